/**
 * The client side of a weft cluster: one WebSocket connection to the scheduler, over
 * which a process submits whole graphs (`runGraph`, what `flow.run()` does with a
 * ClusterExecutor) or opens call sessions (`openSession`, the plain Executor interface:
 * resolved task calls in, outcomes with values out, like dask's `client.submit`).
 *
 * - Graph runs (DESIGN.md "How data flows" §5): the scheduler runs the core and the
 *   runner over the graph; the client streams the spec in chunks (`graphBegin`,
 *   `graphNodes`…, `graphEnd`), receives task state events (only when someone listens:
 *   `onTaskState`, state handlers) or counts by state (`onProgress`), and when the run
 *   has finished fetches the results it keeps, then releases the run.
 * - Everything the client sends goes through one FIFO outbox that respects the
 *   connection's backpressure: when the batcher refuses a message (its queue is at its
 *   bound because the socket is slow) the message is held and sending resumes on
 *   `onDrain`. A graph is a lazy sequence of messages in that outbox, so a big graph is
 *   encoded chunk by chunk as the socket takes it.
 * - A lost connection fails what depends on it with a `ClusterConnectionError` naming
 *   the scheduler's address: graph runs reject, calls in flight end with that error.
 *
 * State handlers run here, on the client, from the task state events (functions do not
 * travel). On a cluster the handler's `info.result` is left out: results stay on the
 * workers until the run has finished and the client asks for them.
 */
import { performance } from 'node:perf_hooks';
import WebSocket from 'ws';
import { TaskSerializationError, WeftError, type SerializedError } from '../errors.ts';
import { loadTasks } from '../executor/pool-tasks.ts';
import type { ExecutorSession, Outcome, TaskCall } from '../executor/types.ts';
import type { GraphSpec, NodeSpec, StateHandlerFn, TaskStateName } from '../flow/spec.ts';
import type { FlowRunResult, RunOptions } from '../runner/types.ts';
import { buildBundle, type Bundle } from './bundle.ts';
import { CLIENT_SOCKET_OPTIONS, Connection, HandshakeError, openHandshake } from './connection.ts';
import { ClusterConnectionError, logToStderr } from './errors.ts';

export { ClusterConnectionError, logToStderr };
import {
  DEFAULT_MAX_FRAME_BYTES,
  dispatch,
  errorFromWire,
  estimateBytes,
  ProtocolError,
  GraphEncoder,
  wireError,
  type CallOutcomesMsg,
  type ClientToScheduler,
  type EventSummaryMsg,
  type Handlers,
  type LogRecord,
  type RunStateMsg,
  type TaskEvent,
  type GraphNodesMsg,
  type WireRunOptions,
} from './protocol.ts';
import { countsOf, progressFromCounts, runResultFrom } from './run-result.ts';

const now = (): number => performance.timeOrigin + performance.now();

/** Nodes per `graphNodes` message (fewer when their arguments are big: see `CHUNK_BYTES`). */
const CHUNK_NODES = 2_000;
/** Estimated bytes per `graphNodes` message. */
const CHUNK_BYTES = 4 * 1024 * 1024;
/** A finished run's release waits at most this long for a frame to ride with. */
const RELEASE_DELAY_MS = 50;

/** Task ids per `getResults` request, and requests in flight at once. */
const RESULTS_CHUNK = 10_000;
const RESULTS_IN_FLIGHT = 4;

/** TLS material for a `wss://` scheduler (PEM strings or buffers). */
export interface ClientTlsOptions {
  /** CA that signed the scheduler's certificate (self-signed clusters). */
  readonly ca?: string | Buffer;
  /** Client certificate and key, when the scheduler asks for one. */
  readonly cert?: string | Buffer;
  readonly key?: string | Buffer;
  /** Default true. */
  readonly rejectUnauthorized?: boolean;
}

export interface ClusterClientOptions {
  /** The scheduler: `ws://host:port` or `wss://host:port`. */
  readonly address: string;
  /** Shared cluster token (the scheduler's `--token-file`), when it asks for one. */
  readonly token?: string;
  readonly tls?: ClientTlsOptions;
  /** Socket open plus handshake. Default 10 s. */
  readonly connectTimeoutMs?: number;
  /** Largest frame accepted or sent. Default 64 MiB. */
  readonly maxFrameBytes?: number;
  /** Worker logs and task console output of this client's runs (default: `[worker key] msg` lines on stderr). */
  readonly onLog?: (record: LogRecord) => void;
  /** The connection ended without `close()` (the scheduler went away). */
  readonly onLost?: (error: ClusterConnectionError) => void;
}


let clients = 0;

