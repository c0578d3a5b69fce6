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
 *   outstanding estimated work is under TARGET_BATCH_MS or it holds fewer than
 *   LOOKAHEAD_CALLS (2) calls. Idle workers are served first. So no-op tasks travel in
 *   batches of hundreds, two batches deep, while a task that takes ≥ 1 ms goes alone,
 *   to an idle worker if there is one, else as the one call queued behind a running
 *   one (so the worker starts it without waiting a round trip for the main thread). A
 *   task never seen before counts as slow until its first outcome returns.
 * - Held work: `freeSlots()` reports 0 while the pending (not yet dispatched) calls hold
 *   ≥ one per worker and ≥ PENDING_HORIZON_MS estimated work per worker, so slow ready
 *   calls wait in the scheduler's priority queue (which orders them) rather than in
 *   this FIFO; no-op calls still fill every slot.
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
 * - Warm pools (`keepAlive: true`, like a Dask cluster that outlives one computation):
 *   `shutdown()` ends only the run's session — pending calls are dropped, a worker still
 *   running a call is replaced (the only way to stop it), per-run state is cleared — and
 *   the next `start()` opens a new session on the same workers: they import the new
 *   run's modules (an import already done costs nothing) and check its task keys. The
 *   task table and the duration estimates carry over. `close()` ends everything.
 */
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import type { Piscina } from 'piscina';
import {
  CancelledError,
  TaskSerializationError,
  TaskTimeoutError,
  WorkerLostError,
  deserializeError,
  type SerializedError,
} from '../errors.ts';
import type { Executor, ExecutorSession, Outcome, OutcomeStatus, TaskCall } from './types.ts';
import {
  CALL_STRIDE,
  C_ARGC,
  C_ATTEMPT,
  C_KEYLEN,
  C_LOOP,
  C_MAP,
  C_SLOT,
  C_TASK,
  ST_OK,
  type FromWorker,
  type RunMsg,
  type SessionMsg,
} from './pool-protocol.ts';
import { BOOTSTRAP, ProcessLink, ThreadLink, type WorkerEvents, type WorkerLink } from './pool-transport.ts';

/**
 * piscina, loaded by the first thread pool rather than with weft (every flow module, in
 * every worker too, imports weft; most never start a pool of their own).
 */
let piscina: typeof Piscina | null = null;
const piscinaClass = (): typeof Piscina => (piscina ??= (createRequire(import.meta.url)('piscina') as typeof import('piscina')).Piscina);

/** A batch (and a worker's queue) holds about this much estimated work (ms). */
const TARGET_BATCH_MS = 1;
/**
 * Calls a busy worker may hold whatever their estimate (the running one + queued ones):
 * 2 keeps the next call on the worker, so it starts as soon as the running one ends,
 * not a round trip later (Dask's worker-saturation 1.1 on a one-thread worker).
 */
const LOOKAHEAD_CALLS = 2;
/**
 * Accepted-but-not-dispatched work the pool holds (ms, estimated, at least one call per
 * worker): beyond it `freeSlots()` reports 0 and further ready calls wait in the
 * scheduler's priority queue, which then decides their order, not this FIFO.
 */
const PENDING_HORIZON_MS = 4 * TARGET_BATCH_MS;
/** Moving-average weight of a new duration sample. */
const EWMA = 0.3;
/** A warm pool starts its task table afresh (on every worker) past this many keys. */
const MAX_KEYS = 1 << 16;

interface CommonOptions {
  /** Calls in flight per worker (default 512). Capacity = workers × prefetch. */
  prefetch?: number;
  /**
   * Keep the workers up across runs (a warm pool; default false). `shutdown()` at the
   * end of a run then only ends that run's session, and the next `start()` reuses the
   * workers, skipping their start-up (threads, TS loader, imports). Call `close()` when
   * done: the workers keep the process alive until then.
   */
  keepAlive?: boolean;
}

