/**
 * Replay of real workflow traces (WfCommons, converted to the neutral JSON format of
 * `../shared/workflows/README.md`).
 *
 * Each trace task becomes one `busy(ms)` node that spins for its recorded runtime ×
 * scale; each dependency becomes an ordering-only `upstream` edge (no data moves: the
 * trace's bytes are not replayed). The lower bound of the makespan on W workers is
 * max(critical path, total work / W), both scaled by the same factor: no schedule can
 * beat either, since a task cannot start before its inputs end and W busy cores finish
 * at most W seconds of work per second.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { ArgBinding, GraphSpec, TaskOptions } from '../src/flow/spec.ts';
import { SpecBuilder } from './shapes.ts';
import { BENCH_TASK_OPTIONS } from './tasks.ts';

export interface WorkflowTask {
  readonly id: string;
  readonly runtime_s: number;
  readonly deps: readonly string[];
  readonly out_bytes: number;
  readonly in_bytes: number;
  readonly cores: number;
}

export interface Workflow {
  readonly name: string;
  readonly source: string;
  readonly tasks: readonly WorkflowTask[];
  /** Provenance and stats; consumers may ignore it. */
  readonly meta?: unknown;
}

/** The repo's sibling `shared/workflows` folder (`<repo>/../shared/workflows`). */
export function defaultWorkflowDir(): string {
  return fileURLToPath(new URL('../../shared/workflows/', import.meta.url));
}

/** The `.json` trace files of a folder, sorted by name. */
export function workflowFiles(dir: string = defaultWorkflowDir()): string[] {
  return readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((f) => join(dir, f));
}

/** Short name of a trace file: its base name without `.json`. */
export function graphName(file: string): string {
  return basename(file).replace(/\.json$/, '');
}

function fail(where: string, msg: string): never {
  throw new Error(`${where}: ${msg}`);
}

/** Checks the neutral workflow format and returns it typed. Throws naming the file and the bad field. */
export function parseWorkflow(data: unknown, where = 'workflow'): Workflow {
  if (typeof data !== 'object' || data === null) fail(where, 'not a JSON object');
  const d = data as Record<string, unknown>;
  if (typeof d.name !== 'string') fail(where, '"name" must be a string');
  if (!Array.isArray(d.tasks)) fail(where, '"tasks" must be an array');
  const tasks: WorkflowTask[] = [];
  d.tasks.forEach((t: unknown, i: number) => {
    const at = `${where}: tasks[${i}]`;
    if (typeof t !== 'object' || t === null) fail(at, 'not an object');
    const r = t as Record<string, unknown>;
    if (typeof r.id !== 'string' || r.id === '') fail(at, '"id" must be a non-empty string');
    if (typeof r.runtime_s !== 'number' || !Number.isFinite(r.runtime_s) || r.runtime_s < 0) {
      fail(at, '"runtime_s" must be a finite number >= 0');
    }
    if (!Array.isArray(r.deps) || !r.deps.every((x) => typeof x === 'string')) fail(at, '"deps" must be an array of task ids');
    tasks.push({
      id: r.id,
      runtime_s: r.runtime_s,
      deps: r.deps as string[],
      out_bytes: typeof r.out_bytes === 'number' ? r.out_bytes : 0,
      in_bytes: typeof r.in_bytes === 'number' ? r.in_bytes : 0,
      cores: typeof r.cores === 'number' ? r.cores : 1,
    });
  });
  return { name: d.name, source: typeof d.source === 'string' ? d.source : '', tasks, meta: d.meta };
}

export function loadWorkflow(file: string): Workflow {
  let data: unknown;
  try {
    data = JSON.parse(readFileSync(file, 'utf8'));
  } catch (err) {
    throw new Error(`${file}: cannot read JSON (${(err as Error).message})`, { cause: err });
  }
  return parseWorkflow(data, file);
}

export interface WorkflowAnalysis {
  readonly tasks: number;
  readonly edges: number;
  /** Tasks on the longest path counted in tasks (a graph with no edges has depth 1). */
  readonly depth: number;
  /** Longest path weighted by runtime, in seconds (unscaled). */
  readonly criticalPathS: number;
  /** Sum of all runtimes, in seconds (unscaled). */
  readonly totalWorkS: number;
  /** Task indices in a topological order (inputs first; ties in file order). */
  readonly order: readonly number[];
  /** For each task index, the indices of its dependencies (deduplicated). */
  readonly deps: readonly (readonly number[])[];
}

