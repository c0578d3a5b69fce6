/**
 * The public shape of a flow run: options in, result out, progress while it runs.
 */
import type { Executor } from '../executor/types.ts';
import type { TaskStateName } from '../flow/spec.ts';

/** Anything that names a node of the flow: a `Ref` from the builder, or a node id. */
export type NodeRef = { readonly node: number } | number;

export interface RunOptions {
  parameters?: Record<string, unknown>;
  /** Default: a fresh LocalExecutor. An executor passed here is started and shut down by the run. */
  executor?: Executor;
  /**
   * The run's id: `{runId}` in result locations and `FlowRunResult.runId`. Default a fresh
   * UUID. Give the same id to every attempt of one logical run (a deployment's flow-run id)
   * so that a rerun finds the checkpoints an earlier attempt wrote under `{runId}`.
   * Letters, digits and `._=-` only (it becomes part of a path). A cluster scheduler running
   * the whole graph uses an id of its own.
   */
  runId?: string;
  /** Tag concurrency limits for this run: at most n running tasks carry the tag. */
  tagLimits?: Record<string, number>;
  /** Directory for checkpointed results (templated locations are relative to it). Default `.weft/results`. */
  resultDir?: string;
  /**
   * Restart: tasks that ended Success/Cached in an earlier run are not run again. Their
   * results come from that run's memory (a `FlowRunResult` that kept them) or from their
   * checkpoint files (a `RestartRecord`, e.g. the `weft run --json` output of that run);
   * a task with neither runs again. The earlier run's parameters apply unless overridden.
   */
  restartFrom?: FlowRunResult | RestartRecord;
  /** Cancels the run: running tasks are stopped, pending ones end Cancelled. */
  signal?: AbortSignal;
  /** Called at most every `progressIntervalMs` (default 100) and once at the end. */
  onProgress?: (p: RunProgress) => void;
  progressIntervalMs?: number;
  /** Called on every task state change (costs a little per task: leave unset for speed). */
  onTaskState?: (e: TaskStateEvent) => void;
  /** Check the scheduler core's invariants after every transition (slow; on in tests). */
  validate?: boolean;
  /** Keep task results in the returned object (default true). */
  keepResults?: boolean;
  /**
   * Internal (a cluster scheduler running a submitted graph): task code lives on the
   * workers, not in this process, so the registry check is skipped; results may be
   * handles to values held elsewhere (`refs`).
   */
  remote?: boolean;
  /** Internal: how the runner treats result handles of values held elsewhere. */
  refs?: ResultRefs;
}

/**
 * Results that stand for values held elsewhere (on a cluster worker). The runner passes
 * them through as arguments and asks these hooks when it must look inside one.
 */
export interface ResultRefs {
  isRef(v: unknown): boolean;
  /** Length of the list it holds, or -1 when it is not a list. */
  length(ref: unknown): number;
  /** A handle to element i of the list it holds. */
  element(ref: unknown, i: number): unknown;
  /** Lengths of the lists it holds inside its list, or null when not every element is a list (or unknown). */
  innerLengths(ref: unknown): readonly number[] | null;
}

/** What a restart needs of an earlier run: its id (for `{runId}` in locations), parameters and task states. */
export interface RestartRecord {
  readonly runId?: string;
  readonly parameters?: Readonly<Record<string, unknown>>;
  readonly tasks: readonly { readonly key: string; readonly mapIndex: number; readonly state: TaskStateName }[];
}

export interface RunProgress {
  /** Task runs known so far (grows as mapped tasks expand). */
  total: number;
  /** Finished task runs (any final state). */
  done: number;
  /** Task runs executing now (at most the executor's parallelism). */
  running: number;
  failed: number;
  skipped: number;
  /** Finished task runs per second since the start. */
  rate: number;
  elapsedMs: number;
}

export interface TaskStateEvent {
  /** Task run id within this run (core id; mapped children have their own). */
  id?: number;
  /** Attempt of the task run (1 for the first). */
  attempt?: number;
  key: string;
  mapIndex: number;
  from: TaskStateName;
  to: TaskStateName;
  /** Wall-clock ms. */
  at: number;
}

/** `FlowRunResult.tasks` in columns, indexed by task id (arrays may be longer than `size`). */
export interface TaskColumns {
  readonly size: number;
  readonly node: ArrayLike<number>;
  readonly mapIndex: ArrayLike<number>;
  /** State per task, as an index into `stateNames`. */
  readonly state: ArrayLike<number>;
  readonly stateNames: readonly TaskStateName[];
  readonly attempts: ArrayLike<number>;
  readonly startMs: ArrayLike<number>;
  readonly endMs: ArrayLike<number>;
  readonly worker: readonly (string | undefined)[];
  /** The task run succeeded (Success, Cached or Mapped) and its record carries no error: the columns say all. */
  plain(id: number): boolean;
  /** The full record (as `tasks[id]`). */
  record(id: number): TaskRunRecord;
}

export interface TaskRunRecord {
  /** Node key in the flow (mapped children share their parent's key). */
  key: string;
  /** Node id in the flow's spec. */
  node: number;
  /** -1 unless a mapped child. */
  mapIndex: number;
  state: TaskStateName;
  attempts: number;
  /** Wall-clock ms of the last attempt's start and end; 0 when it never ran. */
  startMs: number;
  endMs: number;
  error?: { name: string; message: string; stack?: string; code?: string };
  /** Who ran the last attempt (executor-specific). */
  worker?: string;
}

export interface FlowRunResult {
  readonly flowName: string;
  /** `RunOptions.runId`, or a fresh id per run (`{runId}` in result locations). */
  readonly runId: string;
  readonly state: 'Success' | 'Failed' | 'Cancelled' | 'Paused';
  readonly message: string;
  readonly startMs: number;
  readonly endMs: number;
  readonly durationMs: number;
  readonly parameters: Readonly<Record<string, unknown>>;
  /** Every task run: one per node, plus one per mapped child. */
  readonly tasks: readonly TaskRunRecord[];
  /** The result of a node (for a mapped node: the list of its children's results). */
  result<T = unknown>(ref: NodeRef | { readonly node: number; readonly __type?: T }): T;
  /** Internal: the result of one task run by its id (`TaskRunRecord` order), for a cluster scheduler answering its client. */
  taskResult?(id: number): unknown;
  /**
   * Internal: the task runs' records in columns, for a cluster scheduler sending them to
   * its client (no record object per task run; `record(id)` for the few that need more).
   */
  taskColumns?(): TaskColumns;
  /** The final state of a node (for a mapped node, the parent's state). */
  stateOf(ref: NodeRef): TaskStateName;
  /** The task runs of a node: the node itself, then its mapped children by index. */
  runsOf(ref: NodeRef): readonly TaskRunRecord[];
  /** The core's bounded log of what happened to a node (for debugging). */
  story(ref: NodeRef, mapIndex?: number): readonly string[];
}
