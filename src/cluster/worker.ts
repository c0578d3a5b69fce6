/**
 * The cluster worker process (Dask distributed's `Worker`): connects to a scheduler,
 * runs the calls it is sent on a local executor, holds their results and serves them to
 * peers.
 *
 * Life of a call here (`WorkCall.state`):
 *
 *   fetching ──(every input in args)──▶ ready ──(handed to the executor)──▶ executing ──▶ outcome
 *
 * - fetching: inputs come from this worker's store, from an "ahead" producer that was
 *   sent here before it finished (`dep.holders` empty), or from a holder over a peer
 *   connection, with the scheduler as relay when no peer delivers. Every fetch is
 *   asynchronous and per key, so one slow input never holds up another call.
 * - ready: in this worker's own queue, so the scheduler can still steal it. Calls of
 *   tasks measured under ~1 ms are handed to the executor in whole batches; slower ones
 *   only while fewer than `threads` calls execute (the rest stay stealable).
 * - executing: the executor owns it; only `cancelTasks` can stop it.
 *
 * Every call that ends produces exactly one outcome (each returns a credit to the
 * scheduler), except a stolen call, which produces none. A lost scheduler connection
 * drops everything (calls, held results): the scheduler reschedules or recomputes, as
 * it does for a dead worker, and this worker reconnects with a fresh state.
 *
 * Limits worth knowing: with one thread, tasks run on the worker's own event loop, so
 * a long synchronous task also holds up its heartbeats (use threads > 1 for those);
 * results travel as msgpack, so a Map arrives as a plain object (as through the scheduler).
 *
 * Code: a run's `modules` are imported from disk, or, when the run names a code bundle
 * (`compute.bundle`), the bundle is fetched from the scheduler once per hash and cached
 * on disk (`BundleCache`, see `bundle.ts`), and the run's executor imports that file.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { EventEmitter } from 'node:events';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { monitorEventLoopDelay, performance, type IntervalHistogram } from 'node:perf_hooks';
import { format } from 'node:util';
import { WebSocket } from 'ws';
import { CancelledError, TaskSerializationError, WeftError, WorkerLostError, type SerializedError } from '../errors.ts';
import { LocalExecutor } from '../executor/local.ts';
import { PoolExecutor } from '../executor/pool.ts';
import type { TaskFn } from '../executor/pool-tasks.ts';
import type { Executor, ExecutorSession, Outcome, OutcomeStatus, TaskCall } from '../executor/types.ts';
import { BundleCache, defaultBundleDir } from './bundle.ts';
import { CLIENT_SOCKET_OPTIONS, Connection, openHandshake } from './connection.ts';
import { PeerClients, PeerServer, type DataReply, type PeerTls } from './peer.ts';
import {
  dataKey,
  DEFAULT_MAX_FRAME_BYTES,
  dispatch,
  fromColumns,
  OutcomeColumnsBuilder,
  ProtocolError,
  wireError,
  type AcquireMsg,
  type CancelTasksMsg,
  type ComputeMsg,
  type DataMsg,
  type Handlers,
  type HeartbeatMetrics,
  type LogRecord,
  type Message,
  type StealMsg,
  type WelcomeMsg,
  type WireCall,
  type WireDep,
  type WireOutcome,
} from './protocol.ts';
import { packedStringBytes, packValue, unpackValue, WorkerStore, type Lookup } from './worker-store.ts';

export interface WorkerOptions {
  /** The scheduler: `ws://host:port` or `wss://host:port`. */
  scheduler: string;
  /** Default `${hostname}-${pid}`. Unique in the cluster (the scheduler refuses a duplicate). */
  name?: string;
  /** Task slots, default 1 (1: calls run in this thread on a LocalExecutor; more: a PoolExecutor of that many threads). */
  threads?: number;
  /** Bytes, 0 = none. Held results spill to disk above 60% of it; work pauses above 80% rss. */
  memoryLimit?: number;
  /** Abstract resources advertised to the scheduler, e.g. `{ GPU: 1 }`. */
  resources?: Record<string, number>;
  /** Shared secret of the cluster (HMAC handshake; it never travels). */
  token?: string;
  /** PEM material for wss to the scheduler and for the peer server (`cert` + `key` make it wss; `ca` verifies the other side). */
  tls?: { ca?: string | Buffer; cert?: string | Buffer; key?: string | Buffer };
  /** Peer server bind host, default 127.0.0.1. */
  host?: string;
  /** Results up to this packed size travel with their outcome and are not held. Default 64. */
  inlineBytes?: number;
  /** Credits = threads × saturation. Default 2. */
  saturation?: number;
  /** Where fetched code bundles are cached, default `os.tmpdir()/weft-bundles/<installation>` (shared by the workers of one installation). */
  bundleDir?: string;
  /** Spill directory, default `os.tmpdir()/weft-spill-<pid>`. */
  spillDir?: string;
  /** Reconnect backoff (ms): from `minMs` (default 100) doubling to `maxMs` (default 5000), with jitter. */
  reconnect?: { minMs?: number; maxMs?: number };
  /** Diagnostics, one line each (default: stderr). */
  log?: (line: string) => void;
  /** Resident set size sampler for the memory monitor (tests); default `process.memoryUsage.rss`. */
  rss?: () => number;
}

/** Events of a `ClusterWorker`. */
export interface WorkerEvents {
  /** A welcome from the scheduler (after every (re)connect). */
  connected: [info: { id: string; scheduler: string }];
  /** The scheduler connection is gone (the worker reconnects unless closing). */
  disconnected: [reason: string];
}

/** Credits and submission policy. */
/** Marks a primitive result: its size is known without packing it, and nothing about it can fail to pack (see `finish`). */
const PRIMITIVE = new Uint8Array(0);

/** msgpack size of a primitive (exact for strings, an upper bound for numbers). */
function primitiveBytes(v: unknown): number {
  if (typeof v === 'number') return Number.isInteger(v) && v >= -32 && v < 128 ? 1 : 9;
  if (typeof v === 'string') return packedStringBytes(v);
  return 1;
}

const FAST_TASK_MS = 1;
/** `outcomes` messages carry their outcomes in columns. */
const NO_OUTCOMES: readonly WireOutcome[] = Object.freeze([]);
/** Estimated work (ms per thread) handed to the executor at once for short tasks (see `handLimit`). */
const HANDED_MS = 2;
/** Weight of a new duration sample in the per-task moving average. */
const EMA = 0.3;
/** Memory thresholds, as fractions of `memoryLimit` (Dask's target / spill / pause). */
const MEM_TARGET = 0.6;
const MEM_SPILL = 0.7;
const MEM_PAUSE = 0.8;
const MEMORY_CHECK_MS = 100;
/** How long `retire()` waits for the scheduler to move results away and answer. */
const RETIRE_WAIT_MS = 10_000;
/** A relay request (`getData` to the scheduler) without a reply for this long counts as missing. */
const RELAY_TIMEOUT_MS = 60_000;
/** Room left in a frame for everything but the values of a `data` reply. */
const FRAME_SLACK = 64 * 1024;
/** Task log records kept while the socket is busy; beyond, records are counted and dropped. */
const MAX_LOG_RECORDS = 10_000;

/** Start a worker: resolves once its peer server listens; it connects (and reconnects) in the background. */
export async function startWorker(o: WorkerOptions): Promise<ClusterWorker> {
  const core = new WorkerCore(o);
  await core.start();
  return new ClusterWorker(core);
}

/** A running worker (the public face of `WorkerCore`). */
export class ClusterWorker {
  readonly #core: WorkerCore;
  /** Resolves at the first welcome from the scheduler. */
  readonly connectedOnce: Promise<void>;
  /** Resolves once the worker has stopped (after `close()`, or a retirement). */
  readonly closed: Promise<void>;

  /** @internal Use `startWorker`. */
  constructor(core: WorkerCore) {
    this.#core = core;
    this.connectedOnce = core.connectedOnce;
    this.closed = core.closedPromise;
  }

  get name(): string {
    return this.#core.name;
  }

  /** The id the scheduler gave this worker at the last welcome ('' before). */
  get id(): string {
    return this.#core.id;
  }

  /** The peer server's address (`ws://host:port` or `wss://...`). */
  get address(): string {
    return this.#core.address;
  }

  get connected(): boolean {
    return this.#core.conn !== null;
  }

  /** Resolves at the next welcome (at once if connected now). */
  waitConnected(): Promise<void> {
    return this.#core.waitConnected();
  }

  on<E extends keyof WorkerEvents>(event: E, listener: (...args: WorkerEvents[E]) => void): this {
    this.#core.events.on(event, listener as (...args: unknown[]) => void);
    return this;
  }

  off<E extends keyof WorkerEvents>(event: E, listener: (...args: WorkerEvents[E]) => void): this {
    this.#core.events.off(event, listener as (...args: unknown[]) => void);
    return this;
  }

