/**
 * Cluster benchmarks: weft's cluster (a scheduler and worker processes over WebSockets)
 * against the raw transport it is built on, its one-task latency, and the scheduler
 * alone driving hundreds of workers.
 *
 * - **Raw baselines** (`wsBaseline`, `wsRoundTripBaseline`): "raw ws + msgpackr on
 *   loopback". This process is the client; each echo server is a **child process**
 *   (plain JS, no TypeScript loader) with one connection, as a scheduler talks to
 *   worker processes. Messages are small three-field records (`{op, id, run}`), framed
 *   as arrays with msgpackr (records on, sequential structures, one Packr/Unpackr pair
 *   per connection and direction, like `FrameCodec`). The echo decodes every frame and
 *   encodes the decoded messages back. `ws-msgpackr-batched`: batches of 1000 messages,
 *   2 batches in flight per connection, `workers` connections: the cluster's transport
 *   limit and the denominator of its ratios. `ws-msgpackr-roundtrip`: one message in
 *   flight through one echo process: the latency of a loopback ws round trip.
 * - **Executors** (registered in `executors.ts`): `cluster` is a fresh temporary cluster
 *   per run (`ClusterExecutor({ workers, threads: 1 })`: scheduler and worker processes
 *   start and stop inside the timing, like `pool`); `cluster-warm` is one kept-alive
 *   cluster started by the warm-up run (which runs the graph 1 + 3 times: the processes
 *   JIT-compile their hot paths over the first runs) and closed by `releaseExecutors`. Both read the
 *   scheduler's `/status` (`fleet.relayedBytes`: result bytes that went through the
 *   scheduler instead of peer to peer) before the cluster stops; `takeClusterRuns()`
 *   hands those records to the CLI.
 * - **Latency** (`benchLatency`): one tiny task (`one`, returns 1) submitted as a graph
 *   and its result back at the client, `n` sequential runs on one executor after a
 *   warm-up; median, p90, p99.
 * - **Scheduler throughput** (`benchSchedulerSim`): a real scheduler (`startScheduler`,
 *   by default in a child process of its own so it has a core to itself) and `workers`
 *   simulated workers in this process — real WebSocket connections doing the worker
 *   handshake, sending `credits` and answering every `compute` at once with `ok`
 *   outcomes — then a client runs an independent graph through
 *   `ClusterExecutor({ address })`. Task assignments per second are counted in the
 *   scheduler's process (first to last assignment of a run), and its heap per task is
 *   the growth of its (collected) heap from idle to the middle of a run, over the tasks.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { Packr, Unpackr } from 'msgpackr';
import WebSocket from 'ws';
import { Connection, openHandshake } from '../src/cluster/connection.ts';
import type { FleetStats } from '../src/cluster/fleet.ts';
import { fetchStatus, httpUrlOf, type ClusterStatus } from '../src/cluster/local-cluster.ts';
import type { Message, WireOutcome } from '../src/cluster/protocol.ts';
import type { SchedulerServer } from '../src/cluster/scheduler.ts';
import { ClusterExecutor } from '../src/executor/cluster.ts';
import type { Executor, ExecutorSession, Outcome, TaskCall } from '../src/executor/types.ts';
import type { GraphSpec } from '../src/flow/spec.ts';
import type { FlowRunResult, RunOptions } from '../src/runner/types.ts';
import type { BaselineResult } from './baselines.ts';
import type { CreateExecutorFn, RunFlowFn } from './harness.ts';
import { independent, tree } from './shapes.ts';
import { TASKS_MODULE, taskKey } from './tasks.ts';
import { collectGarbage, median, timeRuns, usPer } from './stats.ts';

/** The repository root: child processes run there, so `ws`, `msgpackr` and `tsx` resolve. */
const ROOT = fileURLToPath(new URL('..', import.meta.url));

/** The baseline cluster ratios divide by. */
export const WS_REFERENCE = 'ws-msgpackr-batched';
export const WS_BATCH = 1000;
/** One message in flight costs tens of µs: cap the round-trip baseline's n. */
const WS_ROUNDTRIP_MAX_N = 5_000;

/**
 * The issue's targets for a cluster of 2 worker processes × 1 thread: µs per task by
 * shape (judged on `cluster-warm`, and on `cluster`'s net µs/task — its start-up is
 * process start, not per-task cost), the one-task latency's median, and the scheduler's
 * assignments per second with 500 simulated workers.
 */
export const CLUSTER_TARGETS = Object.freeze({
  usPerTask: Object.freeze({ independent: 5, tree: 10, chain: 20, mapreduce: 10 } as Readonly<Record<string, number>>),
  /** The sizes the targets are stated for (100k independent tasks, a 10k chain...): smaller runs get no verdict. */
  minN: Object.freeze({ independent: 100_000, tree: 16_384, chain: 10_000, mapreduce: 10_000 } as Readonly<Record<string, number>>),
  latencyMedianUs: 300,
  assignmentsPerS: 200_000,
});

// ---- raw ws + msgpackr ---------------------------------------------------------------

/** msgpackr options of weft's `FrameCodec`: records, sequential structures, copied buffers. */
const CODEC_OPTIONS = { useRecords: true, sequential: true, copyBuffers: true, mapsAsObjects: true } as const;

/**
 * The echo server, plain ESM run with `node -e` in the repository root: one WebSocket
 * server on a free loopback port (printed as `port N`), one Packr/Unpackr pair per
 * connection; every frame is decoded and its messages encoded back as one frame. It
 * exits when its stdin closes (the parent went away).
 */
const ECHO_SOURCE = `
import { WebSocketServer } from 'ws';
import { Packr, Unpackr } from 'msgpackr';
const options = ${JSON.stringify(CODEC_OPTIONS)};
const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 });
wss.on('listening', () => process.stdout.write('port ' + wss.address().port + '\\n'));
wss.on('connection', (ws) => {
  const packr = new Packr(options);
  const unpackr = new Unpackr(options);
  ws.on('message', (data) => {
    const msgs = unpackr.unpack(data);
    const view = packr.pack(msgs);
    ws.send(new Uint8Array(view));
  });
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
`;

/**
 * The relay (a scheduler's place on a one-task run's path, doing no scheduling): it
 * connects to the echo server whose port is its first argument, serves a WebSocket on a
 * free loopback port (printed as \`port N\`), and passes every frame on, decoded and
 * encoded again, from its client to the echo and from the echo back.
 */
