/**
 * The end-of-run summary: one row per node key (mapped children folded into their
 * parent's row), then the flow's final state and duration. Pure functions over the
 * run's task records.
 */
import type { FlowRunResult, TaskRunRecord } from '../runner/types.ts';
import type { TaskStateName } from '../flow/spec.ts';
import { formatDuration } from './progress.ts';

export interface SummaryRow {
  readonly key: string;
  /** True when the node was mapped (its row counts children, not the parent record). */
  readonly mapped: boolean;
  /** Task runs counted: the children of a mapped node, else 1. */
  readonly runs: number;
  /** How many of those runs ended in each state, in first-seen order. */
  readonly states: ReadonlyMap<TaskStateName, number>;
  /** Attempts summed over the runs (retries show as attempts > runs). */
  readonly attempts: number;
  /** Sum of the runs' last-attempt wall times (ms). */
  readonly totalMs: number;
}

/**
 * Fold task records into rows, in the order nodes first appear in `tasks`.
 * `exclude` drops node keys (the CLI passes the flow's parameter nodes: they never run).
 */
export function summarizeTasks(tasks: readonly TaskRunRecord[], exclude: ReadonlySet<string> = new Set()): SummaryRow[] {
  interface Acc {
    key: string;
    parent: TaskRunRecord | null;
    children: TaskRunRecord[];
  }
  const byKey = new Map<string, Acc>();
  for (const t of tasks) {
    if (exclude.has(t.key)) continue;
    let acc = byKey.get(t.key);
    if (acc === undefined) {
      acc = { key: t.key, parent: null, children: [] };
      byKey.set(t.key, acc);
    }
    if (t.mapIndex < 0) acc.parent = t;
    else acc.children.push(t);
  }

  const rows: SummaryRow[] = [];
  for (const acc of byKey.values()) {
    const mapped = acc.children.length > 0 || acc.parent?.state === 'Mapped';
    // A mapped node's own record only says "Mapped"; its children are the real runs. A
    // mapped node with no children (mapped over an empty list) or one that never expanded
    // (upstream failed) shows its own record instead.
    const runs = acc.children.length > 0 ? acc.children : acc.parent !== null ? [acc.parent] : [];
    const states = new Map<TaskStateName, number>();
    let attempts = 0;
    let totalMs = 0;
    for (const r of runs) {
      states.set(r.state, (states.get(r.state) ?? 0) + 1);
      attempts += r.attempts;
      if (r.startMs > 0 && r.endMs >= r.startMs) totalMs += r.endMs - r.startMs;
    }
    rows.push({ key: acc.key, mapped, runs: acc.children.length > 0 ? acc.children.length : runs.length, states, attempts, totalMs });
  }
  return rows;
}

/** `Success 8, Failed 2` (or `Success` when every run agrees and there is one run). */
export function formatStates(row: SummaryRow): string {
  if (row.states.size === 1 && row.runs === 1) return [...row.states.keys()][0] as string;
  return [...row.states].map(([s, n]) => `${s} ${n}`).join(', ');
}