  /** What the next heartbeat would report. */
  metrics(): HeartbeatMetrics {
    return this.#core.metrics();
  }

  /** Stop everything now: no reconnect; running calls are abandoned. Idempotent. */
  close(): Promise<void> {
    return this.#core.close('worker closing');
  }

  /**
   * Leave gracefully: tell the scheduler, which moves the results only this worker holds
   * to others (they fetch them from this worker's peer server) and answers `retire`;
   * then finish running calls and close. Waits at most 10 s for the scheduler.
   */
  retire(reason: string): Promise<void> {
    return this.#core.retire(reason);
  }
}

// ---- internal state ------------------------------------------------------------------

type CallState = 'fetching' | 'ready' | 'executing';

/** A call this worker accepted and has not ended. */
interface WorkCall {
  /** `dataKey(run, id)`: its key in `calls` and the key its result is held under. */
  readonly key: string;
  readonly rs: RunState;
  readonly call: WireCall;
  state: CallState;
  /** Inputs not yet in `call.args`. Invariant: 0 unless state is 'fetching'. */
  missing: number;
}

/** One scheduler run on this worker: its executor and its queue of ready calls. */
interface RunState {
  readonly run: number;
  readonly executor: Executor;
  /** starting → ready | failed; disposed once released or dropped (its outcomes are ignored). */
  status: 'starting' | 'ready' | 'failed' | 'disposed';
  /** Why `start()` failed (status 'failed'). */
  startError: SerializedError | null;
  /** Ready calls FIFO from `head`; entries that left 'ready' (stolen, cancelled) are skipped. */
  queue: WorkCall[];
  head: number;
  /** The worker that runs it (task console output goes to its connection). */
  readonly core: WorkerCore;
}

/** What an inline executor is handed: the call, and the worker's record of it (console capture). */
interface InlineCall extends TaskCall {
  readonly wc: WorkCall;
}

/**
 * What ended recently, kept briefly: two generations of maps, the older dropped whole
 * when the newer fills (half the entry or weight budget). O(1) per operation, unlike
 * evicting a Map's oldest entry one by one (its iterator steps over every deleted slot).
 * Values are never undefined.
 */
class RecentMap<V> {
  private cur = new Map<string, V>();
  private prev = new Map<string, V>();
  /** Weight added to `cur` since it began (deletions not subtracted: they only bring the rotation forward). */
  private curWeight = 0;

  constructor(
    private readonly maxEntries: number,
    private readonly maxWeight = Infinity,
  ) {}

  get(key: string): V | undefined {
    const v = this.cur.get(key);
    return v !== undefined ? v : this.prev.get(key);
  }

  /** Remember `value`; one heavier than half the budget is not kept. */
  set(key: string, value: V, weight = 0): void {
    this.prev.delete(key);
    if (weight * 2 > this.maxWeight) {
      this.cur.delete(key);
      return;
    }
    this.cur.set(key, value);
    this.curWeight += weight;
    if (this.cur.size * 2 >= this.maxEntries || this.curWeight * 2 >= this.maxWeight) {
      this.prev = this.cur;
      this.cur = new Map();
      this.curWeight = 0;
    }
  }

  delete(key: string): void {
    this.cur.delete(key);
    this.prev.delete(key);
  }

  deletePrefix(prefix: string): void {
    for (const m of [this.cur, this.prev]) for (const k of [...m.keys()]) if (k.startsWith(prefix)) m.delete(k);
  }

  clear(): void {
    this.cur = new Map();
    this.prev = new Map();
    this.curWeight = 0;
  }
}

type Resolve = (bytes: Uint8Array | undefined) => void;

/** How `recent` keeps a call that ended without a result: its status (one instance per status). */
class Ended {
  constructor(readonly status: OutcomeStatus) {}
}
const ENDED: Readonly<Record<OutcomeStatus, Ended>> = {
  ok: new Ended('ok'),
  error: new Ended('error'),
  timeout: new Ended('timeout'),
  lost: new Ended('lost'),
  cancelled: new Ended('cancelled'),
};
/** How `recent` keeps a result that is `undefined` (a RecentMap value never is). */
const UNDEFINED_RESULT = Symbol('undefined result');

/** `{ value }` boxes: a result may itself be `undefined`. */
interface Box {
  readonly value: unknown;
}

class WorkerCore {
  readonly name: string;
  readonly events = new EventEmitter();
  readonly connectedOnce: Promise<void>;
  readonly closedPromise: Promise<void>;
  id = '';
  address = '';
  /** The scheduler connection after its welcome; null otherwise. */
  conn: Connection | null = null;

  private readonly url: string;
  private readonly threads: number;
  /** Credits for tasks of unknown or long duration (threads × saturation). */
  private readonly baseCredits: number;
  /** Credits last sent (they grow while tasks are measured short: see `adaptCredits`). */
  private credits: number;
  /** Mean task duration across task keys (EMA, ms); undefined until one ended. */
  private meanMs: number | undefined;
  private readonly memoryLimit: number;
  private readonly inlineBytes: number;
  private readonly log: (line: string) => void;
  private readonly rss: () => number;
  private readonly store: WorkerStore;
  private peerServer: PeerServer | null = null;
  private peers: PeerClients | null = null;
  /** Captures task console output (inline mode only: pool threads have their own console). */
  private readonly captures: boolean;

  /** Every accepted, not yet ended call, by `dataKey(run, id)`. */
  private readonly calls = new Map<string, WorkCall>();
  /** Calls handed to an executor and not ended. Invariant: count of `calls` in state 'executing'. */
  private executing = 0;
  private readonly runs = new Map<number, RunState>();
  /** Producer key → ahead consumers (call and the dep it waits for) on this worker. */
  private readonly waiters = new Map<string, { wc: WorkCall; dep: WireDep }[]>();
  /**
   * What calls that ended here left, kept briefly, for ahead consumers that arrive after
   * their producer ended: small results sent inline and not held, and non-ok endings (an
   * `Ended`: such a consumer is dropped at once). Every call accepted and ended touches
   * it, so it is one map, results unboxed (`UNDEFINED_RESULT` stands for undefined), and
   * short: the last 512 to 1,024 endings. An ahead consumer arrives within a frame or two
   * of its producer's end; a longer memory only kept entries alive into the old
   * generation of the heap (with 8,192, this map's set and delete were the worker's two
   * costliest functions on 100k no-op tasks). A consumer that misses it fetches the
   * value through the scheduler, which has it.
   */
  private readonly recent = new RecentMap<unknown>(1024, 16 * 1024 * 1024);
  /** Fetched inputs, kept briefly for the next consumer (never advertised). */
  private readonly fetched = new RecentMap<Box>(256, 32 * 1024 * 1024);
  /** Fetches in flight by key (one per key, shared by every waiting consumer). */
  private readonly inflight = new Map<string, Promise<Lookup>>();
  /** Peer addresses by worker id (accumulated from `compute.peers`). */
  private readonly peerAddrs = new Map<string, string>();
  /** Duration moving average per task key (ms). */
  private readonly durations = new Map<string, { ms: number }>();

  // Relay (getData to the scheduler).
  private relayQueued = new Map<string, Resolve[]>();
  private relayScheduled = false;
  private readonly relayPending = new Map<number, { waiters: Map<string, Resolve[]>; timer: NodeJS.Timeout }>();
  private nextRequestId = 1;
  /** Code bundles on disk, fetched once per hash (kept across reconnects). */
  private readonly bundles: BundleCache;
  private readonly bundleRequests = new Map<number, { resolve: (code: Uint8Array) => void; reject: (err: Error) => void; timer: NodeJS.Timeout }>();

  // Outgoing batches.
  private readonly outbox = new Map<number, OutcomeColumnsBuilder>();
  private outboxScheduled = false;
  private logBuf: LogRecord[] = [];
  private logScheduled = false;
  private logDropped = 0;
  private pumpScheduled = false;
  /** Inputs fetched from peers since start (see `metrics`). */
  private peerFetchedKeys = 0;
  private peerFetchedBytes = 0;
  private peerServedKeys = 0;

  /** Counts sessions: async work started in an earlier one is ignored when it completes. */
  private gen = 0;
  private heartbeatTimer: NodeJS.Timeout | null = null;
  private memoryTimer: NodeJS.Timeout | null = null;
  private readonly loopDelay: IntervalHistogram;
  private lastPong = 0;
  private heartbeatMs = 1000;
  private maxFrameBytes = DEFAULT_MAX_FRAME_BYTES;
  /** Paused by memory: credits 0 sent. */
  private paused = false;
  private spilling = false;
  /** The scheduler asked this worker to retire: no new work, close once running calls end. */
  private retiring = false;
  /** `retire()` was called: close instead of reconnecting. */
  private leaving = false;
  /** `close()` began (set synchronously, before anything is torn down). */
  private stopping = false;
  private closing: Promise<void> | null = null;
  private sleepTimer: NodeJS.Timeout | null = null;
  private wake: (() => void) | null = null;
  private current: Connection | null = null;
  private loop: Promise<void> | null = null;
  private readonly resolveConnectedOnce: () => void;
  private readonly resolveClosed: () => void;
  private welcomeWaiters: (() => void)[] = [];
  private readonly handlers: Handlers<'s2w'>;

