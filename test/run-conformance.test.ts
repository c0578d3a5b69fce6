/**
 * One conformance suite for flow runs, run against every executor (STYLE.md row 14):
 * real flows built from the fixture module `fixtures/run-conformance-tasks.ts`, run
 * through `flow.run({ executor, validate: true })` (validate: the scheduler core checks
 * its invariants after every transition).
 *
 * What an executor cannot do by design (the local executor cannot stop a synchronous
 * busy loop, survive `process.exit`, or fail to send a value it never sends) is not
 * a skipped test: those cases are registered only for executors whose capabilities
 * table says they can, so the final report shows no skips.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { sharedCluster } from './helpers/shared-cluster.ts';
import {
  ClusterExecutor,
  LocalExecutor,
  PoolExecutor,
  flatten,
  flow,
  parameter,
  unmapped,
  type Executor,
  type Flow,
  type FlowRunResult,
  type RunOptions,
  type RunProgress,
  type TaskRunRecord,
} from '../src/index.ts';
import {
  MODULE_FILE,
  add,
  asyncBytes,
  boom,
  briefSpinner,
  byteView,
  bytes,
  checksum,
  countTo,
  crash,
  crashOnce,
  dbQuery,
  dbShared,
  double,
  expectedChecksum,
  flaky,
  inc,
  label,
  longAsync,
  longSync,
  maybeSkip,
  notRetried,
  num,
  pair,
  pauser,
  range,
  retryOnce,
  rich,
  slowRetry,
  sleepy,
  spinner,
  sum,
  sumAll,
  throwsCoded,
  throwsString,
  tolerant,
  unsendable,
  unsendableAsync,
  whoAmI,
  whoAmIRetried,
  whoAmILooped,
  type Rich,
  type Seen,
} from './fixtures/run-conformance-tasks.ts';

/** What an executor can do; a case that needs a capability is registered only where it holds. */
interface Capabilities {
  /** Stops a running synchronous task (timeout, cancel) by replacing its worker. */
  stopsSyncTasks: boolean;
  /** Survives a task that kills its worker (`process.exit`), and reruns what was lost. */
  survivesWorkerExit: boolean;
  /** Sends results between threads/processes: an unsendable result fails its task. */
  sendsResults: boolean;
  /** Runs more than one task at once (so a tag limit has something to hold back). */
  parallel: boolean;
  /** Task arguments may be SharedArrayBuffers shared with the runner's thread. */
  sharedMemory: boolean;
  /** Keeps the sign of a zero (structured clone does; msgpack integers have no -0: a cluster sends 0). */
  negativeZero: boolean;
}

interface ExecutorCase {
  name: string;
  make: () => Executor;
  caps: Capabilities;
  /** Once per executor (beforeAll/afterAll): e.g. the cluster its executors connect to. */
  setup?: () => Promise<void>;
  teardown?: () => Promise<void>;
}

/** One cluster for the whole file: a scheduler and two worker processes of two threads each. */
const cluster = sharedCluster();

const EXECUTORS: ExecutorCase[] = [
  {
    name: 'LocalExecutor',
    make: () => new LocalExecutor(),
    caps: { stopsSyncTasks: false, survivesWorkerExit: false, sendsResults: false, parallel: false, sharedMemory: true, negativeZero: true },
  },
  {
    name: 'PoolExecutor threads 2',
    make: () => new PoolExecutor({ threads: 2 }),
    caps: { stopsSyncTasks: true, survivesWorkerExit: true, sendsResults: true, parallel: true, sharedMemory: true, negativeZero: true },
  },
  {
    name: 'PoolExecutor processes 2',
    make: () => new PoolExecutor({ processes: 2 }),
    caps: { stopsSyncTasks: true, survivesWorkerExit: true, sendsResults: true, parallel: true, sharedMemory: false, negativeZero: true },
  },
  {
    name: 'ClusterExecutor 2 workers × 2 threads',
    make: () => new ClusterExecutor({ address: cluster.address() }),
    caps: { stopsSyncTasks: true, survivesWorkerExit: true, sendsResults: true, parallel: true, sharedMemory: false, negativeZero: false },
    setup: cluster.setup,
    teardown: cluster.teardown,
  },
];

