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
