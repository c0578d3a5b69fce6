/**
 * The cluster scheduler: one process that workers and clients connect to over
 * WebSockets (ws or wss), with `/status` and `/metrics` on the same port.
 *
 * A client submits a graph in chunks; the scheduler runs it with the very runner that
 * runs flows in-process (`runFlow`), over a `FleetSession` whose "executor" is the set
 * of connected workers (see `fleet.ts`). Task state events and summaries stream back to
 * the client, results only when it asks. A client can also open a call session (the
 * plain Executor interface: resolved calls in, outcomes with values out).
 *
 * Nothing from the network stops the scheduler: a bad frame, an unknown op, an
 * oversized frame or a failed handshake closes that one connection with a logged reason
 * (counted in `/metrics`), and every other connection carries on.
 */
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { performance } from 'node:perf_hooks';
import { WebSocketServer, type WebSocket } from 'ws';
import { runFlow } from '../runner/run.ts';
import type { FlowRunResult, RunProgress, TaskColumns, TaskStateEvent } from '../runner/types.ts';
import type { GraphSpec, NodeSpec, TaskStateName } from '../flow/spec.ts';
import type { Outcome } from '../executor/types.ts';
import { BundleStore } from './bundle.ts';
import { acceptHandshake, closeCounts, Connection, heartbeatInterval } from './connection.ts';
import { Fleet, FleetSession, RemoteRef, remoteRefs, unpackValue, type HeldResult, type WorkerState } from './fleet.ts';
import {
  DEFAULT_MAX_FRAME_BYTES,
  dispatch,
  GraphDecoder,
  numberColumn,
  outcomesOf,
  ProtocolError,
  STATE_ORDER,
  wireError,
  type DataMsg,
  type GraphBeginMsg,
  type Handlers,
  type HelloMsg,
  type LogRecord,
  type Message,
  type RunRecords,
  type TaskEvent,
  type WireOutcome,
} from './protocol.ts';

const now = (): number => performance.timeOrigin + performance.now();

/** A finished run's values go with its 'finished' message up to this many task runs... */
const INLINE_RESULTS_MAX_TASKS = 50_000;
/** ...and this many bytes of results held on workers (else the client fetches them in chunks). */
const INLINE_RESULTS_MAX_BYTES = 8 * 1024 * 1024;

export interface SchedulerOptions {
  /** Default 127.0.0.1. */
  host?: string;
  /** Default 8786; 0 picks a free port. */
  port?: number;
  /** Shared secret: peers must prove they know it (HMAC over a nonce). */
  token?: string;
  /** Serve wss/https. With `ca` and `requireClientCert`, peers must present a certificate it signed. */
  tls?: { cert: string | Buffer; key: string | Buffer; ca?: string | Buffer; requireClientCert?: boolean };
  /** Heartbeat interval for small clusters (grows with the cluster). Default 500 ms. */
  heartbeatMs?: number;
  /** A worker silent for this many of its heartbeat intervals is lost. Default 60 (30 s at 500 ms). */
  missedHeartbeats?: number;
  maxFrameBytes?: number;
  /**
   * A client's socket buffering above this many bytes gets event summaries instead of
   * per-task events until it catches up. Default 4 MiB.
   */
  clientHighWaterBytes?: number;
  /** Stealing check interval (ms; a worker that runs out of calls is also checked at once). Default 100. */
  stealMs?: number;
  log?: (line: string) => void;
}

interface ClientState {
  readonly id: string;
  readonly name: string;
  readonly conn: Connection;
  readonly graphs: Map<number, GraphRun>;
  readonly sessions: Map<number, FleetSession>;
}

interface GraphRun {
  readonly client: ClientState;
  readonly begin: GraphBeginMsg;
  readonly nodes: NodeSpec[];
  readonly decoder: GraphDecoder;
  received: number;
  session: FleetSession | null;
  readonly abort: AbortController;
  result: FlowRunResult | null;
  /** Events the client could not take (it gets summaries instead). */
  dropped: number;
}

interface Pending<T> {
  readonly worker: WorkerState;
  resolve(v: T): void;
  reject(e: Error): void;
}

export interface ClusterStatus {
  address: string;
  uptimeMs: number;
  workers: {
    id: string;
    name: string;
    pid: number;
    address: string;
    threads: number;
    credits: number;
    used: number;
    executed: number;
    held: number;
    retiring: boolean;
    lastSeenMsAgo: number;
    resources: Readonly<Record<string, number>>;
    metrics: Record<string, number>;
  }[];
  clients: number;
  /** Graph runs now held (running, or finished and not yet released). */
  runs: number;
  /** Since start: graph runs begun, and call sessions opened (small flat graphs run as calls). */
  started: { graphRuns: number; callSessions: number };
  slots: number;
  /** Calls waiting for a free credit. */
  queued: number;
  running: number;
  tasks: Partial<Record<TaskStateName, number>>;
  throughput: { assigned: number; completed: number; perSecond: number };
  fleet: Fleet['stats'];
  memory: { rss: number; heapUsed: number };
  connectionsClosed: Record<string, number>;
}

/** Graphs of at least this many nodes place their input-less calls in blocks (see `FleetSession.groupRoots`). */
const GROUP_ROOTS_MIN_NODES = 256;

export async function startScheduler(o: SchedulerOptions = {}): Promise<SchedulerServer> {
  const s = new SchedulerServer(o);
  await s.listen();
  return s;
}

