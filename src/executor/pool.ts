/**
 * PoolExecutor: task calls on a local pool of worker threads (through piscina) or child
 * processes, moved in batches.
 *
 * Design (see also `pool-protocol.ts` for the wire and `pool-worker.ts` for the worker):
 *
 * - Capacity: `workers × prefetch` calls accepted at once (`freeSlots()` reports the
 *   rest). Accepted calls wait in `pending` until a worker can take them; dispatched
 *   calls live in a fixed in-flight table indexed by *slot* (the slot number is their
 *   name on the wire), with typed-array side columns (worker serial, task index,
 *   estimated cost). No Map, promise or closure per call.
 * - Adaptive batches: the pool keeps a moving average of each task's measured duration.
 *   A batch for a worker is filled while its estimated cost stays under TARGET_BATCH_MS
 *   (and under `prefetch / 2` calls), and a worker gets another batch only while its
 *   outstanding estimated work is under TARGET_BATCH_MS. So no-op tasks travel in
 *   batches of hundreds, two batches deep, while a task that takes ≥ 1 ms goes alone
 *   and only to an idle worker: a slow task never holds queued ones hostage. A task
 *   never seen before counts as slow until its first outcome returns.
 * - Timeouts: a call with `timeoutMs > 0` goes alone to an idle worker, which then gets
 *   nothing else until it finishes; the pool arms a timer; on expiry the outcome is
 *   'timeout' and the worker is replaced (thread terminated through piscina's abort
 *   signal / process SIGKILLed). The timer starts at dispatch, so it includes the
 *   (µs) trip to the worker.
 * - Cancel: a pending call is dropped ('cancelled'); a running one ends 'cancelled' at
 *   once and its worker is replaced; other calls on that worker that had not finished
 *   when it died end 'lost' (the runner runs them again).
 * - Crash: a worker that exits (process.exit in a task, uncaught error, OOM) is
 *   replaced; its unfinished calls end 'lost' with a WorkerLostError naming it. Outcomes
 *   it posted before dying are still delivered (the port is drained first).
 * - Outcomes are delivered in batches: one `onOutcomes` per worker message, plus one
 *   per tick for outcomes the pool makes itself (cancelled, lost, timeout).
 */
import { availableParallelism } from 'node:os';
import { Piscina } from 'piscina';
import {
  CancelledError,
  TaskSerializationError,
  TaskTimeoutError,
  WorkerLostError,
  deserializeError,
  type SerializedError,
} from '../errors.ts';
import type { Executor, ExecutorSession, Outcome, OutcomeStatus, TaskCall } from './types.ts';
import { CALL_STRIDE, ST_OK, type FromWorker, type RunMsg, type WorkerInit } from './pool-protocol.ts';
import { BOOTSTRAP, ProcessLink, ThreadLink, type WorkerEvents, type WorkerLink } from './pool-transport.ts';

/** A batch (and a worker's queue) holds about this much estimated work (ms). */
const TARGET_BATCH_MS = 1;
/** Moving-average weight of a new duration sample. */
const EWMA = 0.3;

export type PoolOptions =
  | {
      /** Worker threads (default: available parallelism). */
      threads?: number;
      /** Calls in flight per worker (default 512). Capacity = workers × prefetch. */
      prefetch?: number;
      /** Node flags for the threads (default: inherited). */
      execArgv?: string[];
    }
  | {
      /** Child processes instead of threads. */
      processes: number;
      prefetch?: number;
      /** Node flags for the children (default: none). */
      execArgv?: string[];
    };

/** Per-worker state on the main side. */
interface WorkerSlot {
  link: WorkerLink;
  /** 'thread-<id>' / 'process-<pid>' once ready. */
  name: string;
  /** starting → ready → dead (killed or exited; never dispatched to again). */
  state: 'starting' | 'ready' | 'dead';
  /** Calls dispatched to it and not yet finished. */
  out: number;
  /** Sum of the estimated costs of those calls (ms). */
  outEst: number;
  /** Holds a call with a timeout: takes nothing else until it finishes. */
  exclusive: boolean;
  /** How many entries of `keyList` it knows. */
  knownKeys: number;
}

