// Entry of every PoolExecutor worker (piscina thread or forked child process).
// Registers tsx's loader first so that weft's TypeScript sources and the user's `.ts`
// flow modules import as they are, then loads the worker runtime.
import { isMainThread } from 'node:worker_threads';
import { register } from 'tsx/esm/api';

register();
const worker = await import('./pool-worker.ts');

if (isMainThread && process.env.WEFT_POOL_CHILD === '1' && process.send !== undefined) {
  delete process.env.WEFT_POOL_CHILD;
  worker.serveProcess();
}

/** The piscina handler (threads): one long-lived task per worker. */
export default worker.serveThread;