export type PoolOptions =
  | (CommonOptions & {
      /** Worker threads (default: available parallelism). */
      threads?: number;
      /** Node flags for the threads (default: inherited, less tsx's preload flags: the workers register its ESM hooks themselves). */
      execArgv?: string[];
    })
  | (CommonOptions & {
      /** Child processes instead of threads. */
      processes: number;
      /** Node flags for the children (default: none). */
      execArgv?: string[];
    });

/** Per-worker state on the main side. */
interface WorkerSlot {
  link: WorkerLink;
  /** 'thread-<id>' / 'process-<pid>' once ready. */
  name: string;
  /** starting (its session is opening) → ready → dead (killed or exited; never dispatched to again). */
  state: 'starting' | 'ready' | 'dead';
  /** Calls dispatched to it and not yet finished. */
  out: number;
  /** Sum of the estimated costs of those calls (ms). */
  outEst: number;
  /** Holds a call with a timeout: takes nothing else until it finishes. */
  exclusive: boolean;
  /** How many entries of `keyList` it knows. */
  knownKeys: number;
  /** Settles the session opening on this worker (null when none is pending). */
  opening: { epoch: number; resolve: () => void; reject: (e: Error) => void } | null;
  /** Stopped on purpose (and already replaced): its exit spawns nobody. */
  retired: boolean;
}

export class PoolExecutor implements Executor {
  readonly kind = 'pool';
  readonly workers: number;
  private readonly mode: 'threads' | 'processes';
  private readonly prefetch: number;
  private readonly capacity: number;
  private readonly maxBatch: number;
  private readonly execArgv: string[] | undefined;
  private readonly keepAlive: boolean;

  /** The open session (between start() and shutdown()); null otherwise. */
  private session: ExecutorSession | null = null;
  /** Counts sessions: replies of an earlier one are stale. */
  private epoch = 0;
  private piscina: Piscina | null = null;
  private nextSerial = 1;
  /** Live workers (a replaced one leaves, its replacement joins). Invariant: length ≤ workers. */
  private slots: WorkerSlot[] = [];
  private readonly bySerial = new Map<number, WorkerSlot>();
  /** Retired (killed) workers that have not exited yet. */
  private readonly dying = new Set<WorkerSlot>();
  /** close() was called (or shutdown() without keepAlive): nothing starts again. */
  private closed = false;
  private closing: Promise<void> | null = null;

  // Accepted calls: pending + in flight. Invariant: accepted ≤ capacity.
  private accepted = 0;
  /** FIFO of accepted, not yet dispatched calls (null = cancelled); head index `pHead`. */
  private pending: (TaskCall | null)[] = [];
  private pHead = 0;
  private pendingCount = 0;
  /** Estimated work of the pending calls (ms; approximate: estimates move, so it is reset when `pending` empties). */
  private pendingEst = 0;

  // In-flight table, indexed by slot.
  private readonly calls: (TaskCall | null)[];
  private readonly slotSerial: Int32Array;
  private readonly slotTask: Int32Array;
  private readonly slotEst: Float64Array;
  private readonly freeList: Int32Array;
  private freeTop: number;
  private readonly timers = new Map<number, NodeJS.Timeout>();

