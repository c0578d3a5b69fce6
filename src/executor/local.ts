/**
 * LocalExecutor: runs task calls in this thread, one after another. For debugging
 * (breakpoints, stack traces, closures work) and for runs of tiny tasks, where moving
 * calls to another thread would cost more than running them.
 *
 * - `submit` only queues; a drain scheduled with `setImmediate` runs the queue in order
 *   and delivers every outcome it produced in one `onOutcomes` batch.
 * - A synchronous task is called directly: no promise, no closure, one clock read per
 *   call. A task that returns a thenable is awaited (the drain pauses, and resumes when
 *   it settles): calls still run one at a time.
 * - Timeouts: an async call races a timer; on expiry its outcome is 'timeout' and its
 *   later result is ignored (the promise cannot be stopped, only abandoned). A
 *   synchronous task cannot be interrupted in-process: if it ran past its timeout, its
 *   outcome is 'timeout' once it returns. Use PoolExecutor to really stop runaway tasks.
 * - Cancel: queued calls end 'cancelled'; a running async call ends 'cancelled' at once
 *   (its later result is ignored).
 */
import { performance } from 'node:perf_hooks';
import { setCurrentContext, type TaskContext } from '../flow/context.ts';
import { CancelledError, TaskTimeoutError, serializeError, type SerializedError } from '../errors.ts';
import { getTask } from '../flow/registry.ts';
import { loadTasks, modulesLoaded, resolveTask, type TaskFn } from './pool-tasks.ts';
import type { Executor, ExecutorSession, Outcome, OutcomeStatus, TaskCall } from './types.ts';

export interface LocalExecutorOptions {
  /** Calls accepted at once (`freeSlots()`); default 1024. */
  batchSize?: number;
  /**
   * Yield to the event loop after running calls for this long (ms), delivering the
   * outcomes so far; 0 (default) drains the whole queue in one go. A cluster worker sets
   * it so that outcomes stream back while the rest of a deep queue runs.
   */
  sliceMs?: number;
  /**
   * Runs every call: `around(call, fn, args)` must call `fn(...args)` once and return
   * what it returns (or throw what it throws). For a host that gives each task a scope
   * of its own, such as a cluster worker attributing console output to the task that
   * wrote it. Default: `fn(...args)` directly.
   */
  around?: (call: TaskCall, fn: TaskFn, args: unknown[]) => unknown;
}

type Mutable<T> = { -readonly [K in keyof T]: T[K] };

/** The async call the drain is waiting for. */
interface Running {
  readonly call: TaskCall;
  readonly start: number;
  timer: NodeJS.Timeout | null;
  /** Settled (by the task, its timeout or a cancel): later settlements are ignored. */
  done: boolean;
}

/** Rounds of `drain` in one turn when outcomes bring new calls (see `drain`). */
const RE_DRAIN_ROUNDS = 256;
const RE_DRAIN_MS = 2;

export class LocalExecutor implements Executor {
  readonly kind = 'local';
  readonly workers = 1;
  private readonly capacity: number;
  private readonly sliceMs: number;
  private readonly around: ((call: TaskCall, fn: TaskFn, args: unknown[]) => unknown) | null;
  /** The last drain stopped at its time slice with calls still queued. */
  private sliced = false;
  private session: ExecutorSession | null = null;
  private ctx: Mutable<TaskContext> | null = null;
  private closed = false;

  /** Queued calls, FIFO from `head` (null = cancelled). */
  private queue: (TaskCall | null)[] = [];
  private head = 0;
  /** Calls queued or running. Invariant: accepted ≤ capacity. */
  private accepted = 0;
  private running: Running | null = null;
  /** Outcomes of the current drain, delivered together. */
  private out: Outcome[] = [];
  private immediate: NodeJS.Immediate | null = null;
  // One-entry cache: consecutive calls of one task skip the registry lookup.
  private lastKey = '';
  private lastFn: TaskFn | null = null;
  private readonly origin = performance.timeOrigin;
  /** Inside `drain` (a task or a delivery is on the stack): `runNow` leaves it to the scheduled turn. */
  private draining = false;
  private readonly drainCb = (): void => {
    this.immediate = null;
    this.draining = true;
    try {
      this.drain();
    } finally {
      this.draining = false;
    }
  };

  constructor(options: LocalExecutorOptions = {}) {
    this.sliceMs = options.sliceMs ?? 0;
    this.around = options.around ?? null;
    const n = options.batchSize ?? 1024;
    if (!Number.isInteger(n) || n < 1) throw new RangeError(`LocalExecutor: batchSize must be a positive integer, got ${String(n)}`);
    this.capacity = n;
  }