/**
 * Topological order (Kahn), depth, critical path and total work. Throws on a duplicate
 * id, a dependency on an unknown id, or a cycle.
 */
export function analyzeWorkflow(wf: Workflow): WorkflowAnalysis {
  const n = wf.tasks.length;
  const index = new Map<string, number>();
  wf.tasks.forEach((t, i) => {
    if (index.has(t.id)) throw new Error(`${wf.name}: duplicate task id '${t.id}'`);
    index.set(t.id, i);
  });
  const deps: number[][] = [];
  const downstream: number[][] = Array.from({ length: n }, () => []);
  const indegree = new Int32Array(n);
  let edges = 0;
  wf.tasks.forEach((t, i) => {
    const mine = new Set<number>();
    for (const d of t.deps) {
      const j = index.get(d);
      if (j === undefined) throw new Error(`${wf.name}: task '${t.id}' depends on unknown task '${d}'`);
      if (j === i) throw new Error(`${wf.name}: task '${t.id}' depends on itself`);
      mine.add(j);
    }
    const list = [...mine];
    deps.push(list);
    for (const j of list) downstream[j]!.push(i);
    indegree[i] = list.length;
    edges += list.length;
  });

  const order: number[] = [];
  for (let i = 0; i < n; i++) if (indegree[i] === 0) order.push(i);
  for (let head = 0; head < order.length; head++) {
    for (const k of downstream[order[head]!]!) if (--indegree[k]! === 0) order.push(k);
  }
  if (order.length !== n) throw new Error(`${wf.name}: the dependencies contain a cycle`);

  // finish[i]: earliest end of i with unlimited workers; level[i]: tasks on the longest path ending at i.
  const finish = new Float64Array(n);
  const level = new Int32Array(n);
  let criticalPathS = 0;
  let depth = 0;
  let totalWorkS = 0;
  for (const i of order) {
    let start = 0;
    let lv = 0;
    for (const j of deps[i]!) {
      if (finish[j]! > start) start = finish[j]!;
      if (level[j]! > lv) lv = level[j]!;
    }
    const rt = wf.tasks[i]!.runtime_s;
    finish[i] = start + rt;
    level[i] = lv + 1;
    totalWorkS += rt;
    if (finish[i]! > criticalPathS) criticalPathS = finish[i]!;
    if (level[i]! > depth) depth = level[i]!;
  }
  return { tasks: n, edges, depth, criticalPathS, totalWorkS, order, deps };
}

/** max(critical path, total work / workers) × scale, in seconds. */
export function lowerBoundS(a: Pick<WorkflowAnalysis, 'criticalPathS' | 'totalWorkS'>, workers: number, scale: number): number {
  if (!(workers >= 1)) throw new RangeError(`workers must be >= 1 (got ${workers})`);
  return Math.max(a.criticalPathS, a.totalWorkS / workers) * scale;
}

/** How runtimes are scaled: so that total work is `totalWorkS` seconds, or by a fixed factor. */
export type Scaling = { readonly totalWorkS: number } | { readonly scale: number };

export const DEFAULT_SCALING: Scaling = Object.freeze({ totalWorkS: 2 });

export function scaleFactor(a: Pick<WorkflowAnalysis, 'totalWorkS'>, s: Scaling): number {
  if ('scale' in s) {
    if (!(s.scale > 0) || !Number.isFinite(s.scale)) throw new RangeError(`scale must be a positive number (got ${s.scale})`);
    return s.scale;
  }
  if (!(s.totalWorkS > 0) || !Number.isFinite(s.totalWorkS)) throw new RangeError(`total work must be a positive duration (got ${s.totalWorkS})`);
  return a.totalWorkS > 0 ? s.totalWorkS / a.totalWorkS : 1;
}

/**
 * Parses a duration: `2s`, `500ms`, `1.5m`, or a bare number of seconds. Returns seconds.
 */
export function parseDurationS(raw: string): number {
  const m = /^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*(ms|s|m|min)?\s*$/.exec(raw);
  if (m === null) throw new RangeError(`not a duration: '${raw}' (use e.g. 2s, 500ms, 1.5m)`);
  const v = Number(m[1]) * 10 ** Number(m[2] ?? 0);
  const unit = m[3] ?? 's';
  const s = unit === 'ms' ? v / 1000 : unit === 's' ? v : v * 60;
  if (!(s > 0)) throw new RangeError(`duration must be positive: '${raw}'`);
  return s;
}

