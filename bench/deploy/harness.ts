/**
 * The deployment path's benchmark (`weft bench --shape deploy`): what a flow run costs
 * end to end through a weft server, a LocalAgent and a `weft execute flow-run` process,
 * next to the floors that path cannot beat, all measured in the same process run.
 *
 * One server (`startServer`, a temp SQLite file by default, or the `db` given: a
 * `postgres://` URL), 127.0.0.1, port 0, its background services on with their
 * defaults but lazarus's timeout (an hour: claimed runs that no process starts must stay
 * claimed). The bench process holds the server, the agents and a live-feed
 * subscription; only the flow-run processes are children. Phases, in this order:
 *
 * 1. Floors: an HTTP GET round trip (`/api/health`, fetch as BackendClient uses it), a
 *    create-flow-run POST (BackendClient), `node -e 0` spawn → exit, and
 *    `node bin/weft.js --version` spawn → exit (Node plus tsx's loader plus the CLI's
 *    entry: the least a flow-run process costs).
 * 2. Claims: runs of a flow that no LocalAgent takes (its label is held only by the
 *    claimer) are created, then one registered agent claims them in batches
 *    (`claimFlowRuns`, as an agent's poll does) until none is left: claims/s, and the
 *    latency of one claim request. No process is started.
 * 3. One run end to end: a LocalAgent (polling every `pollMs`) and one no-op run at a
 *    time. Times come from the server's state history (created = Scheduled, Submitted =
 *    claimed, Running = the process took it, Success) and the agent (process spawned,
 *    process exited), all on this machine's one clock. Then the same with a LocalAgent
 *    keeping `standby` processes started ahead (each run created once one is ready; the
 *    "spawned" time is the hand-over), rows marked `[standby N]`.
 * 4. Drain: `drainN` no-op runs created first, then 1 (or 2, ...) LocalAgents started,
 *    each with at most `maxRuns` flow-run processes at once; wall time from the agents'
 *    start to the last run's Success (and to the last process exit), runs/s.
 *
 * Every wait is bounded; every child is tracked by PID and killed at the end if it
 * still runs. A run that does not end Success fails the benchmark.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { LocalAgent, WEFT_BIN, type LocalAgentOptions } from '../../src/agent/local.ts';
import { executorSettings, graphSummary, parameterInfo } from '../../src/cli/deploy.ts';
import { loadFlow } from '../../src/cli/load.ts';
import { BackendClient } from '../../src/server/client.ts';
import { startServer, type RunningServer } from '../../src/server/index.ts';
import { FINAL_FLOW_RUN_STATES, type ClaimedRun, type FlowRun, type FlowRunState, type FlowVersion } from '../../src/server/model.ts';
import { LocalStorage } from '../../src/storage/index.ts';
import { median, mulberry32 } from '../stats.ts';
import type { DeployBenchOptions } from './options.ts';

export { DEPLOY_DEFAULTS, DEPLOY_QUICK, type DeployBenchOptions } from './options.ts';

export type DeployGroup = 'floor' | 'server' | 'flow run' | 'drain';

/** One row of the table and of the JSON (`"deploy"`). Times in ms. */
export interface DeployRow {
  readonly group: DeployGroup;
  readonly name: string;
  /** Items per run: requests, spawns, flow runs; for drains, the runs drained. */
  readonly n: number;
  /** Timed runs (after the warm-up). */
  readonly runs: number;
  /** Median over every item of every run (drain: over the runs' wall times). */
  readonly median_ms: number;
  /** 90th percentile (nearest rank) over the same items; null for drains. */
  readonly p90_ms: number | null;
  /** Requests/s, claims/s or runs/s (median over the runs); null where it means nothing. */
  readonly per_s: number | null;
  /**
   * median ÷ the `weft --version` spawn floor measured next to it: flow-run rows against
   * a spawn right before each run, drains against 3 right before the drain (the load of
   * a shared machine moves between phases; a floor measured beside the row moves with it).
   */
  readonly ratio_vs_spawn: number | null;
  /** That floor (median ms); null where no ratio is taken. */
  readonly spawn_floor_ms: number | null;
  /**
   * CPU ms per item of the processes the row started (Linux: this process's reaped
   * children's user + system time from /proc/self/stat, 10 ms ticks); null where none
   * or not measurable. Unlike wall time it hardly moves with the machine's load.
   */
  readonly child_cpu_ms: number | null;
  /** CPU ms per item of this process (server, agents and the driver: `process.cpuUsage`). */
  readonly host_cpu_ms: number | null;
  /** Each run's median (drain: each run's wall time), in ms. */
  readonly run_medians_ms: readonly number[];
  readonly extra?: Readonly<Record<string, number>>;
}

