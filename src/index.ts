/**
 * weft: a fast DAG task executor for TypeScript — Prefect 1 flows, Dask-style scheduling.
 *
 *   import { task, flow, parameter } from 'weft';
 */
export * from './flow/index.ts';
export {
  WeftError,
  FlowValidationError,
  TaskResolutionError,
  TaskSerializationError,
  TaskTimeoutError,
  WorkerLostError,
  CancelledError,
  Signal,
  FailSignal,
  SkipSignal,
  RetrySignal,
  PauseSignal,
  LoopSignal,
  fail,
  skip,
  retry,
  pause,
  loop,
  type SerializedError,
} from './errors.ts';
export type {
  RunOptions,
  FlowRunResult,
  RunProgress,
  TaskStateEvent,
  TaskRunRecord,
  NodeRef,
} from './runner/types.ts';
export type { Executor } from './executor/types.ts';
export { LocalExecutor, PoolExecutor, ClusterExecutor, type ClusterExecutorOptions } from './executor/index.ts';
export { LocalCluster, type LocalClusterOptions, type ClusterStatus } from './cluster/local-cluster.ts';
export { ClusterConnectionError } from './cluster/errors.ts';