type Outgoing = ClientToScheduler | Iterator<ClientToScheduler>;

interface ResultsReply {
  readonly values: readonly unknown[];
  readonly error?: SerializedError;
}

export class ClusterClient {
  /** Connect and complete the handshake. Rejects with a ClusterConnectionError naming the address. */
  static async connect(options: ClusterClientOptions): Promise<ClusterClient> {
    const { address } = options;
    const timeoutMs = options.connectTimeoutMs ?? 10_000;
    const maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    const unreachable = (why: string, cause?: unknown): ClusterConnectionError =>
      new ClusterConnectionError('SCHEDULER_UNREACHABLE', `cannot connect to the weft scheduler at ${address}: ${why}`, address, { cause });
    let ws: WebSocket;
    try {
      const tls = options.tls ?? {};
      ws = new WebSocket(address, {
        maxPayload: maxFrameBytes,
        handshakeTimeout: timeoutMs,
        ...CLIENT_SOCKET_OPTIONS,
        ...(tls.ca !== undefined ? { ca: tls.ca } : {}),
        ...(tls.cert !== undefined ? { cert: tls.cert } : {}),
        ...(tls.key !== undefined ? { key: tls.key } : {}),
        ...(tls.rejectUnauthorized !== undefined ? { rejectUnauthorized: tls.rejectUnauthorized } : {}),
      });
    } catch (err) {
      throw unreachable((err as Error).message, err);
    }
    await new Promise<void>((resolve, reject) => {
      const onError = (err: Error): void => {
        ws.off('open', onOpen);
        ws.terminate();
        reject(unreachable(err.message, err));
      };
      const onOpen = (): void => {
        ws.off('error', onError);
        resolve();
      };
      ws.once('error', onError);
      ws.once('open', onOpen);
    });
    const name = `client-${process.pid}-${++clients}`;
    const conn = new Connection(ws, { receives: 's2c', maxFrameBytes, label: `${name} → ${address}` });
    let welcome;
    try {
      welcome = await openHandshake(conn, {
        hello: { role: 'client', name, resources: {}, threads: 0, memoryLimit: 0, address: '', pid: process.pid },
        ...(options.token !== undefined ? { token: options.token } : {}),
        handshakeMs: timeoutMs,
      });
    } catch (err) {
      conn.terminate('handshake failed', 'HANDSHAKE');
      throw unreachable(err instanceof HandshakeError ? err.message : (err as Error).message, err);
    }
    return new ClusterClient(address, conn, welcome.id, welcome.heartbeatMs, options);
  }

  private readonly graphs = new Map<number, GraphRun>();
  private readonly sessions = new Map<number, CallSession>();
  private readonly requests = new Map<number, { resolve: (r: ResultsReply) => void; reject: (err: Error) => void }>();
  private nextGraph = 1;
  private nextSession = 1;
  private nextRequest = 1;
  /** FIFO of what waits to be sent: single messages and lazy sequences (a graph's chunks). */
  private readonly outbox: Outgoing[] = [];
  /** A message the batcher refused: sent first on the next drain. */
  private held: ClientToScheduler | null = null;
  private pumping = false;
  private readonly heartbeat: NodeJS.Timeout;
  /** Set once the connection is gone (closed by us or lost): why. */
  private ended: ClusterConnectionError | null = null;
  private closing: Promise<void> | null = null;
  private readonly onLog: (record: LogRecord) => void;
  /** Code bundles sent on this connection, by hash. */
  private readonly sentBundles = new Set<string>();

  private constructor(
    /** The scheduler's address. */
    readonly address: string,
    private readonly conn: Connection,
    /** The id the scheduler knows this client by. */
    readonly id: string,
    heartbeatMs: number,
    private readonly options: ClusterClientOptions,
  ) {
    this.onLog = options.onLog ?? logToStderr;
    const handlers: Handlers<'s2c'> = {
      challenge: () => this.unexpected('challenge'),
      welcome: () => this.unexpected('welcome'),
      refuse: (m) => this.conn.close(`the scheduler refused: ${m.reason}`, m.code),
      sessionReady: (m) => this.sessions.get(m.session)?.onReady(m.slots, m.error),
      callOutcomes: (m) => this.sessions.get(m.session)?.onOutcomes(m),
      runState: (m) => this.graphs.get(m.graph)?.onRunState(m),
      taskEvents: (m) => this.graphs.get(m.graph)?.onEvents(m.events),
      eventSummary: (m) => this.graphs.get(m.graph)?.onSummary(m),
      results: (m) => {
        const req = this.requests.get(m.id);
        if (req === undefined) return;
        this.requests.delete(m.id);
        req.resolve(m.error !== undefined ? { values: m.values, error: m.error } : { values: m.values });
      },
      heartbeat: () => undefined,
      log: (m) => {
        for (const r of m.records) guard(() => this.onLog(r));
      },
      error: (m) => {
        const req = this.requests.get(m.ref);
        if (req !== undefined) {
          this.requests.delete(m.ref);
          req.reject(errorFromWire(m.error));
          return;
        }
        guard(() => this.onLog({ level: 'error', msg: `scheduler: ${m.error.name}: ${m.error.message}`, at: Date.now() }));
      },
    };
    conn.onMessages = (msgs) => dispatch(handlers, msgs);
    conn.onDrain = () => this.pump();
    conn.onClose = (reason) => this.onClosed(reason);
    this.heartbeat = setInterval(() => this.post({ op: 'heartbeat', at: now() }), Math.max(50, heartbeatMs));
    this.heartbeat.unref();
  }

