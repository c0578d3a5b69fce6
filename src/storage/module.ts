/**
 * ModuleStorage: the flow lives in an installed package, named by its import specifier
 * (`@acme/flows/etl`); every machine that runs it has the package installed (in its
 * image, or next to weft). Nothing is copied at registration.
 *
 * A load resolves the specifier to a file the way Node's ESM loader resolves an import
 * written in a module of the directory `cwd` (the ref's, else the flow-run process's
 * working directory): `node_modules` lookup upwards, package `exports` with the `import`,
 * `node` and `default` conditions, `main`. Node 20 cannot resolve from another directory
 * (`import.meta.resolve` ignores a parent without a flag, and `require.resolve` applies the
 * `require` condition), so the resolution is esbuild's, which follows the same rules. The
 * file is imported as it is: it finds `weft` and its other dependencies where it is
 * installed.
 */
import { stat } from 'node:fs/promises';
import { isAbsolute, resolve } from 'node:path';
import { oneLine, StorageError } from './common.ts';
import type { BuildContext, LoadContext, LoadedCode, Storage, StorageRef } from './types.ts';

export type ModuleRef = Extract<StorageRef, { kind: 'module' }>;

export interface ModuleStorageOptions {
  /** An import specifier: a package (`pkg`, `@scope/pkg`) or a subpath it exports (`pkg/flows/etl`). */
  readonly specifier: string;
  /** Resolve it from this directory (default: the flow-run process's working directory). */
  readonly cwd?: string;
}

export class ModuleStorage implements Storage {
  readonly kind = 'module' as const;
  readonly specifier: string;
  readonly cwd: string | undefined;

  constructor(opts: ModuleStorageOptions) {
    if (typeof opts?.specifier !== 'string' || opts.specifier.trim() === '') {
      throw new StorageError('STORAGE_INVALID', 'module storage: "specifier" must be a non-empty import specifier');
    }
    this.specifier = opts.specifier.trim();
    this.cwd = opts.cwd !== undefined ? resolve(opts.cwd) : undefined;
  }

  async build(ctx: BuildContext): Promise<ModuleRef> {
    // The package need not be installed here (it may exist only where runs start): say so, do not fail.
    try {
      const file = await resolveSpecifier(this.specifier, this.cwd ?? process.cwd());
      ctx.log?.(`module storage: ${this.specifier} resolves here to ${file}`);
    } catch (err) {
      ctx.log?.(`module storage: warning: ${oneLine(err)}; the machines that run ${ctx.flowName} must have it installed`);
    }
    return { kind: 'module', specifier: this.specifier, ...(this.cwd !== undefined ? { cwd: this.cwd } : {}), flow: ctx.flowName };
  }

  labels(): readonly string[] {
    return [];
  }
}

export function moduleStorage(opts: ModuleStorageOptions): ModuleStorage {
  return new ModuleStorage(opts);
}

export async function loadModule(ref: ModuleRef, _ctx: LoadContext): Promise<LoadedCode> {
  if (ref.cwd !== undefined && !isAbsolute(ref.cwd)) throw new StorageError('STORAGE_INVALID', `module storage: cwd "${ref.cwd}" is not an absolute path`);
  const file = await resolveSpecifier(ref.specifier, ref.cwd ?? process.cwd(), 'STORAGE_LOAD');
  return { module: file, flow: ref.flow, cleanup: async () => {} };
}

/**
 * The file `specifier` names when imported from a module in `dir` (see the module
 * comment). Throws a StorageError naming the specifier, the directory and the cause.
 */
export async function resolveSpecifier(specifier: string, dir: string, code: 'STORAGE_BUILD' | 'STORAGE_LOAD' = 'STORAGE_BUILD'): Promise<string> {
  const fail = (why: string, cause?: unknown): StorageError =>
    new StorageError(code, `module storage: cannot resolve "${specifier}" from ${dir}: ${why}`, cause !== undefined ? { cause } : undefined);
  try {
    if (!(await stat(dir)).isDirectory()) throw fail('not a directory');
  } catch (err) {
    if (err instanceof StorageError) throw err;
    throw fail((err as { code?: unknown }).code === 'ENOENT' ? 'no such directory' : oneLine(err), err);
  }
  const { build } = await import('esbuild');
  let found: { path: string; namespace: string; external: boolean } | null = null;
  try {
    await build({
      stdin: { contents: `import ${JSON.stringify(specifier)};`, resolveDir: dir, sourcefile: 'weft-resolve.js', loader: 'js' },
      bundle: true,
      write: false,
      format: 'esm',
      platform: 'node',
      // Node's conditions and fields: no `module` condition, `main` only.
      conditions: [],
      mainFields: ['main'],
      logLevel: 'silent',
      plugins: [
        {
          name: 'weft-resolve',
          setup(b) {
            b.onResolve({ filter: /.*/ }, async (args) => {
              if (args.kind === 'entry-point' || (args.pluginData as { inner?: boolean } | undefined)?.inner === true) return undefined;
              const r = await b.resolve(args.path, { kind: args.kind, resolveDir: args.resolveDir, importer: args.importer, pluginData: { inner: true } });
              if (r.errors.length > 0) return { errors: r.errors };
              found = { path: r.path, namespace: r.namespace, external: r.external };
              return { path: specifier, external: true };
            });
          },
        },
      ],
    });
  } catch (err) {
    const first = (err as { errors?: { text: string }[] }).errors?.[0]?.text;
    throw fail(first !== undefined ? first.replace(/\.$/, '') : oneLine(err), err);
  }
  const r = found as { path: string; namespace: string; external: boolean } | null;
  if (r === null || r.namespace !== 'file' || r.external || r.path === '') throw fail('it is not a module file (a built-in module?)');
  return r.path;
}
