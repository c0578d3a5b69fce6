/**
 * The scheduler's view of its workers: credits, placement, results held on workers,
 * lineage, stealing and retirement. Graph runs and call sessions reach the workers
 * through a `FleetSession` each — an `Executor`, so the scheduler drives a submitted
 * graph with the very runner (`runFlow`) that runs flows in-process.
 *
 * - **Credits.** A worker may hold at most `credits` calls (it says how many: slots ×
 *   saturation, 0 while over its memory limit). `freeSlots()` never promises more than
 *   the free credits, shared fairly between the sessions that want work.
 * - **Placement.** A call whose inputs are held on workers goes to the worker holding
 *   most of their bytes if it has a free credit; a call without such inputs goes to the
 *   worker currently being filled (round robin over free credits, O(1) per call).
 * - **Results stay where they were made.** A result larger than the worker's inline
 *   limit is held there; the runner gets a `RemoteRef` in its place and passes it on
 *   as an argument, which becomes a `WireDep` the receiving worker fetches from a peer.
 * - **Lineage.** Each held result remembers the call that made it. When its only
 *   holder dies, it is recomputed (inputs first, recursively) when still needed, and calls
 *   that wait for it are placed once it is back. The runner never hears of it.
 * - **Lost workers.** Calls in flight on a dead worker end 'lost' (the runner retries
 *   them; the core fails a task lost on 3 workers as a suspected poison task).
 */
import { performance } from 'node:perf_hooks';
import type { SerializedError } from '../errors.ts';
import type { Executor, ExecutorSession, Outcome, TaskCall } from '../executor/types.ts';
import type { ResultRefs } from '../runner/types.ts';
import type { Connection } from './connection.ts';
import { dataKey, toColumns, type WireCall, type WireDep, type WireOutcome } from './protocol.ts';

const now = (): number => performance.timeOrigin + performance.now();

export { unpackValue } from './worker-store.ts';

export interface WorkerState {
  readonly id: string;
  readonly name: string;
  readonly conn: Connection;
  readonly threads: number;
  readonly resources: Readonly<Record<string, number>>;
  readonly memoryLimit: number;
  /** Peer address (ws://host:port), '' when it serves none. */
  readonly address: string;
  readonly pid: number;
  readonly heartbeatMs: number;
  readonly joinedMs: number;
  credits: number;
  /** Calls sent and not yet ended (ahead calls not counted: see `aheadUsed`). */
  used: number;
  /** Ahead calls waiting there for their producers. */
  aheadUsed: number;
  /** Calls by resource name in flight (for resource capacity). */
  resourceUse: Map<string, number>;
  retiring: boolean;
  /** Results held there (by key). */
  readonly held: Map<string, HeldResult>;
  /** Peer addresses already told to it. */
  readonly knownPeers: Set<string>;
  /** Calls waiting to go out in this tick's compute message, per run. */
  readonly pending: Map<number, WireCall[]>;
  /** Result keys (or `run:*`) to release with the next frame to it. */
  releases: string[];
  metrics: Record<string, number>;
  executed: number;
}

/** Shared empty lists (most held results never get waiters; most handles have no path). */
const NO_WAITERS: Inflight[] = [];
const NO_PATH: readonly number[] = Object.freeze([]);
const NO_HOLDER_IDS: readonly string[] = Object.freeze([]);

/** A result held on workers. */
export class HeldResult {
  readonly holders = new Set<WorkerState>();
  /** Recomputing after its last holder died. */
  recomputing = false;
  /** Calls to place once it is back. */
  waiters: Inflight[] = NO_WAITERS;
  released = false;
  constructor(
    readonly key: string,
    readonly session: FleetSession,
    readonly producer: WireCall,
    public nbytes: number,
    public len: number,
    public inner: readonly number[] | null,
  ) {}
}

/** What the runner holds in place of a result that stayed on a worker. */
export class RemoteRef {
  constructor(
    readonly held: HeldResult,
    readonly path: readonly number[] = NO_PATH,
  ) {}
}

export const remoteRefs: ResultRefs = {
  isRef: (v) => v instanceof RemoteRef,
  length(ref) {
    const r = ref as RemoteRef;
    if (r.path.length === 0) return r.held.len;
    if (r.path.length === 1) return r.held.inner?.[r.path[0]!] ?? -1;
    return -1;
  },
  element: (ref, i) => new RemoteRef((ref as RemoteRef).held, [...(ref as RemoteRef).path, i]),
  innerLengths: (ref) => ((ref as RemoteRef).path.length === 0 ? (ref as RemoteRef).held.inner : null),
};

/** What the runner passes on in place of the result of a call still in flight (`FleetSession.future`): only a whole argument. */
class FutureRef {
  constructor(readonly producer: number) {}
}

/** A call on its way to, or on, a worker. */
export interface Inflight {
  readonly session: FleetSession;
  call: WireCall;
  worker: WorkerState | null;
  /** Set for lineage recomputation: the result this call remakes (the runner knows nothing of it). */
  readonly remake: HeldResult | null;
  /** Results this call needs that are being recomputed. */
  blockedOn: number;
  /** Times it came back INPUT_LOST and was placed again. */
  inputRetries: number;
  /** The call sent ahead to wait for this one's result on its worker (see `FleetSession.submitAhead`). */
  consumer: Inflight | null;
  /**
   * For an ahead call (sent ahead of its producer's outcome: it waits on that worker and
   * takes no credit): its producer's task id (-1 for other calls), and the producer's value once it came back
   * inline (NOT_INLINED until then). `call` still names the producer as a dep: the value is
   * folded in (`settled`) only when the call is used again — sent elsewhere, remade from
   * lineage, placed anew — which most ahead calls never are.
   */
  readonly producer: number;
  producerValue: unknown;
}