  constructor(private readonly o: WorkerOptions) {
    if (typeof o.scheduler !== 'string' || !/^wss?:\/\//.test(o.scheduler)) {
      throw new TypeError(`worker: scheduler must be a ws:// or wss:// URL, got ${JSON.stringify(o.scheduler)}`);
    }
    this.url = o.scheduler;
    this.name = o.name ?? `${hostname()}-${process.pid}`;
    this.threads = positiveInt(o.threads ?? 1, 'threads');
    const saturation = o.saturation ?? 2;
    if (!(saturation > 0)) throw new RangeError(`worker: saturation must be > 0, got ${saturation}`);
    this.baseCredits = Math.max(1, Math.ceil(this.threads * saturation));
    this.credits = this.baseCredits;
    this.memoryLimit = Math.max(0, o.memoryLimit ?? 0);
    this.inlineBytes = o.inlineBytes ?? 64;
    this.log = o.log ?? ((line) => process.stderr.write(`[weft worker ${this.name}] ${line}\n`));
    this.rss = o.rss ?? (() => process.memoryUsage.rss());
    const spillDir = o.spillDir ?? join(tmpdir(), `weft-spill-${process.pid}`);
    this.store = new WorkerStore({ spillDir, removeSpillDir: o.spillDir === undefined });
    this.captures = this.threads === 1;
    this.bundles = new BundleCache(o.bundleDir ?? defaultBundleDir(), (hash) => this.fetchBundle(hash));
    this.loopDelay = monitorEventLoopDelay({ resolution: 20 });
    let resolveOnce!: () => void;
    this.connectedOnce = new Promise<void>((r) => (resolveOnce = r));
    this.resolveConnectedOnce = resolveOnce;
    let resolveClosed!: () => void;
    this.closedPromise = new Promise<void>((r) => (resolveClosed = r));
    this.resolveClosed = resolveClosed;
    this.handlers = this.makeHandlers();
  }

  async start(): Promise<void> {
    const tls = this.o.tls;
    const serve = (keys: readonly string[], budget: number): Promise<DataReply> =>
      this.serve(keys, budget).then((r) => {
        this.peerServedKeys += r.keys.length;
        return r;
      });
    this.peerServer = await PeerServer.listen({
      host: this.o.host ?? '127.0.0.1',
      ...(this.o.token !== undefined ? { token: this.o.token } : {}),
      ...(tls !== undefined ? { tls } : {}),
      serve,
      log: (line) => this.log(line),
    });
    this.address = this.peerServer.address;
    this.peers = new PeerClients({
      name: this.name,
      address: this.address,
      ...(this.o.token !== undefined ? { token: this.o.token } : {}),
      ...(tls !== undefined ? { tls: tls as PeerTls } : {}),
      serve,
      log: (line) => this.log(line),
    });
    this.loopDelay.enable();
    if (this.captures) captureConsole(this);
    if (this.memoryLimit > 0) {
      this.memoryTimer = setInterval(() => this.checkMemory(), MEMORY_CHECK_MS);
      this.memoryTimer.unref();
    }
    this.loop = this.connectLoop();
  }

  waitConnected(): Promise<void> {
    if (this.conn !== null) return Promise.resolve();
    return new Promise<void>((r) => this.welcomeWaiters.push(r));
  }

  // ---- connection life ------------------------------------------------------------

  private async connectLoop(): Promise<void> {
    let failures = 0;
    while (!this.stopping) {
      const welcomed = await this.session();
      if (this.stopping) break;
      if (this.leaving) {
        void this.close('retired (scheduler connection lost)');
        break;
      }
      failures = welcomed ? 0 : failures + 1;
      const min = this.o.reconnect?.minMs ?? 100;
      const max = this.o.reconnect?.maxMs ?? 5000;
      const base = Math.min(max, min * 2 ** Math.min(failures, 30));
      await this.sleep(base * (0.5 + Math.random() * 0.5));
    }
  }

