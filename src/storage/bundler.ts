/**
 * A flow file as one ESM bundle that keeps the file's exports, for the storages that ship
 * code (bundle, s3, a kept local copy, a git clone, the file in a docker image).
 *
 * `bundleModule` in `cluster/bundle.ts`: the same esbuild run as the cluster's code
 * bundles (ESM for node20, everything the file imports except weft's own files, which
 * stay external as `weft-runtime:/src/…` placeholders that `linkBundle` points at the
 * weft installation loading the bundle; names kept; deterministic bytes and sha256), with
 * two differences:
 *
 * - The entry. A cluster bundle imports its modules for their side effects (a worker needs
 *   the `task()` registrations); a flow-run process must find the flow among the module's
 *   exports, so here the flow file itself is the entry point and the bundle exports what
 *   it exports.
 * - No source map. Under tsx source maps are on, and stack frames would name the original
 *   files: `task()` would key the loaded tasks by paths that exist only where the flow was
 *   registered, and pool threads on the loading machine could not import them. Without a
 *   map the tasks belong to the file the loader writes (or the file in the image), which
 *   they can.
 */
import { bundleModule, type Bundle } from '../cluster/bundle.ts';
import { WeftError } from '../errors.ts';
import { StorageError } from './common.ts';

/** Throws a StorageError `code` naming the first esbuild errors (file:line: text). */
export async function bundleFlow(file: string, code: 'STORAGE_BUILD' | 'STORAGE_LOAD' = 'STORAGE_BUILD'): Promise<Bundle> {
  try {
    return await bundleModule(file);
  } catch (err) {
    if (err instanceof WeftError && err.code === 'BUNDLE_BUILD') throw new StorageError(code, err.message, { cause: err.cause });
    throw err;
  }
}
