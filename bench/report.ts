/**
 * What the harness prints and writes: text tables and the JSON documents.
 *
 * JSON of a shape benchmark (extra fields allowed, these are guaranteed):
 *   { "results":   [{ "shape", "n", "executor", "workers", "median_s", "us_per_task", "tasks_per_s" }],
 *     "baselines": [{ "name", "n", "median_s", "us_per_task" }] }
 * JSON of a replay: one `{ "graph", "tasks", "makespan_s", "lower_bound_s", "ratio" }`
 * object when one file ran on one executor, else an array of them (one per file and
 * executor, files in name order).
 */
import { cpus } from 'node:os';
import { REFERENCE_BASELINE, type BaselineResult } from './baselines.ts';
import type { ClusterShapeExtras, LatencyResult, SchedulerSimResult } from './cluster.ts';
import type { ReplayResult, ShapeResult } from './harness.ts';
import { fmt, table } from './stats.ts';

export interface BenchEnvironment {
  readonly node: string;
  readonly platform: string;
  readonly cpus: number;
  readonly cpu_model: string;
  readonly date: string;
}

export function environment(): BenchEnvironment {
  const c = cpus();
  return {
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
    cpus: c.length,
    cpu_model: c[0]?.model ?? 'unknown',
    date: new Date().toISOString(),
  };
}

export interface BenchDocument {
  readonly results: readonly ShapeResult[];
  readonly baselines: readonly BaselineResult[];
  readonly environment?: BenchEnvironment;
  readonly runs?: number;
}

/** The JSON document of a shape benchmark (keys in the documented order first). */
export function benchJson(results: readonly ShapeResult[], baselines: readonly BaselineResult[], extra: Partial<BenchDocument> = {}): BenchDocument {
  return { results, baselines, ...extra };
}

/** One object for a single replay, else an array. */
export function replayJson(results: readonly ReplayResult[]): ReplayResult | readonly ReplayResult[] {
  return results.length === 1 ? results[0]! : results;
}

export function referenceUsPerTask(baselines: readonly BaselineResult[]): number | undefined {
  return baselines.find((b) => b.name === REFERENCE_BASELINE)?.us_per_task;
}

function ratio(us: number, ref: number | undefined): string {
  return ref !== undefined && ref > 0 ? `${fmt(us / ref)}x` : '-';
}

export function baselineTable(baselines: readonly BaselineResult[]): string {
  const ref = referenceUsPerTask(baselines);
  return table(
    ['baseline', 'n', 'workers', 'median s', 'µs/task', 'tasks/s', 'ratio vs postMessage'],
    baselines.map((b) => [
      b.name + (b.batch !== undefined && b.batch > 1 ? ` (batch ${b.batch})` : ''),
      String(b.n),
      String(b.workers),
      fmt(b.median_s),
      fmt(b.us_per_task),
      fmt(b.n / b.median_s),
      ratio(b.us_per_task, ref),
    ]),
  );
}

export function shapeTable(results: readonly ShapeResult[], baselines: readonly BaselineResult[]): string {
  const ref = referenceUsPerTask(baselines);
  return table(
    ['shape', 'n', 'tasks', 'executor', 'workers', 'median s', 'µs/task', 'tasks/s', 'ratio vs postMessage', 'start-up s', 'net µs/task'],
    results.map((r) => [
      r.shape,
      String(r.n),
      String(r.tasks),
      r.executor,
      String(r.workers),
      fmt(r.median_s),
      fmt(r.us_per_task),
      fmt(r.tasks_per_s),
      ratio(r.us_per_task, ref),
      r.startup_s === undefined ? '-' : fmt(r.startup_s),
      r.net_us_per_task === undefined ? '-' : fmt(r.net_us_per_task),
    ]),
  );
}

export function replayTable(results: readonly ReplayResult[]): string {
  return table(
    ['graph', 'tasks', 'executor', 'workers', 'priority', 'critical path s', 'work s', 'lower bound s', 'makespan s', 'ratio', 'first start→last end', 'ratio'],
    results.map((r) => [
      r.graph,
      String(r.tasks),
      r.executor,
      String(r.workers),
      r.priority,
      fmt(r.critical_path_s),
      fmt(r.total_work_s),
      fmt(r.lower_bound_s),
      fmt(r.makespan_s),
      `${fmt(r.ratio)}x`,
      r.makespan_tasks_s > 0 ? fmt(r.makespan_tasks_s) : '-',
      r.makespan_tasks_s > 0 ? `${fmt(r.ratio_tasks)}x` : '-',
    ]),
  );
}

// ---- cluster (bench/cluster.ts) ------------------------------------------------------