export class PoolExecutor implements Executor {
  readonly kind = 'pool';
  readonly workers: number;
  private readonly mode: 'threads' | 'processes';
  private readonly prefetch: number;
  private readonly capacity: number;
  private readonly maxBatch: number;
  private readonly execArgv: string[] | undefined;

  private session: ExecutorSession | null = null;
  private init: WorkerInit | null = null;
  private piscina: Piscina | null = null;
  private nextSerial = 1;
  /** Live workers (a replaced one leaves, its replacement joins). */
  private slots: WorkerSlot[] = [];
  private readonly bySerial = new Map<number, WorkerSlot>();
  private closed = false;
  private closing: Promise<void> | null = null;

  // Accepted calls: pending + in flight. Invariant: accepted ≤ capacity.
  private accepted = 0;
  /** FIFO of accepted, not yet dispatched calls (null = cancelled); head index `pHead`. */
  private pending: (TaskCall | null)[] = [];
  private pHead = 0;
  private pendingCount = 0;

  // In-flight table, indexed by slot.
  private readonly calls: (TaskCall | null)[];
  private readonly slotSerial: Int32Array;
  private readonly slotTask: Int32Array;
  private readonly slotEst: Float64Array;
  private readonly freeList: Int32Array;
  private freeTop: number;
  private readonly timers = new Map<number, NodeJS.Timeout>();

  // Task keys on the wire, and the moving average of each one's duration (-1 = unknown).
  private readonly keyIndex = new Map<string, number>();
  private readonly keyList: string[] = [];
  private est = new Float64Array(16).fill(-1);

  // Outcomes the pool makes itself, delivered once per tick.
  private localOut: Outcome[] = [];
  private localImmediate: NodeJS.Immediate | null = null;
  private dispatchQueued = false;
  private rr = 0;

  constructor(options: PoolOptions = {}) {
    if ('processes' in options) {
      this.mode = 'processes';
      this.workers = positiveInt(options.processes, 'processes');
    } else {
      this.mode = 'threads';
      this.workers = positiveInt(options.threads ?? availableParallelism(), 'threads');
    }
    this.prefetch = positiveInt(options.prefetch ?? 512, 'prefetch');
    this.execArgv = options.execArgv;
    this.capacity = this.workers * this.prefetch;
    this.maxBatch = Math.max(1, this.prefetch >> 1);
    this.calls = new Array<TaskCall | null>(this.capacity).fill(null);
    this.slotSerial = new Int32Array(this.capacity);
    this.slotTask = new Int32Array(this.capacity);
    this.slotEst = new Float64Array(this.capacity);
    this.freeList = new Int32Array(this.capacity);
    for (let i = 0; i < this.capacity; i++) this.freeList[i] = this.capacity - 1 - i;
    this.freeTop = this.capacity;
  }

  async start(session: ExecutorSession): Promise<void> {
    if (this.session !== null) throw new Error('PoolExecutor.start() called twice');
    if (this.closed) throw new Error('PoolExecutor is shut down');
    this.session = session;
    for (const k of session.taskKeys) this.indexOf(k);
    this.init = {
      flowName: session.flowName,
      modules: session.modules,
      taskKeys: [...this.keyList],
      parameters: session.parameters,
      mode: this.mode,
    };
    if (this.mode === 'threads') {
      this.piscina = new Piscina({
        filename: BOOTSTRAP,
        minThreads: this.workers,
        maxThreads: this.workers,
        idleTimeout: 1_000,
        concurrentTasksPerWorker: 1,
        atomics: 'disabled',
        recordTiming: false,
        ...(this.execArgv !== undefined ? { execArgv: this.execArgv } : {}),
      });
      // Piscina reports a worker error with no task attached as an 'error' event; ours
      // always have their serving task, whose rejection we handle.
      this.piscina.on('error', () => {});
    }
    const ready: Promise<void>[] = [];
    for (let i = 0; i < this.workers; i++) ready.push(this.spawn());
    try {
      await Promise.all(ready);
    } catch (err) {
      await this.shutdown();
      throw err;
    }
  }