export interface DeployBenchResult {
  readonly rows: DeployRow[];
  readonly settings: {
    readonly db: string;
    readonly runs: number;
    readonly drain_n: number;
    readonly drain_runs: number;
    readonly max_runs: number;
    readonly poll_ms: number;
    readonly http_n: number;
    readonly claim_n: number;
    readonly standby: number;
  };
  /** PIDs of every process the benchmark started (all exited or killed when it returns). */
  readonly pids: readonly number[];
}

const PROJECT = 'weft-bench';
const NOOP_FILE = fileURLToPath(new URL('./noop-flow.ts', import.meta.url));
const NOOP_FLOW = 'weft-bench-noop';
/** The flow of the floors' POSTs and the claims: its runs carry a label no LocalAgent holds. */
const CLAIM_FLOW = 'weft-bench-claim';
const CLAIM_LABEL = 'weft-bench:claims-only';
/** Runs created in parallel at most (as many requests in flight). */
const CREATE_CONCURRENCY = 25;
const SPAWN_TIMEOUT_MS = 30_000;
const ONE_RUN_TIMEOUT_MS = 60_000;
/** Longer than any benchmark: see startServer below. */
const LAZARUS_TIMEOUT_MS = 3_600_000;

/** Nearest-rank percentile (p in [0, 1]) of a non-empty list. */
export function percentile(xs: readonly number[], p: number): number {
  if (xs.length === 0) throw new RangeError('percentile of an empty list');
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length, Math.max(1, Math.ceil(p * s.length))) - 1]!;
}

/** Resolves waits when what they wait for became true (fed by the live feed and the agents). */
class Watch {
  private readonly checks = new Set<() => void>();

  notify(): void {
    for (const c of [...this.checks]) c();
  }

  until(what: string, test: () => boolean, timeoutMs: number): Promise<void> {
    if (test()) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (!test()) return;
        done();
        resolve();
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
      }, timeoutMs);
      const done = (): void => {
        clearTimeout(timer);
        this.checks.delete(check);
      };
      this.checks.add(check);
    });
  }
}

/** A LocalAgent that notes when it spawned each run's process and when that process exited. */
class TimedLocalAgent extends LocalAgent {
  /** Run id → when the process was spawned (ms since the epoch) and its PID. */
  readonly spawned = new Map<string, { at: number; pid: number | undefined }>();
  /** Run id → when its process closed. */
  readonly exited = new Map<string, number>();

  constructor(
    opts: LocalAgentOptions,
    private readonly hooks: { spawned(pid: number | undefined): void; exited(pid: number | undefined): void },
  ) {
    super(opts);
  }

  protected override async deploy(claimed: ClaimedRun): Promise<void> {
    await super.deploy(claimed);
    let pid: number | undefined;
    for (const [p, id] of this.processes) if (id === claimed.run.id) pid = p;
    this.spawned.set(claimed.run.id, { at: Date.now(), pid });
    this.hooks.spawned(pid);
  }

  // LocalAgent wakes its poll when one of its processes closed: that is the exit to note.
  protected override wake(): void {
    const now = Date.now();
    const live = new Set(this.processes.values());
    for (const [id, { pid }] of this.spawned) {
      if (live.has(id) || this.exited.has(id)) continue;
      this.exited.set(id, now);
      this.hooks.exited(pid);
    }
    super.wake();
  }
}

interface Ctx {
  readonly o: DeployBenchOptions;
  readonly srv: RunningServer;
  readonly api: BackendClient;
  readonly dir: string;
  readonly watch: Watch;
  /** Runs seen final on the live feed, by id. */
  readonly final: Map<string, FlowRun>;
  /** Every PID started (reported), and those not seen to exit yet (the only ones killed at the end). */
  readonly pids: Set<number>;
  readonly live: Set<number>;
  readonly log: (line: string) => void;
}