const RELAY_SOURCE = `
import { WebSocket, WebSocketServer } from 'ws';
import { Packr, Unpackr } from 'msgpackr';
const options = ${JSON.stringify(CODEC_OPTIONS)};
const up = new WebSocket('ws://127.0.0.1:' + process.argv[1], { perMessageDeflate: false });
up.binaryType = 'nodebuffer';
// One options object each: msgpackr keeps a codec's record structures on its options.
const upPackr = new Packr({ ...options });
const upUnpackr = new Unpackr({ ...options });
up.on('open', () => {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 });
  wss.on('listening', () => process.stdout.write('port ' + wss.address().port + '\\n'));
  wss.on('connection', (ws) => {
    const packr = new Packr({ ...options });
    const unpackr = new Unpackr({ ...options });
    ws.on('message', (data) => up.send(new Uint8Array(upPackr.pack(unpackr.unpack(data)))));
    up.on('message', (data) => ws.send(new Uint8Array(packr.pack(upUnpackr.unpack(data)))));
  });
});
process.stdin.on('end', () => process.exit(0));
process.stdin.resume();
`;

interface EchoConn {
  readonly child: ChildProcess;
  readonly ws: WebSocket;
  readonly packr: Packr;
  readonly unpackr: Unpackr;
}

/** Reads a child's stdout until `re` matches a line; rejects on exit or after `timeoutMs`. */
function waitForLine(child: ChildProcess, re: RegExp, timeoutMs: number, what: string): Promise<RegExpExecArray> {
  return new Promise((resolve, reject) => {
    let buf = '';
    let err = '';
    const timer = setTimeout(() => finish(new Error(`${what}: no '${re.source}' line within ${timeoutMs} ms${err ? `: ${err.slice(-500)}` : ''}`)), timeoutMs);
    const onData = (d: string): void => {
      buf += d;
      const m = re.exec(buf);
      if (m !== null) finish(null, m);
    };
    const onErr = (d: string): void => {
      err += d;
    };
    const onExit = (code: number | null): void => finish(new Error(`${what} exited (code ${String(code)}) before it was ready${err ? `: ${err.slice(-500)}` : ''}`));
    const finish = (e: Error | null, m?: RegExpExecArray): void => {
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      child.stderr?.off('data', onErr);
      child.off('exit', onExit);
      if (e !== null) reject(e);
      else resolve(m!);
    };
    child.stdout?.setEncoding('utf8');
    child.stderr?.setEncoding('utf8');
    child.stdout?.on('data', onData);
    child.stderr?.on('data', onErr);
    child.once('exit', onExit);
  });
}

/**
 * Ends a child we started and waits for its exit: after `waitMs` for it to exit on its
 * own, SIGTERM, then SIGKILL after `graceMs`.
 */
