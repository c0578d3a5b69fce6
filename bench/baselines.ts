/**
 * Baselines: what the same work costs without weft, measured in the same process run
 * so every weft number can be read as a ratio.
 *
 * - `loop-noop`: a plain JS loop calling a no-op function. The floor of any dispatch.
 * - `piscina-run`: raw piscina, one `pool.run()` per no-op task, all n submitted at
 *   once, on `workers` threads. A promise and a message round trip per task: what a
 *   naive per-task executor costs.
 * - `postmessage-batched` (batch B, default 1000): the transport's limit. The main thread sends batches of B
 *   integer task ids to `workers` worker threads (at most 2 batches in flight per
 *   worker), and each worker replies with one batch per batch. µs per task = time / n,
 *   one task being one id out and one id back. weft's ratios are against this one.
 * - `postmessage-unbatched`: the same with one id per message (64 in flight per worker):
 *   why the executor batches.
 * - `postmessage-roundtrip`: one id in flight at a time through one echo thread: the
 *   latency of a thread round trip (a wake-up on each side). A chain of tasks on a pool
 *   pays it once per link, so it is the chain's limit as the batched figure is the
 *   independent tasks' limit.
 *
 * Pools and workers start before the clock and stay up across the runs (steady state);
 * each baseline has one untimed warm-up run.
 */
import { once } from 'node:events';
import { Worker } from 'node:worker_threads';
import { Piscina } from 'piscina';
import { median, timeRuns, usPer } from './stats.ts';
import { noop } from './tasks.ts';

export interface BaselineResult {
  readonly name: string;
  readonly n: number;
  readonly median_s: number;
  readonly us_per_task: number;
  /** Extra fields: every timed run, the thread count, the batch size. */
  readonly samples_s: readonly number[];
  readonly workers: number;
  readonly batch?: number;
}

export interface BaselineOptions {
  /** Tasks (or messages) per run. */
  readonly n: number;
  /** Worker threads for the threaded baselines. Default 2. */
  readonly workers?: number;
  /** Timed runs (after one warm-up). Default 5. */
  readonly runs?: number;
  /** Ids per message for the batched postMessage baseline. Default 1000. */
  readonly batch?: number;
  /** Which baselines; default all. */
  readonly only?: readonly BaselineName[];
}

export const BASELINES = ['loop-noop', 'piscina-run', 'postmessage-batched', 'postmessage-unbatched', 'postmessage-roundtrip'] as const;
export type BaselineName = (typeof BASELINES)[number];

/** The baseline the harness divides weft's µs/task by. */
export const REFERENCE_BASELINE: BaselineName = 'postmessage-batched';

export const DEFAULT_BATCH = 1000;
/** The unbatched postMessage baseline is ~10× slower per task: cap its n so it stays short. */
const UNBATCHED_MAX_N = 100_000;
/** The round-trip baseline costs tens of µs per message: cap its n. */
const ROUNDTRIP_MAX_N = 5_000;
/** The loop baseline runs at least this many calls (fewer would time the interpreter, not optimised code). */
const LOOP_MIN_N = 1_000_000;

function result(name: string, n: number, samples: number[], workers: number, batch?: number): BaselineResult {
  const m = median(samples);
  return { name, n, median_s: m, us_per_task: usPer(m, n), samples_s: samples, workers, ...(batch === undefined ? {} : { batch }) };
}

/** A plain loop calling a no-op function n times (the floor). */
export async function loopBaseline(n: number, runs = 5): Promise<BaselineResult> {
  // Call through a mutable slot so the call is not folded away entirely.
  const fns: ((...a: unknown[]) => unknown)[] = [noop];
  let sink = 0;
  const samples = await timeRuns(runs, () => {
    const f = fns[0]!;
    for (let i = 0; i < n; i++) if (f(i) === null) sink++;
  });
  if (sink !== n * (runs + 1)) throw new Error('loop baseline: the no-op did not run');
  return result('loop-noop', n, samples, 1);
}