export async function benchDeploy(opts: DeployBenchOptions): Promise<DeployBenchResult> {
  const o = opts;
  for (const [k, v] of [['runs', o.runs], ['drainN', o.drainN], ['drainRuns', o.drainRuns], ['maxRuns', o.maxRuns], ['pollMs', o.pollMs], ['httpN', o.httpN], ['claimN', o.claimN]] as const) {
    if (!Number.isSafeInteger(v) || v < 1) throw new RangeError(`deploy bench: ${k} must be an integer >= 1 (got ${v})`);
  }
  const standby = o.standby ?? 0;
  if (!Number.isSafeInteger(standby) || standby < 0) throw new RangeError(`deploy bench: standby must be an integer >= 0 (got ${standby})`);
  const log = o.log ?? (() => undefined);
  const dir = mkdtempSync(join(tmpdir(), 'weft-bench-deploy-'));
  const db = o.db ?? `sqlite:${join(dir, 'server.db')}`;
  const pids = new Set<number>();
  const live = new Set<number>();
  let srv: RunningServer | null = null;
  let unsubscribe: (() => void) | null = null;
  try {
    // Lazarus hands a run that stayed Submitted for its timeout back to Scheduled: the claims
    // phase leaves hundreds so, on purpose (no process starts them), which must stay claimed.
    srv = await startServer({ db, host: '127.0.0.1', port: 0, lazarusTimeoutMs: LAZARUS_TIMEOUT_MS });
    const api = new BackendClient(srv.url);
    const watch = new Watch();
    const final = new Map<string, FlowRun>();
    let feedClosed = false;
    unsubscribe = await api.subscribe(
      (e) => {
        if (e.type !== 'flowRun' || !FINAL_FLOW_RUN_STATES.includes(e.run.state)) return;
        final.set(e.run.id, e.run);
        watch.notify();
      },
      {
        onClose: () => {
          feedClosed = true;
        },
      },
    );
    const ctx: Ctx = { o, srv, api, dir, watch, final, pids, live, log };
    await registerFlows(ctx);
    log(`server ${srv.url} (${db.startsWith('sqlite:') ? 'SQLite' : 'PostgreSQL'}); floors (1 warm-up + ${o.runs} runs)`);
    const rows: DeployRow[] = [];
    rows.push(...(await floors(ctx)));
    for (const batch of o.claimBatches) {
      log(`claims in batches of ${batch} (${o.claimN} runs, 1 warm-up + ${o.runs} runs)`);
      rows.push(await claims(ctx, batch));
    }
    log(`one no-op run at a time through a LocalAgent (poll ${o.pollMs} ms; 1 warm-up + ${o.runs} runs)`);
    rows.push(...(await oneRun(ctx, 0)));
    if (standby > 0) {
      log(`one no-op run at a time through a LocalAgent with ${standby} standby process(es) (1 warm-up + ${o.runs} runs)`);
      rows.push(...(await oneRun(ctx, standby)));
    }
    for (const k of o.agents) {
      log(`drain ${o.drainN} runs with ${k} agent${k === 1 ? '' : 's'} × ${o.maxRuns} processes (${o.drainRuns} run${o.drainRuns === 1 ? '' : 's'})`);
      rows.push(await drain(ctx, k));
    }
    if (feedClosed) throw new Error('the live feed closed during the benchmark');
    return {
      rows,
      settings: { db: db.startsWith('sqlite:') ? 'sqlite' : 'postgres', runs: o.runs, drain_n: o.drainN, drain_runs: o.drainRuns, max_runs: o.maxRuns, poll_ms: o.pollMs, http_n: o.httpN, claim_n: o.claimN, standby },
      pids: [...pids],
    };
  } finally {
    unsubscribe?.();
    // Only processes not seen to exit: a PID seen to exit may belong to someone else by now.
    for (const pid of live) killQuietly(pid);
    await srv?.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- set-up -----------------------------------------------------------------------

/** The no-op flow, registered as `weft register` does (local storage), and the claims-only flow. */
async function registerFlows(ctx: Ctx): Promise<{ noop: FlowVersion; claim: FlowVersion }> {
  const loaded = await loadFlow(NOOP_FILE);
  const spec = loaded.flow.spec();
  const storage = new LocalStorage();
  const ref = await storage.build({ flowFile: loaded.path, flowName: loaded.flow.name, backend: ctx.api });
  const base = {
    project: PROJECT,
    graph: graphSummary(spec),
    storage: ref,
    runConfig: { kind: 'local' as const },
    executor: executorSettings(undefined),
    parameters: parameterInfo(spec),
  };
  const noop = (await ctx.api.registerFlow({ ...base, name: NOOP_FLOW, labels: [...storage.labels(ref)] })).version;
  const claim = (await ctx.api.registerFlow({ ...base, name: CLAIM_FLOW, labels: [CLAIM_LABEL] })).version;
  return { noop, claim };
}

/** `n` runs of `flowName`, CREATE_CONCURRENCY requests in flight. */
async function createRuns(ctx: Ctx, flowName: string, n: number): Promise<FlowRun[]> {
  const out: FlowRun[] = [];
  for (let i = 0; i < n; i += CREATE_CONCURRENCY) {
    const k = Math.min(CREATE_CONCURRENCY, n - i);
    out.push(...(await Promise.all(Array.from({ length: k }, () => ctx.api.createFlowRun({ project: PROJECT, flowName })))));
  }
  return out;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * CPU ms used so far by this process's children that have exited and been reaped
 * (cutime + cstime of /proc/self/stat, in USER_HZ = 100 ticks); null off Linux.
 */
export function childrenCpuMs(): number | null {
  try {
    const stat = readFileSync('/proc/self/stat', 'utf8');
    // After "pid (comm) ": field 3 (state) is index 0, so cutime (16) and cstime (17) are 13 and 14.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(f[13]) + Number(f[14]);
    return Number.isFinite(ticks) ? ticks * 10 : null;
  } catch {
    return null;
  }
}

/** CPU ms of this process so far. */
function hostCpuMs(): number {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
}

/** Per-item CPU between two readings (null when either is). */
function perItem(a: number | null, b: number | null, items: number): number | null {
  return a === null || b === null || items <= 0 ? null : (b - a) / items;
}

function killQuietly(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // already gone
  }
}

function latencyRow(group: DeployGroup, name: string, perRun: readonly (readonly number[])[], extra: Partial<DeployRow> = {}): DeployRow {
  const all = perRun.flat();
  const med = median(all);
  return {
    group,
    name,
    n: perRun[0]?.length ?? 0,
    runs: perRun.length,
    median_ms: med,
    p90_ms: percentile(all, 0.9),
    per_s: 1000 / med,
    ratio_vs_spawn: null,
    spawn_floor_ms: null,
    child_cpu_ms: null,
    host_cpu_ms: null,
    run_medians_ms: perRun.map((r) => median(r)),
    ...extra,
  };
}

// ---- 1. floors ----------------------------------------------------------------------

export const HTTP_GET = 'HTTP GET /api/health';
export const HTTP_CREATE = 'POST create flow run';
export const SPAWN_NODE = 'spawn node -e 0 → exit';
export const SPAWN_WEFT = 'spawn weft --version → exit';

async function floors(ctx: Ctx): Promise<DeployRow[]> {
  const { o, srv, api } = ctx;
  const get = await repeat(o.runs, async () => {
    const t: number[] = [];
    for (let i = 0; i < o.httpN; i++) {
      const t0 = performance.now();
      const res = await fetch(`${srv.url}/api/health`);
      await res.json();
      t.push(performance.now() - t0);
      if (!res.ok) throw new Error(`GET /api/health answered ${res.status}`);
    }
    return t;
  });
  const post = await repeat(o.runs, async () => {
    const t: number[] = [];
    for (let i = 0; i < o.httpN; i++) {
      const t0 = performance.now();
      await api.createFlowRun({ project: PROJECT, flowName: CLAIM_FLOW });
      t.push(performance.now() - t0);
    }
    return t;
  });
  const spawns = async (args: readonly string[]): Promise<{ times: number[][]; cpu: number | null }> => {
    await spawnToExit(ctx, args);
    const c0 = childrenCpuMs();
    const times: number[][] = [];
    for (let i = 0; i < o.runs; i++) times.push([await spawnToExit(ctx, args)]);
    return { times, cpu: perItem(c0, childrenCpuMs(), o.runs) };
  };
  const node = await spawns(['-e', '0']);
  const weft = await spawns([WEFT_BIN, '--version']);
  return [
    latencyRow('floor', HTTP_GET, get),
    latencyRow('floor', HTTP_CREATE, post),
    latencyRow('floor', SPAWN_NODE, node.times, { child_cpu_ms: node.cpu }),
    latencyRow('floor', SPAWN_WEFT, weft.times, { child_cpu_ms: weft.cpu }),
  ];
}

/** One untimed warm-up call, then `runs` calls; each answers its items' times. */
async function repeat(runs: number, fn: () => Promise<number[]>): Promise<number[][]> {
  await fn();
  const out: number[][] = [];
  for (let i = 0; i < runs; i++) out.push(await fn());
  return out;
}

/** ms from spawn() to the child's exit (exit code 0 required). */
function spawnToExit(ctx: Ctx, args: readonly string[]): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(process.execPath, args, { cwd: ctx.dir, stdio: 'ignore' });
    const pid = child.pid;
    if (pid !== undefined) {
      ctx.pids.add(pid);
      ctx.live.add(pid);
    }
    const timer = setTimeout(() => {
      if (child.pid !== undefined) killQuietly(child.pid);
      reject(new Error(`node ${args.join(' ')} did not exit within ${SPAWN_TIMEOUT_MS} ms`));
    }, SPAWN_TIMEOUT_MS);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('exit', (code) => {
      const dt = performance.now() - t0;
      clearTimeout(timer);
      if (pid !== undefined) ctx.live.delete(pid);
      if (code === 0) resolve(dt);
      else reject(new Error(`node ${args.join(' ')} exited with code ${code ?? 'null'}`));
    });
  });
}