  /** True once the connection is gone (closed or lost). */
  get closed(): boolean {
    return this.ended !== null;
  }

  /**
   * Run a graph on the cluster. `parameters` are resolved already (see `runFlow`).
   * Rejects before sending anything for what cannot travel (custom triggers, custom
   * cache validators), with the scheduler's error for a graph it rejects, and with a
   * ClusterConnectionError when the connection is lost before the run's result is in.
   */
  runGraph(spec: GraphSpec, parameters: Record<string, unknown>, opts: RunOptions = {}, bundle = ''): Promise<FlowRunResult> {
    if (this.ended !== null) return Promise.reject(this.ended);
    if (opts.restartFrom !== undefined) {
      return Promise.reject(
        new WeftError('UNSUPPORTED', `flow "${spec.name}": restarting from an earlier run (restartFrom) is not supported on a cluster yet`),
      );
    }
    const graph = this.nextGraph++;
    let chunks: GraphNodesMsg[];
    try {
      // Throws for what cannot travel, before anything is sent.
      chunks = encodeGraph(graph, spec);
      checkGraphValues(spec, parameters);
    } catch (err) {
      return Promise.reject(err as Error);
    }
    const run = new GraphRun(this, graph, spec, opts);
    this.graphs.set(graph, run);
    this.postAll(graphMessages(graph, spec, chunks, parameters, run.wireOptions, bundle));
    run.armSignal();
    return run.promise;
  }

  /**
   * Open a call session for `session` (checks locally that every task key resolves
   * first). With a code bundle it resolves once the scheduler has found the bundle, and
   * rejects with its error otherwise. Without one the scheduler cannot refuse the
   * session, so it resolves at once: the open goes out with the first calls, in the
   * same frame, and `sessionReady` only brings the slot count.
   */
  async openSession(session: ExecutorSession, bundle = ''): Promise<CallSession> {
    if (this.ended !== null) throw this.ended;
    await loadTasks(session.modules, session.taskKeys, 'the client');
    if (this.ended !== null) throw this.ended;
    const id = this.nextSession++;
    const s = new CallSession(this, id, session);
    this.sessions.set(id, s);
    this.post({
      op: 'openSession',
      session: id,
      flowName: session.flowName,
      modules: session.modules,
      taskKeys: session.taskKeys,
      parameters: session.parameters,
      bundle,
    });
    if (bundle === '') {
      s.ready.catch(() => undefined); // a lost connection ends the calls in flight instead
      return s;
    }
    try {
      await s.ready;
    } catch (err) {
      this.sessions.delete(id);
      throw err;
    }
    return s;
  }

  /**
   * Code shipping: bundle `modules` (`buildBundle`) and send the bundle unless this
   * connection sent it already. Resolves to its hash, for `runGraph` / `openSession`.
   */
  async shipBundle(modules: readonly string[]): Promise<string> {
    const b = await buildBundle(modules);
    this.putBundle(b);
    return b.hash;
  }

  /** Send a bundle (once per hash per connection). The scheduler checks its hash. */
  putBundle(b: Bundle): void {
    if (this.ended !== null) throw this.ended;
    if (this.sentBundles.has(b.hash)) return;
    this.sentBundles.add(b.hash);
    this.post({ op: 'putBundle', hash: b.hash, code: b.code });
  }

