/**
 * A finished cluster run as a `FlowRunResult`: built on the client from the scheduler's
 * `RunRecords` (per-task columns aligned by core task id) and, when the client kept
 * results, the values it fetched with `getResults` (aligned the same way).
 *
 * It behaves exactly like the runner's result (`src/runner/run.ts`, `result()`): one
 * record per task run, `result(ref)` of a mapped node is the list of its children's
 * results, `runsOf` gives the node then its children by map index, `story` the bounded
 * log of one task run. Map ranges are not sent: they are recovered from the records,
 * children being the task runs with `mapIndex ≥ 0`, grouped by node, ordered by index.
 */
import type { SerializedError } from '../errors.ts';
import type { GraphSpec, TaskStateName } from '../flow/spec.ts';
import type { FlowRunResult, NodeRef, RunProgress, TaskRunRecord } from '../runner/types.ts';
import { FINISHED_STATE_NAMES as FINISHED } from '../scheduler/states.ts';
import { numberColumnLength, ProtocolError, STATE_ORDER, type RunRecords } from './protocol.ts';

/** What a finished run counts as failed in progress reports. */
const FAILED: ReadonlySet<TaskStateName> = new Set<TaskStateName>(['Failed', 'TimedOut', 'TriggerFailed']);

/** Task runs that finished, from counts by state (a progress report's `done`). */
export function progressFromCounts(
  counts: Readonly<Partial<Record<TaskStateName, number>>>,
  elapsedMs: number,
): RunProgress {
  let total = 0;
  let done = 0;
  let failed = 0;
  for (const name of Object.keys(counts) as TaskStateName[]) {
    const n = counts[name] ?? 0;
    total += n;
    if (FINISHED.has(name)) done += n;
    if (FAILED.has(name)) failed += n;
  }
  return {
    total,
    done,
    running: counts.Running ?? 0,
    failed,
    skipped: counts.Skipped ?? 0,
    rate: elapsedMs > 0 ? (done * 1000) / elapsedMs : 0,
    elapsedMs,
  };
}

/** Counts by state of every task run in the records (the final progress report). */
export function countsOf(records: RunRecords): Partial<Record<TaskStateName, number>> {
  const counts: Partial<Record<TaskStateName, number>> = {};
  const states = records.state_;
  for (let i = 0; i < states.length; i++) {
    const name = STATE_ORDER[states[i]!] ?? 'Pending';
    counts[name] = (counts[name] ?? 0) + 1;
  }
  return counts;
}

/** Throws ProtocolError BAD_MESSAGE unless every column has one entry per task run. */
export function checkRecords(records: RunRecords, nodes: number): void {
  const n = records.node.length;
  const columns = ['mapIndex', 'state_', 'attempts', 'start', 'end', 'worker'] as const;
  for (const c of columns) {
    const col: unknown = records[c];
    // Typed arrays or plain arrays of numbers (see `numberColumn`).
    const len = numberColumnLength(col);
    if (len !== n) {
      throw new ProtocolError('BAD_MESSAGE', `run records: column "${c}" has ${len >= 0 ? len : 'no'} entries for ${n} task runs`, {
        field: c,
      });
    }
  }
  if (n < nodes) {
    throw new ProtocolError('BAD_MESSAGE', `run records: ${n} task runs for a graph of ${nodes} nodes`, { field: 'node' });
  }
}

/**
 * The result of a finished run. `values` (aligned by task id) is null when results were
 * not kept: `result()` then gives undefined, or [] for a mapped node, as the runner does.
 */