/** `Inflight.producerValue` before the producer's value came back inline. */
const NOT_INLINED: unique symbol = Symbol('not inlined');

function inflight(session: FleetSession, call: WireCall, remake: HeldResult | null, producer = -1): Inflight {
  return {
    session,
    call,
    worker: null,
    remake,
    blockedOn: 0,
    inputRetries: 0,
    consumer: null,
    producer,
    producerValue: NOT_INLINED,
  };
}

/** The call of `f` with its producer's inline value folded in (once that value came back). */
function settled(f: Inflight): WireCall {
  if (f.producerValue !== NOT_INLINED) {
    f.call = inlineDep(f.call, dataKey(f.session.run, f.producer), f.producerValue);
    f.producerValue = NOT_INLINED;
  }
  return f.call;
}

/** A released run's `release` waits at most this long for a compute to ride with. */
const RELEASE_DELAY_MS = 50;

/** Batches of at least this many calls place their input-less calls in runs of ROOT_RUN per worker. */
const BIG_BATCH = 256;
const ROOT_RUN = 32;

/** Calls past its credits a worker takes when it holds their inputs: a quarter more, at least 8 (none at 0 credits). */
function overdraft(credits: number): number {
  return credits > 0 ? Math.max(8, credits >> 2) : 0;
}

/** A call whose inputs cannot be fetched this many times ends with that error. */
const MAX_INPUT_RETRIES = 3;

export interface FleetStats {
  assigned: number;
  completed: number;
  lost: number;
  recomputed: number;
  stolen: number;
  relayedBytes: number;
  relayedKeys: number;
}

export interface FleetOptions {
  log: (line: string) => void;
  /** Ask a worker for results (scheduler ↔ worker getData). */
  fetch(worker: WorkerState, keys: readonly string[]): Promise<{ keys: readonly string[]; values: readonly Uint8Array[]; missing: readonly string[] }>;
  /** Ask a worker to fetch results from peers and keep them. */
  acquire(worker: WorkerState, from: Record<string, string>): Promise<{ keys: readonly string[]; missing: readonly string[] }>;
  /** A worker ran out of calls: look for work to steal for it now (not at the next periodic check). */
  onIdle?(worker: WorkerState): void;
}

export class Fleet {
  readonly workers = new Map<string, WorkerState>();
  /** Workers in placement order. */
  private order: WorkerState[] = [];
  private cursor = 0;
  readonly sessions = new Map<number, FleetSession>();
  private nextRun = 1;
  private flushScheduled = false;
  /** Workers with calls waiting in `pending` (what `flush` sends). */
  private dirty: WorkerState[] = [];
  private readonly flushCb = (): void => {
    this.flushScheduled = false;
    this.flush();
  };
  /** Sessions whose runner wants slots (they are pumped when credits come back). */
  private hungry = new Set<FleetSession>();
  readonly stats: FleetStats = { assigned: 0, completed: 0, lost: 0, recomputed: 0, stolen: 0, relayedBytes: 0, relayedKeys: 0 };

  constructor(readonly options: FleetOptions) {}

  // ---- workers ----------------------------------------------------------------

  addWorker(w: WorkerState): void {
    this.workers.set(w.id, w);
    this.order.push(w);
    if (!w.retiring) {
      this.creditSum += w.credits;
      this.usedSum += w.used;
    }
  }

  workersGone(): boolean {
    return this.order.length === 0;
  }

  get slots(): number {
    let s = 0;
    for (const w of this.order) if (!w.retiring) s += w.threads;
    return s;
  }

  /** Free credits of the workers that take work: running sums, O(1) (the runner asks after every outcome batch). */
  get freeCredits(): number {
    return Math.max(0, this.creditSum - this.usedSum);
  }

  /** Credits and calls in flight summed over workers that are not retiring. */
  private creditSum = 0;
  private usedSum = 0;

  /** One more (+1) or one fewer (-1) call in flight on a worker (ahead calls are counted apart). */
  private use(w: WorkerState, f: Inflight, delta: 1 | -1): void {
    if (f.producer >= 0) {
      w.aheadUsed += delta;
      return;
    }
    w.used += delta;
    if (!w.retiring) this.usedSum += delta;
  }

  /** The worker takes no more work (retirement): its credits leave the sums. */
  markRetiring(w: WorkerState): void {
    if (w.retiring) return;
    w.retiring = true;
    if (this.workers.has(w.id)) {
      this.creditSum -= w.credits;
      this.usedSum -= w.used;
    }
  }

  setCredits(w: WorkerState, credits: number): void {
    if (!w.retiring && this.workers.has(w.id)) this.creditSum += credits - w.credits;
    w.credits = credits;
    this.wake();
  }