// ---- 2. claims ----------------------------------------------------------------------

async function claims(ctx: Ctx, batch: number): Promise<DeployRow> {
  const { o, api } = ctx;
  const agent = await api.registerAgent({ name: 'weft-bench-claimer', kind: 'local', labels: [CLAIM_LABEL] });
  const claimAll = async (times: number[] | null): Promise<number> => {
    let got = 0;
    // Bounded: one claim per batch of every run there can be, plus the empty last one.
    const maxClaims = Math.ceil((o.claimN + o.httpN * (o.runs + 1)) / batch) + 2;
    for (let i = 0; i < maxClaims; i++) {
      const t0 = performance.now();
      const c = await api.claimFlowRuns({ agentId: agent.id, labels: [CLAIM_LABEL], kind: 'local', before: Date.now() + 10_000, limit: batch });
      times?.push(performance.now() - t0);
      got += c.length;
      if (c.length === 0) return got;
    }
    throw new Error(`claims: still finding runs after ${maxClaims} claims`);
  };
  const perRun: number[][] = [];
  const rates: number[] = [];
  for (let i = -1; i < o.runs; i++) {
    await claimAll(null); // what earlier phases left Scheduled
    await createRuns(ctx, CLAIM_FLOW, o.claimN);
    const times: number[] = [];
    const t0 = performance.now();
    const got = await claimAll(times);
    const wall = (performance.now() - t0) / 1000;
    if (got !== o.claimN) throw new Error(`claims: claimed ${got} runs, created ${o.claimN}`);
    if (i >= 0) {
      perRun.push(times);
      rates.push(got / wall);
    }
  }
  return { ...latencyRow('server', `claim, batches of ${batch} (1 agent)`, perRun), n: o.claimN, per_s: median(rates) };
}

