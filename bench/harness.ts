/**
 * The benchmark harness: runs graphs through `runFlow` on each executor, one untimed
 * warm-up then R timed runs, and reports medians.
 *
 * All it needs from weft is `runFlow(spec, { executor, keepResults: false })`. Both the
 * run function and the executor factory are injectable, so the harness is testable (and
 * usable) before the runner lands. The timing is the wall clock around `runFlow`: it
 * includes the executor's start and shutdown (threads, module imports), since every run
 * starts its own executor — except `pool-warm`, one kept-alive pool that the warm-up run
 * starts and the timed runs reuse (closed after the case); `run_median_s` is the
 * runner's own `durationMs` for comparison.
 */
import type { Executor } from '../src/executor/types.ts';
import type { GraphSpec } from '../src/flow/spec.ts';
import type { FlowRunResult, RunOptions } from '../src/runner/types.ts';
import { createExecutor as defaultCreateExecutor, releaseExecutors, type ExecutorSettings } from './executors.ts';
import { analyzeWorkflow, graphName, loadWorkflow, lowerBoundS, replayGraph, type ReplayPriority, type Scaling } from './replay.ts';
import { independent, type BuiltShape } from './shapes.ts';
import { collectGarbage, median, usPer } from './stats.ts';

export type RunFlowFn = (spec: GraphSpec, opts?: RunOptions) => Promise<FlowRunResult>;
export type CreateExecutorFn = (name: string, settings: ExecutorSettings) => Promise<Executor>;

/** The lead's runner, loaded on first use. */
export async function loadRunFlow(): Promise<RunFlowFn> {
  const mod = await import('../src/runner/run.ts');
  return mod.runFlow;
}

export interface HarnessDeps {
  readonly runFlow: RunFlowFn;
  readonly createExecutor?: CreateExecutorFn;
  /** Progress lines ("running tree 16384 on pool..."); default: none. */
  readonly log?: (line: string) => void;
}

export interface ShapeResult {
  readonly shape: string;
  /** The shape's size parameter (tasks, chain length or leaves). */
  readonly n: number;
  readonly executor: string;
  readonly workers: number;
  readonly median_s: number;
  /** median_s / tasks, in µs (tasks = nodes in the graph, e.g. 2L-1 for a tree). */
  readonly us_per_task: number;
  readonly tasks_per_s: number;
  // Extra fields.
  readonly tasks: number;
  readonly runs: number;
  readonly samples_s: readonly number[];
  /** Median of the runner's own `durationMs` (may exclude executor start-up), seconds. */
  readonly run_median_s: number;
  /** us_per_task ÷ the raw batched postMessage baseline's µs/task (set by `withRatios`). */
  ratio_vs_postmessage?: number;
  /** Median seconds of a 1-task run on the same executor: its fixed start-up + shutdown cost (set by `withStartup`). */
  startup_s?: number;
  /** (median_s − startup_s) / tasks in µs: the per-task cost once the executor is up. */
  net_us_per_task?: number;
}

export class BenchRunError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BenchRunError';
  }
}

function checkSuccess(res: FlowRunResult, what: string): void {
  if (res.state !== 'Success') {
    const failed = res.tasks.find((t) => t.state !== 'Success');
    const why = failed === undefined ? '' : ` (task ${failed.key}: ${failed.state}${failed.error ? `: ${failed.error.message}` : ''})`;
    throw new BenchRunError(`${what}: flow ended ${res.state}: ${res.message}${why}`);
  }
}

/** One run with a fresh executor; returns [wall seconds, runner seconds, result]. */
async function timedRun(
  spec: GraphSpec,
  executorName: string,
  settings: ExecutorSettings,
  deps: HarnessDeps,
  keepResults: boolean,
): Promise<{ wallS: number; runS: number; res: FlowRunResult; executor: Executor }> {
  const executor = await (deps.createExecutor ?? defaultCreateExecutor)(executorName, settings);
  collectGarbage();
  const t0 = performance.now();
  const res = await deps.runFlow(spec, { executor, keepResults });
  const wallS = (performance.now() - t0) / 1000;
  return { wallS, runS: res.durationMs / 1000, res, executor };
}