export function runResultFrom(
  spec: Pick<GraphSpec, 'name' | 'nodes'>,
  records: RunRecords,
  values: readonly unknown[] | null,
): FlowRunResult {
  checkRecords(records, spec.nodes.length);
  const nStatic = spec.nodes.length;
  const size = records.node.length;
  const { node, mapIndex, state_, attempts, start, end, worker, workerNames } = records;
  const errors = new Map<number, SerializedError>(records.errors.map(([id, e]) => [id, e] as const));
  const stories = new Map<number, readonly string[]>(records.stories.map(([id, lines]) => [id, lines] as const));

  // Children of each mapped node, by map index. The core allocates a node's children
  // contiguously in index order, so the sort below rarely has anything to do.
  const kids = new Map<number, number[]>();
  for (let id = nStatic; id < size; id++) {
    if ((mapIndex[id] ?? -1) < 0) continue;
    const u = node[id]!;
    let list = kids.get(u);
    if (list === undefined) kids.set(u, (list = []));
    list.push(id);
  }
  for (const list of kids.values()) {
    let sorted = true;
    for (let i = 1; i < list.length && sorted; i++) if (mapIndex[list[i]!]! < mapIndex[list[i - 1]!]!) sorted = false;
    if (!sorted) list.sort((a, b) => mapIndex[a]! - mapIndex[b]!);
  }

  const stateName = (id: number): TaskStateName => STATE_ORDER[state_[id] ?? 0] ?? 'Pending';
  /** The children of a node that expanded (a mapped node that ended Mapped with width 0 has none). */
  const childrenOf = (id: number): readonly number[] | undefined => {
    const list = kids.get(id);
    if (list !== undefined) return list;
    return spec.nodes[id]?.mapped === true && stateName(id) === 'Mapped' ? [] : undefined;
  };
  const idOf = (ref: NodeRef): number => {
    const id = typeof ref === 'number' ? ref : ref.node;
    if (!Number.isInteger(id) || id < 0 || id >= nStatic) throw new RangeError(`no node ${String(id)} in flow "${spec.name}"`);
    return id;
  };
  const record = (id: number): TaskRunRecord => {
    const n = node[id]!;
    const r: TaskRunRecord = {
      key: spec.nodes[n]?.key ?? `node-${n}`,
      node: n,
      mapIndex: mapIndex[id]!,
      state: stateName(id),
      attempts: attempts[id]!,
      startMs: start[id]!,
      endMs: end[id]!,
    };
    const err = errors.get(id);
    if (err !== undefined) r.error = err;
    else if (r.state === 'Cancelled') r.error = { name: 'CancelledError', message: 'cancelled: the run was cancelled' };
    const w = worker[id]!;
    if (w >= 0 && workerNames[w] !== undefined) r.worker = workerNames[w];
    return r;
  };

  let tasks: TaskRunRecord[] | null = null;
  return {
    flowName: spec.name,
    runId: records.runId,
    state: records.state as FlowRunResult['state'],
    message: records.message,
    startMs: records.startMs,
    endMs: records.endMs,
    durationMs: records.endMs - records.startMs,
    parameters: records.parameters,
    get tasks(): readonly TaskRunRecord[] {
      if (tasks === null) {
        tasks = new Array<TaskRunRecord>(size);
        for (let id = 0; id < size; id++) tasks[id] = record(id);
      }
      return tasks;
    },
    result<T>(ref: NodeRef): T {
      const id = idOf(ref);
      const list = childrenOf(id);
      if (list !== undefined) return (values === null ? [] : list.map((c) => values[c])) as T;
      return (values === null ? undefined : values[id]) as T;
    },
    stateOf(ref: NodeRef): TaskStateName {
      return stateName(idOf(ref));
    },
    runsOf(ref: NodeRef): readonly TaskRunRecord[] {
      const id = idOf(ref);
      const out = [record(id)];
      for (const c of childrenOf(id) ?? []) out.push(record(c));
      return out;
    },
    story(ref: NodeRef, index?: number): readonly string[] {
      let id = idOf(ref);
      if (index !== undefined && index >= 0) {
        const list = childrenOf(id);
        const c = list?.[index];
        if (c === undefined) return [];
        id = c;
      }
      return stories.get(id) ?? [];
    },
  } as FlowRunResult;
}