  private sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      this.wake = resolve;
      this.sleepTimer = setTimeout(() => {
        this.sleepTimer = null;
        this.wake = null;
        resolve();
      }, ms);
    });
  }

  /** One connection: resolves when it is gone, with whether it got as far as a welcome. */
  private session(): Promise<boolean> {
    return new Promise<boolean>((resolve) => {
      const tls = this.o.tls;
      let ws: WebSocket;
      try {
        ws = new WebSocket(this.url, {
          maxPayload: DEFAULT_MAX_FRAME_BYTES,
          handshakeTimeout: 10_000,
          ...CLIENT_SOCKET_OPTIONS,
          ...(tls?.ca !== undefined ? { ca: tls.ca } : {}),
          ...(tls?.cert !== undefined ? { cert: tls.cert } : {}),
          ...(tls?.key !== undefined ? { key: tls.key } : {}),
        });
      } catch (err) {
        this.log(`cannot connect to ${this.url}: ${(err as Error).message}`);
        resolve(false);
        return;
      }
      const conn = new Connection(ws, { receives: 's2w', label: `scheduler ${this.url}` });
      this.current = conn;
      let welcomed = false;
      let handshaking = false;
      conn.onClose = (reason) => {
        if (this.current === conn) this.current = null;
        if (welcomed) this.onDisconnect(conn, reason);
        else if (!handshaking && !this.stopping) this.log(`cannot reach the scheduler at ${this.url}: ${reason}`);
        resolve(welcomed);
      };
      ws.once('open', () => {
        handshaking = true;
        ws.on('pong', () => {
          this.lastPong = performance.now();
        });
        openHandshake(conn, {
          hello: {
            role: 'worker',
            name: this.name,
            resources: this.o.resources ?? {},
            threads: this.threads,
            memoryLimit: this.memoryLimit,
            address: this.address,
            pid: process.pid,
          },
          ...(this.o.token !== undefined ? { token: this.o.token } : {}),
        }).then(
          (w) => {
            if (conn.closed) return;
            welcomed = true;
            this.onWelcome(conn, w);
          },
          (err: unknown) => {
            if (!this.stopping) this.log(`handshake with the scheduler at ${this.url} failed: ${(err as Error).message}`);
          },
        );
      });
    });
  }

  private onWelcome(conn: Connection, w: WelcomeMsg): void {
    if (this.stopping) {
      conn.close('worker closing', 'CLOSED', 1000);
      return;
    }
    this.conn = conn;
    this.id = w.id;
    this.heartbeatMs = Math.max(10, w.heartbeatMs > 0 ? w.heartbeatMs : 1000);
    this.maxFrameBytes = Math.min(w.maxFrameBytes, conn.codec.maxFrameBytes);
    conn.label = `scheduler ${this.url} (as ${this.id})`;
    conn.onMessages = (msgs: Message[]) => {
      dispatch(this.handlers, msgs);
      // Calls that arrived in this frame start now, not a turn of the event loop later,
      // and the outcomes of those that ended at once go out with no turn either.
      if (this.pumpScheduled) this.pump();
      if (this.outboxScheduled) {
        this.outboxScheduled = false;
        this.flushOutbox();
      }
    };
    conn.onDrain = () => {
      this.flushOutbox();
      this.flushLogs();
    };
    conn.send({ op: 'credits', credits: this.paused ? 0 : this.credits });
    this.lastPong = performance.now();
    this.heartbeatTimer = setInterval(() => this.heartbeat(), this.heartbeatMs);
    this.heartbeatTimer.unref();
    this.resolveConnectedOnce();
    const waiting = this.welcomeWaiters;
    this.welcomeWaiters = [];
    for (const r of waiting) r();
    this.events.emit('connected', { id: this.id, scheduler: this.url });
  }

  private onDisconnect(conn: Connection, reason: string): void {
    if (this.conn !== conn) return;
    this.conn = null;
    if (this.heartbeatTimer !== null) clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = null;
    if (!this.stopping && !this.leaving) this.log(`lost the scheduler connection: ${reason}; dropping local state and reconnecting`);
    this.reset();
    this.events.emit('disconnected', reason);
  }

  /** Forget the session: calls (no outcomes), held results, runs and their executors, pending requests. */
  private reset(): void {
    this.gen++;
    this.calls.clear();
    this.executing = 0;
    this.waiters.clear();
    for (const rs of this.runs.values()) this.disposeRun(rs);
    this.runs.clear();
    this.store.clear();
    this.recent.clear();
    this.fetched.clear();
    this.inflight.clear();
    this.peerAddrs.clear();
    for (const req of this.relayPending.values()) {
      clearTimeout(req.timer);
      resolveAll(req.waiters);
    }
    this.relayPending.clear();
    resolveAll(this.relayQueued);
    for (const req of this.bundleRequests.values()) {
      clearTimeout(req.timer);
      req.reject(new Error('the scheduler connection was lost'));
    }
    this.bundleRequests.clear();
    this.outbox.clear();
    this.logBuf = [];
    this.retiring = false;
  }

  private heartbeat(): void {
    const conn = this.conn;
    if (conn === null) return;
    // Liveness: the scheduler may be silent when idle, but its socket answers pings. No
    // pong and no frame for 10 heartbeats (at least 15 s): the link is dead (a half-open
    // TCP connection would otherwise look alive forever).
    const silent = performance.now() - Math.max(this.lastPong, conn.lastSeen - performance.timeOrigin);
    if (silent > Math.max(15_000, 10 * this.heartbeatMs)) {
      conn.terminate(`scheduler ${this.url}: no sign of life for ${Math.round(silent)} ms`, 'HEARTBEAT_TIMEOUT');
      return;
    }
    try {
      conn.ws.ping();
    } catch {
      // closing: the close event follows
    }
    conn.send({ op: 'heartbeat', at: Date.now(), metrics: this.metrics() });
  }

  metrics(): HeartbeatMetrics {
    const mem = process.memoryUsage();
    const delay = this.loopDelay.count > 0 ? this.loopDelay.percentile(99) / 1e6 : 0;
    this.loopDelay.reset();
    return {
      rss: mem.rss,
      heapUsed: mem.heapUsed,
      executing: this.executing,
      queued: this.calls.size - this.executing,
      heldBytes: this.store.heldBytes,
      heldCount: this.store.heldCount,
      spilledBytes: this.store.spilledBytes,
      eventLoopDelayMs: Math.round(delay * 100) / 100,
      peerFetchedKeys: this.peerFetchedKeys,
      peerFetchedBytes: this.peerFetchedBytes,
      peerServedKeys: this.peerServedKeys,
    };
  }

  // ---- messages from the scheduler --------------------------------------------------

  private makeHandlers(): Handlers<'s2w'> {
    const late = (m: Message): void => {
      throw new ProtocolError('BAD_MESSAGE', `unexpected "${m.op}" after the welcome`, { op: m.op });
    };
    return {
      challenge: late,
      welcome: late,
      refuse: late,
      compute: (m) => this.onCompute(m),
      cancelTasks: (m) => this.onCancel(m),
      release: (m) => {
        for (const key of m.keys) this.release(key);
      },
      whoHasReply: (m) => this.log(`unexpected whoHasReply ${m.id} (this worker asks no whoHas)`),
      getData: (m) => {
        const conn = this.conn;
        const gen = this.gen;
        this.serve(m.keys, this.maxFrameBytes - FRAME_SLACK).then(
          (r) => {
            if (this.gen === gen && conn !== null) conn.send({ op: 'data', id: m.id, keys: r.keys, values: r.values, missing: r.missing });
          },
          (err: unknown) => {
            this.log(`getData ${m.id} failed: ${(err as Error).message}`);
            if (this.gen === gen && conn !== null) conn.send({ op: 'data', id: m.id, keys: [], values: [], missing: [...m.keys] });
          },
        );
      },
      data: (m) => this.onRelayData(m),
      bundle: (m) => {
        const req = this.bundleRequests.get(m.id);
        if (req === undefined) return;
        this.bundleRequests.delete(m.id);
        clearTimeout(req.timer);
        if (m.code !== undefined && m.error === undefined) req.resolve(m.code);
        else req.reject(new Error(m.error !== undefined ? m.error.message : 'the scheduler sent no code'));
      },
      acquire: (m) => this.onAcquire(m),
      steal: (m) => this.onSteal(m),
      heartbeat: () => undefined,
      retire: (m) => this.onRetire(m.reason),
      error: (m) => this.log(`error from the scheduler${m.ref >= 0 ? ` (about request ${m.ref})` : ''}: ${m.error.name}: ${m.error.message}`),
    };
  }

  private onCompute(m: ComputeMsg): void {
    const calls = (m.cols !== undefined ? fromColumns(m.cols) : m.calls).map((c, i) => checkCall(c, i));
    if (m.peers !== undefined) {
      for (const [id, addr] of Object.entries(m.peers)) if (typeof addr === 'string') this.peerAddrs.set(id, addr);
    }
    const rs =
      this.runs.get(m.run) ??
      this.openRun(
        m.run,
        m.modules.filter((u): u is string => typeof u === 'string'),
        typeof m.flowName === 'string' ? m.flowName : `run ${m.run}`,
        typeof m.parameters === 'object' && m.parameters !== null ? m.parameters : {},
        m.bundle,
      );
    for (const c of calls) this.accept(rs, c);
    this.schedulePump();
  }

  private openRun(run: number, modules: readonly string[], flowName: string, params: Readonly<Record<string, unknown>>, bundle: string): RunState {
    const parameters = { ...params };
    // Inline mode yields every millisecond: outcomes stream back (and credits return)
    // while the rest of a deep queue runs. Each call runs in a console-capture scope
    // naming it (see `runCaptured`).
    const executor: Executor =
      this.threads === 1 ? new LocalExecutor({ sliceMs: 1, ...(this.captures ? { around: runCaptured } : {}) }) : new PoolExecutor({ threads: this.threads });
    const rs: RunState = { run, executor, status: 'starting', startError: null, queue: [], head: 0, core: this };
    this.runs.set(run, rs);
    const gen = this.gen;
    const session = (mods: readonly string[]): ExecutorSession => ({
      flowName,
      modules: mods,
      // No keys up front: a key that does not resolve fails only the calls that use it.
      taskKeys: [],
      parameters,
      onOutcomes: (outs) => {
        // Outside any task's console capture: this is the worker's own code. (run(null),
        // not exit(): exit() turns the async hooks off and on again, a cost per call.)
        captureStore.run(null, () => this.onOutcomes(rs, outs));
      },
    });
    // The modules of an earlier run: the inline executor starts at once (no promise turns
    // before the first call can run).
    if (bundle === '' && executor instanceof LocalExecutor && executor.startNow(session(modules))) {
      rs.status = 'ready';
      return rs;
    }
    // A bundle replaces the modules: its file (fetched once per hash) is what the executor imports.
    const code = bundle === '' ? Promise.resolve(modules) : this.bundles.get(bundle).then((url) => [url]);
    code
      .then((mods) => {
        if (rs.status !== 'starting') return;
        return executor.start(session(mods));
      })
      .then(
        () => {
          if (rs.status !== 'starting') return;
          rs.status = 'ready';
          this.schedulePump();
        },
        (err: unknown) => {
          if (rs.status !== 'starting' || this.gen !== gen) return;
          rs.status = 'failed';
          rs.startError = wireError(err);
          this.log(`run ${run}: the executor did not start: ${(err as Error).message}`);
          for (const wc of [...this.calls.values()]) if (wc.rs === rs) this.endCall(wc, 'error', rs.startError);
        },
      );
    return rs;
  }

  /** Take one call: refuse it, or register it and start filling its inputs. */
  private accept(rs: RunState, c: WireCall): void {
    const key = dataKey(rs.run, c.id);
    if (this.retiring) {
      this.refuse(rs, c, 'lost', wireError(new WorkerLostError(`worker "${this.name}" is retiring`)));
      return;
    }
    if (this.calls.has(key)) {
      this.refuse(rs, c, 'error', wireError(new WeftError('DUPLICATE_CALL', `task "${c.key}" (${key}) is already on worker "${this.name}"`)));
      return;
    }
    if (rs.status === 'failed') {
      this.refuse(rs, c, 'error', rs.startError as SerializedError);
      return;
    }
    const wc: WorkCall = { key, rs, call: c, state: 'fetching', missing: 0 };
    this.calls.set(key, wc);
    // A new attempt: what an earlier one left behind no longer says anything.
    this.recent.delete(key);
    const deps = c.deps;
    if (deps !== undefined) {
      for (let i = 0; i < deps.length; i++) {
        this.resolveDep(wc, deps[i] as WireDep);
        if (this.calls.get(key) !== wc) return; // ended while filling (bad input, dropped)
      }
    }
    if (wc.missing === 0) this.makeReady(wc);
  }

  /** Fill one input now when it is at hand, else start getting it (`wc.missing` counts those). */
  private resolveDep(wc: WorkCall, dep: WireDep): void {
    let now: Lookup | undefined;
    try {
      now = this.store.valueNow(dep.key);
    } catch (err) {
      this.endCall(wc, 'error', wireError(err));
      return;
    }
    if (now !== undefined && now.found) {
      this.fill(wc, dep, now.value);
      return;
    }
    const recent = this.recent.get(dep.key);
    if (recent !== undefined && !(recent instanceof Ended)) {
      this.fill(wc, dep, recent === UNDEFINED_RESULT ? undefined : recent);
      return;
    }
    const known = this.fetched.get(dep.key);
    if (known !== undefined) {
      this.fill(wc, dep, known.value);
      return;
    }
    if (dep.holders.length === 0 && !this.store.has(dep.key)) {
      const producer = this.calls.get(dep.key);
      if (producer !== undefined) {
        // An ahead call: its producer was sent here and has not ended yet.
        wc.missing++;
        const list = this.waiters.get(dep.key);
        if (list === undefined) this.waiters.set(dep.key, [{ wc, dep }]);
        else list.push({ wc, dep });
        return;
      }
      if (recent instanceof Ended) {
        this.endCall(wc, 'cancelled', aheadDropped(wc, dep.key, recent.status));
        return;
      }
      // Its producer ended here and nothing is left of it: the scheduler may know it.
    }
    wc.missing++;
    const gen = this.gen;
    this.fetchValue(dep).then(
      (r) => {
        if (this.gen !== gen || this.calls.get(wc.key) !== wc) return;
        if (r.found) this.arrive(wc, dep, r.value);
        else this.endCall(wc, 'lost', inputLost(wc, dep));
      },
      (err: unknown) => {
        if (this.gen !== gen || this.calls.get(wc.key) !== wc) return;
        this.endCall(wc, 'error', wireError(err));
      },
    );
  }

  /** Put an input into the call's arguments; a bad path or slot ends the call. Returns false if it ended. */
  private fill(wc: WorkCall, dep: WireDep, value: unknown): boolean {
    try {
      applyDep(wc.call, dep, value);
      return true;
    } catch (err) {
      this.endCall(wc, 'error', wireError(err));
      return false;
    }
  }

  /** An input that was being fetched (or produced ahead) arrived. */
  private arrive(wc: WorkCall, dep: WireDep, value: unknown): void {
    if (!this.fill(wc, dep, value)) return;
    wc.missing--;
    if (wc.missing === 0) {
      this.makeReady(wc);
      this.schedulePump();
    }
  }

  private makeReady(wc: WorkCall): void {
    wc.state = 'ready';
    wc.rs.queue.push(wc);
  }

  /** A value for `dep.key` from wherever it is: disk, a holder, or the scheduler (one fetch per key at a time). */
  private fetchValue(dep: WireDep): Promise<Lookup> {
    const key = dep.key;
    const running = this.inflight.get(key);
    if (running !== undefined) return running;
    const gen = this.gen;
    const p = (async (): Promise<Lookup> => {
      if (this.store.has(key)) {
        const r = await this.store.value(key);
        if (r.found) return r;
      }
      const bytes = await this.fetchBytes(key, dep.holders, dep.nbytes);
      if (bytes === undefined) return { found: false };
      const value = unpackValue(bytes);
      if (this.gen === gen) this.fetched.set(key, { value }, bytes.byteLength);
      return { found: true, value };
    })();
    this.inflight.set(key, p);
    const done = (): void => {
      if (this.inflight.get(key) === p) this.inflight.delete(key);
    };
    p.then(done, done);
    return p;
  }

  /** Bytes of `key` from one of its holders (in random order), else through the scheduler. */
  private async fetchBytes(key: string, holders: readonly string[], nbytes: number): Promise<Uint8Array | undefined> {
    const gen = this.gen;
    const order = [...holders];
    for (let i = order.length - 1; i > 0; i--) {
      const j = Math.floor(Math.random() * (i + 1));
      [order[i], order[j]] = [order[j] as string, order[i] as string];
    }
    for (const h of order) {
      if (h === this.id) continue;
      const addr = this.peerAddrs.get(h);
      if (addr === undefined || addr === this.address || this.peers === null) continue;
      const bytes = await this.peers.fetch(addr, key, nbytes);
      if (this.gen !== gen) return undefined;
      if (bytes !== undefined) {
        this.peerFetchedKeys++;
        this.peerFetchedBytes += bytes.byteLength;
        return bytes;
      }
    }
    return this.relayFetch(key);
  }

  /** Ask the scheduler for `key` (batched per tick into one `getData`). */
  private relayFetch(key: string): Promise<Uint8Array | undefined> {
    if (this.conn === null) return Promise.resolve(undefined);
    return new Promise<Uint8Array | undefined>((resolve) => {
      const list = this.relayQueued.get(key);
      if (list !== undefined) list.push(resolve);
      else this.relayQueued.set(key, [resolve]);
      if (this.relayScheduled) return;
      this.relayScheduled = true;
      setImmediate(() => {
        this.relayScheduled = false;
        const waiters = this.relayQueued;
        this.relayQueued = new Map();
        const conn = this.conn;
        if (waiters.size === 0) return;
        const id = this.nextRequestId++;
        if (conn === null || !conn.send({ op: 'getData', id, keys: [...waiters.keys()] })) {
          resolveAll(waiters);
          return;
        }
        const timer = setTimeout(() => {
          this.relayPending.delete(id);
          this.log(`the scheduler did not answer getData ${id} within ${RELAY_TIMEOUT_MS} ms`);
          resolveAll(waiters);
        }, RELAY_TIMEOUT_MS);
        timer.unref();
        this.relayPending.set(id, { waiters, timer });
      });
    });
  }

  /** A bundle's code from the scheduler (`getBundle`); rejects when not connected, refused, or after 60 s. */
  private fetchBundle(hash: string): Promise<Uint8Array> {
    const conn = this.conn;
    if (conn === null) return Promise.reject(new Error('not connected to the scheduler'));
    const id = this.nextRequestId++;
    return new Promise<Uint8Array>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.bundleRequests.delete(id);
        reject(new Error(`the scheduler did not send it within ${RELAY_TIMEOUT_MS} ms`));
      }, RELAY_TIMEOUT_MS);
      timer.unref();
      this.bundleRequests.set(id, { resolve, reject, timer });
      conn.send({ op: 'getBundle', id, hash });
    });
  }

  private onRelayData(m: DataMsg): void {
    const req = this.relayPending.get(m.id);
    if (req === undefined) {
      this.log(`data ${m.id} from the scheduler answers no pending request`);
      return;
    }
    this.relayPending.delete(m.id);
    clearTimeout(req.timer);
    const n = Math.min(m.keys.length, m.values.length);
    for (let i = 0; i < n; i++) {
      const key = m.keys[i];
      const value = m.values[i];
      if (typeof key !== 'string' || !(value instanceof Uint8Array)) continue;
      const ws = req.waiters.get(key);
      if (ws === undefined) continue;
      req.waiters.delete(key);
      for (const r of ws) r(value);
    }
    resolveAll(req.waiters);
  }

  // ---- handing calls to executors ---------------------------------------------------

  private schedulePump(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      if (this.pumpScheduled) this.pump();
    });
  }

  /**
   * How many calls may be in the executor's hands at once: `threads` for tasks of
   * unknown or long duration; for short ones, enough for about HANDED_MS of estimated
   * work per thread (thousands of µs-tasks in one batch). The rest stays in this
   * worker's queue, where the scheduler can still steal it — so a mis-estimate (one task
   * key whose calls vary in length) strands at most a couple of milliseconds of work.
   */
  private handLimit(taskKey: string): number {
    const d = this.durations.get(taskKey)?.ms;
    if (d === undefined || d >= FAST_TASK_MS) return this.threads;
    return this.threads * Math.max(1, Math.ceil(HANDED_MS / Math.max(d, 0.0005)));
  }

  /**
   * Hand ready calls to their executors: fast tasks (measured under ~1 ms) in whole
   * batches up to the executor's free slots, others only while fewer than `threads`
   * calls execute, so that the rest stay here where the scheduler can steal them.
   */
  private pump(): void {
    this.pumpScheduled = false;
    if (this.stopping) return;
    let inline: LocalExecutor[] | null = null;
    for (const rs of this.runs.values()) {
      if (rs.status !== 'ready') continue;
      const q = rs.queue;
      let free = rs.executor.freeSlots();
      let batch: TaskCall[] | null = null;
      let handed: WorkCall[] | null = null;
      // Durations do not change inside this loop: one limit per run of equal task keys.
      let limitKey = '';
      let limit = 0;
      while (rs.head < q.length && free > 0) {
        const wc = q[rs.head] as WorkCall;
        if (wc.state !== 'ready' || this.calls.get(wc.key) !== wc) {
          rs.head++;
          continue;
        }
        const tk = wc.call.taskKey;
        if (tk !== limitKey) {
          limitKey = tk;
          limit = this.handLimit(tk);
        }
        if (this.executing >= limit) break;
        rs.head++;
        wc.state = 'executing';
        this.executing++;
        free--;
        (batch ??= []).push(this.taskCall(wc));
        (handed ??= []).push(wc);
      }
      if (rs.head === q.length) {
        rs.queue = [];
        rs.head = 0;
      } else if (rs.head > 1024 && rs.head * 2 > q.length) {
        rs.queue = q.slice(rs.head);
        rs.head = 0;
      }
      if (batch === null) continue;
      try {
        rs.executor.submit(batch);
      } catch (err) {
        const e = wireError(err);
        for (const wc of handed as WorkCall[]) this.endCall(wc, 'error', e);
        continue;
      }
      if (rs.executor instanceof LocalExecutor) (inline ??= []).push(rs.executor);
    }
    // Inline executors run what they were given now, not a turn of the event loop later.
    if (inline !== null) for (const ex of inline) ex.runNow();
  }

  /**
   * The executor's view of a call (no deps); inline, with the worker's record of it for
   * console capture. Two literals, not a spread: this runs once per call, and a pool's
   * calls must not carry the record (they are cloned to its threads).
   */
  private taskCall(wc: WorkCall): TaskCall {
    const c = wc.call;
    if (this.captures) {
      const ic: InlineCall = {
        id: c.id,
        runId: c.runId,
        taskKey: c.taskKey,
        key: c.key,
        args: c.args,
        timeoutMs: c.timeoutMs,
        mapIndex: c.mapIndex,
        attempt: c.attempt,
        loopCount: c.loopCount,
        loopResult: c.loopResult,
        wc,
      };
      return ic;
    }
    return {
      id: c.id,
      runId: c.runId,
      taskKey: c.taskKey,
      key: c.key,
      args: c.args,
      timeoutMs: c.timeoutMs,
      mapIndex: c.mapIndex,
      attempt: c.attempt,
      loopCount: c.loopCount,
      loopResult: c.loopResult,
    };
  }

  // ---- outcomes -------------------------------------------------------------------

  private onOutcomes(rs: RunState, outs: Outcome[]): void {
    if (rs.status === 'disposed') return;
    // The moving average of the last task key seen, updated in place (outcomes come in runs of one key).
    let avgKey = '';
    let avg: { ms: number } | undefined;
    for (const o of outs) {
      const key = dataKey(rs.run, o.id);
      const wc = this.calls.get(key);
      // Ended here already (cancelled, its run released) or a stale stamp.
      if (wc === undefined || wc.state !== 'executing' || wc.call.runId !== o.runId) continue;
      if ((o.status === 'ok' || o.status === 'error') && o.startMs > 0 && o.endMs >= o.startMs) {
        const d = o.endMs - o.startMs;
        const tk = wc.call.taskKey;
        if (tk !== avgKey || avg === undefined) {
          avgKey = tk;
          avg = this.durations.get(tk);
        }
        if (avg === undefined) this.durations.set(tk, (avg = { ms: d }));
        else avg.ms += EMA * (d - avg.ms);
        this.meanMs = this.meanMs === undefined ? d : this.meanMs + EMA * (d - this.meanMs);
      }
      this.finish(wc, o);
    }
    this.adaptCredits();
    // Now, not next turn: dependents that just became ready (ahead calls) go to the
    // executor at once (LocalExecutor runs them in this same turn).
    this.pump();
    this.checkRetired();
  }

  /** An executed call ended: pack and hold (or inline) its result, wake ahead consumers, send the outcome. */
  private finish(wc: WorkCall, o: Outcome): void {
    this.forget(wc);
    const c = wc.call;
    let status = o.status;
    let error: SerializedError | undefined = o.error === undefined ? undefined : o.error instanceof Error ? wireError(o.error) : o.error;
    let nbytes = 0;
    let len = -1;
    let inner: number[] | undefined;
    let inline = false;
    if (status === 'ok') {
      let bytes: Uint8Array | null = null;
      try {
        // Small primitives (most results of small tasks) always travel inline: their size is
        // known without packing them, and nothing about them can fail to pack.
        const v0 = o.value;
        const t = typeof v0;
        bytes =
          v0 === null || t === 'undefined' || t === 'boolean' || t === 'number' || t === 'string' ? PRIMITIVE : packValue(v0);
      } catch (err) {
        status = 'error';
        error = wireError(
          new TaskSerializationError(`task "${c.key}" returned a value that cannot be sent from worker "${this.name}": ${(err as Error).message}`),
        );
      }
      if (bytes !== null) {
        nbytes = bytes === PRIMITIVE ? primitiveBytes(o.value) : bytes.byteLength;
        const v = o.value;
        if (Array.isArray(v)) {
          len = v.length;
          if (v.every((e) => Array.isArray(e))) inner = v.map((e: unknown[]) => e.length);
        }
        if (c.ret === true || nbytes <= this.inlineBytes) {
          inline = true;
          this.recent.set(wc.key, v === undefined ? UNDEFINED_RESULT : v, nbytes);
        } else {
          this.recent.delete(wc.key);
          if (bytes === PRIMITIVE) this.store.putString(wc.key, v as string); // big strings are packed only if they must travel
          else this.store.put(wc.key, bytes, v);
        }
        this.wakeWaiters(wc.key, v);
      }
    }
    if (status !== 'ok') this.dropWaiters(wc.key, status);
    // Straight into the run's outgoing columns: no record per call.
    this.outboxFor(wc.rs.run)?.add(c.id, c.runId, status, o.startMs, o.endMs, nbytes, len, inline, o.value, error, inner);
  }

  /** Remove a call from the tables (not its waiters). */
  private forget(wc: WorkCall): void {
    if (this.calls.get(wc.key) === wc) this.calls.delete(wc.key);
    if (wc.state === 'executing') this.executing--;
  }

  /** End a call that did not go through the executor's outcome (or whose executor is gone). */
  private endCall(wc: WorkCall, status: OutcomeStatus, error: SerializedError): void {
    if (this.calls.get(wc.key) !== wc) return;
    this.forget(wc);
    wc.state = 'fetching';
    wc.missing = 0;
    this.dropWaiters(wc.key, status);
    this.emitOutcome(wc.rs.run, {
      id: wc.call.id,
      runId: wc.call.runId,
      status,
      startMs: 0,
      endMs: performance.timeOrigin + performance.now(),
      nbytes: 0,
      len: -1,
      error,
    });
  }

  /** An outcome for a call never registered here (refused on arrival). */
  private refuse(rs: RunState, c: WireCall, status: OutcomeStatus, error: SerializedError): void {
    this.emitOutcome(rs.run, { id: c.id, runId: c.runId, status, startMs: 0, endMs: performance.timeOrigin + performance.now(), nbytes: 0, len: -1, error });
  }

  private wakeWaiters(key: string, value: unknown): void {
    const list = this.waiters.get(key);
    if (list === undefined) return;
    this.waiters.delete(key);
    for (const { wc, dep } of list) if (this.calls.get(wc.key) === wc) this.arrive(wc, dep, value);
  }

  /** The producer of `key` ended without a result (or left): its ahead consumers here end 'cancelled'. */
  private dropWaiters(key: string, status: OutcomeStatus | 'stolen'): void {
    if (status !== 'stolen') this.recent.set(key, ENDED[status]);
    const list = this.waiters.get(key);
    if (list === undefined) return;
    this.waiters.delete(key);
    for (const { wc } of list) this.endCall(wc, 'cancelled', aheadDropped(wc, key, status));
  }

  private emitOutcome(run: number, out: WireOutcome): void {
    this.outboxFor(run)?.addOutcome(out);
  }

  /** The outgoing outcomes of `run`, with a flush scheduled; null while disconnected (they would be dropped). */
  private outboxFor(run: number): OutcomeColumnsBuilder | null {
    if (this.conn === null) return null;
    let b = this.outbox.get(run);
    if (b === undefined) this.outbox.set(run, (b = new OutcomeColumnsBuilder()));
    if (this.outboxScheduled) return b;
    this.outboxScheduled = true;
    setImmediate(() => {
      if (!this.outboxScheduled) return; // flushed at the end of a frame meanwhile
      this.outboxScheduled = false;
      this.flushOutbox();
    });
    return b;
  }

  /** One `outcomes` message per run; what the batcher refuses waits for its drain. */
  private flushOutbox(): void {
    const conn = this.conn;
    if (conn === null) {
      this.outbox.clear();
      return;
    }
    // A task's console lines go ahead of its outcome, so its owner sees them before the result.
    if (this.logBuf.length > 0) this.flushLogs();
    for (const [run, b] of this.outbox) {
      if (!conn.send({ op: 'outcomes', run, outcomes: NO_OUTCOMES, cols: b.build() })) return;
      this.outbox.delete(run);
    }
    // Already a turn after the outcomes: write now rather than one more turn later.
    conn.flush();
    this.checkRetired();
  }

  // ---- other requests ---------------------------------------------------------------

  private onCancel(m: CancelTasksMsg): void {
    const rs = this.runs.get(m.run);
    if (rs === undefined) return;
    const running: number[] = [];
    for (const id of m.tasks) {
      if (!Number.isInteger(id)) continue;
      const wc = this.calls.get(dataKey(m.run, id));
      if (wc === undefined) continue;
      if (wc.state === 'executing') running.push(id);
      else this.endCall(wc, 'cancelled', wireError(new CancelledError(`task "${wc.call.key}" was cancelled`)));
    }
    if (running.length > 0) rs.executor.cancel(running);
  }

  /** Transactional: every call still in this worker's own queue is removed and reported stolen; nothing else. */
  private onSteal(m: StealMsg): void {
    const stolen: number[] = [];
    const kept: number[] = [];
    const gone: string[] = [];
    for (const id of m.tasks) {
      const wc = Number.isInteger(id) ? this.calls.get(dataKey(m.run, id)) : undefined;
      if (wc === undefined || wc.state === 'executing') {
        kept.push(id);
        continue;
      }
      this.forget(wc);
      stolen.push(id);
      gone.push(wc.key);
    }
    // Ahead consumers of a stolen producer cannot get its result here any more.
    for (const key of gone) this.dropWaiters(key, 'stolen');
    this.conn?.send({ op: 'stealReply', id: m.id, run: m.run, stolen, kept });
    this.schedulePump();
  }

  private release(key: unknown): void {
    if (typeof key !== 'string') return;
    if (key.endsWith(':*')) {
      const run = Number(key.slice(0, -2));
      if (Number.isInteger(run)) this.releaseRun(run);
      return;
    }
    this.store.delete(key);
    this.fetched.delete(key);
    this.recent.delete(key);
  }

  /** The scheduler is done with a run: drop its results, end its calls, stop its executor. */
  private releaseRun(run: number): void {
    const prefix = `${run}:`;
    this.store.deletePrefix(prefix);
    this.fetched.deletePrefix(prefix);
    this.recent.deletePrefix(prefix);
    const rs = this.runs.get(run);
    if (rs === undefined) return;
    for (const wc of [...this.calls.values()]) {
      if (wc.rs === rs) this.endCall(wc, 'cancelled', wireError(new CancelledError(`task "${wc.call.key}": run ${run} was released`)));
    }
    this.recent.deletePrefix(prefix);
    this.runs.delete(run);
    this.disposeRun(rs);
    this.checkRetired();
  }

  private disposeRun(rs: RunState): void {
    if (rs.status === 'disposed') return;
    rs.status = 'disposed';
    rs.queue = [];
    rs.head = 0;
    rs.executor.shutdown().catch((err: unknown) => this.log(`run ${rs.run}: executor shutdown failed: ${(err as Error).message}`));
  }

  private onAcquire(m: AcquireMsg): void {
    const gen = this.gen;
    const conn = this.conn;
    const entries = Object.entries(m.from).filter((e): e is [string, string] => typeof e[1] === 'string');
    Promise.all(
      entries.map(async ([key, addr]): Promise<boolean> => {
        if (this.store.has(key)) return true;
        const bytes = addr === this.address || this.peers === null ? undefined : await this.peers.fetch(addr, key);
        if (bytes === undefined || this.gen !== gen) return false;
        this.store.put(key, bytes, undefined, false);
        return true;
      }),
    ).then(
      (ok) => {
        if (this.gen !== gen || conn === null) return;
        const keys: string[] = [];
        const missing: string[] = [];
        ok.forEach((got, i) => (got ? keys : missing).push((entries[i] as [string, string])[0]));
        conn.send({ op: 'acquired', id: m.id, keys, missing });
      },
      (err: unknown) => this.log(`acquire ${m.id} failed: ${(err as Error).message}`),
    );
  }

  /** `getData` from a peer or the scheduler: bytes of the held keys, within the frame budget. */
  private async serve(keys: readonly string[], budget: number): Promise<DataReply> {
    const found: string[] = [];
    const values: Uint8Array[] = [];
    const missing: string[] = [];
    let used = 0;
    for (const key of keys) {
      if (typeof key !== 'string') continue;
      const bytes = await this.store.bytes(key);
      if (bytes === undefined) {
        missing.push(key);
        continue;
      }
      if (used + bytes.byteLength > budget && found.length > 0) {
        missing.push(key);
        continue;
      }
      if (bytes.byteLength > budget) {
        this.log(`result ${key} (${bytes.byteLength} bytes) is larger than a frame (${budget} bytes): it cannot be sent`);
        missing.push(key);
        continue;
      }
      used += bytes.byteLength;
      found.push(key);
      values.push(bytes);
    }
    return { keys: found, values, missing };
  }

  // ---- retirement and closing -------------------------------------------------------

  private onRetire(reason: string): void {
    if (!this.leaving) this.log(`the scheduler retires this worker: ${reason}`);
    this.retiring = true;
    // Calls not started yet run elsewhere: end them 'lost' now rather than when we go.
    for (const wc of [...this.calls.values()]) {
      if (wc.state !== 'executing') this.endCall(wc, 'lost', wireError(new WorkerLostError(`worker "${this.name}" is retiring`)));
    }
    this.checkRetired();
  }

  /** Retiring and nothing left running: send what is queued and close. */
  private checkRetired(): void {
    if (!this.retiring || this.executing > 0 || this.stopping) return;
    if (this.conn !== null && this.outbox.size > 0) {
      this.flushOutbox();
      if (this.outbox.size > 0) return; // waiting for the socket to drain
    }
    // close() sends what is queued and closes the connection with 1000.
    void this.close('worker retired');
  }

  async retire(reason: string): Promise<void> {
    if (this.closing !== null) return this.closing;
    if (this.leaving) return this.closedPromise;
    const conn = this.conn;
    if (conn === null) return this.close(`retired (${reason}) while not connected`);
    this.leaving = true;
    conn.send({ op: 'retire', reason });
    let timer: NodeJS.Timeout | null = null;
    const timedOut = await Promise.race([
      this.closedPromise.then(() => false),
      new Promise<boolean>((r) => {
        timer = setTimeout(() => r(true), RETIRE_WAIT_MS);
      }),
    ]);
    if (timer !== null) clearTimeout(timer);
    if (timedOut && !this.stopping) {
      this.log(`the scheduler did not answer retire within ${RETIRE_WAIT_MS} ms; closing`);
      return this.close(`retired (${reason})`);
    }
    return this.closedPromise;
  }

  close(reason: string): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.stopping = true;
    this.closing = (async () => {
      if (this.sleepTimer !== null) clearTimeout(this.sleepTimer);
      this.sleepTimer = null;
      this.wake?.();
      this.wake = null;
      if (this.memoryTimer !== null) clearInterval(this.memoryTimer);
      this.memoryTimer = null;
      if (this.heartbeatTimer !== null) clearInterval(this.heartbeatTimer);
      this.heartbeatTimer = null;
      const conn = this.conn;
      if (conn !== null) {
        this.flushOutbox();
        this.flushLogs();
        conn.close(reason, 'CLOSED', 1000);
      }
      this.current?.close(reason, 'CLOSED', 1000);
      const executors = [...this.runs.values()].map((rs) => rs.executor);
      this.conn = null;
      this.reset();
      await Promise.allSettled(executors.map((e) => e.shutdown()));
      this.peers?.close();
      await this.peerServer?.close();
      await this.store.close();
      this.loopDelay.disable();
      if (this.captures) releaseConsole(this);
      await this.loop;
      this.resolveClosed();
    })();
    return this.closing;
  }

  // ---- memory ---------------------------------------------------------------------

  /**
   * Every 100 ms with a memory limit (after Dask's thresholds): held results above 60% of
   * the limit, or a process above 70%, spill (least recently used first); above 80% the
   * worker asks for no more work (credits 0) until it is back under 70%.
   */
  private checkMemory(): void {
    const limit = this.memoryLimit;
    const rss = this.rss();
    const held = this.store.heldBytes;
    let target = held;
    if (held > MEM_TARGET * limit) target = MEM_TARGET * limit;
    if (rss > MEM_SPILL * limit) target = Math.min(target, Math.max(0, held - (rss - MEM_TARGET * limit)));
    if (target < held && !this.spilling) {
      this.spilling = true;
      const gen = this.gen;
      this.store.spill(target).then(
        (moved) => {
          this.spilling = false;
          if (moved > 0 && this.gen === gen) this.log(`spilled ${moved} bytes of results to disk (rss ${rss}, limit ${limit})`);
        },
        (err: unknown) => {
          this.spilling = false;
          this.log(`spilling failed: ${(err as Error).message}`);
        },
      );
    }
    if (!this.paused && rss > MEM_PAUSE * limit) {
      this.paused = true;
      this.log(`memory at ${Math.round((rss / limit) * 100)}% of the limit: pausing (credits 0)`);
      this.conn?.send({ op: 'credits', credits: 0 });
    } else if (this.paused && rss < MEM_SPILL * limit) {
      this.paused = false;
      this.log(`memory back at ${Math.round((rss / limit) * 100)}% of the limit: resuming`);
      this.conn?.send({ op: 'credits', credits: this.credits });
    }
  }

  /**
   * Credits follow task durations: with tasks of a few µs, 2 per thread would leave the
   * worker idle for a scheduler round trip after every couple of calls, so short tasks
   * earn a deeper queue (2,048 per thread under 50 µs, 256 under 1 ms, 16 under 10 ms). Long tasks
   * keep the base (threads × saturation), so that queued work stays stealable.
   */
  private adaptCredits(): void {
    const d = this.meanMs;
    if (d === undefined || this.paused) return;
    const perThread = d < 0.05 ? 2048 : d < 1 ? 256 : d < 10 ? 16 : 0;
    const want = Math.max(this.baseCredits, this.threads * perThread);
    // Hysteresis: only a change of level is sent.
    if (want === this.credits) return;
    this.credits = want;
    this.conn?.send({ op: 'credits', credits: want });
  }

  // ---- task console output ----------------------------------------------------------

  /** A console line written by a running task (inline mode). False when there is no scheduler to send it to. */
  captureLog(level: LogRecord['level'], msg: string, wc: WorkCall): boolean {
    if (this.conn === null) return false;
    if (this.logBuf.length >= MAX_LOG_RECORDS) {
      this.logDropped++;
      return true;
    }
    this.logBuf.push({ level, msg, at: Date.now(), worker: this.name, run: wc.rs.run, task: wc.call.id, key: wc.call.key });
    if (!this.logScheduled) {
      this.logScheduled = true;
      setImmediate(() => {
        this.logScheduled = false;
        this.flushLogs();
      });
    }
    return true;
  }

  private flushLogs(): void {
    const conn = this.conn;
    if (conn === null || this.logBuf.length === 0) return;
    const records = this.logBuf;
    if (this.logDropped > 0) {
      records.push({ level: 'warn', msg: `${this.logDropped} task log lines dropped (the connection was busy)`, at: Date.now(), worker: this.name });
    }
    if (!conn.send({ op: 'log', records })) {
      if (this.logDropped > 0) records.pop();
      return;
    }
    this.logBuf = [];
    this.logDropped = 0;
  }
}