  /** A worker died or left: its calls end 'lost', its unique results are recomputed when still needed. */
  removeWorker(w: WorkerState, reason: string): void {
    if (!this.workers.has(w.id)) return;
    if (!w.retiring) {
      this.creditSum -= w.credits;
      this.usedSum -= w.used;
    }
    this.workers.delete(w.id);
    this.order = this.order.filter((x) => x !== w);
    this.cursor = 0;
    w.pending.clear();
    const err: SerializedError = {
      name: 'WorkerLostError',
      message: `worker ${w.name} was lost: ${reason}`,
      code: 'WORKER_LOST',
    };
    for (const s of this.sessions.values()) {
      let lost: Outcome[] | null = null;
      for (const f of s.inflight.values()) {
        if (f.worker !== w) continue;
        if (f.remake !== null) {
          // A recomputation in flight: start it again elsewhere.
          f.worker = null;
          this.place(f);
          continue;
        }
        s.inflight.delete(f.call.id);
        this.stats.lost++;
        (lost ??= []).push({ id: f.call.id, runId: f.call.runId, status: 'lost', error: err, startMs: 0, endMs: now(), worker: w.name });
      }
      if (lost !== null) s.deliver(lost);
    }
    for (const h of w.held.values()) {
      h.holders.delete(w);
      if (h.holders.size === 0 && !h.released && !h.session.closed) this.recompute(h);
    }
    w.held.clear();
    this.options.log(`worker ${w.name} (${w.id}) removed: ${reason}`);
    this.wake();
  }

  // ---- sessions ---------------------------------------------------------------

  openSession(kind: 'graph' | 'calls', modules: readonly string[], bundle: string): FleetSession {
    const s = new FleetSession(this, this.nextRun++, kind, modules, bundle);
    this.sessions.set(s.run, s);
    return s;
  }

  /** Fair share of the free credits for one session. */
  shareFor(s: FleetSession): number {
    const free = this.freeCredits;
    if (free <= 0) {
      this.hungry.add(s);
      return 0;
    }
    this.hungry.add(s);
    const n = this.hungry.size;
    return n <= 1 ? free : Math.max(1, Math.ceil(free / n));
  }

  /** No slot for this session now; it is woken when credits come back. */
  hungryFor(s: FleetSession): number {
    this.hungry.add(s);
    return 0;
  }

  /** Credits came back: let waiting sessions dispatch again. */
  wake(): void {
    this.placeAllParked();
    if (this.hungry.size === 0) return;
    const hungry = [...this.hungry];
    this.hungry.clear();
    for (const s of hungry) if (!s.closed) s.pumpRunner();
  }

  closeSession(s: FleetSession, releaseData: boolean): void {
    this.flush();
    const cancel: number[] = [];
    for (const f of s.inflight.values()) if (f.worker !== null) cancel.push(f.call.id);
    if (cancel.length > 0) {
      const byWorker = new Map<WorkerState, number[]>();
      for (const f of s.inflight.values()) {
        if (f.worker === null) continue;
        let l = byWorker.get(f.worker);
        if (l === undefined) byWorker.set(f.worker, (l = []));
        l.push(f.call.id);
        this.use(f.worker, f, -1);
        if (f.call.resources !== undefined) useResources(f.worker, f.call.resources, -1);
      }
      for (const [w, ids] of byWorker) w.conn.send({ op: 'cancelTasks', run: s.run, tasks: ids });
    }
    s.inflight.clear();
    this.hungry.delete(s);
    if (releaseData) this.releaseSession(s);
    this.wake();
  }

  /** Drop every result of a session on every worker. */
  releaseSession(s: FleetSession): void {
    this.sessions.delete(s.run);
    if (this.blockSession === s) {
      this.blockSession = null;
      this.blockWorker = null;
    }
    for (const w of this.order) {
      if (s.held.size > 0) for (const [k, h] of w.held) if (h.session === s) w.held.delete(k);
      if (s.touched.has(w)) this.releaseLater(w, `${s.run}:*`);
    }
    s.touched.clear();
  }

  /**
   * Releases are not urgent: they go with the worker's next compute (same frame), or on
   * their own after RELEASE_DELAY_MS. Every frame is a write that wakes the worker, and
   * back-to-back small runs would pay one per run.
   */
  private releaseLater(w: WorkerState, key: string): void {
    w.releases.push(key);
    if (this.releaseTimer === null) {
      this.releaseTimer = setTimeout(() => {
        this.releaseTimer = null;
        for (const x of this.order) this.sendReleases(x);
      }, RELEASE_DELAY_MS);
      this.releaseTimer.unref();
    }
  }

  private releaseTimer: NodeJS.Timeout | null = null;

  private sendReleases(w: WorkerState): void {
    if (w.releases.length === 0) return;
    const keys = w.releases;
    w.releases = [];
    w.conn.send({ op: 'release', keys });
  }

  // ---- placement ----------------------------------------------------------------

  /** Place a call: on the worker holding most of its input bytes, else the next with a free credit. */
  place(f: Inflight): boolean {
    const call = f.call;
    if (call.resources !== undefined) return this.placeWithResources(f, call.resources);
    let best: WorkerState | null = null;
    const deps = call.deps;
    if (deps !== undefined && deps.length > 0) {
      let bestBytes = -1;
      // Few deps per call: a tiny linear tally in two parallel arrays (no Map per call).
      const ws: WorkerState[] = [];
      const bytes: number[] = [];
      for (const d of deps) {
        const h = f.session.heldFor(d.key);
        if (h === undefined) continue;
        for (const w of h.holders) {
          // A worker that holds inputs takes a call a little past its credits rather than
          // see it go where its inputs must follow (not while it is paused: 0 credits).
          if (w.retiring || w.used >= w.credits + overdraft(w.credits)) continue;
          let i = ws.indexOf(w);
          if (i < 0) {
            i = ws.length;
            ws.push(w);
            bytes.push(0);
          }
          const b = (bytes[i] = bytes[i]! + d.nbytes);
          if (b > bestBytes) {
            bestBytes = b;
            best = w;
          }
        }
      }
    }
    if (best === null) best = f.session.groupRoots && call.id >= 0 ? this.blockFree(f.session, Math.floor(call.id / ROOT_RUN)) : this.nextFree();
    if (best === null) return false;
    this.assign(f, best);
    return true;
  }