  /** Close the connection (runs still going on the cluster are cancelled by the scheduler). Idempotent. */
  close(): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.flushReleases();
    const ws = this.conn.ws;
    this.closing = new Promise<void>((resolve) => {
      if (ws.readyState === WebSocket.CLOSED) {
        resolve();
        return;
      }
      const t = setTimeout(() => ws.terminate(), 2_000);
      ws.once('close', () => {
        clearTimeout(t);
        resolve();
      });
    });
    this.end(new ClusterConnectionError('SCHEDULER_LOST', `the connection to the weft scheduler at ${this.address} was closed by this client`, this.address));
    this.conn.close('client closed', 'CLOSED', 1000);
    return this.closing;
  }

  // ---- internals shared with GraphRun and CallSession ---------------------------

  /** Queue one message (sent in order, as the socket allows). Dropped once the connection is gone. */
  post(msg: ClientToScheduler): void {
    if (this.ended !== null) return;
    if (this.outbox.length === 0 && this.held === null && this.conn.send(msg)) return;
    this.outbox.push(msg);
    this.pump();
  }

  /** Queue a lazy sequence of messages. */
  postAll(msgs: Iterator<ClientToScheduler>): void {
    if (this.ended !== null) return;
    this.flushReleases();
    this.outbox.push(msgs);
    this.pump();
  }

  /**
   * Release a finished run on the scheduler. Not urgent: it rides with the next message
   * (the next graph), or goes on its own after RELEASE_DELAY_MS — every frame costs a
   * write that wakes the scheduler, and back-to-back small runs would pay it each time.
   */
  release(graph: number): void {
    if (this.ended !== null) return;
    this.releases.push(graph);
    if (this.releaseTimer === null) {
      this.releaseTimer = setTimeout(() => {
        this.releaseTimer = null;
        this.flushReleases();
      }, RELEASE_DELAY_MS);
      this.releaseTimer.unref();
    }
  }

  private releases: number[] = [];
  private releaseTimer: NodeJS.Timeout | null = null;

  private flushReleases(): void {
    if (this.releaseTimer !== null) {
      clearTimeout(this.releaseTimer);
      this.releaseTimer = null;
    }
    if (this.releases.length === 0) return;
    const gs = this.releases;
    this.releases = [];
    for (const graph of gs) this.post({ op: 'releaseRun', graph });
  }

  /**
   * The values of these tasks of a finished run (aligned), fetched in chunks, a few
   * requests at a time. A reply that fails as a whole rejects; one whose values arrived
   * but some were lost (their workers died) keeps them (lost ones undefined) and names
   * what was lost in `lost`.
   */
  async results(graph: number, tasks: readonly number[]): Promise<{ values: unknown[]; lost: string[] }> {
    const values = new Array<unknown>(tasks.length);
    const lost: string[] = [];
    let next = 0;
    const fetchChunks = async (): Promise<void> => {
      while (next < tasks.length) {
        const from = next;
        next = Math.min(tasks.length, next + RESULTS_CHUNK);
        const part = tasks.slice(from, next);
        const r = await this.request(graph, part);
        if (r.values.length !== part.length) {
          if (r.error !== undefined) throw errorFromWire(r.error);
          throw new ProtocolError('BAD_MESSAGE', `results: ${r.values.length} values for ${part.length} tasks`, { op: 'results', field: 'values' });
        }
        if (r.error !== undefined) lost.push(r.error.message);
        for (let i = 0; i < r.values.length; i++) values[from + i] = r.values[i];
      }
    };
    const parallel = Math.min(RESULTS_IN_FLIGHT, Math.ceil(tasks.length / RESULTS_CHUNK));
    await Promise.all(Array.from({ length: parallel }, fetchChunks));
    return { values, lost };
  }

  forgetGraph(graph: number): void {
    this.graphs.delete(graph);
  }

  forgetSession(session: number): void {
    this.sessions.delete(session);
  }

  private request(graph: number, tasks: readonly number[]): Promise<ResultsReply> {
    if (this.ended !== null) return Promise.reject(this.ended);
    const id = this.nextRequest++;
    return new Promise<ResultsReply>((resolve, reject) => {
      this.requests.set(id, { resolve, reject });
      this.post({ op: 'getResults', id, graph, tasks });
    });
  }

  private pump(): void {
    if (this.pumping || this.ended !== null) return;
    this.pumping = true;
    try {
      for (;;) {
        let msg = this.held;
        this.held = null;
        if (msg === null) {
          const head = this.outbox[0];
          if (head === undefined) return;
          if ('op' in head) {
            this.outbox.shift();
            msg = head;
          } else {
            const n = head.next();
            if (n.done === true) {
              this.outbox.shift();
              continue;
            }
            msg = n.value;
          }
        }
        if (!this.conn.send(msg)) {
          // The batcher is at its bound (or the connection is gone): keep it for onDrain.
          if (!this.conn.closed) this.held = msg;
          return;
        }
      }
    } finally {
      this.pumping = false;
    }
  }

  private unexpected(op: string): never {
    throw new ProtocolError('BAD_MESSAGE', `"${op}" after the handshake`, { op });
  }

  private onClosed(reason: string): void {
    if (this.ended !== null) return;
    const err = new ClusterConnectionError('SCHEDULER_LOST', `lost the connection to the weft scheduler at ${this.address}: ${reason}`, this.address);
    this.end(err);
    const onLost = this.options.onLost;
    if (onLost !== undefined) guard(() => onLost(err));
  }

  /** The connection is gone: fail everything that waits on it. */
  private end(err: ClusterConnectionError): void {
    if (this.ended !== null) return;
    this.ended = err;
    clearInterval(this.heartbeat);
    this.outbox.length = 0;
    this.held = null;
    for (const r of this.requests.values()) r.reject(err);
    this.requests.clear();
    for (const g of [...this.graphs.values()]) g.lost(err);
    this.graphs.clear();
    for (const s of [...this.sessions.values()]) s.lost(err);
    this.sessions.clear();
  }
}