  freeSlots(): number {
    return this.closed ? 0 : this.capacity - this.accepted;
  }

  submit(calls: TaskCall[]): void {
    const n = calls.length;
    if (n === 0) return;
    if (this.session === null || this.closed) throw new Error('PoolExecutor: submit() before start() or after shutdown()');
    if (n > this.capacity - this.accepted) {
      throw new RangeError(`PoolExecutor: submit() of ${n} calls with only ${this.capacity - this.accepted} free slots`);
    }
    const p = this.pending;
    for (let i = 0; i < n; i++) p.push(calls[i]!);
    this.accepted += n;
    this.pendingCount += n;
    this.queueDispatch();
  }

  cancel(ids: readonly number[]): void {
    if (ids.length === 0 || this.closed) return;
    const wanted = new Set(ids);
    const p = this.pending;
    for (let i = this.pHead; i < p.length; i++) {
      const c = p[i];
      if (c != null && wanted.has(c.id)) {
        p[i] = null;
        this.pendingCount--;
        this.accepted--;
        this.pushLocal(c, 'cancelled', new CancelledError(`task "${c.key}" was cancelled`), '');
      }
    }
    const victims = new Set<WorkerSlot>();
    for (let s = 0; s < this.capacity; s++) {
      const c = this.calls[s];
      if (c != null && wanted.has(c.id)) {
        const w = this.bySerial.get(this.slotSerial[s]!);
        this.finishLocal(s, 'cancelled', new CancelledError(`task "${c.key}" was cancelled while running`), w);
        if (w !== undefined) victims.add(w);
      }
    }
    for (const w of victims) this.kill(w);
  }