  /** The worker of the last call placed from `block` of `session` while it has a free credit, else the next free one (which then takes the block). */
  private blockFree(session: FleetSession, block: number): WorkerState | null {
    const w = this.blockWorker;
    if (w !== null && this.blockSession === session && this.block === block && !w.retiring && w.credits > w.used && this.workers.has(w.id)) return w;
    const next = this.nextFree();
    this.blockWorker = next;
    this.blockSession = session;
    this.block = block;
    return next;
  }

  private blockWorker: WorkerState | null = null;
  private blockSession: FleetSession | null = null;
  private block = -1;

  /** Only workers that advertise the resources, within their capacity; most input bytes first. */
  private placeWithResources(f: Inflight, need: Readonly<Record<string, number>>): boolean {
    let best: WorkerState | null = null;
    let bestBytes = -1;
    for (const w of this.order) {
      if (w.retiring || w.credits <= w.used || !fits(w, need)) continue;
      let bytes = 0;
      for (const d of f.call.deps ?? []) {
        const h = f.session.heldFor(d.key);
        if (h !== undefined && h.holders.has(w)) bytes += d.nbytes;
      }
      if (bytes > bestBytes) {
        bestBytes = bytes;
        best = w;
      }
    }
    if (best === null) {
      if (!f.session.warnedResources) {
        f.session.warnedResources = true;
        const any = this.order.some((w) => fitsTotal(w, need));
        this.options.log(
          `task "${f.call.key}" needs ${JSON.stringify(need)}: ${any ? 'waiting for capacity' : 'no connected worker advertises that much; it waits for one to join'}`,
        );
      }
      return false;
    }
    this.assign(f, best);
    return true;
  }

  /**
   * Round robin over workers with a free credit (O(1) per call when most have one). On an
   * idle cluster the worker that took the last call takes the next one: back-to-back
   * small runs find its caches and its CPU warm instead of waking another worker each time.
   */
  private nextFree(): WorkerState | null {
    const last = this.lastPlaced;
    if (this.usedSum === 0 && last !== null && !last.retiring && last.credits > last.used && this.workers.has(last.id)) return last;
    const order = this.order;
    const n = order.length;
    for (let k = 0; k < n; k++) {
      const i = (this.cursor + k) % n;
      const w = order[i]!;
      if (!w.retiring && w.credits > w.used) {
        // Runs of `run` consecutive calls per worker: in a big batch, neighbours in the
        // ready order (siblings whose results one task will combine) land together.
        if (k > 0) this.inRun = 0;
        if (++this.inRun >= this.run) {
          this.inRun = 0;
          this.cursor = i + 1 === n ? 0 : i + 1;
        } else this.cursor = i;
        return w;
      }
    }
    return null;
  }

  /** Consecutive calls without inputs placed on one worker before moving on (see `nextFree`). */
  private run = 1;
  private inRun = 0;

  /** Set the run length for the calls of one submitted batch: 1 for small batches (spread them), longer for big ones. */
  beginBatch(size: number): void {
    this.run = size >= BIG_BATCH ? ROOT_RUN : 1;
    this.inRun = 0;
  }

  /** The worker of the last call placed (see `nextFree`). */
  private lastPlaced: WorkerState | null = null;