// ---- what cannot travel ----------------------------------------------------------------

/**
 * Why a value cannot cross the wire (msgpack drops functions silently, throws on symbols
 * and on bigints past 64 bits, and loops on cycles), with where in it, or null when it
 * can. A frame that fails to encode would close the whole connection, so this is
 * checked before anything is queued. Walks everything except binary data.
 */
export function unsendable(v: unknown, path = 'value', ancestors: object[] = []): string | null {
  switch (typeof v) {
    case 'function':
      return `a function (${(v as { name?: string }).name || 'anonymous'}) at ${path}`;
    case 'symbol':
      return `a symbol at ${path}`;
    case 'bigint':
      return v > 0xffff_ffff_ffff_ffffn || v < -0x8000_0000_0000_0000n ? `a bigint wider than 64 bits at ${path}` : null;
    case 'object': {
      if (v === null || ArrayBuffer.isView(v) || v instanceof ArrayBuffer || v instanceof Date || v instanceof RegExp) return null;
      if (ancestors.includes(v)) return `a cycle at ${path}`;
      if (ancestors.length > 200) return `nesting deeper than 200 levels at ${path}`;
      ancestors.push(v);
      try {
        if (Array.isArray(v)) {
          for (let i = 0; i < v.length; i++) {
            const why = unsendable(v[i], `${path}[${i}]`, ancestors);
            if (why !== null) return why;
          }
        } else if (v instanceof Map) {
          for (const [k, x] of v) {
            const why = unsendable(k, `${path} (a map key)`, ancestors) ?? unsendable(x, `${path}.get(${String(k)})`, ancestors);
            if (why !== null) return why;
          }
        } else if (v instanceof Set) {
          for (const x of v) {
            const why = unsendable(x, `${path} (a set element)`, ancestors);
            if (why !== null) return why;
          }
        } else {
          for (const k in v) {
            const why = unsendable((v as Record<string, unknown>)[k], `${path}.${k}`, ancestors);
            if (why !== null) return why;
          }
        }
      } finally {
        ancestors.pop();
      }
      return null;
    }
    default:
      return null;
  }
}

/** Constant arguments and parameter values must travel to the scheduler: TaskSerializationError naming the first that cannot. */
function checkGraphValues(spec: GraphSpec, parameters: Record<string, unknown>): void {
  for (const name of Object.keys(parameters)) {
    const why = unsendable(parameters[name], name);
    if (why !== null) throw new TaskSerializationError(`flow "${spec.name}": parameter "${name}" cannot be sent to a cluster scheduler: it holds ${why}`);
  }
  for (const n of spec.nodes) {
    for (let a = 0; a < n.args.length; a++) {
      const b = n.args[a]!;
      if (b.kind !== 'const') continue;
      const why = unsendable(b.value, `argument ${a}`);
      if (why !== null) throw new TaskSerializationError(`task "${n.key}": its arguments cannot be sent to a cluster scheduler: ${why}`);
    }
  }
}

// ---- graph runs ----------------------------------------------------------------------

/** The graph's nodes as compact chunks (each options object and task key sent once). */
function hasConstant(args: NodeSpec['args']): boolean {
  for (let i = 0; i < args.length; i++) if (args[i]!.kind === 'const') return true;
  return false;
}

function encodeGraph(graph: number, spec: GraphSpec): GraphNodesMsg[] {
  const enc = new GraphEncoder();
  const nodes = spec.nodes;
  const out: GraphNodesMsg[] = [];
  let offset = 0;
  while (offset < nodes.length) {
    let end = offset;
    let bytes = 0;
    while (end < nodes.length && end - offset < CHUNK_NODES && (end === offset || bytes < CHUNK_BYTES)) {
      const n = nodes[end]!;
      // Nodes are small unless they bind constants (a list to map over, a big value).
      bytes += 64 + n.key.length + (hasConstant(n.args) ? estimateBytes(n.args) : 0);
      end++;
    }
    out.push(enc.chunk(graph, nodes, offset, end));
    offset = end;
  }
  return out;
}