/** The table, with a header; columns padded to fit. No trailing newline. */
export function renderSummaryTable(rows: readonly SummaryRow[]): string {
  const header = ['TASK', 'RUNS', 'STATES', 'ATTEMPTS', 'TIME'];
  const body = rows.map((r) => [
    r.mapped ? `${r.key} [map]` : r.key,
    String(r.runs),
    formatStates(r),
    String(r.attempts),
    formatDuration(r.totalMs),
  ]);
  const all = [header, ...body];
  const widths = header.map((_, c) => Math.max(...all.map((line) => (line[c] as string).length)));
  // Numbers right-aligned, text left-aligned.
  const right = [false, true, false, true, true];
  return all
    .map((line) =>
      line
        .map((cell, c) => (right[c] === true ? cell.padStart(widths[c] as number) : cell.padEnd(widths[c] as number)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

/**
 * `flow etl: Success in 1.24s (42 task runs)`, plus the run's message when it adds
 * something. The count is every record of the run, as the progress total counts them.
 */
export function renderFinalLine(result: Pick<FlowRunResult, 'flowName' | 'state' | 'durationMs' | 'message' | 'tasks'>): string {
  const runs = result.tasks.length;
  const msg = result.message !== '' && result.state !== 'Success' ? ` — ${result.message}` : '';
  return `flow ${result.flowName}: ${result.state} in ${formatDuration(result.durationMs)} (${runs} task run${runs === 1 ? '' : 's'})${msg}`;
}

/**
 * The failures worth reading: one line per run that failed on its own (Failed, TimedOut)
 * with the first line of its error, capped at `limit`; then the runs that did not run
 * because of them (TriggerFailed) folded into one line, since they only repeat the cause.
 */
export function renderFailures(tasks: readonly TaskRunRecord[], limit = 10): string[] {
  const where = (t: TaskRunRecord): string => (t.mapIndex >= 0 ? `${t.key}[${t.mapIndex}]` : t.key);
  const bad = tasks.filter((t) => t.state === 'Failed' || t.state === 'TimedOut');
  const lines = bad.slice(0, limit).map((t) => {
    const err = t.error === undefined ? '' : `: ${t.error.name}: ${firstLine(t.error.message)}`;
    return `  ${t.state} ${where(t)}${err}`;
  });
  if (bad.length > limit) lines.push(`  ... and ${bad.length - limit} more`);
  const blocked = tasks.filter((t) => t.state === 'TriggerFailed');
  if (blocked.length > 0) {
    const shown = blocked.slice(0, 6).map(where).join(', ');
    lines.push(`  TriggerFailed (${blocked.length}): ${shown}${blocked.length > 6 ? ', ...' : ''}`);
  }
  return lines;
}

/** The whole summary block printed after a run: table, failures, output values, final line. */
export function renderSummary(
  result: Pick<FlowRunResult, 'flowName' | 'state' | 'durationMs' | 'message' | 'tasks'>,
  exclude: ReadonlySet<string> = new Set(),
  outputs: readonly string[] = [],
): string {
  const rows = summarizeTasks(result.tasks, exclude);
  const parts = [renderSummaryTable(rows)];
  const failures = renderFailures(result.tasks);
  if (failures.length > 0) parts.push(['failures:', ...failures].join('\n'));
  if (outputs.length > 0) parts.push(['result:', ...outputs.map((l) => `  ${l}`)].join('\n'));
  parts.push(renderFinalLine(result));
  return parts.join('\n\n');
}

/** What `renderOutputs` needs of a run result. */
type ResultReader = Pick<FlowRunResult, 'result' | 'stateOf'>;

/**
 * Lines showing the values of a flow's outputs (what its builder returned): one ref, or
 * an object of refs. Only nodes that ended with a value (Success, Cached, Mapped) are
 * shown; each value is compact JSON cut to `maxChars`.
 */
export function renderOutputs(outputs: unknown, result: ResultReader, maxChars = 160): string[] {
  const entries: [string, { node: number }][] = [];
  if (isRefLike(outputs)) entries.push(['', outputs]);
  else if (outputs !== null && typeof outputs === 'object' && !Array.isArray(outputs)) {
    for (const [k, v] of Object.entries(outputs)) if (isRefLike(v)) entries.push([k, v]);
  }
  const lines: string[] = [];
  for (const [name, ref] of entries) {
    let text: string;
    try {
      const state = result.stateOf(ref);
      if (state !== 'Success' && state !== 'Cached' && state !== 'Mapped') continue;
      text = compactJson(result.result(ref), maxChars);
    } catch {
      continue; // no value kept (keepResults off, or the node never produced one)
    }
    lines.push(name === '' ? text : `${name}: ${text}`);
  }
  return lines;
}

function isRefLike(v: unknown): v is { node: number } {
  return typeof v === 'object' && v !== null && typeof (v as { node?: unknown }).node === 'number' && typeof (v as { key?: unknown }).key === 'string';
}

function compactJson(v: unknown, maxChars: number): string {
  let s: string;
  try {
    s = JSON.stringify(v) ?? String(v);
  } catch {
    s = Object.prototype.toString.call(v);
  }
  return s.length > maxChars ? `${s.slice(0, maxChars - 1)}…` : s;
}

/**
 * The `--json` document. `state`, `durationMs` and `tasks` are the stable interface;
 * `runId` and `parameters` let `weft run --restart` restart from it.
 */
export interface RunJson {
  state: FlowRunResult['state'];
  durationMs: number;
  runId?: string;
  parameters?: Readonly<Record<string, unknown>>;
  tasks: { key: string; mapIndex: number; state: TaskStateName; attempts: number; startMs: number; endMs: number }[];
}

export function toRunJson(result: Pick<FlowRunResult, 'state' | 'durationMs' | 'tasks'> & Partial<Pick<FlowRunResult, 'runId' | 'parameters'>>): RunJson {
  return {
    state: result.state,
    durationMs: result.durationMs,
    ...(result.runId !== undefined ? { runId: result.runId } : {}),
    ...(result.parameters !== undefined ? { parameters: result.parameters } : {}),
    tasks: result.tasks.map((t) => ({
      key: t.key,
      mapIndex: t.mapIndex,
      state: t.state,
      attempts: t.attempts,
      startMs: t.startMs,
      endMs: t.endMs,
    })),
  };
}

function firstLine(s: string): string {
  const i = s.indexOf('\n');
  return i === -1 ? s : s.slice(0, i);
}
