/**
 * ClusterExecutor: tasks on a weft cluster — a scheduler and its workers, reached over
 * WebSockets — either a running one (`address`) or a temporary LocalCluster started on
 * this machine for the run (no address: `workers` processes × `threads` slots).
 *
 * - `flow.run()` hands the whole graph over (`runGraph`): the scheduler runs the core
 *   and the runner on its side, so per-task work never crosses to this process; only
 *   state events (when someone listens), progress counts and the results kept come back.
 * - The plain Executor interface (`start`/`submit`/...) opens a call session: resolved
 *   calls go to the scheduler, which places them on its workers (like dask's
 *   `client.submit`). The window of calls in flight is `max(64, 4 × slots)`. The open
 *   travels with the first calls (no round trip first) unless a code bundle must be
 *   checked.
 * - A small flat graph (at most `callModeMaxTasks` tasks, none mapped, none taking
 *   another task's result) runs as calls: its values come back anyway, and the
 *   scheduler is spared a run of its own (half the one-task latency).
 * - Without `keepAlive`, the end of a run (`shutdown()`, or the end of `runGraph`)
 *   disconnects and stops a temporary cluster; the next run connects (or starts one)
 *   again. With `keepAlive` (a warm cluster) both stay up until `close()`.
 * - A running cluster given by `address` is never stopped by this executor.
 */
// The client (ws, the wire protocol) is loaded when a run first connects, not with weft.
import type { CallSession, ClientTlsOptions, ClusterClient } from '../cluster/client.ts';
import { ClusterConnectionError, logToStderr } from '../cluster/errors.ts';
import { fetchStatus, httpUrlOf, LocalCluster } from '../cluster/local-cluster.ts';
import type { LogRecord } from '../cluster/protocol.ts';
import { loadTasks } from './pool-tasks.ts';
import type { GraphSpec } from '../flow/spec.ts';
import { runFlow } from '../runner/run.ts';
import type { FlowRunResult, RunOptions } from '../runner/types.ts';
import type { Executor, ExecutorSession, TaskCall } from './types.ts';

export interface ClusterExecutorOptions {
  /** A running scheduler (`ws://host:port`, `wss://…`). Without it a temporary LocalCluster is started. */
  address?: string;
  /** The cluster's shared token. */
  token?: string;
  /** TLS material for a `wss://` scheduler. */
  tls?: ClientTlsOptions;
  /** Worker processes of a temporary cluster (default 2). */
  workers?: number;
  /** Task slots per worker of a temporary cluster (default 1). */
  threads?: number;
  /** A temporary cluster grows and shrinks between these by its queue (starts at `min`). */
  adapt?: { min: number; max: number };
  /** Keep the connection (and a temporary cluster) across runs until `close()`. */
  keepAlive?: boolean;
  /** Worker logs and task console output (default: `[worker task-key] msg` on stderr). */
  onLog?: (record: LogRecord) => void;
  /**
   * Code shipping: send the flow's modules to the cluster as an esbuild bundle (sent once
   * per content hash per connection; workers fetch it once and cache it), for workers
   * that do not have the code on disk. Default false: workers import the modules by path.
   */
  bundle?: boolean;
  /** Connecting and handshaking with the scheduler. Default 10 s. */
  connectTimeoutMs?: number;
  /**
   * Graphs of at most this many tasks, none mapped and none taking another task's result,
   * run as calls from this process instead of as a scheduler-side run. Default 16; 0
   * hands every graph over.
   */
  callModeMaxTasks?: number;
}

/** Default `callModeMaxTasks`. */
const CALL_MODE_MAX_TASKS = 16;

/**
 * Whether `spec` is small and flat: at most `max` tasks, none mapped, every task's
 * arguments constants or parameters (no value moves from one task to another).
 */
export function isSmallFlatGraph(spec: GraphSpec, max: number): boolean {
  let tasks = 0;
  const nodes = spec.nodes;
  for (const n of nodes) {
    if (n.kind !== 'task') continue;
    if (n.mapped || ++tasks > max) return false;
    for (const a of n.args) if (a.kind === 'ref' && nodes[a.node]?.kind !== 'parameter') return false;
  }
  return true;
}

/** Smallest window of calls in flight for a call session. */
const MIN_WINDOW = 64;
/** Calls in flight per cluster slot (so workers never wait for the next call). */
const WINDOW_PER_SLOT = 4;