async function stopChild(child: ChildProcess, graceMs = 3_000, waitMs = 0): Promise<void> {
  const gone = (): boolean => child.exitCode !== null || child.signalCode !== null;
  if (gone()) return;
  const exited = once(child, 'exit');
  if (waitMs > 0) {
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([exited, new Promise((r) => (timer = setTimeout(r, waitMs)))]);
    clearTimeout(timer);
    if (gone()) return;
  }
  child.kill('SIGTERM');
  const timer = setTimeout(() => child.kill('SIGKILL'), graceMs);
  try {
    await exited;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * `count` echo processes, one connection each. `round(n, batch, window)` pushes n
 * messages through them in frames of `batch` messages, `window` frames in flight per
 * connection, and resolves when every message has come back.
 */
export class WsEchoProcesses {
  private conns: EchoConn[] = [];
  private onDone: (() => void) | null = null;
  private onFail: ((err: Error) => void) | null = null;
  private next = 0;
  private done = 0;
  private n = 0;
  private batch = 1;

  private constructor() {}

  static async start(count: number, timeoutMs = 15_000): Promise<WsEchoProcesses> {
    const e = new WsEchoProcesses();
    try {
      for (let i = 0; i < count; i++) {
        const child = spawn(process.execPath, ['--input-type=module', '-e', ECHO_SOURCE], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
        const m = await waitForLine(child, /port (\d+)\n/, timeoutMs, 'ws echo process');
        const ws = new WebSocket(`ws://127.0.0.1:${m[1]!}`, { perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 });
        const conn: EchoConn = { child, ws, packr: new Packr({ ...CODEC_OPTIONS }), unpackr: new Unpackr({ ...CODEC_OPTIONS }) };
        e.conns.push(conn);
        ws.binaryType = 'nodebuffer';
        await Promise.race([once(ws, 'open'), once(ws, 'error').then(([err]) => Promise.reject(err as Error))]);
        ws.on('message', (data: Buffer) => e.onReply(conn, data));
        ws.on('error', (err: Error) => e.onFail?.(err));
        ws.on('close', () => e.onFail?.(new Error('ws echo connection closed during a round')));
      }
    } catch (err) {
      await e.close();
      throw err;
    }
    return e;
  }

  private send(c: EchoConn): void {
    if (this.next >= this.n) return;
    const end = Math.min(this.n, this.next + this.batch);
    const msgs = new Array<{ op: string; id: number; run: number }>(end - this.next);
    for (let k = 0; k < msgs.length; k++) msgs[k] = { op: 'm', id: this.next + k, run: 1 };
    this.next = end;
    // Copied out of msgpackr's shared slab, as FrameCodec does.
    c.ws.send(new Uint8Array(c.packr.pack(msgs)));
  }

  private onReply(c: EchoConn, data: Buffer): void {
    const msgs = c.unpackr.unpack(data) as { id: number }[];
    this.done += msgs.length;
    if (this.done >= this.n) {
      const done = this.onDone;
      this.onDone = null;
      this.onFail = null;
      done?.();
      return;
    }
    this.send(c);
  }

  round(n: number, batch: number, window: number): Promise<void> {
    if (this.onDone !== null) throw new Error('WsEchoProcesses: a round is already running');
    return new Promise<void>((resolve, reject) => {
      this.n = n;
      this.batch = batch;
      this.next = 0;
      this.done = 0;
      this.onDone = resolve;
      this.onFail = (err) => {
        this.onDone = null;
        this.onFail = null;
        reject(err);
      };
      for (let k = 0; k < window; k++) for (const c of this.conns) this.send(c);
    });
  }

  async close(): Promise<void> {
    const conns = this.conns;
    this.conns = [];
    this.onFail = null;
    for (const c of conns) {
      c.ws.removeAllListeners('close');
      c.ws.on('error', () => undefined);
      c.ws.terminate();
    }
    await Promise.all(conns.map((c) => stopChild(c.child)));
  }
}

function baselineResult(name: string, n: number, samples: number[], workers: number, batch: number): BaselineResult {
  const m = median(samples);
  return { name, n, median_s: m, us_per_task: usPer(m, n), samples_s: samples, workers, batch };
}

/** Batched messages through `workers` echo processes: µs per message round trip. */
export async function wsBaseline(n: number, workers = 2, runs = 5, batch = WS_BATCH): Promise<BaselineResult> {
  const echo = await WsEchoProcesses.start(workers);
  try {
    const samples = await timeRuns(runs, () => echo.round(n, batch, 2));
    return baselineResult(WS_REFERENCE, n, samples, workers, batch);
  } finally {
    await echo.close();
  }
}

/** One message in flight through one echo process: the latency of a loopback ws round trip. */
export async function wsRoundTripBaseline(n: number, runs = 5): Promise<BaselineResult> {
  const echo = await WsEchoProcesses.start(1);
  try {
    const m = Math.min(n, WS_ROUNDTRIP_MAX_N);
    const samples = await timeRuns(runs, () => echo.round(m, 1, 1));
    return baselineResult('ws-msgpackr-roundtrip', m, samples, 1, 1);
  } finally {
    await echo.close();
  }
}

/**
 * One message in flight from this process through a relay process to an echo process and
 * back: the four hops of a one-task run (client → scheduler → worker → scheduler →
 * client) with nothing done at each but decoding and encoding — that run's floor.
 */
export async function wsRelayBaseline(n: number, runs = 5, timeoutMs = 15_000): Promise<BaselineResult> {
  const echo = spawn(process.execPath, ['--input-type=module', '-e', ECHO_SOURCE], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
  let relay: ChildProcess | null = null;
  let ws: WebSocket | null = null;
  try {
    const em = await waitForLine(echo, /port (\d+)\n/, timeoutMs, 'ws echo process');
    relay = spawn(process.execPath, ['--input-type=module', '-e', RELAY_SOURCE, em[1]!], { cwd: ROOT, stdio: ['pipe', 'pipe', 'pipe'] });
    const rm = await waitForLine(relay, /port (\d+)\n/, timeoutMs, 'ws relay process');
    const sock = new WebSocket(`ws://127.0.0.1:${rm[1]!}`, { perMessageDeflate: false, maxPayload: 64 * 1024 * 1024 });
    ws = sock;
    sock.binaryType = 'nodebuffer';
    await Promise.race([once(sock, 'open'), once(sock, 'error').then(([err]) => Promise.reject(err as Error))]);
    const packr = new Packr({ ...CODEC_OPTIONS });
    const unpackr = new Unpackr({ ...CODEC_OPTIONS });
    const m = Math.min(n, WS_ROUNDTRIP_MAX_N);
    const round = (): Promise<void> =>
      new Promise<void>((resolve, reject) => {
        let done = 0;
        const onClose = (): void => finish(new Error('ws relay connection closed during a round'));
        const onMessage = (data: Buffer): void => {
          unpackr.unpack(data);
          if (++done >= m) finish(null);
          else send();
        };
        const send = (): void => sock.send(new Uint8Array(packr.pack([{ op: 'm', id: done, run: 1 }])));
        const finish = (err: Error | null): void => {
          sock.off('message', onMessage);
          sock.off('close', onClose);
          if (err !== null) reject(err);
          else resolve();
        };
        sock.on('message', onMessage);
        sock.once('close', onClose);
        send();
      });
    const samples = await timeRuns(runs, round);
    return baselineResult('ws-msgpackr-relay', m, samples, 1, 1);
  } finally {
    if (ws !== null) {
      ws.on('error', () => undefined);
      ws.terminate();
    }
    if (relay !== null) await stopChild(relay);
    await stopChild(echo);
  }
}

export const WS_BASELINES = [WS_REFERENCE, 'ws-msgpackr-roundtrip', 'ws-msgpackr-relay'] as const;
export type WsBaselineName = (typeof WS_BASELINES)[number];

/** The ws baselines, one after the other. */
export async function runWsBaselines(opts: { n: number; workers?: number; runs?: number; only?: readonly WsBaselineName[] }): Promise<BaselineResult[]> {
  const only = new Set<WsBaselineName>(opts.only ?? WS_BASELINES);
  const out: BaselineResult[] = [];
  if (only.has(WS_REFERENCE)) out.push(await wsBaseline(opts.n, opts.workers ?? 2, opts.runs ?? 5));
  if (only.has('ws-msgpackr-roundtrip')) out.push(await wsRoundTripBaseline(opts.n, opts.runs ?? 5));
  if (only.has('ws-msgpackr-relay')) out.push(await wsRelayBaseline(opts.n, opts.runs ?? 5));
  return out;
}

/** µs per message of the batched ws baseline, when it was measured. */
export function wsReferenceUs(baselines: readonly BaselineResult[]): number | undefined {
  return baselines.find((b) => b.name === WS_REFERENCE)?.us_per_task;
}

// ---- executors: cluster, cluster-warm -------------------------------------------------

/** What the scheduler said about a cluster's runs, read from `/status` before it stopped. */
export interface ClusterRunRecord {
  readonly executor: string;
  /** Graph runs the record covers (1 for a fresh cluster; warm-up + timed runs for a warm one). */
  readonly runs: number;
  readonly relayedBytes: number;
  readonly relayedKeys: number;
  readonly assigned: number;
  readonly stolen: number;
  readonly recomputed: number;
}

const runRecords: ClusterRunRecord[] = [];

/** The records since the last call (and forgets them). */
export function takeClusterRuns(): ClusterRunRecord[] {
  return runRecords.splice(0, runRecords.length);
}

/** Fields a cluster run adds to its `ShapeResult` (extra JSON fields). */
export interface ClusterShapeExtras {
  /** Result bytes relayed through the scheduler per graph run (peer-to-peer transfers are not counted). */
  relayed_bytes_per_run?: number;
  relayed_keys_per_run?: number;
  /** µs/task ÷ the `ws-msgpackr-batched` baseline's µs per message. */
  ratio_vs_ws?: number;
}

/** Adds the scheduler's counters (records of this case's runs) and the ratio to the ws baseline. */
export function withClusterRuns<T extends { us_per_task: number }>(
  result: T,
  records: readonly ClusterRunRecord[],
  wsUs: number | undefined,
): T & ClusterShapeExtras {
  const r = result as T & ClusterShapeExtras;
  let runs = 0;
  let bytes = 0;
  let keys = 0;
  for (const x of records) {
    runs += x.runs;
    bytes += x.relayedBytes;
    keys += x.relayedKeys;
  }
  if (runs > 0) {
    r.relayed_bytes_per_run = bytes / runs;
    r.relayed_keys_per_run = keys / runs;
  }
  if (wsUs !== undefined && wsUs > 0) r.ratio_vs_ws = result.us_per_task / wsUs;
  return r;
}

interface StatusFleet {
  readonly fleet?: Partial<FleetStats>;
}

/** Default bound of one benchmark graph run on a cluster. */
const RUN_TIMEOUT_MS = 180_000;
/** cluster-warm: extra untimed runs of the first graph (see `BenchClusterExecutor.runGraph`). */
const WARMUP_REPEATS = 3;

/** A one-line summary of the scheduler's /status (for a stuck run's error). */
function describeStatus(s: ClusterStatus): string {
  const workers = s.workers.map((w) => `${w.name}: credits ${String(w.credits ?? '?')} used ${String(w.used ?? '?')}`).join('; ');
  return `slots ${s.slots}, queued ${s.queued}, running ${s.running}, tasks ${JSON.stringify(s.tasks ?? {})}, workers [${workers}]`;
}

/**
 * A temporary local cluster for the benchmarks: a `ClusterExecutor` (kept alive by
 * itself) that reads the scheduler's fleet counters before stopping the cluster. Fresh
 * (`warm: false`): the cluster stops at the end of each run, inside the timing, as a
 * plain `ClusterExecutor` without `keepAlive` does. Warm: it stops at `close()`.
 */
export class BenchClusterExecutor implements Executor {
  readonly kind = 'cluster';
  readonly inner: ClusterExecutor;
  private graphRuns = 0;
  /** A graph run that takes longer is cancelled and fails with the scheduler's /status in its message. */
  readonly runTimeoutMs: number;
  /** Warm: extra runs of the first graph inside the first (untimed warm-up) run. */
  readonly warmupRepeats: number;
  private warmedUp = false;

  constructor(
    readonly name: string,
    settings: { workers: number; threads?: number; runTimeoutMs?: number; warmupRepeats?: number },
    private readonly warm: boolean,
  ) {
    this.inner = new ClusterExecutor({ workers: settings.workers, threads: settings.threads ?? 1, keepAlive: true });
    this.runTimeoutMs = settings.runTimeoutMs ?? RUN_TIMEOUT_MS;
    this.warmupRepeats = warm ? (settings.warmupRepeats ?? WARMUP_REPEATS) : 0;
  }

  get workers(): number {
    return this.inner.workers;
  }

  start(session: ExecutorSession): Promise<void> {
    return this.inner.start(session);
  }

  freeSlots(): number {
    return this.inner.freeSlots();
  }

  submit(calls: TaskCall[]): void {
    this.inner.submit(calls);
  }

  cancel(ids: readonly number[]): void {
    this.inner.cancel(ids);
  }

  async shutdown(): Promise<void> {
    await this.inner.shutdown();
    if (!this.warm) await this.finish();
  }

  async runGraph(spec: GraphSpec, parameters: Record<string, unknown>, opts: RunOptions): Promise<FlowRunResult> {
    if (!this.warmedUp) {
      // A warm cluster's processes JIT-compile their hot paths over its first runs: the
      // harness's one warm-up run repeats the graph so the timed runs see a steady state.
      this.warmedUp = true;
      for (let i = 0; i < this.warmupRepeats; i++) await this.runOnce(spec, parameters, { ...opts, keepResults: false });
    }
    return this.runOnce(spec, parameters, opts);
  }

  private async runOnce(spec: GraphSpec, parameters: Record<string, unknown>, opts: RunOptions): Promise<FlowRunResult> {
    const timeout = new AbortController();
    let stuck = '';
    const timer = setTimeout(() => {
      // What the scheduler was doing, for the error (then cancel the run).
      const address = this.inner.address;
      const status = address === '' ? Promise.resolve('(no cluster)') : fetchStatus(httpUrlOf(address), {}, 2_000).then(describeStatus, (e: unknown) => `(no /status: ${String(e)})`);
      void status.then((s) => {
        stuck = s;
        timeout.abort();
      });
    }, this.runTimeoutMs);
    const signal = opts.signal === undefined ? timeout.signal : AbortSignal.any([opts.signal, timeout.signal]);
    // A run that does not even end once cancelled: give up on it (the cluster is closed after the case).
    let hard: NodeJS.Timeout | undefined;
    const abandoned = new Promise<never>((_, reject) => {
      hard = setTimeout(() => reject(new Error(`${this.name}: run of "${spec.name}" did not end within ${this.runTimeoutMs} ms, nor once cancelled; scheduler: ${stuck}`)), this.runTimeoutMs + 15_000);
    });
    try {
      const r = await Promise.race([this.inner.runGraph(spec, parameters, { ...opts, signal }), abandoned]);
      if (timeout.signal.aborted) throw new Error(`${this.name}: run of "${spec.name}" did not finish within ${this.runTimeoutMs} ms; scheduler: ${stuck}`);
      this.graphRuns++;
      return r;
    } finally {
      clearTimeout(timer);
      clearTimeout(hard);
      if (!this.warm) await this.finish();
    }
  }

  close(): Promise<void> {
    return this.finish();
  }

  private async finish(): Promise<void> {
    const address = this.inner.address;
    const runs = this.graphRuns;
    this.graphRuns = 0;
    if (address !== '' && runs > 0) {
      try {
        const s = (await fetchStatus(httpUrlOf(address), {}, 2_000)) as unknown as StatusFleet;
        const f = s.fleet ?? {};
        runRecords.push({
          executor: this.name,
          runs,
          relayedBytes: f.relayedBytes ?? 0,
          relayedKeys: f.relayedKeys ?? 0,
          assigned: f.assigned ?? 0,
          stolen: f.stolen ?? 0,
          recomputed: f.recomputed ?? 0,
        });
      } catch {
        // The counters are for the report only.
      }
    }
    await this.inner.close();
  }
}

// ---- latency ----------------------------------------------------------------------------

export interface LatencyResult {
  readonly shape: 'latency';
  readonly executor: string;
  /**
   * 'flow run': `runFlow` of a one-task graph, to its result (the runner's set-up, the
   * run's own session and records included). 'one call': one call submitted on an open
   * executor session, to its outcome at the client (dask's `client.submit(f).result()`).
   */
  readonly measures: 'flow run' | 'one call';
  readonly workers: number;
  /** Timed one-task runs or calls (sequential). */
  readonly n: number;
  readonly warmup: number;
  readonly median_us: number;
  readonly p90_us: number;
  readonly p99_us: number;
  readonly min_us: number;
  readonly mean_us: number;
}

/** Nearest-rank percentile (p in [0, 1]) of an ascending list. */
export function percentile(sorted: readonly number[], p: number): number {
  if (sorted.length === 0) throw new RangeError('percentile of an empty list');
  const k = Math.min(sorted.length, Math.max(1, Math.ceil(p * sorted.length)));
  return sorted[k - 1]!;
}

/**
 * `n` sequential runs of a one-task graph (`one`, returning 1) on one executor, each
 * timed from `runFlow` to the result at the client (kept results: the value travels
 * back); one executor instance per run from `createExecutor` (a warm executor is the
 * same instance every time). The caller releases shared executors afterwards.
 */
export async function benchLatency(
  executorName: string,
  settings: { workers: number },
  n: number,
  deps: { runFlow: RunFlowFn; createExecutor: CreateExecutorFn; warmup?: number },
): Promise<LatencyResult> {
  if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`latency: n must be a positive integer (got ${n})`);
  const built = tree(1);
  const sink = built.spec.referenceTasks[0]!;
  const warmup = deps.warmup ?? Math.min(100, Math.max(10, Math.ceil(n / 10)));
  const samples = new Array<number>(n);
  let workers = settings.workers;
  for (let i = -warmup; i < n; i++) {
    const executor = await deps.createExecutor(executorName, settings);
    const t0 = performance.now();
    const res = await deps.runFlow(built.spec, { executor, keepResults: true });
    const dt = performance.now() - t0;
    if (res.state !== 'Success') throw new Error(`latency on ${executorName}: run ${i} ended ${res.state}: ${res.message}`);
    const got = res.result(sink);
    if (got !== 1) throw new Error(`latency on ${executorName}: wrong result ${String(got)}, expected 1`);
    workers = executor.workers;
    if (i >= 0) samples[i] = dt * 1000;
  }
  return latencyResult(executorName, 'flow run', workers, n, warmup, samples);
}

function latencyResult(executor: string, measures: LatencyResult['measures'], workers: number, n: number, warmup: number, samples: readonly number[]): LatencyResult {
  const sorted = [...samples].sort((a, b) => a - b);
  let sum = 0;
  for (const s of samples) sum += s;
  return {
    shape: 'latency',
    executor,
    measures,
    workers,
    n,
    warmup,
    median_us: median(sorted),
    p90_us: percentile(sorted, 0.9),
    p99_us: percentile(sorted, 0.99),
    min_us: sorted[0]!,
    mean_us: sum / n,
  };
}

/**
 * `n` sequential calls of the `one` task (returning 1) on one session of one executor
 * (`start` once): each timed from `submit` to its outcome at the client. The session
 * ends with the measurement (`shutdown`); the caller releases shared executors.
 */
export async function benchCallLatency(
  executorName: string,
  settings: { workers: number },
  n: number,
  deps: { createExecutor: CreateExecutorFn; warmup?: number },
): Promise<LatencyResult> {
  if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`latency: n must be a positive integer (got ${n})`);
  const warmup = deps.warmup ?? Math.min(100, Math.max(10, Math.ceil(n / 10)));
  const executor = await deps.createExecutor(executorName, settings);
  let deliver: ((outs: readonly Outcome[]) => void) | null = null;
  const key = taskKey('one');
  await executor.start({
    flowName: 'bench-latency-calls',
    modules: [TASKS_MODULE],
    taskKeys: [key],
    parameters: {},
    onOutcomes: (outs) => deliver?.(outs),
  });
  const samples = new Array<number>(n);
  try {
    for (let i = -warmup; i < n; i++) {
      const id = i + warmup;
      const got = new Promise<readonly Outcome[]>((resolve) => (deliver = resolve));
      const t0 = performance.now();
      executor.submit([{ id, runId: 1, taskKey: key, key: 'one', args: [], timeoutMs: 0, mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined }]);
      const outs = await got;
      const dt = performance.now() - t0;
      const o = outs[0];
      if (outs.length !== 1 || o === undefined || o.id !== id || o.status !== 'ok' || o.value !== 1) {
        throw new Error(`latency on ${executorName}: call ${id} ended ${JSON.stringify(outs.map((x) => ({ id: x.id, status: x.status, value: x.value })))}, expected ok with 1`);
      }
      if (i >= 0) samples[i] = dt * 1000;
    }
  } finally {
    deliver = null;
    await executor.shutdown();
  }
  return latencyResult(executorName, 'one call', executor.workers, n, warmup, samples);
}

// ---- the scheduler with simulated workers -----------------------------------------------

/** First and last assignment of a watched period, in the scheduler's process. */
export interface AssignSpan {
  /** Assignments and completions during the period. */
  readonly assigned: number;
  readonly completed: number;
  /** ms between the first and the last assignment seen (1 ms sampling). */
  readonly spanMs: number;
  /** Collected heapUsed when the probe fired (-1: no probe, or it did not fire). */
  readonly probeHeap: number;
  readonly stats: FleetStats;
}

/** A scheduler to benchmark, in this process or in a child process (the same calls either way). */
export interface SchedulerControl {
  readonly address: string;
  readonly where: 'child' | 'this';
  /** heapUsed after a full collection (when the process has `--expose-gc`; raw heapUsed otherwise). */
  heap(): Promise<number>;
  /** Resolves when `count` workers with a credit each are connected; rejects after `timeoutMs`. */
  waitWorkers(count: number, timeoutMs: number): Promise<void>;
  /**
   * Watch assignments from now on (sampled every ms). With `probeAt`, the heap is
   * collected and measured once that many assignments have happened.
   */
  mark(probeAt?: number): Promise<void>;
  /** Stop watching; what happened since `mark`. */
  span(): Promise<AssignSpan>;
  /** Log lines of the scheduler (the last 100). */
  logTail(): Promise<string[]>;
  close(): Promise<void>;
}

function heapNow(): number {
  collectGarbage();
  collectGarbage();
  return process.memoryUsage().heapUsed;
}

/** Control of a scheduler running in this process. */
export function localControl(s: SchedulerServer, tail: string[], where: 'child' | 'this' = 'this'): SchedulerControl {
  const stats = s.fleet.stats;
  let timer: NodeJS.Timeout | null = null;
  let base = { assigned: 0, completed: 0 };
  let seen = 0;
  let first = -1;
  let last = -1;
  let probeHeap = -1;
  const stop = (): void => {
    if (timer !== null) clearInterval(timer);
    timer = null;
  };
  return {
    address: s.address,
    where,
    heap: () => Promise.resolve(heapNow()),
    async waitWorkers(count, timeoutMs) {
      const deadline = performance.now() + timeoutMs;
      while (s.fleet.workers.size < count || s.fleet.freeCredits < count) {
        if (performance.now() > deadline) {
          throw new Error(`scheduler: ${s.fleet.workers.size} of ${count} workers connected (${s.fleet.freeCredits} free credits) after ${timeoutMs} ms`);
        }
        await new Promise((r) => setTimeout(r, 10));
      }
    },
    mark(probeAt) {
      stop();
      base = { assigned: stats.assigned, completed: stats.completed };
      seen = stats.assigned;
      first = -1;
      last = -1;
      probeHeap = -1;
      timer = setInterval(() => {
        const a = stats.assigned;
        if (a !== seen) {
          const t = performance.now();
          if (first < 0) first = t;
          last = t;
          seen = a;
        }
        if (probeAt !== undefined && probeHeap < 0 && a - base.assigned >= probeAt) probeHeap = heapNow();
      }, 1);
      return Promise.resolve();
    },
    span() {
      stop();
      return Promise.resolve({
        assigned: stats.assigned - base.assigned,
        completed: stats.completed - base.completed,
        spanMs: first < 0 ? 0 : last - first,
        probeHeap,
        stats: { ...stats },
      });
    },
    logTail: () => Promise.resolve(tail.slice()),
    async close() {
      stop();
      await s.close();
    },
  };
}

async function startInProcess(): Promise<{ server: SchedulerServer; tail: string[] }> {
  const { startScheduler } = await import('../src/cluster/scheduler.ts');
  const tail: string[] = [];
  const server = await startScheduler({
    port: 0,
    log: (line) => {
      tail.push(line);
      if (tail.length > 100) tail.shift();
    },
  });
  return { server, tail };
}

type ControlOp = 'heap' | 'waitWorkers' | 'mark' | 'span' | 'logTail' | 'close';
interface ControlRequest {
  readonly id: number;
  readonly op: ControlOp;
  readonly args: unknown[];
}

/**
 * The child's side: start a scheduler and serve `SchedulerControl` calls over IPC. Run
 * by the child that `childControl` spawns (not meant to be called otherwise).
 */
export async function serveSchedulerOverIpc(): Promise<void> {
  const send = process.send?.bind(process);
  if (send === undefined) throw new Error('serveSchedulerOverIpc: no IPC channel');
  const { server, tail } = await startInProcess();
  const ctl = localControl(server, tail, 'child');
  process.on('message', (raw) => {
    const req = raw as ControlRequest;
    const fn = ctl[req.op] as (...a: unknown[]) => Promise<unknown>;
    fn(...req.args).then(
      (value) => {
        send({ id: req.id, value });
        if (req.op === 'close') process.disconnect();
      },
      (err: unknown) => send({ id: req.id, error: err instanceof Error ? err.message : String(err) }),
    );
  });
  process.on('disconnect', () => {
    void ctl.close().finally(() => process.exit(0));
  });
  send({ ready: true, address: server.address });
}

/** The child that runs a scheduler: tsx's loader, then this module's `serveSchedulerOverIpc`. */
const CHILD_SOURCE = `
const { register } = await import('tsx/esm/api');
register();
const m = await import(process.argv[1]);
await m.serveSchedulerOverIpc();
`;

/**
 * A scheduler in a child process of its own (`--expose-gc`), driven over IPC.
 * `profileDir`: the child writes a V8 CPU profile there when it exits (`--cpu-prof`).
 */
export async function childControl(timeoutMs = 30_000, profileDir?: string): Promise<SchedulerControl> {
  const prof = profileDir === undefined ? [] : ['--cpu-prof', `--cpu-prof-dir=${profileDir}`];
  const child = spawn(process.execPath, ['--expose-gc', ...prof, '--input-type=module', '-e', CHILD_SOURCE, import.meta.url], {
    cwd: ROOT,
    stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
  });
  let stderr = '';
  child.stderr?.setEncoding('utf8');
  child.stderr?.on('data', (d: string) => {
    stderr = (stderr + d).slice(-4000);
  });
  const pending = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  let nextId = 1;
  let exited = false;
  child.on('exit', (code) => {
    exited = true;
    for (const p of pending.values()) p.reject(new Error(`scheduler process exited (code ${String(code)})${stderr ? `: ${stderr.slice(-1000)}` : ''}`));
    pending.clear();
  });
  const ready = await new Promise<{ address: string }>((resolve, reject) => {
    const timer = setTimeout(() => {
      void stopChild(child);
      reject(new Error(`scheduler process not ready within ${timeoutMs} ms${stderr ? `: ${stderr.slice(-1000)}` : ''}`));
    }, timeoutMs);
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`scheduler process exited (code ${String(code)}) before it was ready${stderr ? `: ${stderr.slice(-1000)}` : ''}`));
    });
    child.on('message', (raw) => {
      const m = raw as { ready?: boolean; address?: string; id?: number; value?: unknown; error?: string };
      if (m.ready === true) {
        clearTimeout(timer);
        resolve({ address: m.address! });
        return;
      }
      const p = pending.get(m.id ?? -1);
      if (p === undefined) return;
      pending.delete(m.id!);
      if (m.error !== undefined) p.reject(new Error(`scheduler process: ${m.error}`));
      else p.resolve(m.value);
    });
  });
  const call = <T>(op: ControlOp, ...args: unknown[]): Promise<T> => {
    if (exited) return Promise.reject(new Error('scheduler process has exited'));
    return new Promise<T>((resolve, reject) => {
      const id = nextId++;
      pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      child.send({ id, op, args } satisfies ControlRequest);
    });
  };
  return {
    address: ready.address,
    where: 'child',
    heap: () => call<number>('heap'),
    waitWorkers: (count, ms) => call<void>('waitWorkers', count, ms),
    mark: (probeAt) => call<void>('mark', ...(probeAt === undefined ? [] : [probeAt])),
    span: () => call<AssignSpan>('span'),
    logTail: () => call<string[]>('logTail'),
    async close() {
      if (!exited) {
        try {
          await Promise.race([call<void>('close'), new Promise((r) => setTimeout(r, 5_000))]);
        } catch {
          // It may exit before answering.
        }
      }
      // It exits by itself once disconnected (and writes its CPU profile then).
      await stopChild(child, 3_000, 5_000);
    },
  };
}

