/**
 * What the storages share: their error, the bundling of a flow file, and the writing of
 * a fetched bundle where the flow-run process imports it.
 *
 * Bundles (BundleStorage, S3Storage, a kept LocalStorage copy, a Git clone) are made by
 * `bundleFlow` (`bundler.ts`): weft's own files stay external as `weft-runtime:/`
 * placeholders, so the stored bytes do not depend on where weft is installed. A loader
 * verifies the bytes against the sha256 the ref names, links the placeholders to *this*
 * installation (`linkBundle`) and writes the result to a file of its own under the load's
 * work directory. That file is the flow's module: its `task()` calls register under its
 * own file URL, which pool threads and worker processes on this machine can import too.
 * (A file named `<sha256>.mjs` inside a `weft-bundles/` directory would instead have its
 * tasks keyed by the author's original paths, which exist only on the author's machine;
 * the names chosen here never take that form.)
 */
import { mkdir, mkdtemp, rename, writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { bundleHash, isBundleHash, linkBundle } from '../cluster/bundle.ts';
import { WeftError } from '../errors.ts';

/**
 * A storage failed. `code`: STORAGE_INVALID (a malformed ref, spec or option),
 * STORAGE_BUILD (registration could not put the code in place), STORAGE_LOAD (a flow-run
 * process could not get it back). The message is one line naming the place and the cause.
 */
export class StorageError extends WeftError {
  constructor(code: 'STORAGE_INVALID' | 'STORAGE_BUILD' | 'STORAGE_LOAD', message: string, options?: { cause?: unknown }) {
    super(code, message, options);
    this.name = 'StorageError';
  }
}

/** The label a flow kept on this machine requires of an agent (`host:<hostname>`). */
export function hostLabel(host: string = hostname()): string {
  return `host:${host}`;
}

/** The first line of anything thrown. */
export function oneLine(err: unknown): string {
  let msg: string;
  if (err instanceof AggregateError && err.errors.length > 0 && err.message === '') msg = oneLine(err.errors[0]);
  else if (err instanceof Error) msg = err.message;
  else msg = String(err);
  const line = msg.split('\n').find((l) => l.trim() !== '') ?? '';
  return line.trim() === '' ? (err instanceof Error ? err.name : 'unknown error') : line.trim();
}

/** A flow name as a file name component. */
export function safeName(flow: string): string {
  const s = flow.replace(/[^A-Za-z0-9._-]+/g, '_').replace(/^\.+/, '_');
  return s === '' ? 'flow' : s.slice(0, 100);
}

/** Throws unless `code` hashes to `hash` (`what` names where the bytes came from). */
export function verifyBundle(code: Uint8Array, hash: string, what: string): void {
  if (!isBundleHash(hash)) throw new StorageError('STORAGE_INVALID', `${what}: "${hash}" is not a sha256 hex hash`);
  const got = bundleHash(code);
  if (got !== hash) throw new StorageError('STORAGE_LOAD', `${what}: the bytes hash to ${got}, not to the registered ${hash} (changed since registration?)`);
}

/** A fresh directory `<workDir>/<prefix>XXXXXX` for one load. */
export async function scratchDir(workDir: string, prefix: string): Promise<string> {
  try {
    await mkdir(workDir, { recursive: true });
    return await mkdtemp(join(workDir, prefix));
  } catch (err) {
    throw new StorageError('STORAGE_LOAD', `cannot create a directory in the work directory ${workDir}: ${oneLine(err)}`, { cause: err });
  }
}

/** Link a verified bundle to this installation and write it as `<dir>/<name>` (atomically); returns the path. */
export async function writeLinked(dir: string, name: string, code: Uint8Array): Promise<string> {
  const file = join(dir, name);
  try {
    await mkdir(dir, { recursive: true });
    const tmp = `${file}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
    await writeFile(tmp, linkBundle(code));
    await rename(tmp, file);
  } catch (err) {
    throw new StorageError('STORAGE_LOAD', `cannot write the flow's code to ${file}: ${oneLine(err)}`, { cause: err });
  }
  return file;
}

/** Write `code` as is (unlinked) to `file` atomically. */
export async function writeAtomic(file: string, code: Uint8Array): Promise<void> {
  const tmp = `${file}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
  await writeFile(tmp, code);
  await rename(tmp, file);
}

/** The file name a loaded bundle of `flow` gets (never `<sha256>.mjs`: see the module comment). */
export function loadedName(flow: string): string {
  return `${safeName(flow)}.flow.mjs`;
}
