/**
 * A flow file as one ESM bundle that keeps the file's exports, for the storages that ship
 * code (bundle, s3, a kept local copy, a git clone).
 *
 * Like the cluster's code bundles (`cluster/bundle.ts`): esbuild, ESM for node20, with
 * everything the file imports except weft's own files, which stay external as
 * `weft-runtime:/src/…` placeholders (`linkBundle` points them at the weft installation
 * that loads the bundle), names kept. Deterministic: the same sources give the same bytes
 * and sha256. Two differences:
 *
 * - The entry. A cluster bundle imports its modules for their side effects (a worker needs
 *   the `task()` registrations); a flow-run process must find the flow among the module's
 *   exports, so here the flow file itself is the entry point and the bundle exports what
 *   it exports.
 * - No source map. Under tsx source maps are on, and stack frames would name the original
 *   files: `task()` would key the loaded tasks by paths that exist only where the flow was
 *   registered, and pool threads on the loading machine could not import them. Without a
 *   map the tasks belong to the file the loader writes, which they can.
 */
import { relative, resolve as resolvePath, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { bundleHash, RUNTIME_PREFIX, type Bundle } from '../cluster/bundle.ts';
import { StorageError } from './common.ts';

/** weft's `src/` directory: files under it stay external. */
const SRC_DIR = fileURLToPath(new URL('../', import.meta.url));
const OUTFILE = '/weft-flow.mjs';
/** CommonJS dependencies bundled into ESM call `require` for Node's built-in modules. */
const BANNER = 'import { createRequire as __weftCreateRequire } from "node:module";\nconst require = __weftCreateRequire(import.meta.url);';

/** Throws a StorageError `code` naming the first esbuild errors (file:line: text). */
export async function bundleFlow(file: string, code: 'STORAGE_BUILD' | 'STORAGE_LOAD' = 'STORAGE_BUILD'): Promise<Bundle> {
  const { build } = await import('esbuild');
  let result;
  try {
    result = await build({
      entryPoints: [file],
      bundle: true,
      format: 'esm',
      platform: 'node',
      target: 'node20',
      outfile: OUTFILE,
      absWorkingDir: '/',
      write: false,
      // No source map: with source maps on (tsx turns them on), stack frames would name the
      // original files, and `task()` would key its tasks by paths that exist only where the
      // flow was registered. Without one, tasks are keyed by the file the loader writes.
      sourcemap: false,
      // Task names default to function names: renaming a clashing top-level function must not change them.
      keepNames: true,
      banner: { js: BANNER },
      logLevel: 'silent',
      plugins: [
        {
          name: 'weft-runtime',
          setup(b) {
            b.onResolve({ filter: /.*/ }, async (args) => {
              if (args.kind === 'entry-point' || (args.pluginData as { weft?: boolean } | undefined)?.weft === true) return undefined;
              const spec = args.path.startsWith('file://') ? fileURLToPath(args.path) : args.path;
              const r = await b.resolve(spec, { kind: args.kind, importer: args.importer, resolveDir: args.resolveDir, pluginData: { weft: true } });
              if (r.errors.length > 0) return { errors: r.errors };
              if (!r.external && r.namespace === 'file' && r.path.startsWith(SRC_DIR)) {
                return { path: RUNTIME_PREFIX + 'src/' + relative(SRC_DIR, r.path).split(sep).join('/'), external: true };
              }
              return { path: r.path, namespace: r.namespace, external: r.external, sideEffects: r.sideEffects, suffix: r.suffix, pluginData: r.pluginData as unknown };
            });
          },
        },
      ],
    });
  } catch (err) {
    const errors = (err as { errors?: { text: string; location?: { file: string; line: number } | null }[] }).errors;
    const detail =
      errors !== undefined && errors.length > 0
        ? errors
            .slice(0, 3)
            .map((e) => (e.location != null ? `${resolvePath('/', e.location.file)}:${e.location.line}: ${e.text}` : e.text))
            .join('; ')
        : (err as Error).message.split('\n')[0];
    throw new StorageError(code, `cannot bundle ${file}: ${detail}`, { cause: err });
  }
  const js = result.outputFiles.find((f) => f.path.endsWith('.mjs'));
  if (js === undefined) throw new StorageError(code, `cannot bundle ${file}: esbuild produced no output`);
  return { hash: bundleHash(js.contents), code: js.contents };
}