export class ClusterExecutor implements Executor {
  readonly kind = 'cluster';
  private readonly options: ClusterExecutorOptions;
  private slots: number;
  private cluster: LocalCluster | null = null;
  private client: ClusterClient | null = null;
  private connecting: Promise<ClusterClient> | null = null;
  private session: CallSession | null = null;
  private starting = false;
  private closed = false;
  private closing: Promise<void> | null = null;
  /** The connection error of a run as calls (see `runAsCalls`), set when its session ends. */
  private lostDuringRun: ClusterConnectionError | null = null;

  constructor(options: ClusterExecutorOptions = {}) {
    for (const k of ['workers', 'threads'] as const) {
      const v = options[k];
      if (v !== undefined && (!Number.isInteger(v) || v < 1)) throw new RangeError(`ClusterExecutor: ${k} must be a positive integer, got ${String(v)}`);
    }
    const cm = options.callModeMaxTasks;
    if (cm !== undefined && (!Number.isInteger(cm) || cm < 0)) throw new RangeError(`ClusterExecutor: callModeMaxTasks must be a non-negative integer, got ${String(cm)}`);
    if (options.address !== undefined && (options.workers !== undefined || options.adapt !== undefined)) {
      throw new RangeError('ClusterExecutor: workers and adapt size a temporary cluster; with an address the cluster has its own workers');
    }
    this.options = { ...options };
    this.slots = options.address !== undefined ? 1 : (options.adapt?.min ?? options.workers ?? 2) * (options.threads ?? 1);
  }

  /** Task slots of the cluster (known once connected; before that the configured size, or 1). */
  get workers(): number {
    return Math.max(1, this.slots);
  }

  /** The scheduler's address (a temporary cluster's once started; '' before). */
  get address(): string {
    return this.options.address ?? this.cluster?.address ?? '';
  }

  /** How it was configured: a cluster's address, or a temporary cluster's size (what `weft register` records). */
  get settings(): { readonly address?: string; readonly workers?: number; readonly threads?: number } {
    const o = this.options;
    return o.address !== undefined ? { address: o.address } : { workers: o.adapt?.min ?? o.workers ?? 2, threads: o.threads ?? 1 };
  }

  /** The temporary cluster, while it runs (null with an address). */
  get localCluster(): LocalCluster | null {
    return this.cluster;
  }

  async start(session: ExecutorSession): Promise<void> {
    if (this.closed) throw new Error('ClusterExecutor is closed');
    if (this.session !== null || this.starting) throw new Error('ClusterExecutor.start() called twice');
    this.starting = true;
    try {
      // Before connecting: a key that cannot resolve here needs no cluster to be found out.
      await loadTasks(session.modules, session.taskKeys, 'the client');
      const client = await this.connect();
      const bundle = this.options.bundle === true ? await client.shipBundle(session.modules) : '';
      const s = await client.openSession(session, bundle);
      if (this.closed) {
        s.close();
        throw new Error('ClusterExecutor: closed while starting');
      }
      this.session = s;
      if (s.slots > 0) this.slots = s.slots;
    } catch (err) {
      this.starting = false;
      // The runner does not shut down an executor whose start() failed.
      if (!this.options.keepAlive) await this.release();
      throw err;
    }
    this.starting = false;
  }

  freeSlots(): number {
    const s = this.session;
    if (s === null) return 0;
    // After a lost connection the window stays open: the next submit() throws the
    // connection error, which ends the run (a window of 0 would leave it waiting).
    return Math.max(0, this.window() - s.pending);
  }

  submit(calls: TaskCall[]): void {
    if (calls.length === 0) return;
    const s = this.session;
    if (s === null) throw new Error('ClusterExecutor: submit() before start() or after shutdown()');
    if (s.lostWith !== null) throw s.lostWith;
    const free = this.window() - s.pending;
    if (calls.length > free) throw new RangeError(`ClusterExecutor: submit() of ${calls.length} calls with only ${free} free slots`);
    s.submit(calls);
  }

  cancel(ids: readonly number[]): void {
    this.session?.cancel(ids);
  }

  /** Ends the run's session; without keepAlive also disconnects and stops a temporary cluster. Idempotent. */
  async shutdown(): Promise<void> {
    const s = this.session;
    this.session = null;
    if (s?.lostWith != null) this.lostDuringRun = s.lostWith;
    s?.close();
    if (!this.options.keepAlive) await this.release();
  }