/** Starts a scheduler to benchmark: in a child process (default) or in this one. */
export async function startSchedulerControl(where: 'child' | 'this' = 'child', profileDir?: string): Promise<SchedulerControl> {
  if (where === 'child') return childControl(30_000, profileDir);
  const { server, tail } = await startInProcess();
  return localControl(server, tail);
}

/** One simulated worker: a real connection and handshake; every compute answered at once. */
interface SimWorker {
  readonly conn: Connection;
  readonly heartbeat: NodeJS.Timeout;
  calls: number;
  /** Sent its raised credits (see `raiseTo`). */
  raised: boolean;
}

export interface SimFleetOptions {
  /** Credits each worker offers (it has 1 thread). Default 2. */
  readonly credits?: number;
  /**
   * After its first compute, raise the credits to this (as a real worker does once it has
   * measured its tasks: 2,048 per thread under 50 µs). Default: no raise.
   */
  readonly raiseTo?: number;
  /** Count every (run, id) received: `duplicates` and `distinct` then say whether each call came once. */
  readonly track?: boolean;
  /** Connects in flight at once. Default 100. */
  readonly connectBatch?: number;
  readonly connectTimeoutMs?: number;
}

/**
 * `count` simulated workers in this process, connected to `address`: each does the
 * worker handshake (threads 1), sends its credits, answers every `compute` at once with
 * `ok` outcomes (value null, nbytes 1, len -1, its id and runId), heartbeats at the
 * interval the scheduler gave, gives nothing up to a steal, and has no data to share.
 */