export class SchedulerServer {
  address = '';
  httpUrl = '';
  port = 0;
  readonly fleet: Fleet;
  /** Code bundles clients sent, for workers to fetch. */
  readonly bundles = new BundleStore();
  private readonly http: Server;
  private readonly wss: WebSocketServer;
  private readonly clients = new Map<string, ClientState>();
  private readonly runOwner = new Map<number, ClientState>();
  private readonly pending = new Map<number, Pending<DataMsg>>();
  private readonly pendingAcquire = new Map<number, Pending<{ keys: readonly string[]; missing: readonly string[] }>>();
  private readonly steals = new Map<number, { victim: WorkerState; thief: WorkerState; run: number }>();
  private nextReq = 1;
  private nextWorker = 1;
  private nextClient = 1;
  private readonly log: (line: string) => void;
  private readonly baseHeartbeat: number;
  private readonly missed: number;
  private readonly maxFrameBytes: number;
  private readonly clientHighWater: number;
  private readonly started = now();
  private timers: NodeJS.Timeout[] = [];
  private closing = false;
  private stealSoon = false;
  private completedAt: { t: number; n: number }[] = [];

  constructor(private readonly o: SchedulerOptions) {
    this.log = o.log ?? ((line) => process.stderr.write(`[weft scheduler] ${line}\n`));
    this.baseHeartbeat = o.heartbeatMs ?? 500;
    this.missed = o.missedHeartbeats ?? 60;
    this.maxFrameBytes = o.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    this.clientHighWater = o.clientHighWaterBytes ?? 4 * 1024 * 1024;
    this.fleet = new Fleet({
      log: this.log,
      fetch: (w, keys) => this.fetchFrom(w, keys),
      acquire: (w, from) => this.acquireOn(w, from),
      onIdle: () => {
        // After this tick's outcomes have been dispatched on: only then is the worker really idle.
        if (this.stealSoon) return;
        this.stealSoon = true;
        setImmediate(() => {
          this.stealSoon = false;
          this.steal();
        });
      },
    });
    const handler = (req: IncomingMessage, res: ServerResponse): void => this.httpRequest(req, res);
    this.http =
      o.tls !== undefined
        ? createHttpsServer(
            {
              cert: o.tls.cert,
              key: o.tls.key,
              ...(o.tls.ca !== undefined ? { ca: o.tls.ca } : {}),
              requestCert: o.tls.requireClientCert === true,
              rejectUnauthorized: o.tls.requireClientCert === true,
            },
            handler,
          )
        : createHttpServer(handler);
    this.wss = new WebSocketServer({ server: this.http, maxPayload: this.maxFrameBytes });
    this.wss.on('connection', (ws: WebSocket, req: IncomingMessage) => this.accept(ws, req));
    this.wss.on('error', (err: Error) => this.log(`websocket server error: ${err.message}`));
    this.http.on('clientError', (err: Error, socket) => {
      this.log(`http client error: ${err.message}`);
      socket.destroy();
    });
  }