/**
 * How replay tasks are prioritised: `critical-path` gives each task a user `priority`
 * equal to its upward rank (its runtime plus the longest path below it to an exit, in
 * scaled seconds: the classic HEFT / critical-path list-scheduling priority), so weft's
 * ready queue runs the task that heads the longest remaining chain first; `none` leaves
 * every priority at 0 (weft's static memory-minimising order alone).
 */
export type ReplayPriority = 'critical-path' | 'none';
export const REPLAY_PRIORITIES: readonly ReplayPriority[] = Object.freeze(['critical-path', 'none']);
export const DEFAULT_PRIORITY: ReplayPriority = 'critical-path';

/** Parses `--priority critical-path|none` (also `cp`, `off`). */
export function parsePriority(raw: string): ReplayPriority {
  const v = raw.trim().toLowerCase();
  if (v === 'critical-path' || v === 'cp' || v === 'upward-rank') return 'critical-path';
  if (v === 'none' || v === 'off') return 'none';
  throw new RangeError(`--priority must be one of ${REPLAY_PRIORITIES.join(', ')} (got '${raw}')`);
}

/**
 * Upward rank of each task (by task index), unscaled seconds: its own runtime plus the
 * largest upward rank among the tasks that depend on it (0 for none). The largest rank
 * is the critical path.
 */
export function upwardRanks(wf: Workflow, analysis: WorkflowAnalysis = analyzeWorkflow(wf)): Float64Array {
  const n = analysis.tasks;
  const below = new Float64Array(n);
  const rank = new Float64Array(n);
  // Reverse topological order: every dependent is ranked before its dependencies.
  for (let k = n - 1; k >= 0; k--) {
    const i = analysis.order[k]!;
    const r = wf.tasks[i]!.runtime_s + below[i]!;
    rank[i] = r;
    for (const j of analysis.deps[i]!) if (r > below[j]!) below[j] = r;
  }
  return rank;
}

export interface ReplayOptions {
  /** Default `critical-path`. */
  readonly priority?: ReplayPriority;
}

export interface ReplayGraph {
  readonly spec: GraphSpec;
  readonly analysis: WorkflowAnalysis;
  readonly scale: number;
  readonly priority: ReplayPriority;
  /** Scaled critical path and total work, seconds. */
  readonly criticalPathS: number;
  readonly totalWorkS: number;
}

/**
 * One `busy(runtime_s × scale × 1000 ms)` node per trace task, keyed by the trace's task
 * id, in topological order; dependencies as `upstream` edges; the sinks are the
 * reference tasks. With `priority: 'critical-path'` (the default) each node's options
 * carry its scaled upward rank as `priority`.
 */
export function replayGraph(
  wf: Workflow,
  scaling: Scaling = DEFAULT_SCALING,
  analysis = analyzeWorkflow(wf),
  options: ReplayOptions = {},
): ReplayGraph {
  const priority = options.priority ?? DEFAULT_PRIORITY;
  const scale = scaleFactor(analysis, scaling);
  const n = analysis.tasks;
  const b = new SpecBuilder(n);
  const nodeOf = new Int32Array(n);
  const hasDownstream = new Uint8Array(n);
  for (const i of analysis.order) {
    const t = wf.tasks[i]!;
    const ms: ArgBinding = { kind: 'const', value: t.runtime_s * scale * 1000, mode: 'plain' };
    const upstream = analysis.deps[i]!.map((j) => {
      hasDownstream[j] = 1;
      return nodeOf[j]!;
    });
    nodeOf[i] = b.add('busy', [ms], upstream, t.id);
  }
  if (priority === 'critical-path') {
    const rank = upwardRanks(wf, analysis);
    // Equal ranks share one options object (the core decodes each distinct object once).
    const shared = new Map<number, TaskOptions>();
    for (let i = 0; i < n; i++) {
      const p = rank[i]! * scale;
      let o = shared.get(p);
      if (o === undefined) {
        o = Object.freeze({ ...BENCH_TASK_OPTIONS.busy, priority: p });
        shared.set(p, o);
      }
      const id = nodeOf[i]!;
      b.nodes[id] = { ...b.nodes[id]!, options: o };
    }
  }
  const sinks: number[] = [];
  for (let i = 0; i < n; i++) if (hasDownstream[i] === 0) sinks.push(nodeOf[i]!);
  sinks.sort((x, y) => x - y);
  return {
    spec: b.build(`replay-${wf.name}`, sinks),
    analysis,
    scale,
    priority,
    criticalPathS: analysis.criticalPathS * scale,
    totalWorkS: analysis.totalWorkS * scale,
  };
}