// ---- helpers ---------------------------------------------------------------------------

function positiveInt(n: number, what: string): number {
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`worker: ${what} must be a positive integer, got ${String(n)}`);
  return n;
}

function resolveAll(waiters: Map<string, Resolve[]>): void {
  for (const list of waiters.values()) for (const r of list) r(undefined);
  waiters.clear();
}

function aheadDropped(wc: WorkCall, key: string, status: OutcomeStatus | 'stolen'): SerializedError {
  return {
    name: 'CancelledError',
    code: 'AHEAD_DROPPED',
    message: `task "${wc.call.key}" was sent ahead of its input ${key}, whose producer ${status === 'stolen' ? 'was moved to another worker' : `ended ${status}`}`,
  };
}

function inputLost(wc: WorkCall, dep: WireDep): SerializedError {
  const from = dep.holders.length > 0 ? `${dep.holders.join(', ')} or the scheduler` : 'the scheduler';
  return {
    name: 'WorkerLostError',
    code: 'INPUT_LOST',
    message: `input ${dep.key} of task "${wc.call.key}" could not be fetched from ${from}`,
  };
}

/** Put a dep's value (after its path) into the call's arguments. Throws WeftError BAD_DEP on a wrong path or slot. */
function applyDep(call: WireCall, dep: WireDep, value: unknown): void {
  let v = value;
  if (dep.path !== undefined) {
    for (const i of dep.path) {
      if (!Array.isArray(v) || !Number.isInteger(i) || i < 0 || i >= v.length) {
        throw new WeftError('BAD_DEP', `task "${call.key}": input ${dep.key} has no element at path [${dep.path.join(', ')}]`);
      }
      v = v[i] as unknown;
    }
  }
  const args = call.args;
  if (dep.index === -1) {
    args[dep.arg] = v;
    return;
  }
  const slot = args[dep.arg];
  if (!Array.isArray(slot)) throw new WeftError('BAD_DEP', `task "${call.key}": argument ${dep.arg} is not a list to put input ${dep.key} into`);
  slot[dep.index] = v;
}