  assign(f: Inflight, w: WorkerState): void {
    const call = settled(f);
    f.worker = w;
    this.lastPlaced = w;
    this.use(w, f, 1);
    if (f.call.resources !== undefined) useResources(w, f.call.resources, 1);
    this.stats.assigned++;
    const s = f.session;
    let batch = w.pending.get(s.run);
    if (batch === undefined) {
      if (w.pending.size === 0) this.dirty.push(w);
      w.pending.set(s.run, (batch = []));
    }
    batch.push(call);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      setImmediate(this.flushCb);
    }
  }

  /** Send this tick's compute messages (one per worker and run). */
  flush(): void {
    const dirty = this.dirty;
    if (dirty.length === 0) return;
    this.dirty = [];
    for (const w of dirty) {
      if (w.pending.size === 0 || !this.workers.has(w.id)) continue;
      this.sendReleases(w); // released runs first, in the same frame
      for (const [run, calls] of w.pending) {
        const s = this.sessions.get(run);
        if (s === undefined) continue;
        s.touched.add(w); // once per batch, not per call (releases go where compute went)
        let peers: Record<string, string> | undefined;
        // Indexed loops: this runs a few times per run, often before it is optimized (a for-of allocates per item then).
        for (let i = 0; i < calls.length; i++) {
          const deps = calls[i]!.deps;
          if (deps === undefined) continue;
          for (let j = 0; j < deps.length; j++) {
            const holders = deps[j]!.holders;
            for (let k = 0; k < holders.length; k++) {
              const id = holders[k]!;
              const h = this.workers.get(id);
              if (h === undefined || h === w || w.knownPeers.has(id) || h.address === '') continue;
              (peers ??= {})[id] = h.address;
              w.knownPeers.add(id);
            }
          }
        }
        const first = !s.announced.has(w);
        if (first) s.announced.add(w);
        w.conn.send({
          op: 'compute',
          run,
          modules: s.modules,
          bundle: s.bundle,
          calls: [],
          cols: toColumns(calls),
          ...(peers !== undefined ? { peers } : {}),
          ...(first && s.session !== null ? { flowName: s.session.flowName, parameters: s.session.parameters } : {}),
        });
      }
      w.pending.clear();
      // Already a turn after the submits: write now rather than one more turn later.
      w.conn.flush();
    }
  }

  // ---- outcomes ---------------------------------------------------------------

  /** A worker's batch of outcomes for one run. */
  outcomes(w: WorkerState, run: number, outs: readonly WireOutcome[]): void {
    const s = this.sessions.get(run);
    if (s === undefined) return; // a closed session: its calls' credits were returned when it closed
    let batch: Outcome[] | null = null;
    for (let i = 0; i < outs.length; i++) {
      const o = outs[i]!;
      const f = s.inflight.get(o.id);
      if (f === undefined || f.worker !== w || f.call.runId !== o.runId) continue; // stale (cancelled, stolen back, rescheduled)
      s.inflight.delete(o.id);
      this.use(w, f, -1);
      if (f.call.resources !== undefined) useResources(w, f.call.resources, -1);
      w.executed++;
      this.stats.completed++;
      if (f.remake !== null) {
        this.remade(f, w, o);
        continue;
      }
      if (o.status === 'lost' && o.error?.code === 'INPUT_LOST' && f.inputRetries < MAX_INPUT_RETRIES) {
        // An input vanished (its holder died while this call fetched it): wait for its recomputation.
        f.inputRetries++;
        if (this.retryAfterInputs(f)) continue;
      }
      const af = f.consumer;
      if (af !== null) {
        f.consumer = null;
        // Its lineage must not wait for a local producer that will never run again (folded in by `settled`).
        if (o.status === 'ok' && 'value' in o) af.producerValue = o.value;
      }
      let value: unknown;
      if (o.status === 'ok') {
        if ('value' in o) value = o.value;
        else {
          const key = dataKey(run, o.id);
          const h = new HeldResult(key, s, settled(f), o.nbytes, o.len, o.inner ?? null);
          h.holders.add(w);
          w.held.set(key, h);
          s.held.set(key, h);
          value = new RemoteRef(h);
        }
      }
      // Every field in the literal: properties added later would need a backing store per outcome.
      const out: Outcome = { id: o.id, runId: o.runId, status: o.status, value, error: o.error, startMs: o.startMs, endMs: o.endMs, worker: w.name };
      (batch ??= []).push(out);
    }
    if (batch !== null) s.deliver(batch);
    this.wake();
    if (w.used === 0 && !w.retiring) this.options.onIdle?.(w);
  }

  /** The outcome of a recomputation. */
  private remade(f: Inflight, w: WorkerState, o: WireOutcome): void {
    const h = f.remake!;
    h.recomputing = false;
    this.stats.recomputed++;
    const waiters = h.waiters;
    h.waiters = NO_WAITERS;
    if (o.status === 'ok' && !('value' in o)) {
      h.nbytes = o.nbytes;
      h.holders.add(w);
      w.held.set(h.key, h);
      for (const x of waiters) this.unblock(x);
      return;
    }
    const err: SerializedError = {
      name: 'WorkerLostError',
      message:
        o.status === 'ok'
          ? `input ${h.key} was lost with its worker and recomputing it gave a small value where a held one was (task "${h.producer.key}" is not deterministic)`
          : `input ${h.key} was lost with its worker and recomputing it ended ${o.status}${o.error ? `: ${o.error.message}` : ''}`,
      code: 'INPUT_LOST',
    };
    for (const x of waiters) {
      if (x.remake !== null) {
        this.remadeFailed(x, err);
        continue;
      }
      x.session.inflight.delete(x.call.id);
      x.session.deliver([{ id: x.call.id, runId: x.call.runId, status: 'error', error: err, startMs: 0, endMs: now() }]);
    }
  }

  private remadeFailed(x: Inflight, err: SerializedError): void {
    x.session.inflight.delete(x.call.id);
    const h = x.remake!;
    h.recomputing = false;
    const ws = h.waiters;
    h.waiters = NO_WAITERS;
    for (const y of ws) {
      if (y.remake !== null) this.remadeFailed(y, err);
      else {
        y.session.inflight.delete(y.call.id);
        y.session.deliver([{ id: y.call.id, runId: y.call.runId, status: 'error', error: err, startMs: 0, endMs: now() }]);
      }
    }
  }

  /** Park a call until its lost inputs are recomputed. False when none of its inputs is lost. */
  private retryAfterInputs(f: Inflight): boolean {
    settled(f);
    f.worker = null;
    const missing = this.blockers(f);
    if (missing === 0) {
      // The input is held somewhere else again: place the call anew.
      f.call = refreshDeps(f.call, f.session);
      f.session.inflight.set(f.call.id, f);
      if (!this.place(f)) f.session.parked.push(f);
      return true;
    }
    f.session.inflight.set(f.call.id, f);
    return true;
  }

  /** Count (and trigger recomputation of) the lost inputs of a call; registers it as a waiter on each. */
  blockers(f: Inflight): number {
    let n = 0;
    const deps = f.call.deps;
    if (deps === undefined) return 0;
    const seen = new Set<string>();
    for (const d of deps) {
      if (seen.has(d.key)) continue;
      seen.add(d.key);
      const h = f.session.heldFor(d.key);
      if (h === undefined || h.holders.size > 0) continue;
      n++;
      if (h.waiters === NO_WAITERS) h.waiters = [f];
      else h.waiters.push(f);
      if (!h.recomputing) this.recompute(h);
    }
    f.blockedOn = n;
    return n;
  }

  private unblock(f: Inflight): void {
    if (--f.blockedOn > 0) return;
    f.call = refreshDeps(f.call, f.session);
    if (!this.place(f)) f.session.parked.push(f);
  }

  /** Recompute a result whose holders all died (its inputs first). */
  recompute(h: HeldResult): void {
    if (h.recomputing || h.released) return;
    h.recomputing = true;
    const s = h.session;
    // Same id (the worker stores the result under its key); runId -1: the runner never sees it
    // (its task finished long ago, so no call of the runner's can hold that id meanwhile).
    const f = inflight(s, { ...h.producer, runId: -1 }, h);
    this.options.log(`recomputing ${h.key} (task "${h.producer.key}") from lineage`);
    s.inflight.set(f.call.id, f);
    if (this.blockers(f) > 0) return;
    f.call = refreshDeps(f.call, s);
    if (!this.place(f)) s.parked.push(f);
  }

  /** Place parked calls (credits came back). */
  placeParked(s: FleetSession): void {
    if (s.parked.length === 0) return;
    const parked = s.parked;
    s.parked = [];
    for (let i = 0; i < parked.length; i++) {
      const f = parked[i]!;
      if (!this.place(f)) {
        s.parked = parked.slice(i).concat(s.parked);
        return;
      }
    }
  }

  /** Parked calls of every session (after credits came back or a worker joined). */
  placeAllParked(): void {
    for (const s of this.sessions.values()) this.placeParked(s);
  }

  // ---- stealing ---------------------------------------------------------------

  /**
   * Idle workers take queued calls from saturated ones: a worker with more calls than
   * threads gives back the excess it has not started (the worker decides, transactionally).
   */
  stealCandidates(): { victim: WorkerState; run: number; ids: number[]; thief: WorkerState }[] {
    const idle = this.order.filter((w) => !w.retiring && w.used === 0 && w.credits > 0);
    if (idle.length === 0) return [];
    const out: { victim: WorkerState; run: number; ids: number[]; thief: WorkerState }[] = [];
    for (const victim of this.order) {
      const excess = victim.used - victim.threads;
      if (excess <= 0 || idle.length === 0) continue;
      const thief = idle.shift()!;
      const want = Math.min(excess, thief.credits);
      const byRun = new Map<number, number[]>();
      let n = 0;
      for (const s of this.sessions.values()) {
        for (const f of s.inflight.values()) {
          // Not ahead calls, nor producers of ahead calls (their consumers wait on that worker).
          if (f.worker !== victim || f.call.runId < 0 || f.call.resources !== undefined || f.consumer !== null || n >= want) continue;
          let l = byRun.get(s.run);
          if (l === undefined) byRun.set(s.run, (l = []));
          l.push(f.call.id);
          n++;
        }
      }
      for (const [run, ids] of byRun) out.push({ victim, run, ids, thief });
    }
    return out;
  }

  /** The victim's answer: stolen calls go to the thief (or wherever there is room). */
  stolen(victim: WorkerState, run: number, ids: readonly number[], thief: WorkerState | undefined): void {
    const s = this.sessions.get(run);
    if (s === undefined) return; // closed meanwhile: its credits were returned then
    for (const id of ids) {
      const f = s.inflight.get(id);
      if (f === undefined || f.worker !== victim) continue;
      this.use(victim, f, -1);
      if (f.call.resources !== undefined) useResources(victim, f.call.resources, -1);
      this.stats.stolen++;
      f.worker = null;
      if (thief !== undefined && this.workers.has(thief.id) && !thief.retiring && thief.credits > thief.used) this.assign(f, thief);
      else if (!this.place(f)) s.parked.push(f);
    }
    this.wake();
  }

  // ---- retirement -------------------------------------------------------------

  /**
   * Move a retiring worker's unique results to other workers (they fetch them from its
   * peer server), then resolve. Results nobody else can take are recomputed later if needed.
   */
  async evacuate(w: WorkerState): Promise<number> {
    this.markRetiring(w);
    const unique: HeldResult[] = [];
    for (const h of w.held.values()) if (h.holders.size === 1 && !h.released && !h.session.closed) unique.push(h);
    const others = this.order.filter((x) => x !== w && !x.retiring);
    if (unique.length === 0 || others.length === 0 || w.address === '') return 0;
    const plan = new Map<WorkerState, Record<string, string>>();
    unique.forEach((h, i) => {
      const to = others[i % others.length]!;
      let m = plan.get(to);
      if (m === undefined) plan.set(to, (m = {}));
      m[h.key] = w.address;
    });
    let moved = 0;
    await Promise.all(
      [...plan].map(async ([to, from]) => {
        try {
          const r = await this.options.acquire(to, from);
          for (const k of r.keys) {
            const h = w.held.get(k);
            if (h === undefined) continue;
            h.holders.add(to);
            to.held.set(k, h);
            moved++;
          }
        } catch (err) {
          this.options.log(`moving results off ${w.name} to ${to.name} failed: ${(err as Error).message}`);
        }
      }),
    );
    return moved;
  }
}