// ---- 3. one run end to end ----------------------------------------------------------

export const ONE_RUN_ROWS = {
  submitted: 'created → Submitted (claimed)',
  spawned: 'created → process spawned',
  running: 'created → Running',
  success: 'created → Success',
  exited: 'created → process exited',
  work: 'Running → Success (in the process)',
} as const;

function agentOptions(ctx: Ctx, name: string, extra: Partial<LocalAgentOptions> = {}): LocalAgentOptions {
  return {
    backend: new BackendClient(ctx.srv.url),
    serverUrl: ctx.srv.url,
    name,
    cwd: ctx.dir,
    resultDir: join(ctx.dir, 'results'),
    maxRuns: ctx.o.maxRuns,
    pollMinMs: ctx.o.pollMs,
    pollMaxMs: ctx.o.pollMs,
    ...extra,
  };
}

function newAgent(ctx: Ctx, name: string, extra: Partial<LocalAgentOptions> = {}): TimedLocalAgent {
  return new TimedLocalAgent(agentOptions(ctx, name, extra), {
    spawned: (pid) => {
      if (pid !== undefined) {
        ctx.pids.add(pid);
        ctx.live.add(pid);
      }
      ctx.watch.notify();
    },
    exited: (pid) => {
      if (pid !== undefined) ctx.live.delete(pid);
      ctx.watch.notify();
    },
  });
}