const isInt = (v: unknown): v is number => Number.isInteger(v);
const isString = (v: unknown): v is string => typeof v === 'string';

/** Check the fields of a call beyond what the op table checks; a bad one breaks the protocol. */
/** (A function of its own, not a closure made per call: `checkCall` runs once per call received.) */
function badCallField(i: number, field: string, expected: string): never {
  throw new ProtocolError('BAD_MESSAGE', `compute: call ${i}: field "${field}" must be ${expected}`, { op: 'compute', field, expected });
}

function checkCall(raw: unknown, i: number): WireCall {
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) badCallField(i, '(call)', 'an object');
  const c = raw as Record<string, unknown>;
  if (!isInt(c.id)) badCallField(i, 'id', 'int');
  if (!isInt(c.runId)) badCallField(i, 'runId', 'int');
  if (typeof c.taskKey !== 'string') badCallField(i, 'taskKey', 'string');
  if (typeof c.key !== 'string') badCallField(i, 'key', 'string');
  if (!Array.isArray(c.args)) badCallField(i, 'args', 'array');
  if (typeof c.timeoutMs !== 'number') badCallField(i, 'timeoutMs', 'number');
  if (!isInt(c.mapIndex)) badCallField(i, 'mapIndex', 'int');
  if (!isInt(c.attempt)) badCallField(i, 'attempt', 'int');
  if (!isInt(c.loopCount)) badCallField(i, 'loopCount', 'int');
  if (c.ret !== undefined && typeof c.ret !== 'boolean') badCallField(i, 'ret', 'boolean');
  if (c.deps !== undefined) {
    if (!Array.isArray(c.deps)) badCallField(i, 'deps', 'array');
    for (const d of c.deps as unknown[]) {
      if (typeof d !== 'object' || d === null) badCallField(i, 'deps[]', 'an object');
      const dep = d as Record<string, unknown>;
      if (typeof dep.key !== 'string') badCallField(i, 'deps[].key', 'string');
      if (!Array.isArray(dep.holders) || !dep.holders.every(isString)) badCallField(i, 'deps[].holders', 'array of strings');
      if (typeof dep.nbytes !== 'number') badCallField(i, 'deps[].nbytes', 'number');
      if (!isInt(dep.arg) || dep.arg < 0) badCallField(i, 'deps[].arg', 'int >= 0');
      if (!isInt(dep.index) || dep.index < -1) badCallField(i, 'deps[].index', 'int >= -1');
      if (dep.path !== undefined && (!Array.isArray(dep.path) || !dep.path.every(isInt))) badCallField(i, 'deps[].path', 'array of ints');
    }
  }
  return raw as WireCall;
}