const tmp = mkdtempSync(join(tmpdir(), 'weft-run-conf-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
let markers = 0;

/** Wall-clock ms, as task records count them. */
const wallNow = (): number => performance.timeOrigin + performance.now();

/** How long a task run took, by its record (start to outcome); a run that ran has both times. */
function took(t: TaskRunRecord): number {
  expect(t.startMs, `startMs of "${t.key}" (${t.state}), which ran`).toBeGreaterThan(0);
  expect(t.endMs, `endMs of "${t.key}" (${t.state})`).toBeGreaterThanOrEqual(t.startMs);
  return t.endMs - t.startMs;
}

/** The one record of a node that is not mapped. */
function rec(r: FlowRunResult, ref: { readonly node: number }): TaskRunRecord {
  const runs = r.runsOf(ref);
  expect(runs).toHaveLength(1);
  return runs[0]!;
}

/** Mapped children's records (the parent left out). */
const children = (r: FlowRunResult, ref: { readonly node: number }): readonly TaskRunRecord[] => r.runsOf(ref).slice(1);

/** True when no two records' [start, end] intervals overlap (with a little clock slack between threads). */
function noOverlap(records: readonly TaskRunRecord[], slackMs = 2): boolean {
  const byStart = [...records].sort((a, b) => a.startMs - b.startMs);
  for (let i = 1; i < byStart.length; i++) {
    if (byStart[i]!.startMs + slackMs < byStart[i - 1]!.endMs) return false;
  }
  return true;
}

describe.each(EXECUTORS)('flow runs on $name', ({ make, caps, setup, teardown }) => {
  if (setup !== undefined) beforeAll(setup);
  if (teardown !== undefined) afterAll(teardown);
  const run = <O>(f: Flow<O>, opts: RunOptions = {}): Promise<FlowRunResult> =>
    f.run({ executor: make(), validate: true, ...opts });

  // ---- results ----------------------------------------------------------------------

  it('computes a diamond, a chain and a fan-out/fan-in', async () => {
    const f = flow('conf-shapes', () => {
      // diamond: a → (b, c) → d
      const a = num(3);
      const b = double(a);
      const c = inc(a);
      const d = add(b, c);
      // chain
      const chain = inc(inc(inc(inc(num(0)))));
      // fan-out from one source, fan-in into one sink
      const src = num(5);
      const fans = [0, 1, 2, 3, 4, 5].map((k) => add(src, k));
      const fanIn = sumAll(...fans);
      return { a, b, c, d, chain, fanIn, fans };
    });
    const progress: RunProgress[] = [];
    const r = await run(f, { onProgress: (p) => progress.push(p) });
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs.b)).toBe(6);
    expect(r.result(f.outputs.c)).toBe(4);
    expect(r.result(f.outputs.d)).toBe(10);
    expect(r.result(f.outputs.chain)).toBe(4);
    expect(f.outputs.fans.map((x) => r.result(x))).toEqual([5, 6, 7, 8, 9, 10]);
    expect(r.result(f.outputs.fanIn)).toBe(45);
    expect(r.tasks.every((t) => t.state === 'Success' && t.attempts === 1)).toBe(true);
    // Every task ran after its inputs finished.
    const d = rec(r, f.outputs.d);
    expect(d.startMs).toBeGreaterThanOrEqual(rec(r, f.outputs.b).endMs - 2);
    expect(d.startMs).toBeGreaterThanOrEqual(rec(r, f.outputs.c).endMs - 2);
    // The last progress report is the final count.
    expect(progress.at(-1)).toMatchObject({ total: r.tasks.length, done: r.tasks.length, running: 0, failed: 0 });
  });

  it('maps: over a list, mapped→mapped pairwise, reduce, flatten, unmapped, width 0', async () => {
    const f = flow('conf-mapping', () => {
      const xs = range(4);
      const doubled = double.map(xs);
      const bumped = inc.map(xs);
      const paired = add.map(doubled, bumped); // child i gets doubled[i] and bumped[i]
      const plus10 = add.map(xs, unmapped(10));
      const total = sum(paired);
      const pairs = pair.map(range(3));
      const flat = inc.map(flatten(pairs));
      const none = double.map(range(0));
      const noneTotal = sum(none);
      const noneAgain = inc.map(none);
      return { doubled, paired, plus10, total, pairs, flat, none, noneTotal, noneAgain };
    });
    const r = await run(f);
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs.doubled)).toEqual([0, 2, 4, 6]);
    expect(r.result(f.outputs.paired)).toEqual([1, 4, 7, 10]);
    expect(r.result(f.outputs.plus10)).toEqual([10, 11, 12, 13]);
    expect(r.result(f.outputs.total)).toBe(22);
    expect(r.result(f.outputs.pairs)).toEqual([[0, 0], [1, 10], [2, 20]]);
    expect(r.result(f.outputs.flat)).toEqual([1, 1, 2, 11, 3, 21]);
    expect(r.result(f.outputs.none)).toEqual([]);
    expect(r.result(f.outputs.noneAgain)).toEqual([]);
    expect(r.result(f.outputs.noneTotal)).toBe(0);
    expect(r.stateOf(f.outputs.paired)).toBe('Mapped');
    const kids = children(r, f.outputs.paired);
    expect(kids.map((k) => k.mapIndex)).toEqual([0, 1, 2, 3]);
    expect(kids.every((k) => k.state === 'Success')).toBe(true);
    expect(r.runsOf(f.outputs.none)).toHaveLength(1); // width 0: the parent alone
  });

  // ---- errors -----------------------------------------------------------------------

  it('an error fails its task, dependents are TriggerFailed, an unrelated branch succeeds', async () => {
    const f = flow('conf-error', () => {
      const bad = boom(1);
      const next = double(bad);
      const after = inc(next);
      const fine = inc(double(20));
      return { bad, next, after, fine, str: throwsString(), coded: throwsCoded() };
    });
    const r = await run(f);
    expect(r.state).toBe('Failed');
    expect(r.stateOf(f.outputs.bad)).toBe('Failed');
    expect(r.stateOf(f.outputs.next)).toBe('TriggerFailed');
    expect(r.stateOf(f.outputs.after)).toBe('TriggerFailed');
    expect(r.result(f.outputs.fine)).toBe(41);
    expect(r.stateOf(f.outputs.fine)).toBe('Success');
    const err = rec(r, f.outputs.bad).error;
    expect(err?.name).toBe('Error');
    expect(err?.message).toBe('boom in task');
    expect(err?.stack).toContain(MODULE_FILE);
    expect(err?.stack).toContain('boom');
    expect(rec(r, f.outputs.next).error?.name).toBe('TriggerFailed');
    expect(rec(r, f.outputs.next).attempts).toBe(0);
    // Something thrown that is not an Error, and an error class with a code of its own.
    expect(rec(r, f.outputs.str)).toMatchObject({ state: 'Failed', error: { name: 'Error', message: 'a plain string' } });
    expect(rec(r, f.outputs.coded)).toMatchObject({ state: 'Failed', error: { name: 'CodedError', message: 'with a code', code: 'E_CODED' } });
  });

  // ---- retries ----------------------------------------------------------------------

  it('retries: fails twice then succeeds within maxRetries 2; retryOn filters; gives up after maxRetries', async () => {
    const f = flow('conf-retries', () => ({
      ok: flaky(2),
      exhausted: flaky.with({ name: 'flaky-exhausted' })(5),
      filtered: notRetried(),
    }));
    const r = await run(f);
    expect(r.state).toBe('Failed');
    const ok = rec(r, f.outputs.ok);
    expect(ok.state).toBe('Success');
    expect(ok.attempts).toBe(3);
    expect(ok.error).toBeUndefined();
    expect(r.result(f.outputs.ok)).toBe('ok on attempt 3');
    const exhausted = rec(r, f.outputs.exhausted);
    expect(exhausted.state).toBe('Failed');
    expect(exhausted.attempts).toBe(3);
    expect(exhausted.error).toMatchObject({ name: 'FlakyError', message: 'flaky attempt 3' });
    const filtered = rec(r, f.outputs.filtered);
    expect(filtered.state).toBe('Failed');
    expect(filtered.attempts).toBe(1);
    expect(filtered.error).toMatchObject({ name: 'TypeError', message: 'not flaky (attempt 1)' });
  });

  // ---- signals ----------------------------------------------------------------------

  it('signals: skip propagates (unless turned off), loop carries a value, retry reruns, pause pauses the run', async () => {
    const f = flow('conf-signals', () => {
      const s = maybeSkip(-1);
      const down = double(s);
      const downer = inc(down);
      const tol = tolerant(s);
      const notSkipped = maybeSkip(7);
      const looped = countTo(3);
      const retried = retryOnce();
      const paused = pauser();
      const afterPause = double(paused);
      return { s, down, downer, tol, notSkipped, looped, retried, paused, afterPause };
    });
    const r = await run(f);
    expect(r.stateOf(f.outputs.s)).toBe('Skipped');
    expect(r.stateOf(f.outputs.down)).toBe('Skipped');
    expect(r.stateOf(f.outputs.downer)).toBe('Skipped');
    expect(r.result(f.outputs.tol)).toBe('tolerant saw null');
    expect(r.result(f.outputs.notSkipped)).toBe(7);
    expect(r.result(f.outputs.looped)).toBe(303); // carried 3, loopCount 3
    expect(rec(r, f.outputs.looped).attempts).toBe(1); // loop iterations are not attempts
    expect(r.result(f.outputs.retried)).toBe(2);
    expect(rec(r, f.outputs.retried).attempts).toBe(2);
    // A paused task holds its dependents and pauses the run (skips alone would leave it Success).
    expect(r.stateOf(f.outputs.paused)).toBe('Paused');
    expect(r.stateOf(f.outputs.afterPause)).toBe('Pending');
    expect(r.state).toBe('Paused');
  });

  it('a run whose only signal is a skip succeeds', async () => {
    const f = flow('conf-skip-only', () => ({ s: inc(maybeSkip(-5)), ok: double(1) }));
    const r = await run(f);
    expect(r.stateOf(f.outputs.s)).toBe('Skipped');
    expect(r.state).toBe('Success');
  });

  // ---- context ----------------------------------------------------------------------

  it('context() gives key, mapIndex, attempt and loopCount', async () => {
    const f = flow('conf-context', () => ({
      p: parameter('p', 'default-p'),
      one: whoAmI('x'),
      many: whoAmI.map(['a', 'b', 'c']),
      retried: whoAmIRetried('r'),
      looped: whoAmILooped('l'),
    }));
    const r = await run(f, { parameters: { p: 'given-p' } });
    expect(r.state).toBe('Success');
    const base = { flowName: 'conf-context', p: 'given-p', attempt: 1, loopCount: 0 };
    expect(r.result<Seen>(f.outputs.one)).toEqual({ ...base, key: 'whoAmI', mapIndex: -1, x: 'x' });
    expect(r.result<Seen[]>(f.outputs.many)).toEqual(
      ['a', 'b', 'c'].map((x, i) => ({ ...base, key: 'whoAmI-2', mapIndex: i, x })),
    );
    expect(r.result<Seen>(f.outputs.retried)).toEqual({ ...base, key: 'whoAmIRetried', mapIndex: -1, attempt: 2, x: 'r' });
    expect(r.result<Seen>(f.outputs.looped)).toEqual({ ...base, key: 'whoAmILooped', mapIndex: -1, loopCount: 2, x: 'l' });
  });

  // ---- timeouts ---------------------------------------------------------------------

  it('a task past its timeout (async; or sync, stopped or reported when it returns) ends TimedOut; the run carries on', async () => {
    const f = flow('conf-timeout', () => {
      const slow = sleepy();
      const spun = briefSpinner();
      return { slow, spun, next: label(slow), nextSpun: label.with({ name: 'nextSpun' })(spun), fine: double(8) };
    });
    const r = await run(f);
    // Settled at its timeout (it would sleep 5 s); worker replacement time is not the point,
    // and a loaded 2-core CI machine running two test files at once stretches it past 1.5 s.
    expect(took(rec(r, f.outputs.slow))).toBeLessThan(3_000);
    expect(r.stateOf(f.outputs.slow)).toBe('TimedOut');
    expect(rec(r, f.outputs.slow).error?.name).toBe('TaskTimeoutError');
    expect(rec(r, f.outputs.slow).error?.message).toMatch(/sleepy/);
    expect(rec(r, f.outputs.spun)).toMatchObject({ state: 'TimedOut', error: { name: 'TaskTimeoutError' } });
    expect(r.stateOf(f.outputs.next)).toBe('TriggerFailed');
    expect(r.stateOf(f.outputs.nextSpun)).toBe('TriggerFailed');
    expect(r.result(f.outputs.fine)).toBe(16);
    expect(r.state).toBe('Failed');
  });

  if (caps.stopsSyncTasks) {
    it('a synchronous busy loop past its timeout is stopped (TimedOut), and the run carries on', async () => {
      const f = flow('conf-timeout-sync', () => {
        const slow = spinner();
        const again = spinner.with({ name: 'spinner-retried', maxRetries: 1 })();
        return { slow, again, next: label(slow), fine: inc(double(8)) };
      });
      const r = await run(f);
      // Settled at its timeout; the spin lasts 10 s (20 s for the retried one) and the run
      // ended long before. (Measured from the spinner's dispatch: pool start-up is not the point.)
      const slow = rec(r, f.outputs.slow);
      expect(took(slow)).toBeLessThan(3_000);
      expect(wallNow() - slow.startMs).toBeLessThan(7_000);
      expect(r.stateOf(f.outputs.slow)).toBe('TimedOut');
      expect(rec(r, f.outputs.slow).error).toMatchObject({ name: 'TaskTimeoutError' });
      expect(r.stateOf(f.outputs.next)).toBe('TriggerFailed');
      expect(r.result(f.outputs.fine)).toBe(17);
      // A timeout counts as a failure for retries: the retried one timed out twice.
      expect(rec(r, f.outputs.again)).toMatchObject({ state: 'TimedOut', attempts: 2 });
    });
  }

  // ---- cancellation -----------------------------------------------------------------

  /**
   * Run `f`, aborting once the task `key` is Running. Returns the result, how long after
   * the abort the task was settled Cancelled, and how long after it the run ended.
   */
  async function runAndCancel<O>(f: Flow<O>, key: string): Promise<{ r: FlowRunResult; cancelledMs: number; endedMs: number }> {
    const ac = new AbortController();
    let abortedAt = 0;
    let cancelledAt = 0;
    const r = await run(f, {
      signal: ac.signal,
      onTaskState: (e) => {
        if (e.key !== key) return;
        if (e.to === 'Running' && abortedAt === 0) {
          abortedAt = -1;
          setTimeout(() => {
            abortedAt = wallNow();
            ac.abort();
          }, 100);
        }
        if (e.to === 'Cancelled') cancelledAt = e.at;
      },
    });
    expect(abortedAt).toBeGreaterThan(0);
    expect(cancelledAt).toBeGreaterThan(0);
    return { r, cancelledMs: cancelledAt - abortedAt, endedMs: wallNow() - abortedAt };
  }

  it('an AbortSignal cancels the run while an async task runs: it ends Cancelled at once', async () => {
    const f = flow('conf-cancel-async', () => {
      const long = longAsync(10_000);
      return { long, next: label(long) };
    });
    const { r, cancelledMs, endedMs } = await runAndCancel(f, 'longAsync');
    expect(r.state).toBe('Cancelled');
    expect(r.stateOf(f.outputs.long)).toBe('Cancelled');
    expect(r.stateOf(f.outputs.next)).toBe('Cancelled');
    expect(cancelledMs).toBeLessThan(2_000);
    expect(endedMs).toBeLessThan(5_000); // the task would sleep 10 s
  });

  it('an AbortSignal cancels a task waiting for its retry; the run ends at once', async () => {
    const f = flow('conf-cancel-retrying', () => ({ s: slowRetry(), fine: double(2) }));
    const ac = new AbortController();
    let abortedAt = 0;
    const r = await run(f, {
      signal: ac.signal,
      onTaskState: (e) => {
        if (e.to === 'Retrying' && abortedAt === 0) {
          abortedAt = wallNow();
          queueMicrotask(() => ac.abort());
        }
      },
    });
    expect(wallNow() - abortedAt).toBeLessThan(5_000); // the retry delay is 10 s
    expect(r.state).toBe('Cancelled');
    expect(rec(r, f.outputs.s)).toMatchObject({ state: 'Cancelled', attempts: 1 });
  });

  if (caps.stopsSyncTasks) {
    it('an AbortSignal stops a running synchronous task: the run ends Cancelled long before it would finish', async () => {
      const f = flow('conf-cancel-sync', () => {
        const long = longSync(10_000);
        return { long, next: label(long) };
      });
      const { r, cancelledMs, endedMs } = await runAndCancel(f, 'longSync');
      expect(r.state).toBe('Cancelled');
      expect(r.stateOf(f.outputs.long)).toBe('Cancelled');
      expect(r.stateOf(f.outputs.next)).toBe('Cancelled');
      // Settled at once (its worker is replaced), and the run ended long before the 10 s spin.
      expect(cancelledMs).toBeLessThan(2_000);
      expect(endedMs).toBeLessThan(5_000);
      expect(rec(r, f.outputs.long).error?.name).toBe('CancelledError');
    });
  }

  // ---- workers dying ----------------------------------------------------------------

  if (caps.survivesWorkerExit) {
    it('a task that always kills its worker fails as a suspected poison task after 3 deaths; the run finishes', async () => {
      const f = flow('conf-poison', () => ({ bad: crash(), next: label(crash.with({ name: 'crash-b' })()), fine: inc(double(1)) }));
      const r = await run(f);
      expect(r.state).toBe('Failed');
      const bad = rec(r, f.outputs.bad);
      expect(bad.state).toBe('Failed');
      expect(bad.error?.message).toMatch(/suspected poison task/);
      expect(bad.error?.message).toMatch(/3 workers died/);
      expect(bad.error?.name).toBe('WorkerLostError');
      // The error names the task and the three workers that died under it.
      expect(bad.error?.message).toMatch(/^task "crash" is a suspected poison task: 3 workers died while running it \(workers: [^,]+, [^,]+, [^,]+\)$/);
      expect(r.stateOf(f.outputs.next)).toBe('TriggerFailed');
      expect(r.result(f.outputs.fine)).toBe(3);
      // Dispatched three times, each on a worker that then died.
      expect(r.story(f.outputs.bad).filter((l) => /-> running/.test(l))).toHaveLength(3);
    });

    it('a task that kills its worker only on its first run succeeds on the rerun', async () => {
      const marker = join(tmp, `crash-once-${++markers}`);
      const f = flow('conf-crash-once', () => {
        const c = crashOnce(marker);
        return { c, next: label(c), fine: double(21) };
      });
      const r = await run(f);
      expect(r.state).toBe('Success');
      expect(r.result(f.outputs.c)).toBe('survived');
      expect(r.result(f.outputs.next)).toBe('<survived>');
      expect(r.result(f.outputs.fine)).toBe(42);
      expect(rec(r, f.outputs.c).state).toBe('Success');
    });
  }

  // ---- tag limits -------------------------------------------------------------------

  it('tagLimits { db: 1 }: never two db tasks at once (timing records)', async () => {
    const f = flow('conf-tags', () => ({
      q: dbQuery.map([1, 2, 3, 4]),
      q2: dbQuery.with({ name: 'dbQuery-single' })(5),
      free: double.map([1, 2, 3]),
    }));
    const r = await run(f, { tagLimits: { db: 1 } });
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs.q)).toEqual([1, 2, 3, 4]);
    const dbRuns = [...children(r, f.outputs.q), rec(r, f.outputs.q2)];
    expect(dbRuns.every((t) => t.startMs > 0 && t.endMs >= t.startMs)).toBe(true);
    expect(noOverlap(dbRuns)).toBe(true);
  });

  if (caps.parallel) {
    it('without a tag limit the same db tasks do overlap (so the check above means something)', async () => {
      const f = flow('conf-tags-free', () => ({ q: dbQuery.map([1, 2, 3, 4]) }));
      const r = await run(f);
      expect(r.state).toBe('Success');
      expect(noOverlap(children(r, f.outputs.q))).toBe(false);
    });
  }

  if (caps.sharedMemory) {
    it('tagLimits { db: 1 }: a shared counter never sees two db tasks at once', async () => {
      const counter = new SharedArrayBuffer(8);
      const f = flow('conf-tags-shared', () => ({ q: dbShared.map([1, 2, 3, 4, 5], unmapped(counter)) }));
      const r = await run(f, { tagLimits: { db: 1 } });
      expect(r.state).toBe('Success');
      const a = new Int32Array(counter);
      expect(Atomics.load(a, 0)).toBe(0);
      expect(Atomics.load(a, 1)).toBe(1);
    });
  }

  // ---- what travels -----------------------------------------------------------------

  if (caps.sendsResults) {
    it('a result that cannot be sent (a function) fails its task with TaskSerializationError; the run carries on', async () => {
      const f = flow('conf-unsendable', () => {
        const u = unsendable();
        return { u, ua: unsendableAsync(), next: label(u), fine: inc(double(2)) };
      });
      const r = await run(f);
      expect(r.state).toBe('Failed');
      const u = rec(r, f.outputs.u);
      expect(u.state).toBe('Failed');
      expect(u.error?.name).toBe('TaskSerializationError');
      expect(u.error?.message).toMatch(/unsendable/);
      expect(r.stateOf(f.outputs.next)).toBe('TriggerFailed');
      expect(r.result(f.outputs.fine)).toBe(5);
      expect(rec(r, f.outputs.ua).error?.name).toBe('TaskSerializationError');
      expect(rec(r, f.outputs.ua).error?.message).toMatch(/unsendableAsync/);
    });
  }

  it('ArrayBuffer, Uint8Array and structured-clone values arrive intact, also as arguments of the next task', async () => {
    const n = 4096;
    const f = flow('conf-bytes', () => {
      const buf = bytes(n);
      const abuf = asyncBytes(n);
      return { rich: rich(), buf, abuf, view: byteView(300), check: checksum(buf), acheck: checksum(abuf), empty: bytes(0) };
    });
    const r = await run(f);
    expect(r.state).toBe('Success');
    const buf = r.result<ArrayBuffer>(f.outputs.buf);
    expect(buf).toBeInstanceOf(ArrayBuffer);
    expect(buf.byteLength).toBe(n);
    const v = new Uint8Array(buf);
    expect(v.every((b, i) => b === ((i * 7 + 3) & 0xff))).toBe(true);
    const view = r.result<Uint8Array>(f.outputs.view);
    expect(view).toBeInstanceOf(Uint8Array);
    expect(Array.from(view)).toEqual(Array.from({ length: 300 }, (_, i) => (i * 13 + 1) & 0xff));
    expect(r.result(f.outputs.check)).toEqual({ length: n, sum: expectedChecksum(n), isArrayBuffer: true });
    expect(r.result(f.outputs.acheck)).toEqual({ length: n, sum: expectedChecksum(n), isArrayBuffer: true });
    expect(new Uint8Array(r.result<ArrayBuffer>(f.outputs.abuf))).toEqual(v);
    expect(r.result<ArrayBuffer>(f.outputs.empty).byteLength).toBe(0);
    // Values beyond JSON keep their types (structured clone).
    const v2 = r.result<Rich>(f.outputs.rich);
    expect(v2.map).toEqual(new Map([['a', 1], ['b', 2]]));
    expect(v2.set).toEqual(new Set([1, 2, 3]));
    expect(v2.date).toBeInstanceOf(Date);
    expect(v2.date.toISOString()).toBe('2024-01-02T03:04:05.000Z');
    expect(v2.big).toBe(2n ** 70n);
    expect(v2.nested.a).toEqual([1, null, undefined, 4]);
    expect(v2.nested.a).toHaveLength(4);
    expect(v2.nested.s).toBe('héllo ✓');
    expect(v2.nested.re).toEqual(/x+/gi);
    expect(v2.typed).toEqual(new Float64Array([0.5, -1, Infinity]));
    expect(Object.is(v2.neg0, caps.negativeZero ? -0 : 0)).toBe(true);
    expect(v2.nan).toBeNaN();
  });
});