  async start(session: ExecutorSession): Promise<void> {
    if (this.session !== null) throw new Error('LocalExecutor.start() called twice');
    await loadTasks(session.modules, session.taskKeys, 'this thread');
    this.begin(session);
  }

  /**
   * `start` without a wait, when nothing needs importing (every module was imported here
   * before and no task key is asked for): true once started, false to call `start`.
   */
  startNow(session: ExecutorSession): boolean {
    if (this.session !== null) throw new Error('LocalExecutor.start() called twice');
    if (session.taskKeys.length > 0 || !modulesLoaded(session.modules)) return false;
    this.begin(session);
    return true;
  }

  private begin(session: ExecutorSession): void {
    this.session = session;
    this.ctx = {
      flowName: session.flowName,
      key: '',
      mapIndex: -1,
      attempt: 1,
      loopCount: 0,
      loopResult: undefined,
      parameters: session.parameters,
    };
  }

  freeSlots(): number {
    return this.closed ? 0 : this.capacity - this.accepted;
  }

  submit(calls: TaskCall[]): void {
    const n = calls.length;
    if (n === 0) return;
    if (this.session === null || this.closed) throw new Error('LocalExecutor: submit() before start() or after shutdown()');
    if (n > this.capacity - this.accepted) {
      throw new RangeError(`LocalExecutor: submit() of ${n} calls with only ${this.capacity - this.accepted} free slots`);
    }
    const q = this.queue;
    for (let i = 0; i < n; i++) q.push(calls[i]!);
    this.accepted += n;
    this.schedule();
  }

  cancel(ids: readonly number[]): void {
    if (ids.length === 0 || this.closed) return;
    const wanted = new Set(ids);
    const q = this.queue;
    for (let i = this.head; i < q.length; i++) {
      const c = q[i];
      if (c != null && wanted.has(c.id)) {
        q[i] = null;
        this.record(c, 'cancelled', undefined, new CancelledError(`task "${c.key}" was cancelled`), 0);
      }
    }
    const r = this.running;
    if (r !== null && wanted.has(r.call.id)) {
      this.settle(r, 'cancelled', undefined, new CancelledError(`task "${r.call.key}" was cancelled while running`));
      return;
    }
    this.schedule();
  }

  shutdown(): Promise<void> {
    if (!this.closed) {
      this.closed = true;
      if (this.immediate !== null) clearImmediate(this.immediate);
      this.immediate = null;
      const r = this.running;
      if (r !== null) {
        r.done = true;
        if (r.timer !== null) clearTimeout(r.timer);
      }
      this.running = null;
      this.queue = [];
      this.head = 0;
      this.out = [];
    }
    return Promise.resolve();
  }

  /**
   * Run the queued calls now rather than at the next turn of the event loop (for a caller
   * that hands calls over from a macrotask of its own, like a cluster worker: no turn in
   * between). Does nothing inside a task or a delivery, nor with nothing queued.
   */
  runNow(): void {
    if (this.immediate === null || this.draining) return;
    clearImmediate(this.immediate);
    this.immediate = null;
    this.drainCb();
  }

  private schedule(): void {
    if (this.immediate === null && !this.closed) this.immediate = setImmediate(this.drainCb);
  }

  /** Run queued calls until the queue is empty or an async call is pending; deliver the outcomes. */
  private drain(): void {
    // Calls submitted from inside onOutcomes (a dependent that became ready) run in the
    // same turn, for a bounded number of rounds and time, instead of waiting for the
    // next event-loop turn: a chain then costs a function call per link, not a turn.
    const until = performance.now() + RE_DRAIN_MS;
    for (let round = 1; ; round++) {
      this.drainOnce();
      // Whatever ends the loop, calls still queued keep the drain `submit` scheduled.
      if (this.running !== null || this.head >= this.queue.length || this.closed) return;
      if (this.sliced) {
        // Out of time: let the event loop send what was delivered, then go on.
        this.sliced = false;
        this.schedule();
        return;
      }
      if (round >= RE_DRAIN_ROUNDS || performance.now() > until) {
        this.schedule();
        return;
      }
      if (this.immediate !== null) {
        clearImmediate(this.immediate);
        this.immediate = null;
      }
    }
  }