// ---- console capture (inline mode) -------------------------------------------------------

/**
 * Task console output in inline mode (LocalExecutor, this thread). The executor runs
 * each call through `runCaptured`, inside an AsyncLocalStorage scope whose store is the
 * worker's record of the call (handed over with it, so nothing is looked up per call).
 * The console methods, patched once per process while a capturing worker lives, send
 * what is written inside such a scope to that call's worker, and pass everything else
 * through. The scope follows the task across its awaits, so async tasks are captured too.
 *
 * Pool threads (threads > 1) have consoles of their own that this does not reach:
 * their output goes to the worker process's stdout/stderr, uncaptured.
 */
const captureStore = new AsyncLocalStorage<WorkCall | null>();
const capturing = new Set<WorkerCore>();
type ConsoleMethod = 'log' | 'info' | 'warn' | 'error' | 'debug';
const LEVELS: Readonly<Record<ConsoleMethod, LogRecord['level']>> = { log: 'info', info: 'info', warn: 'warn', error: 'error', debug: 'debug' };
let originals: Record<ConsoleMethod, (...args: unknown[]) => void> | null = null;

/** The inline executor's `around`: run the call in a capture scope naming it. */
function runCaptured(call: TaskCall, fn: TaskFn, args: unknown[]): unknown {
  return captureStore.run((call as InlineCall).wc, fn, ...args);
}

function captureConsole(w: WorkerCore): void {
  capturing.add(w);
  if (originals !== null) return;
  const saved = {} as Record<ConsoleMethod, (...args: unknown[]) => void>;
  for (const m of Object.keys(LEVELS) as ConsoleMethod[]) {
    const orig = console[m] as (...args: unknown[]) => void;
    saved[m] = orig;
    const level = LEVELS[m];
    console[m] = function (this: unknown, ...args: unknown[]): void {
      const wc = captureStore.getStore();
      if (wc != null && capturing.has(wc.rs.core)) {
        let msg: string | null = null;
        try {
          msg = format(...args);
        } catch {
          msg = null; // an argument whose inspection throws: print it the usual way
        }
        if (msg !== null && wc.rs.core.captureLog(level, msg, wc)) return;
      }
      orig.apply(console, args);
    };
  }
  originals = saved;
}

function releaseConsole(w: WorkerCore): void {
  capturing.delete(w);
  if (capturing.size > 0 || originals === null) return;
  for (const m of Object.keys(LEVELS) as ConsoleMethod[]) console[m] = originals[m];
  originals = null;
}