  listen(): Promise<void> {
    const host = this.o.host ?? '127.0.0.1';
    return new Promise((resolve, reject) => {
      this.http.once('error', reject);
      this.http.listen(this.o.port ?? 8786, host, () => {
        this.http.off('error', reject);
        const a = this.http.address() as AddressInfo;
        this.port = a.port;
        const h = host.includes(':') ? `[${host}]` : host;
        const tls = this.o.tls !== undefined;
        this.address = `${tls ? 'wss' : 'ws'}://${h}:${a.port}`;
        this.httpUrl = `${tls ? 'https' : 'http'}://${h}:${a.port}`;
        const tick = Math.max(20, Math.floor(this.baseHeartbeat / 2));
        this.timers.push(setInterval(() => this.checkHeartbeats(), tick));
        this.timers.push(setInterval(() => this.steal(), this.o.stealMs ?? 100));
        for (const t of this.timers) t.unref();
        resolve();
      });
    });
  }

  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    for (const t of this.timers) clearInterval(t);
    for (const g of this.allGraphs()) g.abort.abort();
    for (const ws of this.wss.clients) ws.terminate();
    await new Promise<void>((resolve) => this.wss.close(() => resolve()));
    this.http.closeAllConnections?.();
    await new Promise<void>((resolve) => this.http.close(() => resolve()));
  }

  private *allGraphs(): Generator<GraphRun> {
    for (const c of this.clients.values()) yield* c.graphs.values();
  }

  // ---- connections -------------------------------------------------------------

  private accept(ws: WebSocket, req: IncomingMessage): void {
    const remote = `${req.socket.remoteAddress ?? '?'}:${req.socket.remotePort ?? '?'}`;
    const conn = new Connection(ws, { maxFrameBytes: this.maxFrameBytes, label: `connection from ${remote}` });
    conn.onClose = (reason, code) => {
      if (!this.closing && code !== 'CLOSED') this.log(`closed ${remote} before its handshake: ${reason}`);
    };
    acceptHandshake(conn, {
      roles: ['client', 'worker'],
      ...(this.o.token !== undefined ? { token: this.o.token } : {}),
      admit: (hello) => this.admit(hello),
    }).then(
      ({ hello, id }) => {
        if (conn.closed) return;
        if (hello.role === 'worker') this.joinWorker(conn, hello, id);
        else this.joinClient(conn, hello, id);
      },
      (err: unknown) => this.log(`handshake with ${remote} failed: ${(err as Error).message}`),
    );
  }

  private admit(hello: HelloMsg): { id: string; heartbeatMs: number } | { refuse: string; reason: string } {
    if (this.closing) return { refuse: 'SHUTTING_DOWN', reason: 'the scheduler is shutting down' };
    if (hello.role === 'worker') {
      for (const w of this.fleet.workers.values()) {
        if (w.name === hello.name) return { refuse: 'DUPLICATE_NAME', reason: `a worker named "${hello.name}" is already connected` };
      }
      if (!(hello.threads >= 1)) return { refuse: 'BAD_HELLO', reason: `a worker must offer at least 1 thread, got ${hello.threads}` };
      return { id: `w${this.nextWorker++}`, heartbeatMs: heartbeatInterval(this.fleet.workers.size + 1, this.baseHeartbeat) };
    }
    return { id: `c${this.nextClient++}`, heartbeatMs: heartbeatInterval(this.fleet.workers.size + 1, this.baseHeartbeat) };
  }

  private joinWorker(conn: Connection, hello: HelloMsg, id: string): void {
    conn.receives = 'w2s';
    conn.label = `worker ${hello.name}`;
    const w: WorkerState = {
      id,
      name: hello.name,
      conn,
      threads: hello.threads,
      resources: hello.resources,
      memoryLimit: hello.memoryLimit,
      address: hello.address,
      pid: hello.pid,
      heartbeatMs: heartbeatInterval(this.fleet.workers.size + 1, this.baseHeartbeat),
      joinedMs: now(),
      credits: 0,
      used: 0,
      aheadUsed: 0,
      resourceUse: new Map(),
      retiring: false,
      held: new Map(),
      knownPeers: new Set(),
      pending: new Map(),
      releases: [],
      metrics: {},
      executed: 0,
    };
    this.fleet.addWorker(w);
    this.log(`worker ${w.name} joined as ${id} (${w.threads} threads, pid ${w.pid}, peer ${w.address || 'none'})`);
    const handlers: Handlers<'w2s'> = {
      hello: () => this.unexpected('hello'),
      proof: () => this.unexpected('proof'),
      outcomes: (m) => this.fleet.outcomes(w, m.run, outcomesOf(m)),
      credits: (m) => this.fleet.setCredits(w, Math.max(0, m.credits)),
      whoHas: (m) => {
        const holders: string[][] = [];
        const addresses: Record<string, string> = {};
        for (const k of m.keys) {
          const h = this.heldByKey(k);
          const ids: string[] = [];
          if (h !== undefined) {
            for (const x of h.holders) {
              ids.push(x.id);
              addresses[x.id] = x.address;
            }
          }
          holders.push(ids);
        }
        conn.send({ op: 'whoHasReply', id: m.id, holders, addresses });
      },
      data: (m) => this.settle(this.pending, m.id, m),
      getBundle: (m) => {
        const code = this.bundles.fetch(m.hash);
        if (code !== undefined) conn.send({ op: 'bundle', id: m.id, hash: m.hash, code });
        else conn.send({ op: 'bundle', id: m.id, hash: m.hash, error: wireError(this.bundles.missing(m.hash)) });
      },
      getData: (m) => void this.relay(w, m.id, m.keys),
      acquired: (m) => this.settle(this.pendingAcquire, m.id, { keys: m.keys, missing: m.missing }),
      stealReply: (m) => {
        const st = this.steals.get(m.id);
        this.steals.delete(m.id);
        this.fleet.stolen(w, m.run, m.stolen, st?.thief);
      },
      heartbeat: (m) => {
        if (m.metrics !== undefined) w.metrics = { ...m.metrics };
      },
      retire: (m) => void this.retire(w, m.reason),
      log: (m) => this.forwardLogs(m.records, w.name),
      error: (m) => this.log(`worker ${w.name} reports: ${m.error.name}: ${m.error.message}`),
    };
    conn.onMessages = (msgs: Message[]) => dispatch(handlers, msgs);
    conn.onClose = (reason, code) => {
      for (const [id2, p] of this.pending) {
        if (p.worker === w) {
          this.pending.delete(id2);
          p.reject(new Error(`worker ${w.name} is gone: ${reason}`));
        }
      }
      for (const [id2, p] of this.pendingAcquire) {
        if (p.worker === w) {
          this.pendingAcquire.delete(id2);
          p.reject(new Error(`worker ${w.name} is gone: ${reason}`));
        }
      }
      if (!this.closing) this.log(`worker ${w.name} disconnected (${code}): ${reason}`);
      this.fleet.removeWorker(w, reason);
    };
    this.fleet.wake();
  }

  private unexpected(op: string): never {
    throw new ProtocolError('BAD_MESSAGE', `"${op}" after the handshake`, { op });
  }

  private joinClient(conn: Connection, hello: HelloMsg, id: string): void {
    conn.receives = 'c2s';
    conn.label = `client ${hello.name}`;
    const c: ClientState = { id, name: hello.name, conn, graphs: new Map(), sessions: new Map() };
    this.clients.set(id, c);
    const handlers: Handlers<'c2s'> = {
      hello: () => this.unexpected('hello'),
      proof: () => this.unexpected('proof'),
      graphBegin: (m) => {
        if (c.graphs.has(m.graph)) throw new ProtocolError('BAD_MESSAGE', `graph ${m.graph} was already begun on this connection`, { field: 'graph' });
        if (m.nodeCount < 0 || m.nodeCount > 50_000_000) throw new ProtocolError('BAD_MESSAGE', `graph ${m.graph}: nodeCount ${m.nodeCount} out of range`, { field: 'nodeCount' });
        c.graphs.set(m.graph, { client: c, begin: m, nodes: [], decoder: new GraphDecoder(), received: 0, session: null, abort: new AbortController(), result: null, dropped: 0 });
      },
      putBundle: (m) => {
        const why = this.bundles.put(m.hash, m.code);
        if (why !== null) this.log(`client ${c.name}: code bundle ${m.hash} refused: ${why}`);
      },
      graphNodes: (m) => {
        const g = this.graphOf(c, m.graph);
        if (g.session !== null) throw new ProtocolError('BAD_MESSAGE', `graph ${m.graph}: nodes after graphEnd`, { field: 'graph' });
        if (m.offset !== g.received) throw new ProtocolError('BAD_MESSAGE', `graph ${m.graph}: chunk at offset ${m.offset}, expected ${g.received}`, { field: 'offset' });
        const nodes = g.decoder.nodes(m);
        for (let i = 0; i < nodes.length; i++) g.nodes.push(nodes[i]!); // indexed: a for-of allocates per node until optimized
        g.received += nodes.length;
        if (g.received > g.begin.nodeCount) throw new ProtocolError('BAD_MESSAGE', `graph ${m.graph}: more nodes than announced (${g.begin.nodeCount})`, { field: 'nodes' });
      },
      graphEnd: (m) => this.startGraph(this.graphOf(c, m.graph)),
      cancelRun: (m) => c.graphs.get(m.graph)?.abort.abort(),
      releaseRun: (m) => {
        const g = c.graphs.get(m.graph);
        if (g === undefined) return;
        c.graphs.delete(m.graph);
        if (g.result === null) g.abort.abort(); // still running: stop it (a finished run has nothing to abort)
        if (g.session !== null) {
          this.runOwner.delete(g.session.run);
          g.session.release();
        }
      },
      getResults: (m) => void this.getResults(c, m.id, m.graph, m.tasks),
      openSession: (m) => {
        if (c.sessions.has(m.session)) throw new ProtocolError('BAD_MESSAGE', `session ${m.session} is already open`, { field: 'session' });
        if (m.bundle !== '' && !this.bundles.has(m.bundle)) {
          c.conn.send({ op: 'sessionReady', session: m.session, slots: this.fleet.slots, error: wireError(this.bundles.missing(m.bundle)) });
          return;
        }
        const s = this.fleet.openSession('calls', m.modules, m.bundle);
        this.callSessionsOpened++;
        c.sessions.set(m.session, s);
        this.runOwner.set(s.run, c);
        void s.start({
          flowName: m.flowName,
          modules: m.modules,
          taskKeys: m.taskKeys,
          parameters: m.parameters,
          onOutcomes: (outs) => this.sendCallOutcomes(c, m.session, outs),
        });
        // Also to a client that does not wait for it (its calls came with the open): the
        // slot count, and the frame wakes it while the calls run (it answers faster).
        c.conn.send({ op: 'sessionReady', session: m.session, slots: this.fleet.slots });
      },
      submit: (m) => {
        const s = c.sessions.get(m.session);
        if (s === undefined) throw new ProtocolError('BAD_MESSAGE', `no open session ${m.session}`, { field: 'session' });
        s.submit(m.calls.slice());
      },
      cancelCalls: (m) => c.sessions.get(m.session)?.cancel(m.ids),
      closeSession: (m) => {
        const s = c.sessions.get(m.session);
        if (s === undefined) return;
        c.sessions.delete(m.session);
        this.runOwner.delete(s.run);
        s.release();
      },
      heartbeat: () => undefined,
      error: (m) => this.log(`client ${c.name} reports: ${m.error.name}: ${m.error.message}`),
    };
    conn.onMessages = (msgs: Message[]) => {
      dispatch(handlers, msgs);
      // The calls this frame submitted go to their workers now, before anything for the client.
      this.fleet.flush();
    };
    conn.onClose = (reason, code) => {
      this.clients.delete(id);
      if (!this.closing && code !== 'CLOSED') this.log(`client ${c.name} disconnected (${code}): ${reason}`);
      for (const g of c.graphs.values()) {
        g.abort.abort();
        if (g.session !== null) {
          this.runOwner.delete(g.session.run);
          g.session.release();
        }
      }
      c.graphs.clear();
      for (const s of c.sessions.values()) {
        this.runOwner.delete(s.run);
        s.release();
      }
      c.sessions.clear();
    };
  }

  private graphOf(c: ClientState, graph: number): GraphRun {
    const g = c.graphs.get(graph);
    if (g === undefined) throw new ProtocolError('BAD_MESSAGE', `graph ${graph} was not begun`, { field: 'graph' });
    return g;
  }

  // ---- graph runs --------------------------------------------------------------

  private startGraph(g: GraphRun): void {
    const b = g.begin;
    const c = g.client;
    if (g.session !== null) throw new ProtocolError('BAD_MESSAGE', `graph ${b.graph}: graphEnd twice`, { field: 'graph' });
    if (g.received !== b.nodeCount) {
      throw new ProtocolError('BAD_MESSAGE', `graph ${b.graph}: graphEnd after ${g.received} of ${b.nodeCount} nodes`, { field: 'nodeCount' });
    }
    if (b.bundle !== '' && !this.bundles.has(b.bundle)) {
      c.graphs.delete(b.graph);
      c.conn.send({ op: 'runState', graph: b.graph, state: 'rejected', error: wireError(this.bundles.missing(b.bundle)) });
      return;
    }
    const spec: GraphSpec = { name: b.name, nodes: g.nodes, referenceTasks: b.referenceTasks.slice(), modules: b.modules.slice() };
    const session = this.fleet.openSession('graph', b.modules, b.bundle);
    this.graphRunsStarted++;
    g.session = session;
    session.needsValue = valueNeeds(spec);
    session.groupRoots = spec.nodes.length >= GROUP_ROOTS_MIN_NODES;
    session.pumpRunner = () => session.session?.resume?.();
    this.runOwner.set(session.run, c);
    // (No 'accepted' message: the client learns the outcome from 'finished' or 'rejected';
    // one frame less per run.)
    const opts = b.options;
    const onTaskState = opts.events ? (e: TaskStateEvent): void => this.taskEvent(g, e) : undefined;
    const onProgress = opts.summaryMs > 0 ? (p: RunProgress): void => this.summary(g, p) : undefined;
    let started = false;
    runFlow(spec, {
      executor: session,
      parameters: { ...b.parameters },
      remote: true,
      refs: remoteRefs,
      tagLimits: { ...opts.tagLimits },
      validate: opts.validate,
      signal: g.abort.signal,
      keepResults: true,
      ...(opts.resultDir !== '' ? { resultDir: opts.resultDir } : {}),
      // A run id that is not a string is ignored (runFlow refuses a malformed one, failing this run only).
      ...(typeof opts.runId === 'string' ? { runId: opts.runId } : {}),
      ...(onTaskState !== undefined ? { onTaskState } : {}),
      ...(onProgress !== undefined ? { onProgress, progressIntervalMs: opts.summaryMs } : {}),
    }).then(
      (result) => {
        started = true;
        g.result = result;
        this.flushEvents(g);
        if (c.conn.closed || !c.graphs.has(b.graph)) {
          session.release();
          return;
        }
        const records = toRecords(result);
        if (!opts.results) {
          c.conn.send({ op: 'runState', graph: b.graph, state: 'finished', flowState: result.state, records });
          return;
        }
        void this.valuesForFinish(result).then((got) => {
          if (c.conn.closed) return;
          c.conn.send({
            op: 'runState',
            graph: b.graph,
            state: 'finished',
            flowState: result.state,
            records,
            ...(got !== null ? { values: got.values, ...(got.lost.length > 0 ? { lost: got.lost } : {}) } : {}),
          });
        });
      },
      (err: unknown) => {
        if (!started) session.release();
        this.runOwner.delete(session.run);
        c.graphs.delete(b.graph);
        if (!c.conn.closed) c.conn.send({ op: 'runState', graph: b.graph, state: 'rejected', error: wireError(err) });
      },
    );
  }

  private graphRunsStarted = 0;
  private callSessionsOpened = 0;
  private readonly eventBuf = new Map<GraphRun, TaskEvent[]>();

  private taskEvent(g: GraphRun, e: TaskStateEvent): void {
    const conn = g.client.conn;
    if (conn.closed) return;
    if (conn.isPaused || conn.batcher.queuedBytes + conn.ws.bufferedAmount > this.clientHighWater) {
      g.dropped++;
      return;
    }
    let buf = this.eventBuf.get(g);
    if (buf === undefined) {
      this.eventBuf.set(g, (buf = []));
      setImmediate(() => this.flushEvents(g));
    }
    buf.push({ task: e.id ?? -1, key: e.key, mapIndex: e.mapIndex, state: e.to, at: e.at, attempt: e.attempt ?? 0 });
  }

  private flushEvents(g: GraphRun): void {
    const buf = this.eventBuf.get(g);
    if (buf === undefined) return;
    this.eventBuf.delete(g);
    if (buf.length > 0 && !g.client.conn.closed) {
      if (!g.client.conn.send({ op: 'taskEvents', graph: g.begin.graph, events: buf })) g.dropped += buf.length;
    }
  }

  private summary(g: GraphRun, p: RunProgress): void {
    const conn = g.client.conn;
    if (conn.closed) return;
    const ok = p.done - p.failed - p.skipped;
    conn.send({
      op: 'eventSummary',
      graph: g.begin.graph,
      counts: { Pending: Math.max(0, p.total - p.done - p.running), Running: p.running, Success: Math.max(0, ok), Failed: p.failed, Skipped: p.skipped },
      dropped: g.dropped,
    });
  }

  private async getResults(c: ClientState, id: number, graph: number, tasks: readonly number[]): Promise<void> {
    const g = c.graphs.get(graph);
    if (g === undefined || g.result === null) {
      c.conn.send({ op: 'results', id, values: [], error: { name: 'WeftError', message: `no finished run for graph ${graph}`, code: 'NO_SUCH_RUN' } });
      return;
    }
    let got: { values: unknown[]; lost: string[] };
    try {
      got = await this.collect(g.result, tasks);
    } catch (err) {
      c.conn.send({ op: 'results', id, values: [], error: wireError(err) });
      return;
    }
    const { values, lost } = got;
    if (lost.length > 0) {
      c.conn.send({
        op: 'results',
        id,
        values,
        error: { name: 'WorkerLostError', message: `results lost with their workers: ${lost.slice(0, 5).join(', ')}${lost.length > 5 ? ', ...' : ''}`, code: 'RESULTS_LOST' },
      });
      return;
    }
    c.conn.send({ op: 'results', id, values });
  }

  /** The values of these task runs: in hand, or fetched from the workers that hold them. */
  private async collect(r: FlowRunResult, tasks: readonly number[]): Promise<{ values: unknown[]; lost: string[] }> {
    const values = new Array<unknown>(tasks.length);
    const remote = new Map<WorkerState, { i: number; ref: RemoteRef }[]>();
    const lost: string[] = [];
    for (let i = 0; i < tasks.length; i++) {
      const t = tasks[i]!;
      const v = Number.isInteger(t) && t >= 0 ? r.taskResult?.(t) : undefined;
      if (v instanceof RemoteRef) {
        const holder = v.held.holders.values().next().value;
        if (holder === undefined) {
          lost.push(v.held.key);
          continue;
        }
        let l = remote.get(holder);
        if (l === undefined) remote.set(holder, (l = []));
        l.push({ i, ref: v });
      } else values[i] = v;
    }
    await Promise.all(
      [...remote].map(async ([w, items]) => {
        const keys = [...new Set(items.map((x) => x.ref.held.key))];
        const d = await this.fetchFrom(w, keys);
        const byKey = new Map<string, unknown>();
        d.keys.forEach((k, j) => byKey.set(k, unpackValue(d.values[j]!)));
        for (const k of d.missing) lost.push(k);
        for (const { i, ref } of items) {
          let v = byKey.get(ref.held.key);
          for (const p of ref.path) v = (v as unknown[] | undefined)?.[p];
          values[i] = v;
        }
      }),
    );
    return { values, lost };
  }

  /**
   * Every task run's value, to send with 'finished' (saves the client a round trip), when
   * the run is small enough to go in one message; null otherwise (the client asks in chunks).
   */
  private async valuesForFinish(r: FlowRunResult): Promise<{ values: unknown[]; lost: string[] } | null> {
    const n = r.tasks.length;
    if (n > INLINE_RESULTS_MAX_TASKS) return null;
    let held = 0;
    for (let id = 0; id < n; id++) {
      const v = r.taskResult?.(id);
      if (v instanceof RemoteRef) held += v.held.nbytes;
      if (held > INLINE_RESULTS_MAX_BYTES) return null;
    }
    try {
      return await this.collect(r, Array.from({ length: n }, (_, i) => i));
    } catch {
      return null;
    }
  }

  private sendCallOutcomes(c: ClientState, session: number, outs: Outcome[]): void {
    if (c.conn.closed) return;
    const wire: WireOutcome[] = new Array<WireOutcome>(outs.length);
    const workers: string[] = new Array<string>(outs.length);
    for (let i = 0; i < outs.length; i++) {
      const o = outs[i]!;
      const w: { -readonly [K in keyof WireOutcome]: WireOutcome[K] } = { id: o.id, runId: o.runId, status: o.status, startMs: o.startMs, endMs: o.endMs, nbytes: 0, len: -1 };
      if (o.status === 'ok') w.value = o.value;
      if (o.error !== undefined) w.error = o.error instanceof Error ? wireError(o.error) : o.error;
      wire[i] = w;
      workers[i] = o.worker ?? '';
    }
    c.conn.send({ op: 'callOutcomes', session, outcomes: wire, workers });
  }

  private forwardLogs(records: readonly LogRecord[], worker: string): void {
    const byClient = new Map<ClientState, LogRecord[]>();
    for (const r of records) {
      const c = r.run !== undefined ? this.runOwner.get(r.run) : undefined;
      if (c === undefined) {
        this.log(`[${worker}] ${r.msg}`);
        continue;
      }
      let l = byClient.get(c);
      if (l === undefined) byClient.set(c, (l = []));
      l.push(r.worker === undefined ? { ...r, worker } : r);
    }
    for (const [c, l] of byClient) c.conn.send({ op: 'log', records: l });
  }

  // ---- requests to workers -----------------------------------------------------

  private settle<T>(map: Map<number, Pending<T>>, id: number, v: T): void {
    const p = map.get(id);
    if (p === undefined) return;
    map.delete(id);
    p.resolve(v);
  }

  private fetchFrom(w: WorkerState, keys: readonly string[]): Promise<DataMsg> {
    return new Promise<DataMsg>((resolve, reject) => {
      const id = this.nextReq++;
      this.pending.set(id, { worker: w, resolve, reject });
      w.conn.send({ op: 'getData', id, keys });
    });
  }

  private acquireOn(w: WorkerState, from: Record<string, string>): Promise<{ keys: readonly string[]; missing: readonly string[] }> {
    return new Promise((resolve, reject) => {
      const id = this.nextReq++;
      this.pendingAcquire.set(id, { worker: w, resolve, reject });
      w.conn.send({ op: 'acquire', id, from });
    });
  }

  private heldByKey(key: string): HeldResult | undefined {
    const colon = key.indexOf(':');
    const run = Number(key.slice(0, colon));
    return this.fleet.sessions.get(run)?.heldFor(key);
  }

  /** A worker could not reach a peer: fetch through the scheduler (counted as relayed bytes). */
  private async relay(w: WorkerState, id: number, keys: readonly string[]): Promise<void> {
    const byHolder = new Map<WorkerState, string[]>();
    const missing: string[] = [];
    for (const k of keys) {
      const h = this.heldByKey(k);
      let holder: WorkerState | undefined;
      if (h !== undefined) for (const x of h.holders) if (x !== w) holder = x;
      if (holder === undefined) {
        missing.push(k);
        continue;
      }
      let l = byHolder.get(holder);
      if (l === undefined) byHolder.set(holder, (l = []));
      l.push(k);
    }
    const outKeys: string[] = [];
    const values: Uint8Array[] = [];
    await Promise.all(
      [...byHolder].map(async ([holder, ks]) => {
        try {
          const d = await this.fetchFrom(holder, ks);
          d.keys.forEach((k, j) => {
            outKeys.push(k);
            const v = d.values[j]!;
            values.push(v);
            this.fleet.stats.relayedBytes += v.byteLength;
            this.fleet.stats.relayedKeys++;
          });
          missing.push(...d.missing);
        } catch {
          missing.push(...ks);
        }
      }),
    );
    if (!w.conn.closed) w.conn.send({ op: 'data', id, keys: outKeys, values, missing });
  }

  /** Graceful retirement: move the worker's unique results, then let it go. */
  private async retire(w: WorkerState, reason: string): Promise<void> {
    if (w.retiring) return;
    this.log(`worker ${w.name} retiring: ${reason}`);
    this.fleet.markRetiring(w);
    // Wait (bounded) for its calls to finish.
    const deadline = now() + 10_000;
    while (w.used > 0 && now() < deadline && !w.conn.closed) await new Promise((r) => setTimeout(r, 10));
    const moved = await this.fleet.evacuate(w);
    if (moved > 0) this.log(`moved ${moved} results off ${w.name}`);
    if (!w.conn.closed) {
      w.conn.send({ op: 'retire', reason: 'retirement accepted' });
      w.conn.flush();
    }
  }

  // ---- liveness and stealing -------------------------------------------------------

  private checkHeartbeats(): void {
    const t = now();
    for (const w of [...this.fleet.workers.values()]) {
      const limit = Math.max(w.heartbeatMs, heartbeatInterval(this.fleet.workers.size, this.baseHeartbeat)) * this.missed;
      if (t - w.conn.lastSeen > limit) {
        this.log(`worker ${w.name} missed heartbeats for ${Math.round(t - w.conn.lastSeen)} ms (limit ${limit} ms): declaring it lost`);
        w.conn.terminate(`worker ${w.name}: missed heartbeats`, 'HEARTBEAT_MISSED');
      }
    }
  }

  private steal(): void {
    for (const c of this.fleet.stealCandidates()) {
      const id = this.nextReq++;
      this.steals.set(id, { victim: c.victim, thief: c.thief, run: c.run });
      c.victim.conn.send({ op: 'steal', id, run: c.run, tasks: c.ids });
    }
  }

  // ---- observability -------------------------------------------------------------

  status(): ClusterStatus {
    const t = now();
    const fleet = this.fleet;
    let queued = 0;
    let running = 0;
    const tasks: Partial<Record<TaskStateName, number>> = {};
    for (const s of fleet.sessions.values()) {
      queued += s.parked.length;
      for (const f of s.inflight.values()) if (f.worker !== null) running++;
    }
    for (const g of this.allGraphs()) {
      if (g.result !== null) for (const r of g.result.tasks) tasks[r.state] = (tasks[r.state] ?? 0) + 1;
    }
    // Demand the runners could not place (they hold it in their ready queues): hungry sessions.
    queued += fleet.freeCredits === 0 && running > 0 ? 1 : 0;
    this.completedAt.push({ t, n: fleet.stats.completed });
    while (this.completedAt.length > 2 && t - this.completedAt[0]!.t > 5000) this.completedAt.shift();
    const first = this.completedAt[0]!;
    const perSecond = t > first.t ? ((fleet.stats.completed - first.n) * 1000) / (t - first.t) : 0;
    const mem = process.memoryUsage();
    return {
      address: this.address,
      uptimeMs: t - this.started,
      workers: [...fleet.workers.values()].map((w) => ({
        id: w.id,
        name: w.name,
        pid: w.pid,
        address: w.address,
        threads: w.threads,
        credits: w.credits,
        used: w.used,
        executed: w.executed,
        held: w.held.size,
        retiring: w.retiring,
        lastSeenMsAgo: Math.round(t - w.conn.lastSeen),
        resources: w.resources,
        metrics: w.metrics,
      })),
      clients: this.clients.size,
      runs: [...this.allGraphs()].length,
      started: { graphRuns: this.graphRunsStarted, callSessions: this.callSessionsOpened },
      slots: fleet.slots,
      queued,
      running,
      tasks,
      throughput: { assigned: fleet.stats.assigned, completed: fleet.stats.completed, perSecond },
      fleet: { ...fleet.stats },
      memory: { rss: mem.rss, heapUsed: mem.heapUsed },
      connectionsClosed: Object.fromEntries(closeCounts),
    };
  }

  metrics(): string {
    const s = this.status();
    const lines: string[] = [];
    const metric = (name: string, help: string, type: 'gauge' | 'counter', values: [Record<string, string>, number][]): void => {
      lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
      for (const [labels, v] of values) {
        const l = Object.entries(labels)
          .map(([k, x]) => `${k}="${x.replace(/["\\\n]/g, '_')}"`)
          .join(',');
        lines.push(`${name}${l ? `{${l}}` : ''} ${v}`);
      }
    };
    metric('weft_workers', 'Connected workers.', 'gauge', [[{}, s.workers.length]]);
    metric('weft_clients', 'Connected clients.', 'gauge', [[{}, s.clients]]);
    metric('weft_slots', 'Task slots (threads) across workers.', 'gauge', [[{}, s.slots]]);
    metric('weft_graph_runs_total', 'Graph runs begun.', 'counter', [[{}, s.started.graphRuns]]);
    metric('weft_call_sessions_total', 'Call sessions opened.', 'counter', [[{}, s.started.callSessions]]);
    metric('weft_tasks_running', 'Calls sent to workers and not yet ended.', 'gauge', [[{}, s.running]]);
    metric('weft_tasks_queued', 'Calls waiting for a free worker credit.', 'gauge', [[{}, s.queued]]);
    metric('weft_tasks_assigned_total', 'Calls sent to workers.', 'counter', [[{}, s.fleet.assigned]]);
    metric('weft_tasks_completed_total', 'Outcomes received from workers.', 'counter', [[{}, s.fleet.completed]]);
    metric('weft_tasks_lost_total', 'Calls lost with their workers.', 'counter', [[{}, s.fleet.lost]]);
    metric('weft_tasks_recomputed_total', 'Results recomputed from lineage.', 'counter', [[{}, s.fleet.recomputed]]);
    metric('weft_tasks_stolen_total', 'Calls moved by work stealing.', 'counter', [[{}, s.fleet.stolen]]);
    metric('weft_relayed_bytes_total', 'Result bytes relayed through the scheduler (peer fallback).', 'counter', [[{}, s.fleet.relayedBytes]]);
    metric(
      'weft_connections_closed_total',
      'Connections closed, by reason code.',
      'counter',
      Object.entries(s.connectionsClosed).map(([code, n]) => [{ reason: code }, n]),
    );
    metric('weft_worker_used', 'Calls in flight per worker.', 'gauge', s.workers.map((w) => [{ worker: w.name }, w.used]));
    metric('weft_worker_held_results', 'Results held per worker.', 'gauge', s.workers.map((w) => [{ worker: w.name }, w.held]));
    metric('weft_scheduler_rss_bytes', 'Scheduler resident memory.', 'gauge', [[{}, s.memory.rss]]);
    metric('weft_scheduler_heap_used_bytes', 'Scheduler V8 heap used.', 'gauge', [[{}, s.memory.heapUsed]]);
    return `${lines.join('\n')}\n`;
  }

  private httpRequest(req: IncomingMessage, res: ServerResponse): void {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method !== 'GET') {
      res.writeHead(405, { 'content-type': 'text/plain' }).end('only GET\n');
      return;
    }
    if (path === '/status') {
      res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(this.status()));
      return;
    }
    if (path === '/metrics') {
      res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' }).end(this.metrics());
      return;
    }
    if (path === '/' || path === '/health') {
      res.writeHead(200, { 'content-type': 'text/plain' }).end(`weft scheduler ${this.address}: ${this.fleet.workers.size} workers\n`);
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' }).end(`no route ${path}; try /status or /metrics\n`);
  }
}