async function historyTimes(ctx: Ctx, id: string): Promise<Partial<Record<FlowRunState, number>>> {
  const out: Partial<Record<FlowRunState, number>> = {};
  for (const h of await ctx.api.getFlowRunHistory(id)) out[h.state] ??= h.at;
  return out;
}

function mustSucceed(ctx: Ctx, ids: readonly string[]): void {
  for (const id of ids) {
    const r = ctx.final.get(id);
    if (r?.state !== 'Success') throw new Error(`run ${id} ended ${r?.state ?? '?'}${r?.message ? `: ${r.message}` : ''}`);
  }
}

/** The one-run rows' names of an agent with `standby` standby processes (0: none, the plain names). */
export function oneRunName(k: keyof typeof ONE_RUN_ROWS, standby: number): string {
  return standby === 0 ? ONE_RUN_ROWS[k] : `${ONE_RUN_ROWS[k]} [standby ${standby}]`;
}

/** Wait (bounded) until the agent has a ready standby; its PIDs join the benchmark's. */
async function readyStandby(ctx: Ctx, agent: LocalAgent): Promise<void> {
  const end = Date.now() + SPAWN_TIMEOUT_MS;
  for (;;) {
    let ready = false;
    for (const [pid, r] of agent.standbys) {
      ctx.pids.add(pid);
      ctx.live.add(pid);
      ready ||= r;
    }
    if (ready) return;
    if (Date.now() > end) throw new Error(`no standby process ready within ${SPAWN_TIMEOUT_MS} ms`);
    await sleep(5);
  }
}

async function oneRun(ctx: Ctx, standby: number): Promise<DeployRow[]> {
  const { o } = ctx;
  const nodeArgs = o.cpuProfDir !== undefined && standby === 0 ? ['--cpu-prof', `--cpu-prof-dir=${o.cpuProfDir}`] : [];
  const agent = newAgent(ctx, standby === 0 ? 'weft-bench-one' : 'weft-bench-one-standby', { ...(nodeArgs.length > 0 ? { nodeArgs } : {}), ...(standby > 0 ? { standby } : {}) });
  const phases: Record<keyof typeof ONE_RUN_ROWS, number[]> = { submitted: [], spawned: [], running: [], success: [], exited: [], work: [] };
  const floors: number[] = [];
  let childCpu: number | null = 0;
  let hostCpu = 0;
  await agent.start();
  try {
    const rand = mulberry32(7);
    for (let i = -1; i < o.runs; i++) {
      // The floor beside this run: the machine's load now, not at the start of the bench.
      const floor = await spawnToExit(ctx, [WEFT_BIN, '--version']);
      if (standby > 0) await readyStandby(ctx, agent);
      // The agent polls as soon as a process exits (room freed), then every pollMs: a run
      // created right after the last one ended would always wait a whole interval. A
      // random phase makes created → Submitted what a run created at any time waits.
      await sleep(o.pollMs * (1 + rand()));
      const c0 = childrenCpuMs();
      const h0 = hostCpuMs();
      const run = await ctx.api.createFlowRun({ project: PROJECT, flowName: NOOP_FLOW });
      await ctx.watch.until(`run ${run.id} to finish and its process to exit`, () => ctx.final.has(run.id) && agent.exited.has(run.id), ONE_RUN_TIMEOUT_MS);
      const c1 = childrenCpuMs();
      const h1 = hostCpuMs();
      mustSucceed(ctx, [run.id]);
      const h = await historyTimes(ctx, run.id);
      const created = h.Scheduled!;
      if (i < 0) continue;
      floors.push(floor);
      childCpu = childCpu === null || c0 === null || c1 === null ? null : childCpu + c1 - c0;
      hostCpu += h1 - h0;
      phases.submitted.push(h.Submitted! - created);
      phases.spawned.push(agent.spawned.get(run.id)!.at - created);
      phases.running.push(h.Running! - created);
      phases.success.push(h.Success! - created);
      phases.exited.push(agent.exited.get(run.id)! - created);
      phases.work.push(h.Success! - h.Running!);
    }
  } finally {
    const standbys = [...agent.standbys.keys()];
    await agent.stop({ stopRuns: true });
    // stop() waited for its standbys to exit.
    for (const pid of standbys) ctx.live.delete(pid);
  }
  return (Object.keys(ONE_RUN_ROWS) as (keyof typeof ONE_RUN_ROWS)[]).map((k) => {
    const r = latencyRow('flow run', oneRunName(k, standby), phases[k].map((x) => [x]));
    const floor = median(floors);
    // The process's CPU belongs to the whole run: given on the end-to-end rows.
    const whole = k === 'success' || k === 'exited';
    return {
      ...r,
      n: 1,
      per_s: null,
      ratio_vs_spawn: k === 'submitted' ? null : r.median_ms / floor,
      spawn_floor_ms: k === 'submitted' ? null : floor,
      child_cpu_ms: whole && childCpu !== null ? childCpu / o.runs : null,
      host_cpu_ms: whole ? hostCpu / o.runs : null,
    };
  });
}