export class SimFleet {
  private readonly workers: SimWorker[] = [];
  private readonly seen: Map<string, number> | null;
  duplicates = 0;
  private closed = false;

  private constructor(
    readonly address: string,
    private readonly credits: number,
    track: boolean,
    private readonly raiseTo: number | undefined,
  ) {
    this.seen = track ? new Map() : null;
  }

  static async start(address: string, count: number, o: SimFleetOptions = {}): Promise<SimFleet> {
    const f = new SimFleet(address, o.credits ?? 2, o.track === true, o.raiseTo);
    const batch = o.connectBatch ?? 100;
    try {
      for (let i = 0; i < count; i += batch) {
        const k = Math.min(batch, count - i);
        await Promise.all(Array.from({ length: k }, (_, j) => f.connect(i + j, o.connectTimeoutMs ?? 10_000)));
      }
    } catch (err) {
      await f.close();
      throw err;
    }
    return f;
  }

  /** Calls received by all workers. */
  get calls(): number {
    let n = 0;
    for (const w of this.workers) n += w.calls;
    return n;
  }

  /** Distinct (run, id) calls received (with `track`). */
  get distinct(): number {
    return this.seen?.size ?? -1;
  }

  get size(): number {
    return this.workers.length;
  }

  private async connect(i: number, timeoutMs: number): Promise<void> {
    const ws = new WebSocket(this.address, { perMessageDeflate: false, handshakeTimeout: timeoutMs });
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', (err) => reject(err));
    });
    const conn = new Connection(ws, { receives: 's2w', label: `sim worker ${i}` });
    // Until the handshake owns it, an early close must not be an unhandled rejection.
    const welcome = await openHandshake(conn, {
      hello: { role: 'worker', name: `sim-${process.pid}-${i}`, resources: {}, threads: 1, memoryLimit: 0, address: '', pid: process.pid },
      handshakeMs: timeoutMs,
    });
    if (this.closed) {
      conn.terminate('fleet closed', 'CLOSED');
      return;
    }
    const heartbeat = setInterval(() => conn.send({ op: 'heartbeat', at: Date.now() }), Math.max(100, welcome.heartbeatMs));
    heartbeat.unref();
    const w: SimWorker = { conn, heartbeat, calls: 0, raised: false };
    this.workers.push(w);
    conn.onMessages = (msgs) => this.receive(w, msgs);
    conn.onClose = () => clearInterval(heartbeat);
    conn.send({ op: 'credits', credits: this.credits });
  }

  private receive(w: SimWorker, msgs: Message[]): void {
    const conn = w.conn;
    for (let i = 0; i < msgs.length; i++) {
      const m = msgs[i]!;
      switch (m.op) {
        case 'compute': {
          // Calls travel in columns (`cols`); the record form is read too.
          const ids = m.cols !== undefined ? m.cols.id : m.calls.map((c) => c.id);
          const runIds = m.cols !== undefined ? m.cols.runId : m.calls.map((c) => c.runId);
          const t = Date.now();
          const outcomes = new Array<WireOutcome>(ids.length);
          for (let k = 0; k < ids.length; k++) {
            const c = { id: ids[k]!, runId: runIds[k]! };
            outcomes[k] = { id: c.id, runId: c.runId, status: 'ok', startMs: t, endMs: t, value: null, nbytes: 1, len: -1 };
            if (this.seen !== null) {
              const key = `${m.run}:${c.id}:${c.runId}`;
              const n = this.seen.get(key) ?? 0;
              if (n > 0) this.duplicates++;
              this.seen.set(key, n + 1);
            }
          }
          w.calls += ids.length;
          conn.send({ op: 'outcomes', run: m.run, outcomes });
          if (!w.raised && this.raiseTo !== undefined) {
            w.raised = true;
            conn.send({ op: 'credits', credits: this.raiseTo });
          }
          break;
        }
        case 'steal':
          // Everything sent was answered at once: nothing is queued to give back.
          conn.send({ op: 'stealReply', id: m.id, run: m.run, stolen: [], kept: m.tasks });
          break;
        case 'getData':
          conn.send({ op: 'data', id: m.id, keys: [], values: [], missing: m.keys });
          break;
        case 'acquire':
          conn.send({ op: 'acquired', id: m.id, keys: [], missing: Object.keys(m.from) });
          break;
        default:
          // release, cancelTasks, heartbeat, retire, whoHasReply, error: nothing to do.
          break;
      }
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    const ws = this.workers.splice(0, this.workers.length);
    await Promise.all(
      ws.map(async (w) => {
        clearInterval(w.heartbeat);
        const sock = w.conn.ws;
        if (sock.readyState === WebSocket.CLOSED) return;
        const closed = once(sock, 'close');
        w.conn.close('bench done');
        const timer = setTimeout(() => sock.terminate(), 2_000);
        await closed;
        clearTimeout(timer);
      }),
    );
  }
}

