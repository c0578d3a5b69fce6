// Entry of every PoolExecutor worker (piscina thread or forked child process).
//
// Registers tsx's ESM loader hooks first, so that weft's TypeScript sources and the
// user's `.ts` flow modules import as they are, then loads the worker runtime.
//
// Start-up cost matters here (it is paid by every worker of every cold pool): we hand
// tsx's hooks module straight to `module.register` (what `tsx/esm/api`'s `register()`
// does on Node 20) instead of importing `tsx/esm/api`, which would also load tsx's whole
// bundle and esbuild's JS API into this thread for nothing — the hooks run in Node's
// loader thread, which loads them itself.
// (An inherited `--import tsx` does not make this redundant: on Node 20 tsx installs its
// ESM hooks from the main thread only; in workers it adds just its CommonJS hooks.)
import { isMainThread } from 'node:worker_threads';
import { register } from 'node:module';

register(import.meta.resolve('tsx/esm'), { parentURL: import.meta.url, data: {} });
// Marks this thread/process as a weft worker: `Flow.run()` refuses to run here, so a flow
// module that runs itself at its top level fails with a clear error instead of starting
// a pool inside every worker that imports it.
globalThis[Symbol.for('weft.worker')] = true;
process.setSourceMapsEnabled(true);
const worker = await import('./pool-worker.ts');

if (isMainThread && process.env.WEFT_POOL_CHILD === '1' && process.send !== undefined) {
  delete process.env.WEFT_POOL_CHILD;
  worker.serveProcess();
}

/** The piscina handler (threads): one long-lived task per worker. */
export default worker.serveThread;