type TimedRun = Awaited<ReturnType<typeof timedRun>>;

/**
 * One warm-up run (checked), then `runs` timed runs (each checked). `workers` is what
 * the executor reported on the last run.
 */
async function timedSeries(
  spec: GraphSpec,
  executorName: string,
  settings: ExecutorSettings,
  deps: HarnessDeps,
  runs: number,
  what: string,
  keepWarmResults: boolean,
): Promise<{ warm: TimedRun; timed: TimedRun[]; workers: number }> {
  const warm = await timedRun(spec, executorName, settings, deps, keepWarmResults);
  checkSuccess(warm.res, what);
  let workers = warm.executor.workers;
  const timed: TimedRun[] = [];
  for (let r = 0; r < runs; r++) {
    const t = await timedRun(spec, executorName, settings, deps, false);
    checkSuccess(t.res, what);
    workers = t.executor.workers;
    timed.push(t);
  }
  return { warm, timed, workers };
}

/**
 * Benchmarks one built shape on one executor. The warm-up run keeps results and checks
 * the sink's value against the shape's expectation (a wrong answer is not a benchmark).
 */
export async function benchShape(
  built: BuiltShape,
  executorName: string,
  settings: ExecutorSettings,
  runs: number,
  deps: HarnessDeps,
): Promise<ShapeResult> {
  try {
    return await shapeRuns(built, executorName, settings, runs, deps);
  } finally {
    // A warm pool (`pool-warm`) lives for one case: its start-up falls in the warm-up run.
    if (deps.createExecutor === undefined) await releaseExecutors();
  }
}

async function shapeRuns(
  built: BuiltShape,
  executorName: string,
  settings: ExecutorSettings,
  runs: number,
  deps: HarnessDeps,
): Promise<ShapeResult> {
  const what = `${built.shape} n=${built.n} on ${executorName}`;
  deps.log?.(`running ${what} (${built.tasks} tasks, 1 warm-up + ${runs} runs)`);
  const { warm, timed, workers } = await timedSeries(built.spec, executorName, settings, deps, runs, what, true);
  const sinks = built.spec.referenceTasks;
  if (built.expected !== undefined && sinks.length === 1) {
    const got = warm.res.result(sinks[0]!);
    if (got !== built.expected) throw new BenchRunError(`${what}: wrong result ${String(got)}, expected ${String(built.expected)}`);
  }
  const wall = timed.map((t) => t.wallS);
  const run = timed.map((t) => t.runS);
  const m = median(wall);
  return {
    shape: built.shape,
    n: built.n,
    executor: executorName,
    workers,
    median_s: m,
    us_per_task: usPer(m, built.tasks),
    tasks_per_s: built.tasks / m,
    tasks: built.tasks,
    runs,
    samples_s: wall,
    run_median_s: median(run),
  };
}

/** Fills `ratio_vs_postmessage` from the reference baseline's µs/task (when it was measured). */
export function withRatios<T extends { us_per_task: number; ratio_vs_postmessage?: number }>(
  results: T[],
  referenceUsPerTask: number | undefined,
): T[] {
  if (referenceUsPerTask === undefined || !(referenceUsPerTask > 0)) return results;
  for (const r of results) r.ratio_vs_postmessage = r.us_per_task / referenceUsPerTask;
  return results;
}

/**
 * The fixed cost of a run on an executor: the median of `runs` runs of a single no-op
 * task (after one warm-up), i.e. executor start-up, module import, shutdown.
 */
export async function measureStartup(
  executorName: string,
  settings: ExecutorSettings,
  runs: number,
  deps: HarnessDeps,
): Promise<number> {
  return (await benchShape(independent(1), executorName, settings, runs, { ...deps, log: undefined })).median_s;
}