export interface SchedulerSimOptions {
  /** Tasks of the independent graph. */
  readonly tasks: number;
  /** Simulated workers. Default 500. */
  readonly workers?: number;
  /** Credits per simulated worker. Default 2. */
  readonly credits?: number;
  /** Raise to this after the first compute, as real workers do for short tasks (see `SimFleetOptions.raiseTo`). */
  readonly raiseTo?: number;
  /** Timed runs after one warm-up. Default 5. */
  readonly runs?: number;
  /** Where the scheduler runs. Default 'child' (its own process and core). */
  readonly scheduler?: 'child' | 'this';
  /** Check that every call reached a worker exactly once (costs a map entry per call). */
  readonly track?: boolean;
  /** A run that takes longer is cancelled and fails the benchmark. Default max(60 s, 200 µs × tasks). */
  readonly runTimeoutMs?: number;
  /** Write the scheduler process's CPU profile to this directory (scheduler 'child' only). */
  readonly profileDir?: string;
  readonly log?: (line: string) => void;
}

export interface SchedulerSimResult {
  readonly shape: 'scheduler';
  readonly n: number;
  readonly tasks: number;
  readonly sim_workers: number;
  readonly credits: number;
  readonly scheduler_process: 'child' | 'this';
  readonly runs: number;
  /** Median wall clock of `runFlow` at the client (graph sent, run, finished), seconds. */
  readonly median_s: number;
  readonly us_per_task: number;
  /** Tasks per second end to end (client's wall clock). */
  readonly tasks_per_s: number;
  /** Median of assignments ÷ (last − first assignment), counted in the scheduler's process. */
  readonly assignments_per_s: number;
  readonly assign_span_s: number;
  readonly samples_s: readonly number[];
  readonly assignments_per_s_samples: readonly number[];
  /** (collected heap in the middle of a run − collected heap idle) ÷ tasks, bytes. */
  readonly heap_per_task_b: number;
  readonly heap_idle_b: number;
  readonly heap_mid_b: number;
  /** Calls the simulated workers received over all runs (warm-up and probe included) and, with track, the distinct ones. */
  readonly calls_received: number;
  readonly calls_distinct?: number;
  readonly duplicates?: number;
  /** Assignments counted by the scheduler over the same runs. */
  readonly assigned: number;
  readonly stolen: number;
}