  // Task keys on the wire, and the moving average of each one's duration (-1 = unknown).
  // Both outlive a session (a warm pool keeps them).
  private keyIndex = new Map<string, number>();
  private keyList: string[] = [];
  private est = new Float64Array(16).fill(-1);
  /** One-entry cache of `indexOf` (runs of one task are the common case). */
  private lastKey = '';
  private lastIndex = -1;

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
    this.keepAlive = options.keepAlive ?? false;
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
    if (this.closed) throw new Error('PoolExecutor is shut down');
    if (this.session !== null) throw new Error('PoolExecutor.start() called twice');
    this.session = session;
    const epoch = ++this.epoch;
    if (this.keyList.length > MAX_KEYS && this.keyList.length > session.taskKeys.length * 2) this.resetKeys();
    for (const k of session.taskKeys) this.indexOf(k);
    if (this.mode === 'threads' && this.piscina === null) {
      this.piscina = this.makePiscina();
      // Piscina reports a worker error with no task attached as an 'error' event; ours
      // always have their serving task, whose rejection we handle.
      this.piscina.on('error', () => {});
    }
    while (this.slots.length < this.workers) this.spawn();
    // Every live worker (new or kept) opens the session; spawned ones get the message
    // queued until they are up, so readiness costs one round trip after start-up.
    const ready = this.slots.map((w) => this.openSession(w));
    try {
      await Promise.all(ready);
    } catch (err) {
      // The other openings may still settle: nobody waits for them.
      for (const p of ready) p.catch(() => {});
      if (this.session === session && this.epoch === epoch) await this.shutdown();
      throw err;
    }
    if (this.session !== session) throw new Error('PoolExecutor: shut down while starting');
  }

  private makePiscina(): Piscina {
    const Piscina = piscinaClass();
    const options = {
      filename: BOOTSTRAP,
      minThreads: this.workers,
      maxThreads: this.workers,
      idleTimeout: 1_000,
      concurrentTasksPerWorker: 1,
      atomics: 'disabled',
      recordTiming: false,
    } as const;
    if (this.execArgv !== undefined) return new Piscina({ ...options, execArgv: this.execArgv });
    const flags = withoutTsxPreload(process.execArgv);
    if (flags.length === process.execArgv.length) return new Piscina(options); // inherited, as Node does
    try {
      return new Piscina({ ...options, execArgv: flags });
    } catch (err) {
      // Node accepts a per-process flag (e.g. --expose-gc) in a worker only when it is
      // inherited implicitly, not when listed: then inherit everything, tsx included.
      if ((err as { code?: unknown }).code !== 'ERR_WORKER_INVALID_EXEC_ARGV') throw err;
      return new Piscina(options);
    }
  }

  freeSlots(): number {
    if (this.session === null) return 0;
    // Enough is queued here to feed every worker until the next outcome: the rest waits
    // in the scheduler's priority order (only slow calls get here; no-ops fill the slots).
    if (this.pendingCount >= this.workers && this.pendingEst >= PENDING_HORIZON_MS * this.workers) return 0;
    return this.capacity - this.accepted;
  }

  submit(calls: TaskCall[]): void {
    const n = calls.length;
    if (n === 0) return;
    if (this.session === null) throw new Error('PoolExecutor: submit() before start() or after shutdown()');
    if (n > this.capacity - this.accepted) {
      throw new RangeError(`PoolExecutor: submit() of ${n} calls with only ${this.capacity - this.accepted} free slots`);
    }
    const p = this.pending;
    let cost = 0;
    for (let i = 0; i < n; i++) {
      const c = calls[i]!;
      p.push(c);
      cost += this.estimate(this.indexOf(c.taskKey));
    }
    this.pendingEst += cost;
    this.accepted += n;
    this.pendingCount += n;
    this.queueDispatch();
  }

  cancel(ids: readonly number[]): void {
    if (ids.length === 0 || this.session === null) return;
    const wanted = new Set(ids);
    const p = this.pending;
    for (let i = this.pHead; i < p.length; i++) {
      const c = p[i];
      if (c != null && wanted.has(c.id)) {
        p[i] = null;
        this.pendingCount--;
        this.pendingEst = this.pendingCount === 0 ? 0 : Math.max(0, this.pendingEst - this.estimate(this.indexOf(c.taskKey)));
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
    for (const w of victims) this.retire(w);
  }

  /**
   * End the run. Without `keepAlive`: stop every worker (as `close()`). With it: end
   * only the session — drop pending calls, replace the workers still running one, clear
   * per-run state — and keep the workers for the next `start()`. Idempotent.
   */
  shutdown(): Promise<void> {
    if (!this.keepAlive || this.closed) return this.close();
    this.endSession();
    return Promise.resolve();
  }

  /** Stop every worker and release everything (a warm pool too). Idempotent; `start()` fails afterwards. */
  close(): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.closed = true;
    // Retired workers may not have exited yet: wait for them too (no handle left behind).
    const links = [...this.slots, ...this.dying].map((w) => w.link);
    for (const w of this.slots) w.retired = true;
    this.slots = [];
    this.endSession();
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

  /** Forget the open session: its calls (pending, in flight) and its outcomes not yet delivered. */
  private endSession(): void {
    if (this.session === null) return;
    this.session = null;
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
    if (this.localImmediate !== null) clearImmediate(this.localImmediate);
    this.localImmediate = null;
    this.localOut = [];
    this.pending = [];
    this.pHead = 0;
    this.pendingCount = 0;
    this.pendingEst = 0;
    this.accepted = 0;
    for (let s = 0; s < this.capacity; s++) {
      if (this.calls[s] !== null) {
        this.calls[s] = null;
        this.freeList[this.freeTop++] = s;
      }
    }
    for (const w of [...this.slots]) {
      const err = new Error('PoolExecutor: shut down while starting');
      if (w.opening !== null) {
        w.opening.reject(err);
        w.opening = null;
      }
      // A worker still busy with this session's calls can only be stopped by replacing it.
      if (w.out > 0 || w.exclusive) this.retire(w);
      w.out = 0;
      w.outEst = 0;
      w.exclusive = false;
    }
  }

  // ---- workers --------------------------------------------------------------------

  /** Start a worker (its session opens with `openSession`). */
  private spawn(): WorkerSlot {
    const serial = this.nextSerial++;
    const w: WorkerSlot = {
      link: null as unknown as WorkerLink, // set below: the link's callbacks need the slot
      name: `${this.mode === 'threads' ? 'thread' : 'process'}-starting-${serial}`,
      state: 'starting',
      out: 0,
      outEst: 0,
      exclusive: false,
      knownKeys: 0,
      opening: null,
      retired: false,
    };
    const events: WorkerEvents = {
      onMessage: (_l, msg) => {
        if (msg.op === 'done') this.onDone(w, msg);
        else this.onControl(w, msg);
      },
      onExit: (_l, reason) => this.onExit(w, reason),
    };
    w.link =
      this.mode === 'threads' ? new ThreadLink(serial, this.piscina!, events) : new ProcessLink(serial, this.execArgv ?? [], events);
    this.bySerial.set(serial, w);
    this.slots.push(w);
    return w;
  }

  /** Open the current session on `w`; resolves when it is ready, rejects with its start error. */
  private openSession(w: WorkerSlot): Promise<void> {
    const s = this.session!;
    const epoch = this.epoch;
    const check = s.taskKeys.map((k) => this.indexOf(k));
    const msg: SessionMsg = {
      op: 'session',
      epoch,
      flowName: s.flowName,
      modules: s.modules,
      newKeys: this.keyList.slice(w.knownKeys),
      check,
      parameters: s.parameters,
      mode: this.mode,
    };
    w.knownKeys = this.keyList.length;
    w.state = 'starting';
    return new Promise<void>((resolve, reject) => {
      w.opening = { epoch, resolve, reject };
      try {
        w.link.send(msg, []);
      } catch (err) {
        w.opening = null;
        reject(err instanceof Error ? err : new Error(String(err)));
      }
    });
  }

  private onControl(w: WorkerSlot, msg: Exclude<FromWorker, { op: 'done' }>): void {
    const o = w.opening;
    if (o === null || msg.epoch !== o.epoch || w.state === 'dead') return; // stale reply
    w.opening = null;
    if (msg.op === 'ready') {
      w.name = msg.worker;
      w.state = 'ready';
      o.resolve();
      this.queueDispatch();
    } else {
      // The worker itself is fine (a warm pool keeps it); it just cannot serve this run,
      // and start() rejects (ending the session, or the pool without keepAlive).
      o.reject(deserializeError(msg.error));
    }
  }

  private onExit(w: WorkerSlot, reason: string): void {
    const wasStarting = w.state === 'starting';
    w.state = 'dead';
    this.dying.delete(w);
    this.bySerial.delete(w.link.serial);
    const i = this.slots.indexOf(w);
    if (i >= 0) this.slots.splice(i, 1);
    if (w.opening !== null) {
      w.opening.reject(new WorkerLostError(`worker ${w.name} exited before it was ready: ${reason}`));
      w.opening = null;
    }
    if (this.closed) return;
    // Its unfinished calls are lost: the runner runs them again elsewhere.
    if (w.out > 0) {
      for (let s = 0; s < this.capacity; s++) {
        if (this.calls[s] !== null && this.slotSerial[s] === w.link.serial) {
          this.finishLocal(s, 'lost', new WorkerLostError(`worker ${w.name} died while running task "${this.calls[s]!.key}": ${reason}`), w);
        }
      }
    }
    // A crash is replaced here; a retired worker was replaced when it was retired.
    if (!w.retired && !wasStarting) this.replace();
  }

  /** Stop a worker now (timeout, cancel, end of session while busy) and replace it; its exit reports its lost calls. */
  private retire(w: WorkerSlot): void {
    if (w.retired) return;
    w.retired = true;
    this.dying.add(w);
    const i = this.slots.indexOf(w);
    if (i >= 0) this.slots.splice(i, 1);
    if (w.state !== 'dead') {
      w.state = 'dead';
      w.link.kill();
    }
    if (!this.closed) this.replace();
  }

  /** A new worker in place of one that left; it joins the open session, if any. */
  private replace(): void {
    if (this.closed || this.slots.length >= this.workers) return;
    const w = this.spawn();
    if (this.session !== null) this.openSession(w).catch((err: unknown) => this.onReplacementFailed(err));
  }

  /** A replacement worker could not start (its modules no longer import?): if none is left, fail what waits. */
  private onReplacementFailed(err: unknown): void {
    if (this.session === null || this.slots.some((w) => w.state !== 'dead')) return;
    const error = err instanceof Error ? err : new WorkerLostError(String(err));
    const p = this.pending;
    for (let i = this.pHead; i < p.length; i++) {
      const c = p[i];
      if (c != null) {
        p[i] = null;
        this.pendingCount--;
        this.pendingEst = 0;
        this.accepted--;
        this.pushLocal(c, 'error', error, '');
      }
    }
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

  /**
   * Hand pending calls to workers that can take them, one batch per worker per round:
   * idle workers first (a call never waits behind another while a worker is idle), then
   * busy ones, while their estimated work is under TARGET_BATCH_MS or they hold fewer
   * than LOOKAHEAD_CALLS calls.
   */
  private dispatch(): void {
    if (this.session === null) return;
    const ws = this.slots;
    const nw = ws.length;
    let progress = true;
    while (this.pendingCount > 0 && progress) {
      progress = false;
      for (let k = 0; k < nw && this.pendingCount > 0; k++) {
        const w = ws[(this.rr + k) % nw]!;
        if (w.state === 'ready' && w.out === 0 && !w.exclusive && this.sendBatch(w) > 0) progress = true;
      }
      for (let k = 0; k < nw && this.pendingCount > 0; k++) {
        const w = ws[(this.rr + k) % nw]!;
        if (w.state !== 'ready' || w.exclusive || w.out >= this.prefetch) continue;
        if (w.outEst >= TARGET_BATCH_MS && w.out >= LOOKAHEAD_CALLS) continue;
        // Hysteresis: a worker that still holds a full batch gets no small one. Its next
        // outcome message dispatches again, by when the runner has refilled `pending`;
        // without this, batch sizes settle at the size of the outcome messages (~60
        // calls measured) and the per-message cost of postMessage dominates.
        if (w.out >= this.maxBatch && this.pendingCount < this.maxBatch) continue;
        if (this.sendBatch(w) > 0) progress = true;
      }
      this.rr = (this.rr + 1) % Math.max(1, nw);
    }
    if (this.pHead > 1024 && this.pHead * 2 > this.pending.length) {
      this.pending = this.pending.slice(this.pHead);
      this.pHead = 0;
    }
  }

  /** Choose calls for `w`, move them to the in-flight table and send them as one batch; returns how many it took. */
  private sendBatch(w: WorkerSlot): number {
    const p = this.pending;
    const est = this.est;
    const limit = Math.min(this.maxBatch, this.prefetch - w.out);
    const serial = w.link.serial;
    const batch: number[] = [];
    let q = this.pHead;
    let cost = 0;
    let timed = false;
    while (q < p.length && batch.length < limit && cost < TARGET_BATCH_MS) {
      const c = p[q];
      if (c == null) {
        q++;
        continue;
      }
      if (c.timeoutMs > 0) {
        // Alone, to an idle worker (which then takes nothing else until it finishes).
        if (batch.length > 0 || w.out > 0) break;
        timed = true;
      }
      p[q++] = null;
      const slot = this.freeList[--this.freeTop]!;
      const t = this.indexOf(c.taskKey);
      const e = est[t]!;
      const ce = e < 0 ? TARGET_BATCH_MS : e;
      this.calls[slot] = c;
      this.slotSerial[slot] = serial;
      this.slotTask[slot] = t;
      this.slotEst[slot] = ce;
      cost += ce;
      batch.push(slot);
      if (timed) break;
    }
    const count = batch.length;
    this.pHead = skipNulls(p, this.pHead, q);
    if (count === 0) return 0;
    this.pendingCount -= count;
    this.pendingEst = this.pendingCount === 0 ? 0 : Math.max(0, this.pendingEst - cost);
    const sent = this.post(w, batch);
    w.out += sent;
    w.outEst += sent === count ? cost : TARGET_BATCH_MS * sent;
    if (timed && sent === 1) {
      const slot = batch[0]!;
      w.exclusive = true;
      this.timers.set(
        slot,
        setTimeout(() => this.onTimeout(slot, serial), this.calls[slot]!.timeoutMs),
      );
    }
    return count;
  }

  /** The columns of a batch (see `pool-protocol.ts`). */
  private encode(w: WorkerSlot, batch: readonly number[]): RunMsg {
    const n = batch.length;
    const ints = new Int32Array(n * CALL_STRIDE);
    const keys = new Array<string>(n);
    let args: unknown[] | undefined;
    let allNum = true;
    let loopResults: unknown[] | undefined;
    for (let i = 0, j = 0; i < n; i++, j += CALL_STRIDE) {
      const slot = batch[i]!;
      const c = this.calls[slot]!;
      const a = c.args;
      const argc = a.length;
      ints[j + C_SLOT] = slot;
      ints[j + C_TASK] = this.slotTask[slot]!;
      ints[j + C_MAP] = c.mapIndex;
      ints[j + C_ATTEMPT] = c.attempt;
      ints[j + C_LOOP] = c.loopCount;
      ints[j + C_ARGC] = argc;
      ints[j + C_KEYLEN] = c.key.length;
      keys[i] = c.key;
      if (argc > 0) {
        args ??= [];
        for (let k = 0; k < argc; k++) {
          const v = a[k];
          if (allNum && typeof v !== 'number') allNum = false;
          args.push(v);
        }
      }
      if (c.loopCount > 0) (loopResults ??= new Array<unknown>(n))[i] = c.loopResult;
    }
    let newKeys: string[] | undefined;
    if (w.knownKeys < this.keyList.length) {
      newKeys = this.keyList.slice(w.knownKeys);
      w.knownKeys = this.keyList.length;
    }
    return {
      op: 'run',
      ints,
      // One flat string (join) rather than one string per call: a single memcpy to clone.
      names: keys.join(''),
      ...(args === undefined ? {} : allNum ? { nums: Float64Array.from(args as number[]) } : { args }),
      ...(loopResults ? { loopResults } : {}),
      ...(newKeys ? { newKeys } : {}),
    };
  }

  /** Post a batch; on a clone error fail only the calls whose arguments cannot travel. Returns calls sent. */
  private post(w: WorkerSlot, batch: number[]): number {
    const msg = this.encode(w, batch);
    try {
      w.link.send(msg, transferOf(msg));
      return batch.length;
    } catch (err) {
      if (!isCloneError(err)) throw err;
      // The message did not leave: the worker learns the new keys with the retry.
      if (msg.newKeys !== undefined) w.knownKeys -= msg.newKeys.length;
    }
    const keep: number[] = [];
    for (const slot of batch) {
      const c = this.calls[slot]!;
      try {
        structuredClone([c.args, c.loopResult]);
        keep.push(slot);
      } catch (e) {
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
    const retry = this.encode(w, keep);
    w.link.send(retry, transferOf(retry));
    return keep.length;
  }

  /** A call's estimated duration (ms): the moving average of its task, TARGET_BATCH_MS when unknown. */
  private estimate(t: number): number {
    const e = this.est[t]!;
    return e < 0 ? TARGET_BATCH_MS : e;
  }

  private indexOf(taskKey: string): number {
    if (taskKey === this.lastKey) return this.lastIndex;
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
    this.lastKey = taskKey;
    this.lastIndex = t;
    return t;
  }

  /** Start the task table afresh (a warm pool that has seen too many keys); workers relearn it. */
  private resetKeys(): void {
    this.keyIndex = new Map();
    this.keyList = [];
    this.est = new Float64Array(16).fill(-1);
    this.lastKey = '';
    this.lastIndex = -1;
    // Their tables cannot shrink: replace the workers (a rare event, at a session start).
    for (const w of [...this.slots]) this.retire(w);
  }

  // ---- outcomes -------------------------------------------------------------------

  private onDone(w: WorkerSlot, msg: Extract<FromWorker, { op: 'done' }>): void {
    const session = this.session;
    if (session === null) return;
    const { slots, status, values, nums, fill, times } = msg;
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
      const v = nums !== undefined ? nums[i] : values !== undefined ? values[i] : fill;
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
    if (outs.length > 0) session.onOutcomes(outs);
    if (this.pendingCount > 0) this.dispatch();
  }

  private onTimeout(slot: number, serial: number): void {
    this.timers.delete(slot);
    const c = this.calls[slot];
    if (c == null || this.slotSerial[slot] !== serial) return;
    const w = this.bySerial.get(serial);
    this.finishLocal(slot, 'timeout', new TaskTimeoutError(`task "${c.key}" timed out after ${c.timeoutMs} ms`), w);
    if (w !== undefined) this.retire(w);
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
        if (this.session !== null && outs.length > 0) this.session.onOutcomes(outs);
        this.queueDispatch();
      });
    }
  }
}

/** The typed columns of a batch move, not copy (`ints` must not be read after sending). */
function transferOf(msg: RunMsg): ArrayBuffer[] {
  return msg.nums === undefined ? [msg.ints.buffer as ArrayBuffer] : [msg.ints.buffer as ArrayBuffer, msg.nums.buffer as ArrayBuffer];
}

function skipNulls(p: (TaskCall | null)[], from: number, to: number): number {
  let i = from;
  while (i < to && p[i] == null) i++;
  return i;
}

/**
 * `flags` without the ones that preload tsx (`npx tsx` adds `--require …/tsx/dist/preflight.cjs
 * --import …/tsx/dist/loader.mjs`). Inherited by a worker thread, they load tsx's whole
 * bundle and its CommonJS hooks there, which then run esbuild on piscina's own files:
 * measured, that more than doubled a cold pool's CPU time. The worker entry registers
 * tsx's ESM hooks itself, as it does under `weft` (which registers tsx with the API, not
 * with flags).
 */
export function withoutTsxPreload(flags: readonly string[]): string[] {
  const out: string[] = [];
  const isTsx = (v: string | undefined): boolean => v !== undefined && /(^tsx(\/|$))|([\\/]tsx[\\/])/.test(v);
  for (let i = 0; i < flags.length; i++) {
    const a = flags[i]!;
    if ((a === '--require' || a === '-r' || a === '--import' || a === '--loader' || a === '--experimental-loader') && isTsx(flags[i + 1])) {
      i++;
      continue;
    }
    const eq = /^--(require|import|loader|experimental-loader)=(.*)$/.exec(a);
    if (eq !== null && isTsx(eq[2])) continue;
    out.push(a);
  }
  return out;
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