/** Targets as the cluster tables print them (kept here so this module loads without the cluster). */
export interface ClusterTargets {
  readonly usPerTask: Readonly<Record<string, number>>;
  /** The size a shape's target is stated for: a smaller run of it gets no verdict. */
  readonly minN?: Readonly<Record<string, number>>;
  readonly latencyMedianUs: number;
  readonly assignmentsPerS: number;
}

function met(ok: boolean | undefined): string {
  return ok === undefined ? '-' : ok ? 'yes' : 'NO';
}

/**
 * Cluster rows of a shape run: µs/task against the ws+msgpackr baseline, bytes relayed
 * by the scheduler, and the target (judged on cluster-warm's µs/task and on cluster's
 * net µs/task, its start-up being process start-up).
 */
export function clusterTable(results: readonly (ShapeResult & ClusterShapeExtras)[], targets: ClusterTargets): string {
  return table(
    ['shape', 'n', 'tasks', 'executor', 'workers', 'µs/task', 'net µs/task', 'ratio vs ws', 'relayed B/run', 'target µs/task', 'met'],
    results.map((r) => {
      const target = r.n >= (targets.minN?.[r.shape] ?? 0) ? targets.usPerTask[r.shape] : undefined;
      // A fresh cluster is judged on its net µs/task (noise can make it ≤ 0 on small runs: no verdict then).
      const net = r.net_us_per_task;
      const judged = r.executor === 'cluster' ? (net !== undefined && net > 0 ? net : undefined) : r.us_per_task;
      return [
        r.shape,
        String(r.n),
        String(r.tasks),
        r.executor,
        String(r.workers),
        fmt(r.us_per_task),
        r.net_us_per_task === undefined ? '-' : fmt(r.net_us_per_task),
        r.ratio_vs_ws === undefined ? '-' : `${fmt(r.ratio_vs_ws)}x`,
        r.relayed_bytes_per_run === undefined ? '-' : fmt(r.relayed_bytes_per_run),
        target === undefined ? '-' : fmt(target),
        met(target === undefined || judged === undefined ? undefined : judged <= target),
      ];
    }),
  );
}

/**
 * One-task latency per executor, in round trips of the baselines: one ws round trip, one
 * postMessage round trip, and the relay (client → relay → echo → relay → client, the
 * four hops of a one-task cluster run with no work at each: that run's floor).
 */
export function latencyTable(rows: readonly LatencyResult[], baselines: readonly BaselineResult[], targets: ClusterTargets): string {
  const rt = (name: string): number | undefined => baselines.find((b) => b.name === name)?.us_per_task;
  const ws = rt('ws-msgpackr-roundtrip');
  const pm = rt('postmessage-roundtrip');
  const relay = rt('ws-msgpackr-relay');
  return table(
    ['executor', 'measures', 'workers', 'runs', 'median µs', 'p90 µs', 'p99 µs', 'min µs', 'ws round trips', 'postMessage round trips', 'relay floors', 'target µs', 'met'],
    rows.map((r) => {
      const cluster = r.executor.startsWith('cluster');
      return [
        r.executor,
        r.measures,
        String(r.workers),
        String(r.n),
        fmt(r.median_us),
        fmt(r.p90_us),
        fmt(r.p99_us),
        fmt(r.min_us),
        ws === undefined ? '-' : fmt(r.median_us / ws),
        pm === undefined ? '-' : fmt(r.median_us / pm),
        relay === undefined ? '-' : fmt(r.median_us / relay),
        cluster ? fmt(targets.latencyMedianUs) : '-',
        cluster ? met(r.median_us <= targets.latencyMedianUs) : '-',
      ];
    }),
  );
}

/** The scheduler driving simulated workers: assignments/s (scheduler side), end-to-end rate, heap per task. */
export function schedulerTable(rows: readonly SchedulerSimResult[], baselines: readonly BaselineResult[], targets: ClusterTargets): string {
  const ws = baselines.find((b) => b.name === 'ws-msgpackr-batched');
  const wsRate = ws === undefined ? undefined : ws.n / ws.median_s;
  return table(
    ['tasks', 'sim workers', 'credits', 'scheduler', 'assignments/s', 'vs ws msgs/s', 'end-to-end s', 'end-to-end tasks/s', 'heap B/task', 'target/s', 'met'],
    rows.map((r) => [
      String(r.tasks),
      String(r.sim_workers),
      String(r.credits),
      r.scheduler_process === 'child' ? 'own process' : 'this process',
      fmt(r.assignments_per_s),
      wsRate === undefined ? '-' : `${fmt(r.assignments_per_s / wsRate)}x`,
      fmt(r.median_s),
      fmt(r.tasks_per_s),
      fmt(r.heap_per_task_b),
      fmt(targets.assignmentsPerS),
      met(r.assignments_per_s >= targets.assignmentsPerS),
    ]),
  );
}