/**
 * Nodes whose results the scheduler itself must see (not just pass on): inputs of
 * inline nodes (case/merge comparisons run in the scheduler's runner) and tasks whose
 * results are checkpointed, targeted or cached there.
 */
function valueNeeds(spec: GraphSpec): (key: string) => boolean {
  const keys = new Set<string>();
  // Indexed, and one options check per distinct options object: this pass runs once per graph, unoptimized.
  const nodes = spec.nodes;
  let lastOptions: NodeSpec['options'] | null = null;
  let persists = false;
  for (let i = 0; i < nodes.length; i++) {
    const n = nodes[i]!;
    const o = n.options;
    if (o !== lastOptions) {
      lastOptions = o;
      persists = o.checkpoint || o.cacheForMs > 0 || o.result !== null;
    }
    if (n.kind === 'task' && persists) keys.add(n.key);
    if (n.kind === 'inline') {
      for (const b of n.args) if (b.kind === 'ref') keys.add(spec.nodes[b.node]!.key);
    }
  }
  if (keys.size === 0) return () => false;
  return (key) => keys.has(key);
}

/** A finished run's records in columns (of a result from `runFlow`, which keeps its task runs in columns). */
export function toRecords(r: FlowRunResult): RunRecords {
  const cols = r.taskColumns?.();
  if (cols === undefined) throw new Error(`run ${r.runId}: its result has no task columns (not a result of runFlow)`);
  return recordsOf(r, cols);
}

