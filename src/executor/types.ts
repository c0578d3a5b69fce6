/**
 * The one interface between the runner and every executor.
 *
 * Streaming and batched: the runner submits arrays of calls, the executor hands back
 * arrays of outcomes through `session.onOutcomes`. There is no promise and no message
 * per task on the hot path. Backpressure: the runner never submits more calls than
 * `freeSlots()` allows; each outcome frees one slot.
 */
import type { SerializedError } from '../errors.ts';
import type { GraphSpec } from '../flow/spec.ts';
import type { FlowRunResult, RunOptions } from '../runner/types.ts';

/** One attempt of one task, with its arguments already resolved. */
export interface TaskCall {
  /** Core task id (unique within the run). */
  id: number;
  /** Dispatch stamp: an outcome must carry it back unchanged; stale ones are dropped. */
  runId: number;
  /** Registry key of the task's function (`<module url>#<name>`). */
  taskKey: string;
  /** Node key within the flow (for context, logs and errors). */
  key: string;
  args: unknown[];
  /** 0 = none. Measured from when the call starts on its worker. */
  timeoutMs: number;
  /** -1 when not a mapped child. */
  mapIndex: number;
  /** 1 for the first attempt. */
  attempt: number;
  /** 0 for the first run; n after n loop signals. */
  loopCount: number;
  /** Value carried by the last loop signal (undefined on the first run). */
  loopResult: unknown;
  /** Abstract resources the task needs (`{ GPU: 1 }`); absent when none. Executors that know resources place it accordingly. */
  resources?: Readonly<Record<string, number>>;
}

export type OutcomeStatus =
  /** The task returned; `value` is its result. */
  | 'ok'
  /** The task threw (or returned an unsendable value); `error` says why. Signals arrive here too. */
  | 'error'
  /** The task passed its timeout and was stopped. */
  | 'timeout'
  /** The worker running it died; the call may run again elsewhere. */
  | 'lost'
  /** The call was cancelled before or while running. */
  | 'cancelled';

export interface Outcome {
  id: number;
  runId: number;
  status: OutcomeStatus;
  value?: unknown;
  /** An Error (in-process) or its serialized record (from another thread/process). */
  error?: Error | SerializedError;
  /** Wall-clock ms (performance.timeOrigin + performance.now()) when the call started / ended. 0 when unknown. */
  startMs: number;
  endMs: number;
  /** Identifies the worker that ran it (thread index, process pid, ...), for stories and poison detection. */
  worker?: string;
}

export interface ExecutorSession {
  readonly flowName: string;
  /** Module URLs that define the run's tasks: workers import these before running anything. */
  readonly modules: readonly string[];
  /** Every task key the run may call: `start()` rejects (TaskResolutionError naming the task) if a worker cannot resolve one. */
  readonly taskKeys: readonly string[];
  readonly parameters: Readonly<Record<string, unknown>>;
  /** Batched outcomes, delivered on the runner's thread. */
  onOutcomes(outcomes: Outcome[]): void;
  /**
   * Executors shared by several runs (a cluster's workers) call this when slots freed up
   * that this run's own outcomes did not free: the runner dispatches again.
   */
  resume?(): void;
}

export interface Executor {
  /** 'local', 'pool', 'cluster', ... */
  readonly kind: string;
  /** Number of parallel slots (threads, processes...): used for reporting and lower bounds. */
  readonly workers: number;
  /** Prepare for one run: start workers, import modules, check every task key resolves. */
  start(session: ExecutorSession): Promise<void>;
  /** How many more calls may be submitted right now. */
  freeSlots(): number;
  submit(calls: TaskCall[]): void;
  /** Stop these calls, queued or running (a running call on a thread is stopped by replacing the thread). Each ends with a 'cancelled' outcome. */
  cancel(ids: readonly number[]): void;
  /** End the run: stop workers, release resources. Idempotent. */
  shutdown(): Promise<void>;
  /**
   * Executors that can outlive one run (a warm pool, a cluster client): release
   * everything, workers included. `shutdown()` on such an executor ends only the run,
   * and a later `start()` opens the next one on the same workers. Idempotent; absent on
   * executors whose `shutdown()` already releases everything.
   */
  close?(): Promise<void>;
  /**
   * Executors that can run a dependent right after its producer, on the producer's
   * worker (a cluster): `future(producer)` stands for the producer's result in the
   * dependent's arguments, `submitAhead(call, producer)` sends the dependent there (false
   * when it cannot). The call carries a negative runId; its outcome comes back with it,
   * or as 'cancelled' when the producer did not succeed. Such calls take no slot.
   */
  future?(producer: number): unknown;
  submitAhead?(call: TaskCall, producer: number): boolean;
  /**
   * Executors that run whole graphs elsewhere (a cluster scheduler runs the core and the
   * runner over the graph it receives): `runFlow` hands the spec over instead of driving
   * calls. `parameters` are already resolved and checked; every task is known to resolve
   * in this process. The executor honours `opts` (signal, onProgress, onTaskState,
   * tagLimits, validate, keepResults, resultDir) and, like `runFlow`, rejects only for
   * problems found before any task runs.
   */
  runGraph?(spec: GraphSpec, parameters: Record<string, unknown>, opts: RunOptions): Promise<FlowRunResult>;
  /**
   * Executors with `runGraph` that can also take task calls: the same executor without
   * `runGraph` (same workers, same `shutdown`), so that the runner drives the graph here
   * and a wrapper that must see every call (the server's task tag limits) can wrap it.
   */
  asCalls?(): Executor;
}