/** Raw piscina: n concurrent `run()` calls of a no-op on `workers` threads. */
export async function piscinaBaseline(n: number, workers = 2, runs = 5): Promise<BaselineResult> {
  const pool = new Piscina({
    filename: new URL('./piscina-noop.mjs', import.meta.url).href,
    minThreads: workers,
    maxThreads: workers,
    idleTimeout: 60_000,
  });
  try {
    const samples = await timeRuns(runs, async () => {
      const pending = new Array<Promise<unknown>>(n);
      for (let i = 0; i < n; i++) pending[i] = pool.run(null);
      await Promise.all(pending);
    });
    return result('piscina-run', n, samples, workers);
  } finally {
    await pool.destroy();
  }
}

/**
 * `workers` echo threads; `round(n, batch, window)` pushes n ids through them in batches
 * of `batch`, keeping `window` batches in flight per worker, and resolves when every id
 * has come back.
 */
export class EchoWorkers {
  private readonly workers: Worker[];
  private onDone: (() => void) | null = null;
  private next = 0;
  private done = 0;
  private n = 0;
  private batch = 1;

  constructor(count: number) {
    const url = new URL('./postmessage-echo.mjs', import.meta.url);
    // No execArgv: the echo thread needs no TypeScript loader.
    this.workers = Array.from({ length: count }, () => new Worker(url, { execArgv: [] }));
    for (const w of this.workers) {
      w.on('message', (ids: number[]) => this.onReply(w, ids));
    }
  }

  async ready(): Promise<void> {
    await Promise.all(this.workers.map((w) => once(w, 'online')));
  }

  private send(w: Worker): void {
    if (this.next >= this.n) return;
    const end = Math.min(this.n, this.next + this.batch);
    const ids = new Array<number>(end - this.next);
    for (let k = 0; k < ids.length; k++) ids[k] = this.next + k;
    this.next = end;
    w.postMessage(ids);
  }

  private onReply(w: Worker, ids: number[]): void {
    this.done += ids.length;
    if (this.done >= this.n) {
      const done = this.onDone;
      this.onDone = null;
      done?.();
      return;
    }
    this.send(w);
  }

  round(n: number, batch: number, window: number): Promise<void> {
    if (this.onDone !== null) throw new Error('EchoWorkers: a round is already running');
    return new Promise<void>((resolve) => {
      this.n = n;
      this.batch = batch;
      this.next = 0;
      this.done = 0;
      this.onDone = resolve;
      for (let k = 0; k < window; k++) for (const w of this.workers) this.send(w);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.terminate()));
  }
}

/** Batched (or, with batch 1, unbatched) postMessage round trips through `workers` echo threads. */
export async function postMessageBaseline(n: number, workers = 2, runs = 5, batch = DEFAULT_BATCH): Promise<BaselineResult> {
  const echo = new EchoWorkers(workers);
  try {
    await echo.ready();
    const window = batch === 1 ? 64 : 2;
    const samples = await timeRuns(runs, () => echo.round(n, batch, window));
    return result(batch === 1 ? 'postmessage-unbatched' : 'postmessage-batched', n, samples, workers, batch);
  } finally {
    await echo.close();
  }
}

/** One message in flight at a time through one echo thread: the round-trip latency. */
export async function roundTripBaseline(n: number, runs = 5): Promise<BaselineResult> {
  const echo = new EchoWorkers(1);
  try {
    await echo.ready();
    const samples = await timeRuns(runs, () => echo.round(n, 1, 1));
    return result('postmessage-roundtrip', n, samples, 1, 1);
  } finally {
    await echo.close();
  }
}

/** Runs the selected baselines one after the other (never concurrently: they share 2 cores). */
export async function runBaselines(opts: BaselineOptions): Promise<BaselineResult[]> {
  const { n } = opts;
  const workers = opts.workers ?? 2;
  const runs = opts.runs ?? 5;
  const only = new Set<BaselineName>(opts.only ?? BASELINES);
  const out: BaselineResult[] = [];
  if (only.has('loop-noop')) out.push(await loopBaseline(Math.max(n, LOOP_MIN_N), runs));
  if (only.has('postmessage-batched')) out.push(await postMessageBaseline(n, workers, runs, opts.batch ?? DEFAULT_BATCH));
  if (only.has('postmessage-unbatched')) out.push(await postMessageBaseline(Math.min(n, UNBATCHED_MAX_N), workers, runs, 1));
  if (only.has('postmessage-roundtrip')) out.push(await roundTripBaseline(Math.min(n, ROUNDTRIP_MAX_N), runs));
  if (only.has('piscina-run')) out.push(await piscinaBaseline(n, workers, runs));
  return out;
}