/** A graph's messages, produced as the socket takes them: begin, node chunks, end. */
function* graphMessages(
  graph: number,
  spec: GraphSpec,
  chunks: readonly GraphNodesMsg[],
  parameters: Record<string, unknown>,
  options: WireRunOptions,
  bundle: string,
): Generator<ClientToScheduler> {
  yield {
    op: 'graphBegin',
    graph,
    name: spec.name,
    nodeCount: spec.nodes.length,
    referenceTasks: spec.referenceTasks,
    modules: spec.modules,
    parameters,
    bundle,
    options,
  };
  yield* chunks;
  yield { op: 'graphEnd', graph };
}

/** One submitted graph, from submission to its result. */
class GraphRun {
  readonly promise: Promise<FlowRunResult>;
  readonly wireOptions: WireRunOptions;
  private resolve!: (r: FlowRunResult) => void;
  private reject!: (e: Error) => void;
  private settled = false;
  /** The last state seen of each task run (for `from` in events); undefined = Pending. */
  private readonly prev: (TaskStateName | undefined)[] = [];
  /** The last error seen of each task run (for state handlers' `info.error`). */
  private readonly lastError = new Map<number, SerializedError>();
  /** Nodes with state handlers, by key (mapped children share their parent's key). */
  private readonly handled: Map<string, NodeSpec> | null;
  private readonly t0 = now();
  private readonly onAbort = (): void => this.client.post({ op: 'cancelRun', graph: this.graph });

  constructor(
    private readonly client: ClusterClient,
    readonly graph: number,
    private readonly spec: GraphSpec,
    private readonly opts: RunOptions,
  ) {
    this.promise = new Promise<FlowRunResult>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    let handled: Map<string, NodeSpec> | null = null;
    for (const n of spec.nodes) {
      const o = n.options;
      if (o.stateHandlers.length > 0 || o.onFailure !== null) (handled ??= new Map()).set(n.key, n);
    }
    this.handled = handled;
    this.wireOptions = {
      tagLimits: opts.tagLimits ?? {},
      validate: opts.validate ?? false,
      events: opts.onTaskState !== undefined || handled !== null,
      summaryMs: opts.onProgress !== undefined ? Math.max(1, opts.progressIntervalMs ?? 100) : 0,
      resultDir: opts.resultDir ?? '',
      results: opts.keepResults !== false,
      ...(opts.runId !== undefined ? { runId: opts.runId } : {}),
    };
  }

  /** Cancel on abort (the run then finishes Cancelled through the usual path). */
  armSignal(): void {
    const signal = this.opts.signal;
    if (signal === undefined) return;
    if (signal.aborted) this.onAbort();
    else signal.addEventListener('abort', this.onAbort, { once: true });
  }

  onRunState(m: RunStateMsg): void {
    if (this.settled) return;
    switch (m.state) {
      case 'accepted':
      case 'running':
        return;
      case 'rejected':
        this.client.forgetGraph(this.graph);
        this.fail(m.error !== undefined ? errorFromWire(m.error) : new WeftError('RUN_REJECTED', `flow "${this.spec.name}" was rejected by the scheduler`));
        return;
      case 'finished':
        if (m.records === undefined) {
          this.client.forgetGraph(this.graph);
          this.client.release(this.graph);
          this.fail(new ProtocolError('BAD_MESSAGE', 'runState "finished" without records', { op: 'runState', field: 'records' }));
          return;
        }
        void this.finish(m);
        return;
    }
  }

  onEvents(events: readonly TaskEvent[]): void {
    if (this.settled) return;
    const onTaskState = this.opts.onTaskState;
    for (const e of events) {
      const id = e.task;
      const from = this.prev[id] ?? 'Pending';
      this.prev[id] = e.state;
      if (e.error !== undefined) this.lastError.set(id, e.error);
      if (onTaskState !== undefined) {
        try {
          onTaskState({ id, attempt: e.attempt, key: e.key, mapIndex: e.mapIndex, from, to: e.state, at: e.at });
        } catch (err) {
          // As in the runner: a listener that throws ends the run with its error.
          this.abandon(err);
          return;
        }
      }
      if (this.handled !== null) this.runHandlers(e, from);
    }
  }

