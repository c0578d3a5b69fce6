/**
 * The graph spec: what building a flow produces and what a run consumes.
 *
 * Pure data. The flow model (`task()`, `Flow`) builds it; the scheduler core turns it
 * into typed arrays; the runner resolves arguments from it; executors only ever see
 * `taskKey` + `module` (to find the function) and the resolved argument values.
 */

/** How an argument edge feeds a task. */
export type BindMode =
  /** The whole upstream value (for a mapped upstream: the list of its children's results). */
  | 'plain'
  /** Map over it: child i gets element i (or, for a mapped upstream, child i's result). */
  | 'mapped'
  /** Inside `.map()`: pass the whole value to every child. */
  | 'unmapped'
  /** Inside `.map()`: map over the concatenation of a list of lists (e.g. a mapped task that returned lists). */
  | 'flatten';

export type ArgBinding =
  | { readonly kind: 'ref'; readonly node: number; readonly mode: BindMode }
  | { readonly kind: 'const'; readonly value: unknown; readonly mode: BindMode };

/** Built-in trigger names. A custom trigger is a function (see `TriggerFn`). */
export type TriggerName =
  | 'allSuccessful'
  | 'allFailed'
  | 'anySuccessful'
  | 'anyFailed'
  | 'allFinished'
  | 'alwaysRun'
  | 'notAllSkipped'
  | 'manualOnly'
  | 'someSuccessful'
  | 'someFailed';

/** States as strings (public); the core keeps small integer codes (`src/scheduler/states.ts`). */
export type TaskStateName =
  | 'Pending'
  | 'Scheduled'
  | 'Running'
  | 'Retrying'
  | 'Looped'
  | 'Success'
  | 'Cached'
  | 'Mapped'
  | 'Skipped'
  | 'Failed'
  | 'TimedOut'
  | 'TriggerFailed'
  | 'Cancelled'
  | 'Paused';

/** What a custom trigger sees: one entry per upstream edge (mapped upstreams unpacked into their children). */
export interface UpstreamState {
  readonly key: string;
  readonly state: TaskStateName;
  readonly mapIndex: number;
}

/**
 * A custom trigger: return true to run, false to fail the trigger (TriggerFailed).
 * Throwing `skip()` skips the task. Must be pure and synchronous: the core calls it.
 */
export type TriggerFn = (upstream: readonly UpstreamState[]) => boolean;

export type TriggerSpec =
  | { readonly kind: 'builtin'; readonly name: TriggerName; readonly atLeast?: number; readonly atMost?: number }
  | { readonly kind: 'custom'; readonly fn: TriggerFn; readonly name: string };

/** Which error a retry applies to: error class names (or constructors, matched by name up the prototype chain). */
export type RetryOn = readonly string[];

export interface ResultSpec {
  /**
   * Checkpoint location template, relative to the run's result dir unless absolute, e.g.
   * `"{flow}/{task}/{mapIndex}.json"`. Placeholders: flow, task, mapIndex, runId, date, and `{param.x}`.
   */
  readonly location?: string;
  /** Target template: if the file exists before the task runs, its content is the result (state Cached). */
  readonly target?: string;
  /** Serializer: 'json' (default) or 'msgpack'. */
  readonly serializer?: 'json' | 'msgpack';
}

export type CacheValidatorName = 'durationOnly' | 'allInputs' | 'allParameters' | 'partialInputsOnly';

export interface StateHandlerFn {
  (task: { key: string; mapIndex: number }, oldState: TaskStateName, newState: TaskStateName, info: {
    error?: { name: string; message: string; stack?: string };
    result?: unknown;
  }): void;
}

/** Resolved task options (defaults filled in by the flow model). */
export interface TaskOptions {
  readonly name: string;
  readonly tags: readonly string[];
  readonly maxRetries: number;
  readonly retryDelayMs: number;
  readonly retryOn: RetryOn | null;
  /** 0 = no timeout. Enforced by the executor from the moment the call starts. */
  readonly timeoutMs: number;
  readonly trigger: TriggerSpec;
  readonly skipOnUpstreamSkip: boolean;
  /** 0 = no caching. */
  readonly cacheForMs: number;
  readonly cacheValidator: CacheValidatorName | ((args: readonly unknown[], cached: readonly unknown[]) => boolean);
  readonly cacheKey: string | null;
  readonly checkpoint: boolean;
  readonly result: ResultSpec | null;
  readonly stateHandlers: readonly StateHandlerFn[];
  readonly onFailure: StateHandlerFn | null;
  /** Higher runs first among ready tasks. */
  readonly priority: number;
  /** Abstract resources, e.g. `{ GPU: 1 }`; honoured by executors that know them. */
  readonly resources: Readonly<Record<string, number>>;
}

export type NodeKind =
  /** A user task: runs on the executor. */
  | 'task'
  /** A flow parameter: its value comes from the run, it never executes. */
  | 'parameter'
  /**
   * A built-in task evaluated by the runner in the main thread without the executor
   * (compare for case/ifElse/switch, merge, getItem). `inline` holds its function.
   */
  | 'inline';

export interface NodeSpec {
  /** Index in `GraphSpec.nodes`. */
  readonly id: number;
  /** Unique within the flow: the task name, with `-2`, `-3`... for further uses of the same task. */
  readonly key: string;
  readonly kind: NodeKind;
  /** Registry key of the task definition (`<module url>#<name or ordinal>`); '' for parameters/inline. */
  readonly taskKey: string;
  /** File URL of the module that defined the task; workers import it. '' for parameters/inline. */
  readonly module: string;
  /** Positional arguments. */
  readonly args: readonly ArgBinding[];
  /** Ordering-only upstream edges (node ids): no data flows, the trigger still sees their states. */
  readonly upstream: readonly number[];
  /** True when this node was created with `.map()`: it expands into children at run time. */
  readonly mapped: boolean;
  readonly options: TaskOptions;
  /** For parameters: the name, default, whether required, and an optional type check. */
  readonly parameter?: {
    readonly name: string;
    readonly default: unknown;
    readonly required: boolean;
    readonly type?: 'string' | 'number' | 'boolean' | 'object' | 'array';
  };
  /** For inline nodes: the function the runner calls with the resolved args. */
  readonly inline?: (...args: unknown[]) => unknown;
}

export interface GraphSpec {
  readonly name: string;
  readonly nodes: readonly NodeSpec[];
  /** Node ids whose states decide the flow's state; default: the terminal nodes (no downstream). */
  readonly referenceTasks: readonly number[];
  /** Module URLs a worker must import to resolve every task of this flow. */
  readonly modules: readonly string[];
}