/** `toRecords` from the runner's columns: one record object only for a task run that did not simply succeed. */
function recordsOf(r: FlowRunResult, cols: TaskColumns): RunRecords {
  const n = cols.size;
  const node = new Array<number>(n);
  const mapIndex = new Array<number>(n);
  const state_ = new Array<number>(n);
  const attempts = new Array<number>(n);
  const start = new Array<number>(n);
  const end = new Array<number>(n);
  const worker = new Array<number>(n);
  const workerNames: string[] = [];
  const workerIdx = new Map<string, number>();
  const errors: [number, RunRecords['errors'][number][1]][] = [];
  const stories: [number, readonly string[]][] = [];
  const stateIdx = cols.stateNames.map((name) => STATE_ORDER.indexOf(name));
  let lastName: string | undefined;
  let lastIdx = -1;
  for (let i = 0; i < n; i++) {
    node[i] = cols.node[i]!;
    mapIndex[i] = cols.mapIndex[i]!;
    state_[i] = Math.max(0, stateIdx[cols.state[i]!] ?? 0);
    attempts[i] = cols.attempts[i]!;
    start[i] = cols.startMs[i] ?? 0;
    end[i] = cols.endMs[i] ?? 0;
    const w = cols.worker[i];
    if (w === undefined) worker[i] = -1;
    else if (w === lastName) worker[i] = lastIdx; // runs of one worker's tasks: no Map lookup
    else {
      let k = workerIdx.get(w);
      if (k === undefined) {
        k = workerNames.length;
        workerNames.push(w);
        workerIdx.set(w, k);
      }
      worker[i] = k;
      lastName = w;
      lastIdx = k;
    }
    if (cols.plain(i)) continue;
    const t = cols.record(i);
    if (t.error !== undefined) errors.push([i, t.error]);
    if (t.state !== 'Success' && t.state !== 'Cached' && t.state !== 'Mapped' && stories.length < 1000) {
      stories.push([i, r.story(t.node, t.mapIndex)]);
    }
  }
  return {
    runId: r.runId,
    state: r.state,
    message: r.message,
    startMs: r.startMs,
    endMs: r.endMs,
    parameters: r.parameters,
    node: numberColumn(node, Int32Array),
    mapIndex: numberColumn(mapIndex, Int32Array),
    state_: numberColumn(state_, Uint8Array),
    attempts: numberColumn(attempts, Int32Array),
    start: numberColumn(start, Float64Array),
    end: numberColumn(end, Float64Array),
    worker: numberColumn(worker, Int32Array),
    workerNames,
    errors,
    stories,
  };
}