  /** Disconnects and stops a temporary cluster; the executor cannot start again. Idempotent. */
  close(): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.closed = true;
    const s = this.session;
    this.session = null;
    s?.close();
    this.closing = this.release();
    return this.closing;
  }

  /**
   * The whole graph runs on the cluster (see `Executor.runGraph`), but for a small flat
   * graph (see `callModeMaxTasks`): the runner drives that one here, as calls. Either way
   * a connection lost during the run rejects it with the ClusterConnectionError.
   */
  async runGraph(spec: GraphSpec, parameters: Record<string, unknown>, opts: RunOptions): Promise<FlowRunResult> {
    if (this.closed) throw new Error('ClusterExecutor is closed');
    // A restart reads the earlier run's checkpoints here, so it runs as calls too.
    if (opts.restartFrom !== undefined || isSmallFlatGraph(spec, this.options.callModeMaxTasks ?? CALL_MODE_MAX_TASKS)) {
      return this.runAsCalls(spec, parameters, opts);
    }
    try {
      const client = await this.connect();
      const bundle = this.options.bundle === true ? await client.shipBundle(spec.modules) : '';
      return await client.runGraph(spec, parameters, opts, bundle);
    } finally {
      if (!this.options.keepAlive) await this.release();
    }
  }

  /**
   * This executor without `runGraph` (see `Executor.asCalls`): the runner drives the whole
   * graph from this process through `start`/`submit`, as it does a small flat graph, so a
   * wrapper that must see every task call (the server's tag limits) can sit in between.
   * Values move between tasks through this process. Its `shutdown()` is this executor's.
   */
  asCalls(): Executor {
    const workers = (): number => this.workers;
    return {
      kind: this.kind,
      get workers(): number {
        return workers();
      },
      start: (session) => this.start(session),
      freeSlots: () => this.freeSlots(),
      submit: (c) => this.submit(c),
      cancel: (ids) => this.cancel(ids),
      shutdown: () => this.shutdown(),
    };
  }

  private async runAsCalls(spec: GraphSpec, parameters: Record<string, unknown>, opts: RunOptions): Promise<FlowRunResult> {
    this.lostDuringRun = null;
    const result = await runFlow(spec, { ...opts, parameters, executor: this.asCalls() });
    const lost = this.lostDuringRun as ClusterConnectionError | null;
    this.lostDuringRun = null;
    if (lost !== null) throw new ClusterConnectionError('SCHEDULER_LOST', `flow "${spec.name}": ${lost.message}`, lost.address, { cause: lost });
    return result;
  }

  private window(): number {
    return Math.max(MIN_WINDOW, WINDOW_PER_SLOT * Math.max(this.slots, this.session?.slots ?? 0));
  }

  /** The open client, connecting (and starting a temporary cluster) first when needed. */
  private connect(): Promise<ClusterClient> {
    if (this.client !== null && !this.client.closed) return Promise.resolve(this.client);
    this.connecting ??= (async () => {
      const o = this.options;
      let address = o.address;
      if (address === undefined) {
        if (this.cluster === null || this.cluster.closed) {
          this.cluster = await LocalCluster.start({
            workers: o.adapt?.min ?? o.workers ?? 2,
            threads: o.threads ?? 1,
            ...(o.token !== undefined ? { token: o.token } : {}),
            ...(o.adapt !== undefined ? { adapt: o.adapt } : {}),
          });
        }
        address = this.cluster.address;
      }
      const { ClusterClient } = await import('../cluster/client.ts');
      const client = await ClusterClient.connect({
        address,
        ...(o.token !== undefined ? { token: o.token } : {}),
        ...(o.tls !== undefined ? { tls: o.tls } : {}),
        ...(o.connectTimeoutMs !== undefined ? { connectTimeoutMs: o.connectTimeoutMs } : {}),
        onLog: o.onLog ?? logToStderr,
      });
      this.client = client;
      try {
        const status = await fetchStatus(httpUrlOf(address), o.tls ?? {}, 2_000);
        if (status.slots > 0) this.slots = status.slots;
      } catch {
        // /status is for reporting only: the run does not depend on it.
      }
      return client;
    })().finally(() => {
      this.connecting = null;
    });
    return this.connecting;
  }

  /** Disconnect and stop a temporary cluster. */
  private async release(): Promise<void> {
    const connecting = this.connecting;
    if (connecting !== null) await connecting.catch(() => undefined);
    const client = this.client;
    this.client = null;
    const cluster = this.cluster;
    this.cluster = null;
    await client?.close();
    await cluster?.close();
  }
}