  onSummary(m: EventSummaryMsg): void {
    if (this.settled) return;
    const onProgress = this.opts.onProgress;
    if (onProgress === undefined) return;
    try {
      onProgress(progressFromCounts(m.counts, now() - this.t0));
    } catch (err) {
      this.abandon(err);
    }
  }

  lost(err: ClusterConnectionError): void {
    this.fail(new ClusterConnectionError('SCHEDULER_LOST', `flow "${this.spec.name}": ${err.message}`, err.address, { cause: err }));
  }

  private runHandlers(e: TaskEvent, from: TaskStateName): void {
    const node = this.handled!.get(e.key);
    if (node === undefined) return;
    const o = node.options;
    const task = { key: e.key, mapIndex: e.mapIndex };
    const err = this.lastError.get(e.task);
    // No `result`: on a cluster it stays on the worker that made it.
    const info: Parameters<StateHandlerFn>[3] = err !== undefined ? { error: err } : {};
    const to = e.state;
    const failed = to === 'Failed' || to === 'TimedOut' || to === 'TriggerFailed';
    // Like the runner: after the event that caused them; their errors are warnings, not fatal.
    queueMicrotask(() => {
      for (const h of o.stateHandlers) safeHandler(() => h(task, from, to, info), node.key);
      if (o.onFailure !== null && failed) safeHandler(() => o.onFailure!(task, from, to, info), node.key);
    });
  }

  private async finish(m: RunStateMsg): Promise<void> {
    const records = m.records!;
    this.settled = true; // further events of this run mean nothing now
    this.opts.signal?.removeEventListener('abort', this.onAbort);
    let values: unknown[] | null = null;
    try {
      if (this.opts.keepResults !== false && records.node.length > 0) {
        // Small runs: the values came with 'finished'. Else fetch them in chunks.
        const got =
          m.values !== undefined
            ? { values: m.values.slice(), lost: (m.lost ?? []).slice() }
            : await this.client.results(this.graph, Array.from({ length: records.node.length }, (_, i) => i));
        values = got.values;
        if (got.lost.length > 0) {
          process.emitWarning(`flow "${this.spec.name}": some results could not be fetched from the cluster (result() gives undefined for them): ${got.lost.join('; ')}`);
        }
      }
    } catch (err) {
      this.client.release(this.graph);
      this.client.forgetGraph(this.graph);
      const why = err instanceof Error ? err.message : String(err);
      this.reject(
        err instanceof ClusterConnectionError
          ? new ClusterConnectionError('SCHEDULER_LOST', `flow "${this.spec.name}" finished ${records.state}, then ${err.message}`, err.address, { cause: err })
          : new WeftError('RESULTS_UNAVAILABLE', `flow "${this.spec.name}" finished ${records.state} on the cluster, but its results could not be fetched: ${why}`, {
              cause: err,
            }),
      );
      return;
    }
    this.client.release(this.graph);
    this.client.forgetGraph(this.graph);
    let result: FlowRunResult;
    try {
      result = runResultFrom(this.spec, records, values);
    } catch (err) {
      this.reject(err as Error);
      return;
    }
    try {
      this.opts.onProgress?.(progressFromCounts(countsOf(records), now() - this.t0));
    } catch (err) {
      this.reject(err as Error);
      return;
    }
    this.resolve(result);
  }

  /** A listener threw: cancel and drop the run on the scheduler, reject with the error. */
  private abandon(err: unknown): void {
    this.client.post({ op: 'cancelRun', graph: this.graph });
    this.client.release(this.graph);
    this.client.forgetGraph(this.graph);
    this.fail(err instanceof Error ? err : new Error(String(err)));
  }

  private fail(err: Error): void {
    if (this.settled) return;
    this.settled = true;
    this.opts.signal?.removeEventListener('abort', this.onAbort);
    this.reject(err);
  }
}

function safeHandler(fn: () => void, key: string): void {
  try {
    fn();
  } catch (err) {
    process.emitWarning(`state handler of task "${key}" threw: ${(err as Error)?.message ?? String(err)}`);
  }
}

/** A user callback (log sink, loss listener) must not break the connection's message loop. */
function guard(fn: () => void): void {
  try {
    fn();
  } catch (err) {
    process.emitWarning(`weft cluster client: a callback threw: ${(err as Error)?.message ?? String(err)}`);
  }
}

// ---- call sessions ---------------------------------------------------------------------

/**
 * A call-level session: resolved task calls go to the scheduler, which places them on
 * workers and returns every outcome with its value. Opened by `ClusterClient.openSession`.
 */