/** Re-read holders of a call's deps (they change as workers die and results are remade or moved). */
function refreshDeps(c: WireCall, s: FleetSession): WireCall {
  if (c.deps === undefined) return c;
  const deps: WireDep[] = c.deps.map((d) => {
    const h = s.heldFor(d.key);
    if (h === undefined) return d;
    const holders: string[] = [];
    for (const w of h.holders) holders.push(w.id);
    return { ...d, holders };
  });
  return wireCall(c, c.args, deps, c.ret);
}

/**
 * A WireCall built as one literal of one shape. (Spreading a call and then its optional
 * fields copied it once per spread, into objects V8 could not keep fast: the biggest
 * allocation per call on the scheduler.) Absent optional fields are undefined.
 */
function wireCall(c: TaskCall, args: unknown[], deps: readonly WireDep[] | undefined, ret: boolean | undefined): WireCall {
  return {
    id: c.id,
    runId: c.runId,
    taskKey: c.taskKey,
    key: c.key,
    args,
    timeoutMs: c.timeoutMs,
    mapIndex: c.mapIndex,
    attempt: c.attempt,
    loopCount: c.loopCount,
    loopResult: c.loopResult,
    resources: c.resources,
    deps,
    ret,
  };
}

/**
 * One graph run or call session on the fleet, as an Executor (the runner's view).
 * `run` is the fleet-wide number that namespaces its task ids and result keys.
 */