  shutdown(): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.closed = true;
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
    if (this.localImmediate !== null) clearImmediate(this.localImmediate);
    this.localImmediate = null;
    this.localOut = [];
    const links = this.slots.map((w) => w.link);
    this.slots = [];
    const pool = this.piscina;
    this.closing = (async () => {
      // Ask every worker to stop; threads are then terminated by piscina whatever they
      // are running, processes get a grace period and then SIGKILL.
      const gone = links.map((l) => l.close());
      if (pool !== null) await pool.destroy();
      await Promise.all(gone);
    })();
    return this.closing;
  }

  // ---- workers --------------------------------------------------------------------

  /** Start a worker; resolves when it is ready, rejects with its start error. */
  private spawn(): Promise<void> {
    const init = this.init!;
    const serial = this.nextSerial++;
    return new Promise<void>((resolve, reject) => {
      const events: WorkerEvents = {
        onMessage: (_l, msg) => {
          const w = this.bySerial.get(serial);
          if (w === undefined) return;
          if (msg.op === 'done') this.onDone(w, msg);
          else this.onControl(w, msg, resolve, reject);
        },
        onExit: (_l, reason) => {
          const w = this.bySerial.get(serial);
          if (w !== undefined) this.onExit(w, reason, reject);
        },
      };
      const link =
        this.mode === 'threads'
          ? new ThreadLink(serial, this.piscina!, init, events)
          : new ProcessLink(serial, init, this.execArgv ?? [], events);
      const w: WorkerSlot = {
        link,
        name: `${this.mode === 'threads' ? 'thread' : 'process'}-starting-${serial}`,
        state: 'starting',
        out: 0,
        outEst: 0,
        exclusive: false,
        knownKeys: init.taskKeys.length,
      };
      this.bySerial.set(serial, w);
      this.slots.push(w);
    });
  }

  private onControl(w: WorkerSlot, msg: Exclude<FromWorker, { op: 'done' }>, resolve: () => void, reject: (e: Error) => void): void {
    if (msg.op === 'ready') {
      w.name = msg.worker;
      if (w.state === 'starting') w.state = 'ready';
      resolve();
      this.queueDispatch();
    } else {
      w.state = 'dead';
      reject(deserializeError(msg.error));
      w.link.kill();
    }
  }

  private onExit(w: WorkerSlot, reason: string, reject: (e: Error) => void): void {
    const wasStarting = w.state === 'starting';
    w.state = 'dead';
    this.bySerial.delete(w.link.serial);
    const i = this.slots.indexOf(w);
    if (i >= 0) this.slots.splice(i, 1);
    if (this.closed) return;
    if (wasStarting) reject(new WorkerLostError(`worker ${w.name} exited before it was ready: ${reason}`));
    // Its unfinished calls are lost: the runner runs them again elsewhere.
    if (w.out > 0) {
      for (let s = 0; s < this.capacity; s++) {
        if (this.calls[s] !== null && this.slotSerial[s] === w.link.serial) {
          this.finishLocal(s, 'lost', new WorkerLostError(`worker ${w.name} died while running task "${this.calls[s]!.key}": ${reason}`), w);
        }
      }
    }
    if (this.session !== null && !wasStarting) {
      this.spawn().catch((err: unknown) => this.onReplacementFailed(err));
    }
  }

  /** A replacement worker could not start (its modules no longer import?): if none is left, fail what waits. */
  private onReplacementFailed(err: unknown): void {
    if (this.closed || this.slots.some((w) => w.state !== 'dead')) return;
    const error = err instanceof Error ? err : new WorkerLostError(String(err));
    const p = this.pending;
    for (let i = this.pHead; i < p.length; i++) {
      const c = p[i];
      if (c != null) {
        p[i] = null;
        this.pendingCount--;
        this.accepted--;
        this.pushLocal(c, 'error', error, '');
      }
    }
  }

  /** Stop a worker now (timeout, cancel); its exit reports the rest and replaces it. */
  private kill(w: WorkerSlot): void {
    if (w.state === 'dead') return;
    w.state = 'dead';
    w.link.kill();
  }

  // ---- dispatch -------------------------------------------------------------------

  private queueDispatch(): void {
    if (this.dispatchQueued) return;
    this.dispatchQueued = true;
    queueMicrotask(() => {
      this.dispatchQueued = false;
      this.dispatch();
    });
  }

  /** Hand pending calls to workers that can take them, one batch per worker per round. */
  private dispatch(): void {
    if (this.closed) return;
    const ws = this.slots;
    const nw = ws.length;
    let progress = true;
    while (this.pendingCount > 0 && progress) {
      progress = false;
      for (let k = 0; k < nw && this.pendingCount > 0; k++) {
        const w = ws[(this.rr + k) % nw]!;
        if (w.state !== 'ready' || w.exclusive || w.out >= this.prefetch || w.outEst >= TARGET_BATCH_MS) continue;
        if (this.sendBatch(w) > 0) progress = true;
      }
      this.rr = (this.rr + 1) % Math.max(1, nw);
    }
    if (this.pHead > 1024 && this.pHead * 2 > this.pending.length) {
      this.pending = this.pending.slice(this.pHead);
      this.pHead = 0;
    }
  }

  /** Build and send one batch for `w`; returns how many calls it took. */
  private sendBatch(w: WorkerSlot): number {
    const p = this.pending;
    const est = this.est;
    const limit = Math.min(this.maxBatch, this.prefetch - w.out);
    // First pass: choose the calls (cheap), so that the columns are allocated once.
    let end = this.pHead;
    let count = 0;
    let cost = 0;
    let timed = false;
    while (end < p.length && count < limit && cost < TARGET_BATCH_MS) {
      const c = p[end];
      if (c == null) {
        end++;
        continue;
      }
      if (c.timeoutMs > 0) {
        if (count === 0 && w.out === 0) {
          timed = true;
          count = 1;
          end++;
        }
        break;
      }
      const t = this.indexOf(c.taskKey);
      const e = est[t]!;
      cost += e < 0 ? TARGET_BATCH_MS : e;
      count++;
      end++;
    }
    if (count === 0) {
      // Only cancelled entries (or a timed call waiting for an idle worker) at the head.
      this.pHead = skipNulls(p, this.pHead, end);
      return 0;
    }
    const ints = new Int32Array(count * CALL_STRIDE);
    const keys = new Array<string>(count);
    const args = new Array<unknown[]>(count);
    let loopResults: unknown[] | undefined;
    const serial = w.link.serial;
    let j = 0;
    let i = 0;
    let batchEst = 0;
    for (let q = this.pHead; q < end; q++) {
      const c = p[q];
      if (c == null) continue;
      p[q] = null;
      const slot = this.freeList[--this.freeTop]!;
      const t = this.indexOf(c.taskKey);
      const e = est[t]!;
      this.calls[slot] = c;
      this.slotSerial[slot] = serial;
      this.slotTask[slot] = t;
      const ce = e < 0 ? TARGET_BATCH_MS : e;
      this.slotEst[slot] = ce;
      batchEst += ce;
      ints[j] = slot;
      ints[j + 1] = t;
      ints[j + 2] = c.mapIndex;
      ints[j + 3] = c.attempt;
      ints[j + 4] = c.loopCount;
      keys[i] = c.key;
      args[i] = c.args;
      if (c.loopCount > 0) (loopResults ??= new Array<unknown>(count))[i] = c.loopResult;
      j += CALL_STRIDE;
      i++;
    }
    this.pHead = end;
    this.pendingCount -= count;
    let newKeys: string[] | undefined;
    if (w.knownKeys < this.keyList.length) {
      newKeys = this.keyList.slice(w.knownKeys);
      w.knownKeys = this.keyList.length;
    }
    const firstSlot = ints[0]!;
    const msg: RunMsg = { op: 'run', ints, keys, args, ...(loopResults ? { loopResults } : {}), ...(newKeys ? { newKeys } : {}) };
    // (`ints` is transferred: do not read it after this line.)
    const sent = this.post(w, msg);
    w.out += sent;
    w.outEst += sent === count ? batchEst : TARGET_BATCH_MS;
    if (timed && sent === 1) {
      w.exclusive = true;
      const c = this.calls[firstSlot]!;
      this.timers.set(
        firstSlot,
        setTimeout(() => this.onTimeout(firstSlot, serial), c.timeoutMs),
      );
    }
    return count;
  }

  /** Post a batch; on a clone error fail only the calls whose arguments cannot travel. Returns calls sent. */
  private post(w: WorkerSlot, msg: RunMsg): number {
    try {
      w.link.send(msg, [msg.ints.buffer as ArrayBuffer]);
      return msg.keys.length;
    } catch (err) {
      if (!isCloneError(err)) throw err;
    }
    const keep: number[] = [];
    const n = msg.keys.length;
    for (let i = 0; i < n; i++) {
      const slot = msg.ints[i * CALL_STRIDE]!;
      try {
        structuredClone([msg.args[i], msg.loopResults?.[i]]);
        keep.push(i);
      } catch (e) {
        const c = this.calls[slot]!;
        const why = e instanceof Error ? e.message : String(e);
        this.finishLocal(
          slot,
          'error',
          new TaskSerializationError(`arguments of task "${c.key}" cannot be sent between ${this.mode}: ${why}`),
          undefined,
        );
      }
    }
    if (keep.length === 0) return 0;
    const ints = new Int32Array(keep.length * CALL_STRIDE);
    keep.forEach((i, k) => ints.set(msg.ints.subarray(i * CALL_STRIDE, (i + 1) * CALL_STRIDE), k * CALL_STRIDE));
    const retry: RunMsg = {
      op: 'run',
      ints,
      keys: keep.map((i) => msg.keys[i]!),
      args: keep.map((i) => msg.args[i]!),
      ...(msg.loopResults ? { loopResults: keep.map((i) => msg.loopResults![i]) } : {}),
      ...(msg.newKeys ? { newKeys: msg.newKeys } : {}),
    };
    w.link.send(retry, [ints.buffer]);
    return keep.length;
  }

  private indexOf(taskKey: string): number {
    let t = this.keyIndex.get(taskKey);
    if (t === undefined) {
      t = this.keyList.length;
      this.keyIndex.set(taskKey, t);
      this.keyList.push(taskKey);
      if (t >= this.est.length) {
        const e = new Float64Array(this.est.length * 2).fill(-1);
        e.set(this.est);
        this.est = e;
      }
    }
    return t;
  }

  // ---- outcomes -------------------------------------------------------------------

  private onDone(w: WorkerSlot, msg: Extract<FromWorker, { op: 'done' }>): void {
    const { slots, status, values, times } = msg;
    const n = slots.length;
    const serial = w.link.serial;
    const calls = this.calls;
    const est = this.est;
    const outs: Outcome[] = [];
    const name = w.name;
    const timers = this.timers.size > 0 ? this.timers : null;
    for (let i = 0; i < n; i++) {
      const slot = slots[i]!;
      const c = calls[slot];
      // Already settled by the pool (cancelled, timed out) and perhaps reused: stale.
      if (c == null || this.slotSerial[slot] !== serial) continue;
      const start = times[2 * i]!;
      const end = times[2 * i + 1]!;
      const t = this.slotTask[slot]!;
      const prev = est[t]!;
      est[t] = prev < 0 ? end - start : prev + EWMA * (end - start - prev);
      w.out--;
      w.outEst -= this.slotEst[slot]!;
      if (timers !== null) {
        const tm = timers.get(slot);
        if (tm !== undefined) {
          clearTimeout(tm);
          timers.delete(slot);
          w.exclusive = false;
        }
      }
      calls[slot] = null;
      this.freeList[this.freeTop++] = slot;
      const v = values[i];
      outs.push(
        status[i] === ST_OK
          ? { id: c.id, runId: c.runId, status: 'ok', value: v, error: undefined, startMs: start, endMs: end, worker: name }
          : { id: c.id, runId: c.runId, status: 'error', value: undefined, error: v as SerializedError, startMs: start, endMs: end, worker: name },
      );
    }
    if (w.out <= 0) {
      w.out = 0;
      w.outEst = 0;
    }
    this.accepted -= outs.length;
    if (outs.length > 0) this.session!.onOutcomes(outs);
    if (this.pendingCount > 0) this.dispatch();
  }

  private onTimeout(slot: number, serial: number): void {
    this.timers.delete(slot);
    const c = this.calls[slot];
    if (c == null || this.slotSerial[slot] !== serial) return;
    const w = this.bySerial.get(serial);
    this.finishLocal(slot, 'timeout', new TaskTimeoutError(`task "${c.key}" timed out after ${c.timeoutMs} ms`), w);
    if (w !== undefined) this.kill(w);
  }

  /** Settle an in-flight call from the pool's side and free its slot. */
  private finishLocal(slot: number, status: OutcomeStatus, error: Error, w: WorkerSlot | undefined): void {
    const c = this.calls[slot]!;
    this.calls[slot] = null;
    this.freeList[this.freeTop++] = slot;
    const tm = this.timers.get(slot);
    if (tm !== undefined) {
      clearTimeout(tm);
      this.timers.delete(slot);
    }
    if (w !== undefined && w.link.serial === this.slotSerial[slot]) {
      w.out--;
      w.outEst -= this.slotEst[slot]!;
    }
    this.accepted--;
    this.pushLocal(c, status, error, w?.name ?? '');
  }

  private pushLocal(c: TaskCall, status: OutcomeStatus, error: Error, worker: string): void {
    const now = performance.timeOrigin + performance.now();
    const o: Outcome = { id: c.id, runId: c.runId, status, value: undefined, error, startMs: 0, endMs: now };
    if (worker !== '') o.worker = worker;
    this.localOut.push(o);
    if (this.localImmediate === null) {
      this.localImmediate = setImmediate(() => {
        this.localImmediate = null;
        const outs = this.localOut;
        this.localOut = [];
        if (!this.closed && outs.length > 0) this.session!.onOutcomes(outs);
        this.queueDispatch();
      });
    }
  }
}

function skipNulls(p: (TaskCall | null)[], from: number, to: number): number {
  let i = from;
  while (i < to && p[i] == null) i++;
  return i;
}

function positiveInt(v: number, what: string): number {
  if (!Number.isInteger(v) || v < 1) throw new RangeError(`PoolExecutor: ${what} must be a positive integer, got ${String(v)}`);
  return v;
}

function isCloneError(err: unknown): boolean {
  return (
    err instanceof Error &&
    (err.name === 'DataCloneError' || /could not be cloned|serializ|Unserializable/i.test(err.message))
  );
}