const MAX_SIM_WORKERS = 5_000;
const MAX_SIM_TASKS = 10_000_000;

/**
 * The scheduler driving `workers` simulated workers through `runs` independent graphs
 * of `tasks` no-op tasks (after one warm-up run), then one more run with a heap probe at
 * its middle. Everything it starts is closed before it returns or throws.
 */
export async function benchSchedulerSim(runFlow: RunFlowFn, o: SchedulerSimOptions): Promise<SchedulerSimResult> {
  const workers = o.workers ?? 500;
  const credits = o.credits ?? 2;
  const runs = o.runs ?? 5;
  if (!Number.isSafeInteger(o.tasks) || o.tasks < 1 || o.tasks > MAX_SIM_TASKS) throw new RangeError(`scheduler bench: tasks must be in 1..${MAX_SIM_TASKS}`);
  if (!Number.isSafeInteger(workers) || workers < 1 || workers > MAX_SIM_WORKERS) throw new RangeError(`scheduler bench: workers must be in 1..${MAX_SIM_WORKERS}`);
  if (!Number.isSafeInteger(credits) || credits < 1) throw new RangeError('scheduler bench: credits must be a positive integer');
  const runTimeoutMs = o.runTimeoutMs ?? Math.max(60_000, o.tasks * 0.2);
  const log = o.log ?? (() => undefined);
  const built = independent(o.tasks);

  log(
    `starting a scheduler (${o.scheduler ?? 'child'} process) and ${workers} simulated workers (${credits} credits each${o.raiseTo !== undefined ? `, raised to ${o.raiseTo} after the first compute` : ''})`,
  );
  const ctl = await startSchedulerControl(o.scheduler ?? 'child', o.profileDir);
  let fleet: SimFleet | null = null;
  let executor: ClusterExecutor | null = null;
  try {
    fleet = await SimFleet.start(ctl.address, workers, { credits, track: o.track === true, ...(o.raiseTo !== undefined ? { raiseTo: o.raiseTo } : {}) });
    await ctl.waitWorkers(workers, 30_000);
    executor = new ClusterExecutor({ address: ctl.address, keepAlive: true, onLog: () => undefined });
    const ex = executor;
    const once_ = async (): Promise<number> => {
      const t0 = performance.now();
      const res = await runFlow(built.spec, { executor: ex, keepResults: false, signal: AbortSignal.timeout(runTimeoutMs) });
      const s = (performance.now() - t0) / 1000;
      if (res.state !== 'Success') {
        const tail = (await ctl.logTail()).slice(-5).join(' | ');
        throw new Error(`scheduler bench: run ended ${res.state}: ${res.message}${tail ? ` (scheduler: ${tail})` : ''}`);
      }
      return s;
    };
    log(`scheduler bench: ${built.tasks} tasks, 1 warm-up + ${runs} runs`);
    collectGarbage();
    await once_();
    const samples: number[] = [];
    const rates: number[] = [];
    const spans: number[] = [];
    for (let r = 0; r < runs; r++) {
      collectGarbage();
      await ctl.mark();
      samples.push(await once_());
      const sp = await ctl.span();
      if (sp.assigned < built.tasks) throw new Error(`scheduler bench: ${sp.assigned} assignments for ${built.tasks} tasks`);
      // With deep credits the scheduler assigns the whole graph in one synchronous burst,
      // which the 1 ms sampler cannot see into (first = last): count that run over its
      // whole end-to-end time instead (a lower bound of the assignment rate).
      const spanS = sp.spanMs > 0 ? sp.spanMs / 1000 : samples[samples.length - 1]!;
      spans.push(spanS);
      rates.push(sp.assigned / spanS);
    }
    // Heap: idle (collected) vs. the middle of one more run (collected there, in the scheduler's process).
    const idle = await ctl.heap();
    await ctl.mark(Math.floor(built.tasks / 2));
    await once_();
    const probe = await ctl.span();
    const mid = probe.probeHeap;
    const m = median(samples);
    const calls = fleet.calls;
    return {
      shape: 'scheduler',
      n: o.tasks,
      tasks: built.tasks,
      sim_workers: workers,
      credits,
      scheduler_process: ctl.where,
      runs,
      median_s: m,
      us_per_task: usPer(m, built.tasks),
      tasks_per_s: built.tasks / m,
      assignments_per_s: median(rates),
      assign_span_s: median(spans),
      samples_s: samples,
      assignments_per_s_samples: rates,
      heap_per_task_b: mid >= 0 ? (mid - idle) / built.tasks : NaN,
      heap_idle_b: idle,
      heap_mid_b: mid,
      calls_received: calls,
      ...(o.track === true ? { calls_distinct: fleet.distinct, duplicates: fleet.duplicates } : {}),
      assigned: probe.stats.assigned,
      stolen: probe.stats.stolen,
    };
  } finally {
    await executor?.close().catch(() => undefined);
    await fleet?.close().catch(() => undefined);
    await ctl.close();
  }
}