export class FleetSession implements Executor {
  readonly kind = 'cluster';
  session: ExecutorSession | null = null;
  readonly inflight = new Map<number, Inflight>();
  /** Results of this session held on workers (by key). */
  readonly held = new Map<string, HeldResult>();
  /** Calls that found no free credit (recomputations, stolen calls). */
  parked: Inflight[] = [];
  /** Workers that received compute for this session. */
  readonly touched = new Set<WorkerState>();
  /** Workers told this session's flow name and parameters. */
  readonly announced = new Set<WorkerState>();
  closed = false;
  warnedResources = false;
  /** Per task key (node key): return the value with the outcome whatever its size. */
  needsValue: ((key: string) => boolean) | null = null;
  /**
   * A big graph: its input-less calls go to workers in blocks of ROOT_RUN consecutive
   * task ids (siblings in the graph's order, whose results one task will combine, land
   * on one worker however the runner batches them).
   */
  groupRoots = false;
  /** Call sessions return every value. */
  returnAll: boolean;
  /** Runs the runner's pump when credits come back. */
  pumpRunner: () => void = () => undefined;
  private pending: Outcome[] | null = null;

  constructor(
    readonly fleet: Fleet,
    readonly run: number,
    readonly mode: 'graph' | 'calls',
    readonly modules: readonly string[],
    readonly bundle: string,
  ) {
    this.returnAll = mode === 'calls';
  }

  get workers(): number {
    return Math.max(1, this.fleet.slots);
  }

  heldFor(key: string): HeldResult | undefined {
    return this.held.get(key);
  }

  start(session: ExecutorSession): Promise<void> {
    this.session = session;
    return Promise.resolve();
  }

  freeSlots(): number {
    if (this.closed) return 0;
    if (this.parked.length > 0) {
      this.fleet.placeParked(this);
      // Parked calls go first; the runner is woken when credits come back.
      if (this.parked.length > 0) return this.fleet.hungryFor(this);
    }
    return this.fleet.shareFor(this);
  }

  submit(calls: TaskCall[]): void {
    const fleet = this.fleet;
    fleet.beginBatch(calls.length);
    for (let i = 0; i < calls.length; i++) {
      const f = inflight(this, this.toWire(calls[i]!), null);
      this.inflight.set(f.call.id, f);
      if (fleet.workersGone()) {
        this.parked.push(f);
        continue;
      }
      if (f.call.deps !== undefined && this.blockedByLost(f)) continue;
      if (!fleet.place(f)) this.parked.push(f);
    }
  }

  private blockedByLost(f: Inflight): boolean {
    const deps = f.call.deps!;
    for (const d of deps) {
      const h = this.held.get(d.key);
      if (h !== undefined && h.holders.size === 0) {
        // Count and register through the fleet (it recomputes them).
        return this.fleet.blockers(f) > 0;
      }
    }
    return false;
  }

  /** Args → WireCall: RemoteRefs (top level, or elements of a list argument) become deps. */
  private toWire(c: TaskCall): WireCall {
    const args = c.args;
    let deps: WireDep[] | undefined;
    let copy: unknown[] | null = null;
    for (let a = 0; a < args.length; a++) {
      const v = args[a];
      if (v instanceof RemoteRef) {
        copy ??= args.slice();
        copy[a] = null;
        deps = withDep(deps, depOf(v, a, -1));
      } else if (v instanceof FutureRef) {
        // Held by nobody yet: its producer's worker hands it over when the producer ends.
        copy ??= args.slice();
        copy[a] = null;
        deps = withDep(deps, { key: dataKey(this.run, v.producer), holders: NO_HOLDER_IDS, nbytes: 0, arg: a, index: -1 });
      } else if (Array.isArray(v) && v.length > 0 && hasRef(v)) {
        copy ??= args.slice();
        const list = v.slice();
        for (let i = 0; i < list.length; i++) {
          const x = list[i];
          if (x instanceof RemoteRef) {
            list[i] = null;
            deps = withDep(deps, depOf(x, a, i));
          }
        }
        copy[a] = list;
      }
    }
    const ret = this.returnAll || (this.needsValue !== null && this.needsValue(c.key)) ? true : undefined;
    if (deps === undefined && ret === undefined) return c;
    return wireCall(c, copy ?? args, deps, ret);
  }

