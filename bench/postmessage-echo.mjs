// Worker of the raw postMessage baseline (bench/baselines.ts): every batch of task ids
// that arrives goes straight back as one reply batch (the outcomes of those ids).
// Plain .mjs: nothing but the transport is measured.
import { parentPort } from 'node:worker_threads';

if (parentPort === null) throw new Error('postmessage-echo.mjs must run in a worker thread');
const port = parentPort;
port.on('message', (batch) => {
  port.postMessage(batch);
});
