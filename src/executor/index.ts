/**
 * Executors: how the tasks of one flow run execute.
 *
 * - `LocalExecutor`: in this thread, one call after another (debugging, tiny tasks).
 * - `PoolExecutor`: a local pool of worker threads (piscina) or child processes, calls
 *   moved in adaptive batches. `keepAlive: true` keeps the workers up across runs (a
 *   warm pool: each run's `shutdown()` ends only its session; `close()` ends the pool).
 * - `ClusterExecutor`: a weft cluster (a scheduler and worker processes over WebSockets),
 *   a running one by `address` or a temporary LocalCluster; `flow.run()` hands it the
 *   whole graph.
 */
export type { Executor, ExecutorSession, Outcome, OutcomeStatus, TaskCall } from './types.ts';
export { LocalExecutor, type LocalExecutorOptions } from './local.ts';
export { PoolExecutor, type PoolOptions } from './pool.ts';
export { ClusterExecutor, type ClusterExecutorOptions } from './cluster.ts';
