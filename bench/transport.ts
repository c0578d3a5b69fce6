/**
 * Quick transport measurement: 100k independent no-op tasks through PoolExecutor on
 * 2 threads (driven like the runner: submit up to freeSlots(), refill from onOutcomes),
 * against raw batched postMessage round trips to 2 plain worker_threads in the same
 * process. Prints µs per task, median of 5 runs each.
 *
 *   npx tsx bench/transport.ts [tasks=100000] [threads=2] [prefetch]
 */
import { Worker } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';
import { PoolExecutor } from '../src/executor/pool.ts';
import type { Outcome, TaskCall } from '../src/executor/types.ts';

const N = Number(process.argv[2] ?? 100_000);
const THREADS = Number(process.argv[3] ?? 2);
const PREFETCH = process.argv[4] === undefined ? undefined : Number(process.argv[4]);
const MODULE = new URL('../test/fixtures/exec-tasks.ts', import.meta.url).href;
const NOOP = `${MODULE}#noop`;
const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;

async function poolRun(ex: PoolExecutor, calls: TaskCall[], done: { resolve: () => void; got: number }): Promise<number> {
  done.got = 0;
  const t0 = performance.now();
  const finished = new Promise<void>((r) => (done.resolve = r));
  let next = 0;
  const feed = (): void => {
    const free = Math.min(ex.freeSlots(), N - next);
    if (free > 0) {
      ex.submit(calls.slice(next, next + free));
      next += free;
    }
  };
  (done as { feed?: () => void }).feed = feed;
  feed();
  await finished;
  return ((performance.now() - t0) * 1000) / N;
}

async function benchPool(): Promise<number[]> {
  const ex = new PoolExecutor({ threads: THREADS, ...(PREFETCH ? { prefetch: PREFETCH } : {}) });
  const state = { resolve: () => {}, got: 0, feed: undefined as undefined | (() => void) };
  await ex.start({
    flowName: 'bench',
    modules: [MODULE],
    taskKeys: [NOOP],
    parameters: {},
    onOutcomes(outs: Outcome[]) {
      state.got += outs.length;
      if (state.got >= N) state.resolve();
      else state.feed?.();
    },
  });
  const res: number[] = [];
  for (let r = 0; r < 6; r++) {
    const calls: TaskCall[] = [];
    for (let i = 0; i < N; i++) {
      calls.push({ id: i, runId: r, taskKey: NOOP, key: 'noop', args: [], timeoutMs: 0, mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined });
    }
    const us = await poolRun(ex, calls, state);
    if (r > 0) res.push(us); // first run warms up
  }
  await ex.shutdown();
  return res;
}

/** Raw: batches of 256 `{ id, args: [] }` to a worker that answers with the ids. */
async function benchRaw(): Promise<number[]> {
  const src = `
    const { parentPort } = require('node:worker_threads');
    parentPort.on('message', (batch) => {
      const ids = new Array(batch.length);
      for (let i = 0; i < batch.length; i++) ids[i] = batch[i].id;
      parentPort.postMessage(ids);
    });`;
  const workers = Array.from({ length: THREADS }, () => new Worker(src, { eval: true }));
  const B = 256;
  const res: number[] = [];
  for (let r = 0; r < 6; r++) {
    const t0 = performance.now();
    let sent = 0;
    let got = 0;
    await new Promise<void>((resolve) => {
      const send = (w: Worker): void => {
        if (sent >= N) return;
        const n = Math.min(B, N - sent);
        const batch = new Array(n);
        for (let i = 0; i < n; i++) batch[i] = { id: sent + i, args: [] };
        sent += n;
        w.postMessage(batch);
      };
      for (const w of workers) {
        w.removeAllListeners('message');
        w.on('message', (ids: number[]) => {
          got += ids.length;
          if (got >= N) resolve();
          else send(w);
        });
        send(w);
        send(w); // two batches deep
      }
    });
    const us = ((performance.now() - t0) * 1000) / N;
    if (r > 0) res.push(us);
  }
  await Promise.all(workers.map((w) => w.terminate()));
  return res;
}

const pool = await benchPool();
const raw = await benchRaw();
console.log(`PoolExecutor ${THREADS} threads, ${N} no-op tasks: median ${median(pool).toFixed(3)} µs/task  runs ${pool.map((x) => x.toFixed(3)).join(' ')}`);
console.log(`raw batched postMessage ${THREADS} workers:        median ${median(raw).toFixed(3)} µs/task  runs ${raw.map((x) => x.toFixed(3)).join(' ')}`);