/** Fills `startup_s` and `net_us_per_task` from a per-executor start-up median. */
export function withStartup(results: ShapeResult[], startupS: ReadonlyMap<string, number>): ShapeResult[] {
  for (const r of results) {
    const s = startupS.get(r.executor);
    if (s === undefined) continue;
    r.startup_s = s;
    r.net_us_per_task = usPer(r.median_s - s, r.tasks);
  }
  return results;
}

export interface ReplayResult {
  readonly graph: string;
  readonly tasks: number;
  /** Median wall clock of the run (includes executor start-up), seconds. */
  readonly makespan_s: number;
  /** max(critical path, total work / workers) × scale, seconds. */
  readonly lower_bound_s: number;
  /** makespan_s / lower_bound_s (≥ 1; 1 is a perfect schedule with no overhead). */
  readonly ratio: number;
  // Extra fields.
  readonly executor: string;
  readonly workers: number;
  readonly scale: number;
  readonly critical_path_s: number;
  readonly total_work_s: number;
  readonly edges: number;
  readonly depth: number;
  readonly runs: number;
  readonly samples_s: readonly number[];
  /** Median of (last task end − first task start) from the run's task records, seconds (0 when unknown). */
  readonly makespan_tasks_s: number;
  /** makespan_tasks_s / lower_bound_s: the schedule's quality without the executor's start-up. */
  readonly ratio_tasks: number;
  /** Ready-task priorities used: the trace's critical-path (upward) ranks, or none. */
  readonly priority: ReplayPriority;
}

/** Last end − first start over the records of tasks that ran, seconds; 0 when no record has times. */
export function taskSpanS(res: FlowRunResult): number {
  let first = Infinity;
  let last = -Infinity;
  for (const t of res.tasks) {
    if (t.startMs > 0 && t.startMs < first) first = t.startMs;
    if (t.endMs > 0 && t.endMs > last) last = t.endMs;
  }
  return last > first ? (last - first) / 1000 : 0;
}

/** Replays one trace file on one executor: one warm-up, `runs` timed runs, medians. */
export async function benchReplay(
  file: string,
  executorName: string,
  settings: ExecutorSettings,
  scaling: Scaling,
  runs: number,
  deps: HarnessDeps,
  priority: ReplayPriority = 'critical-path',
): Promise<ReplayResult> {
  try {
    return await replayRuns(file, executorName, settings, scaling, runs, deps, priority);
  } finally {
    if (deps.createExecutor === undefined) await releaseExecutors();
  }
}

async function replayRuns(
  file: string,
  executorName: string,
  settings: ExecutorSettings,
  scaling: Scaling,
  runs: number,
  deps: HarnessDeps,
  priority: ReplayPriority,
): Promise<ReplayResult> {
  const wf = loadWorkflow(file);
  const analysis = analyzeWorkflow(wf);
  const g = replayGraph(wf, scaling, analysis, { priority });
  const name = graphName(file);
  const what = `replay ${name} on ${executorName}`;
  deps.log?.(`running ${what} (${analysis.tasks} tasks, total work ${g.totalWorkS.toFixed(3)} s, 1 warm-up + ${runs} runs)`);
  const { timed, workers } = await timedSeries(g.spec, executorName, settings, deps, runs, what, false);
  const wall = timed.map((t) => t.wallS);
  const spans = timed.map((t) => taskSpanS(t.res));
  const lb = lowerBoundS(analysis, workers, g.scale);
  const makespan = median(wall);
  const span = median(spans);
  return {
    graph: name,
    tasks: analysis.tasks,
    makespan_s: makespan,
    lower_bound_s: lb,
    ratio: makespan / lb,
    executor: executorName,
    workers,
    scale: g.scale,
    critical_path_s: g.criticalPathS,
    total_work_s: g.totalWorkS,
    edges: analysis.edges,
    depth: analysis.depth,
    runs,
    samples_s: wall,
    makespan_tasks_s: span,
    ratio_tasks: span / lb,
    priority,
  };
}