export class CallSession {
  /** Task slots across the cluster's workers (as of `sessionReady`). */
  slots = 0;
  readonly ready: Promise<void>;
  /** Dispatch stamps of the calls in flight, by call id (to end them if the connection is lost). */
  private readonly inFlight = new Map<number, number>();
  private resolveReady!: () => void;
  private rejectReady!: (e: Error) => void;
  private open = true;
  private failure: ClusterConnectionError | null = null;
  private local: Outcome[] = [];
  private localImmediate: NodeJS.Immediate | null = null;

  constructor(
    private readonly client: ClusterClient,
    readonly id: number,
    private readonly session: ExecutorSession,
  ) {
    this.ready = new Promise<void>((resolve, reject) => {
      this.resolveReady = resolve;
      this.rejectReady = reject;
    });
  }

  /** Calls submitted whose outcome has not arrived. */
  get pending(): number {
    return this.inFlight.size;
  }

  /** Set once the connection was lost: submit() throws it. */
  get lostWith(): ClusterConnectionError | null {
    return this.failure;
  }

  submit(calls: readonly TaskCall[]): void {
    if (this.failure !== null) throw this.failure;
    if (!this.open) throw new Error('cluster call session: submit() after close()');
    let send: TaskCall[] | null = null;
    for (let i = 0; i < calls.length; i++) {
      const c = calls[i]!;
      this.inFlight.set(c.id, c.runId);
      const why = unsendable(c.args, 'args') ?? unsendable(c.loopResult, 'loopResult');
      if (why === null) {
        send?.push(c);
        continue;
      }
      // Only this call fails; the rest of the batch goes.
      send ??= calls.slice(0, i);
      const err = new TaskSerializationError(`arguments of task "${c.key}" cannot be sent between processes: they hold ${why}`);
      this.local.push({ id: c.id, runId: c.runId, status: 'error', error: wireError(err), startMs: 0, endMs: now() });
    }
    if (this.local.length > 0) this.localImmediate ??= setImmediate(() => this.flushLocal());
    const out = send ?? calls;
    if (out.length > 0) this.client.post({ op: 'submit', session: this.id, calls: out });
  }

  cancel(ids: readonly number[]): void {
    if (!this.open || this.failure !== null || ids.length === 0) return;
    this.client.post({ op: 'cancelCalls', session: this.id, ids });
  }

  /** End the session: the scheduler stops its calls; outcomes still on their way are dropped. */
  close(): void {
    if (!this.open) return;
    this.open = false;
    this.inFlight.clear();
    this.local = [];
    if (this.localImmediate !== null) clearImmediate(this.localImmediate);
    this.localImmediate = null;
    this.client.forgetSession(this.id);
    this.client.post({ op: 'closeSession', session: this.id });
  }

  onReady(slots: number, error: SerializedError | undefined): void {
    if (error !== undefined) {
      this.open = false;
      this.rejectReady(errorFromWire(error));
      return;
    }
    this.slots = slots;
    this.resolveReady();
  }

  onOutcomes(m: CallOutcomesMsg): void {
    if (!this.open) return;
    const outs: Outcome[] = new Array<Outcome>(m.outcomes.length);
    let k = 0;
    for (let i = 0; i < m.outcomes.length; i++) {
      const w = m.outcomes[i]!;
      if (!this.inFlight.delete(w.id)) continue; // not ours (any more)
      const o: Outcome = { id: w.id, runId: w.runId, status: w.status, startMs: w.startMs, endMs: w.endMs };
      if (w.value !== undefined) o.value = w.value;
      if (w.error !== undefined) o.error = w.error;
      const worker = m.workers[i];
      if (worker !== undefined) o.worker = worker;
      outs[k++] = o;
    }
    if (k === 0) return;
    outs.length = k;
    this.deliver(outs);
  }

  /** The connection is gone: every call in flight ends with the connection error. */
  lost(err: ClusterConnectionError): void {
    this.failure = err;
    this.rejectReady(err);
    if (!this.open || this.inFlight.size === 0) return;
    const t = now();
    const rec = wireError(err);
    const outs: Outcome[] = [];
    for (const [id, runId] of this.inFlight) outs.push({ id, runId, status: 'error', error: rec, startMs: 0, endMs: t });
    this.inFlight.clear();
    this.deliver(outs);
  }

  /** Outcomes made here (calls that could not be sent), delivered once per tick. */
  private flushLocal(): void {
    this.localImmediate = null;
    const outs = this.local.filter((o) => this.inFlight.delete(o.id));
    this.local = [];
    if (this.open && outs.length > 0) this.deliver(outs);
  }

  private deliver(outs: Outcome[]): void {
    try {
      this.session.onOutcomes(outs);
    } catch (err) {
      // The consumer's bug, not the connection's: surface it without closing the socket.
      queueMicrotask(() => {
        throw err;
      });
    }
  }
}
