/**
 * LocalStorage: the flow's code stays on the machine that registered it.
 *
 * By default the ref names the flow file where it is (its absolute path) and the host it
 * is on; a run of it carries the label `host:<hostname>`, which only an agent on that
 * host has (agents add their own host label), and the flow-run process imports the file
 * as it is, so its relative imports, its `node_modules` and the files it reads next to
 * itself all work as they did at registration. Edits to the file apply to later runs.
 *
 * With a `directory` (or `copy: true`, default directory `~/.weft/flows`) the flow is
 * instead bundled at registration (with everything it imports, weft excepted) into
 * `<directory>/<flow>/<sha256>.mjs`: a copy weft keeps, unaffected by later edits. A
 * single file cannot be copied alone (its relative imports would break), hence a bundle.
 * The kept file is the unlinked bundle; a load verifies its hash and writes a copy linked
 * to the weft installation of the flow-run process into the load's work directory.
 */
import { mkdir, readFile, rm, stat } from 'node:fs/promises';
import { homedir, hostname } from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { isBundleHash } from '../cluster/bundle.ts';
import { bundleFlow } from './bundler.ts';
import { hostLabel, loadedName, oneLine, safeName, scratchDir, StorageError, verifyBundle, writeAtomic, writeLinked } from './common.ts';
import type { BuildContext, LoadContext, LoadedCode, Storage, StorageRef } from './types.ts';

export type LocalRef = Extract<StorageRef, { kind: 'local' }>;

export interface LocalStorageOptions {
  /** Keep a bundled copy of the flow in this directory (under `<flow>/<sha256>.mjs`) instead of naming the file. */
  readonly directory?: string;
  /** Keep a bundled copy in `directory`, default `~/.weft/flows`. Implied by `directory`. */
  readonly copy?: boolean;
}

/** `~/.weft/flows`: where `LocalStorage({ copy: true })` keeps its bundles. */
export function defaultFlowsDirectory(): string {
  return join(homedir(), '.weft', 'flows');
}

export class LocalStorage implements Storage {
  readonly kind = 'local' as const;
  readonly directory: string | null;

  constructor(opts: LocalStorageOptions = {}) {
    if (opts.directory !== undefined && (typeof opts.directory !== 'string' || opts.directory === '')) {
      throw new StorageError('STORAGE_INVALID', 'local storage: "directory" must be a non-empty path');
    }
    this.directory = opts.directory !== undefined ? resolve(opts.directory) : opts.copy === true ? defaultFlowsDirectory() : null;
  }

  async build(ctx: BuildContext): Promise<LocalRef> {
    const file = resolve(ctx.flowFile);
    await mustBeFile(file, 'STORAGE_BUILD', `local storage: flow file ${file}`);
    const host = hostname();
    if (this.directory === null) return { kind: 'local', path: file, host, flow: ctx.flowName };
    const { hash, code } = await bundleFlow(file);
    const dir = join(this.directory, safeName(ctx.flowName));
    const path = join(dir, `${hash}.mjs`);
    try {
      await mkdir(dir, { recursive: true });
      await writeAtomic(path, code);
    } catch (err) {
      throw new StorageError('STORAGE_BUILD', `local storage: cannot keep the flow's bundle in ${dir}: ${oneLine(err)}`, { cause: err });
    }
    ctx.log?.(`kept ${ctx.flowName} as ${path}`);
    return { kind: 'local', path, host, flow: ctx.flowName, hash };
  }

  labels(ref: StorageRef): readonly string[] {
    return ref.kind === 'local' ? [hostLabel(ref.host)] : [];
  }
}

export function localStorage(opts?: LocalStorageOptions): LocalStorage {
  return new LocalStorage(opts);
}

export async function loadLocal(ref: LocalRef, ctx: LoadContext): Promise<LoadedCode> {
  const here = hostname();
  if (ref.host !== here) {
    throw new StorageError(
      'STORAGE_LOAD',
      `local storage: flow "${ref.flow}" is kept on host "${ref.host}", and this is "${here}" (only an agent labelled ${hostLabel(ref.host)} can run it)`,
    );
  }
  if (!isAbsolute(ref.path)) throw new StorageError('STORAGE_INVALID', `local storage: "${ref.path}" is not an absolute path`);
  await mustBeFile(ref.path, 'STORAGE_LOAD', `local storage: flow file ${ref.path}`);
  if (ref.hash === undefined) return { module: ref.path, flow: ref.flow, cleanup: async () => {} };

  if (!isBundleHash(ref.hash)) throw new StorageError('STORAGE_INVALID', `local storage: "${ref.hash}" is not a sha256 hex hash`);
  let code: Uint8Array;
  try {
    code = await readFile(ref.path);
  } catch (err) {
    throw new StorageError('STORAGE_LOAD', `local storage: cannot read ${ref.path}: ${oneLine(err)}`, { cause: err });
  }
  verifyBundle(code, ref.hash, `local storage: ${ref.path}`);
  const dir = await scratchDir(ctx.workDir, 'local-');
  try {
    const module = await writeLinked(dir, loadedName(ref.flow), code);
    return { module, flow: ref.flow, cleanup: () => rm(dir, { recursive: true, force: true }) };
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

async function mustBeFile(path: string, code: 'STORAGE_BUILD' | 'STORAGE_LOAD', what: string): Promise<void> {
  let isFile: boolean;
  try {
    isFile = (await stat(path)).isFile();
  } catch (err) {
    const c = (err as { code?: unknown }).code;
    throw new StorageError(code, `${what} ${c === 'ENOENT' ? 'does not exist' : `cannot be read: ${oneLine(err)}`}`, { cause: err });
  }
  if (!isFile) throw new StorageError(code, `${what} is not a file`);
}