  /** The future result of a call in flight: as an argument, the worker that runs that call hands it over locally. */
  future(producer: number): unknown {
    return new FutureRef(producer);
  }

  /** Send a dependent to its producer's worker now; it starts there when the producer succeeds. */
  submitAhead(call: TaskCall, producer: number): boolean {
    const pf = this.inflight.get(producer);
    const w = pf?.worker ?? null;
    if (w === null || w.retiring || this.closed || this.inflight.has(call.id) || call.resources !== undefined) return false;
    const f = inflight(this, this.toWire(call), null, producer);
    if (f.call.deps !== undefined) {
      // Every other input must be held by that worker or be known: a lost one rules it out.
      for (const d of f.call.deps) {
        const h = this.held.get(d.key);
        if (h !== undefined && h.holders.size === 0) return false;
      }
    }
    this.inflight.set(call.id, f);
    pf!.consumer = f;
    this.fleet.assign(f, w);
    return true;
  }

  cancel(ids: readonly number[]): void {
    const byWorker = new Map<WorkerState, number[]>();
    const now_ = now();
    const out: Outcome[] = [];
    for (const id of ids) {
      const f = this.inflight.get(id);
      if (f === undefined) continue;
      if (f.worker === null) {
        // Parked or waiting for inputs: never sent.
        this.inflight.delete(id);
        this.parked = this.parked.filter((x) => x !== f);
        out.push({ id, runId: f.call.runId, status: 'cancelled', error: { name: 'CancelledError', message: `task "${f.call.key}" was cancelled` }, startMs: 0, endMs: now_ });
        continue;
      }
      let l = byWorker.get(f.worker);
      if (l === undefined) byWorker.set(f.worker, (l = []));
      l.push(id);
    }
    // Computes of this tick go out first: a cancel must never overtake the call it names.
    if (byWorker.size > 0) this.fleet.flush();
    for (const [w, l] of byWorker) w.conn.send({ op: 'cancelTasks', run: this.run, tasks: l });
    if (out.length > 0) this.deliver(out);
  }

  /** Outcomes to the runner (or the client), batched per tick. */
  deliver(outs: Outcome[]): void {
    if (this.closed || this.session === null) return;
    if (this.pending === null) {
      this.pending = outs;
      queueMicrotask(() => {
        const p = this.pending!;
        this.pending = null;
        if (!this.closed) this.session?.onOutcomes(p);
      });
    } else for (const o of outs) this.pending.push(o);
  }

  /** End the run (the runner calls this). Graph runs keep their results until the client releases them. */
  shutdown(): Promise<void> {
    if (!this.closed) {
      this.closed = this.mode === 'calls';
      this.fleet.closeSession(this, this.mode === 'calls');
    }
    return Promise.resolve();
  }

  /** Drop the session and its results everywhere (client released it or left). */
  release(): void {
    if (this.closed && !this.fleet.sessions.has(this.run)) return;
    this.closed = true;
    this.fleet.closeSession(this, true);
    for (const h of this.held.values()) h.released = true;
    this.held.clear();
  }
}

function fits(w: WorkerState, need: Readonly<Record<string, number>>): boolean {
  for (const k in need) if ((w.resources[k] ?? 0) - (w.resourceUse.get(k) ?? 0) < need[k]!) return false;
  return true;
}

function fitsTotal(w: WorkerState, need: Readonly<Record<string, number>>): boolean {
  for (const k in need) if ((w.resources[k] ?? 0) < need[k]!) return false;
  return true;
}

function useResources(w: WorkerState, need: Readonly<Record<string, number>>, sign: 1 | -1): void {
  for (const k in need) w.resourceUse.set(k, (w.resourceUse.get(k) ?? 0) + sign * need[k]!);
}

/** A call with the dep on `key` replaced by its value. */
function inlineDep(c: WireCall, key: string, value: unknown): WireCall {
  if (c.deps === undefined) return c;
  const args = c.args.slice();
  let deps: WireDep[] | undefined;
  for (const d of c.deps) {
    if (d.key !== key) {
      (deps ??= []).push(d);
      continue;
    }
    let v = value;
    if (d.path !== undefined) for (const p of d.path) v = (v as unknown[] | undefined)?.[p];
    if (d.index < 0) args[d.arg] = v;
    else {
      const list = (args[d.arg] as unknown[]).slice();
      list[d.index] = v;
      args[d.arg] = list;
    }
  }
  return wireCall(c, args, deps, c.ret);
}

/** `deps` with `d` added: a list of one to start (most calls have one dep; `[]` then push reserves room for 17). */
function withDep(deps: WireDep[] | undefined, d: WireDep): WireDep[] {
  if (deps === undefined) return [d];
  deps.push(d);
  return deps;
}

function hasRef(list: unknown[]): boolean {
  for (let i = 0; i < list.length; i++) if (list[i] instanceof RemoteRef) return true;
  return false;
}

function depOf(r: RemoteRef, arg: number, index: number): WireDep {
  const h = r.held;
  let holders: readonly string[] = NO_HOLDER_IDS;
  if (h.holders.size > 0) {
    const ids: string[] = [];
    for (const w of h.holders) ids.push(w.id);
    holders = ids;
  }
  // Two literal shapes, not a conditional spread (a temporary object per dep).
  if (r.path.length > 0) return { key: h.key, holders, nbytes: h.nbytes, arg, index, path: r.path };
  return { key: h.key, holders, nbytes: h.nbytes, arg, index };
}