  private drainOnce(): void {
    const q = this.queue;
    const ctx = this.ctx!;
    const around = this.around;
    let t0 = performance.now();
    const sliceEnd = this.sliceMs > 0 ? t0 + this.sliceMs : Infinity;
    while (this.running === null && this.head < q.length && !this.closed) {
      const c = q[this.head];
      q[this.head++] = null;
      if (c == null) continue;
      let fn = this.lastFn;
      if (c.taskKey !== this.lastKey || fn === null) {
        fn = getTask(c.taskKey)?.fn ?? null;
        if (fn === null) {
          try {
            resolveTask(c.taskKey, 'this thread');
          } catch (err) {
            this.record(c, 'error', undefined, err as Error, t0);
          }
          continue;
        }
        this.lastKey = c.taskKey;
        this.lastFn = fn;
      }
      ctx.key = c.key;
      ctx.mapIndex = c.mapIndex;
      ctx.attempt = c.attempt;
      ctx.loopCount = c.loopCount;
      ctx.loopResult = c.loopResult;
      setCurrentContext(ctx);
      let value: unknown;
      let failed = false;
      try {
        value = around === null ? fn(...c.args) : around(c, fn, c.args);
      } catch (err) {
        failed = true;
        value = err;
      }
      setCurrentContext(null);
      if (!failed && typeof value === 'object' && value !== null && typeof (value as PromiseLike<unknown>).then === 'function') {
        this.await(c, value as PromiseLike<unknown>, t0);
        break;
      }
      const t1 = performance.now();
      if (c.timeoutMs > 0 && t1 - t0 > c.timeoutMs) {
        this.record(c, 'timeout', undefined, timeoutError(c, true), t0);
      } else if (failed) {
        this.record(c, 'error', undefined, asError(value), t0);
      } else {
        this.out.push({
          id: c.id,
          runId: c.runId,
          status: 'ok',
          value,
          error: undefined,
          startMs: t0 + this.origin,
          endMs: t1 + this.origin,
          worker: 'local',
        });
      }
      t0 = t1;
      if (t1 > sliceEnd) {
        this.sliced = true;
        break;
      }
    }
    if (this.head === q.length) {
      this.queue = [];
      this.head = 0;
    } else if (this.head > 4096 && this.head * 2 > q.length) {
      this.queue = q.slice(this.head);
      this.head = 0;
    }
    this.flush();
  }

  private await(call: TaskCall, p: PromiseLike<unknown>, start: number): void {
    const r: Running = { call, start, timer: null, done: false };
    this.running = r;
    if (call.timeoutMs > 0) {
      r.timer = setTimeout(() => this.settle(r, 'timeout', undefined, timeoutError(call, false)), call.timeoutMs);
    }
    p.then(
      (v) => this.settle(r, 'ok', v, undefined),
      (e: unknown) => this.settle(r, 'error', undefined, asError(e)),
    );
  }

  /** The running async call ended (result, error, timeout or cancel): record it and carry on draining. */
  private settle(r: Running, status: OutcomeStatus, value: unknown, error: Error | SerializedError | undefined): void {
    if (r.done) return;
    r.done = true;
    if (r.timer !== null) clearTimeout(r.timer);
    if (this.running === r) this.running = null;
    if (this.closed) return;
    const c = r.call;
    this.out.push({
      id: c.id,
      runId: c.runId,
      status,
      value,
      error,
      startMs: r.start + this.origin,
      endMs: performance.now() + this.origin,
      worker: 'local',
    });
    this.drain();
  }

  private record(c: TaskCall, status: OutcomeStatus, value: unknown, error: Error | SerializedError, start: number): void {
    this.out.push({
      id: c.id,
      runId: c.runId,
      status,
      value,
      error,
      startMs: start === 0 ? 0 : start + this.origin,
      endMs: performance.now() + this.origin,
      worker: 'local',
    });
  }

  private flush(): void {
    const outs = this.out;
    if (outs.length === 0 || this.closed) return;
    this.out = [];
    this.accepted -= outs.length;
    this.session!.onOutcomes(outs);
  }
}

function timeoutError(c: TaskCall, sync: boolean): TaskTimeoutError {
  return new TaskTimeoutError(
    sync
      ? `task "${c.key}" ran past its timeout of ${c.timeoutMs} ms (a synchronous task cannot be interrupted in-process)`
      : `task "${c.key}" timed out after ${c.timeoutMs} ms`,
  );
}

/** Keep Errors as they are (in-process); anything else thrown becomes a record. */
function asError(e: unknown): Error | SerializedError {
  return e instanceof Error ? e : serializeError(e);
}