// ---- 4. drain -----------------------------------------------------------------------

async function drain(ctx: Ctx, agents: number): Promise<DeployRow> {
  const { o } = ctx;
  const walls: number[] = [];
  const exits: number[] = [];
  const perRun: number[] = [];
  const floors: number[] = [];
  let childCpu: number | null = 0;
  let hostCpu = 0;
  // Bounded, generously: a run costs ~0.5 s of CPU, but a shared machine can be 10x slower.
  const timeoutMs = 60_000 + (o.drainN * 10_000) / Math.max(1, Math.min(agents * o.maxRuns, 2));
  for (let i = 0; i < o.drainRuns; i++) {
    const runs = await createRuns(ctx, NOOP_FLOW, o.drainN);
    const ids = runs.map((r) => r.id);
    for (let k = 0; k < 3; k++) floors.push(await spawnToExit(ctx, [WEFT_BIN, '--version']));
    const c0 = childrenCpuMs();
    const h0 = hostCpuMs();
    const fleet = Array.from({ length: agents }, (_, k) => newAgent(ctx, `weft-bench-drain-${k}`));
    const t0 = Date.now();
    try {
      await Promise.all(fleet.map((a) => a.start()));
      const exited = (): number => fleet.reduce((s, a) => s + a.exited.size, 0);
      await ctx.watch.until(`${o.drainN} runs to finish with ${agents} agent(s)`, () => ids.every((id) => ctx.final.has(id)) && exited() >= o.drainN, timeoutMs);
    } finally {
      await Promise.all(fleet.map((a) => a.stop({ stopRuns: true })));
    }
    const c1 = childrenCpuMs();
    childCpu = childCpu === null || c0 === null || c1 === null ? null : childCpu + c1 - c0;
    hostCpu += hostCpuMs() - h0;
    mustSucceed(ctx, ids);
    const lastSuccess = Math.max(...ids.map((id) => ctx.final.get(id)!.endedAt ?? NaN));
    const lastExit = Math.max(...fleet.flatMap((a) => [...a.exited.values()]));
    walls.push(lastSuccess - t0);
    exits.push(lastExit - t0);
    perRun.push(...ids.map((id) => (ctx.final.get(id)!.endedAt ?? NaN) - (ctx.final.get(id)!.startedAt ?? NaN)));
    const byAgent = fleet.map((a) => a.runsStarted);
    ctx.log(`  drain ${i + 1}/${o.drainRuns}: ${((lastSuccess - t0) / 1000).toFixed(2)} s to the last Success, runs per agent ${byAgent.join('/')}`);
  }
  const wall = median(walls);
  const floor = median(floors);
  const items = o.drainN * o.drainRuns;
  return {
    group: 'drain',
    name: `drain ${o.drainN} runs, ${agents} agent${agents === 1 ? '' : 's'} × ${o.maxRuns} processes`,
    n: o.drainN,
    runs: o.drainRuns,
    median_ms: wall,
    p90_ms: null,
    per_s: median(walls.map((w) => (o.drainN * 1000) / w)),
    ratio_vs_spawn: wall / o.drainN / floor,
    spawn_floor_ms: floor,
    child_cpu_ms: childCpu === null ? null : childCpu / items,
    host_cpu_ms: hostCpu / items,
    run_medians_ms: walls,
    extra: { to_last_exit_ms: median(exits), running_to_success_median_ms: median(perRun), slots: agents * o.maxRuns },
  };
}
