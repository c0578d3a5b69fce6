/**
 * Executor factory for the benchmarks: executor name → a fresh instance.
 *
 * A run starts and shuts down the executor it is given, so every timed run gets a new
 * one (its start-up — threads, module imports — is part of what a user waits for and is
 * inside the timing). The exception is `pool-warm`: one kept-alive pool (per thread
 * count) that every run reuses, as a Dask user keeps a cluster up across computations;
 * its start-up falls in the untimed warm-up run, so its figures are the steady state.
 * `cluster` and `cluster-warm` are the same two policies for a temporary local cluster
 * (a scheduler and `workers` worker processes × 1 thread; see `cluster.ts`).
 * `releaseExecutors()` closes such shared executors (the harness calls it after each
 * case). The executors are imported on first use: the harness, the shapes and the
 * baselines load without them. To add one, register a factory.
 */
import type { Executor } from '../src/executor/types.ts';

export interface ExecutorSettings {
  /** Threads / processes / workers for executors that have several. */
  readonly workers: number;
}

export type ExecutorFactory = (settings: ExecutorSettings) => Promise<Executor>;

/** Shared executors that outlive a run (closed by `releaseExecutors`), by name and workers. */
const kept = new Map<string, Executor>();

const FACTORIES = new Map<string, ExecutorFactory>([
  [
    'local',
    async () => {
      const { LocalExecutor } = await import('../src/executor/index.ts');
      return new LocalExecutor();
    },
  ],
  [
    'pool',
    async ({ workers }) => {
      const { PoolExecutor } = await import('../src/executor/index.ts');
      return new PoolExecutor({ threads: workers });
    },
  ],
  [
    // One warm pool (keepAlive) reused by every run: no start-up inside the timing (not in `all`).
    'pool-warm',
    async ({ workers }) => {
      const id = `pool-warm/${workers}`;
      let ex = kept.get(id);
      if (ex === undefined) {
        const { PoolExecutor } = await import('../src/executor/index.ts');
        ex = new PoolExecutor({ threads: workers, keepAlive: true });
        kept.set(id, ex);
      }
      return ex;
    },
  ],
  [
    // The pool on child processes instead of threads (not in `all`).
    'process',
    async ({ workers }) => {
      const { PoolExecutor } = await import('../src/executor/index.ts');
      return new PoolExecutor({ processes: workers });
    },
  ],
  [
    // A fresh temporary cluster per run: a scheduler and `workers` worker processes × 1
    // thread, started and stopped inside the timing like `pool` (not in `all`).
    'cluster',
    async ({ workers }) => {
      const { BenchClusterExecutor } = await import('./cluster.ts');
      return new BenchClusterExecutor('cluster', { workers, threads: 1 }, false);
    },
  ],
  [
    // One kept-alive temporary cluster reused by every run, like `pool-warm` (not in `all`).
    'cluster-warm',
    async ({ workers }) => {
      const id = `cluster-warm/${workers}`;
      let ex = kept.get(id);
      if (ex === undefined) {
        const { BenchClusterExecutor } = await import('./cluster.ts');
        ex = new BenchClusterExecutor('cluster-warm', { workers, threads: 1 }, true);
        kept.set(id, ex);
      }
      return ex;
    },
  ],
]);

/** Adds (or replaces) a named executor factory, e.g. `registerExecutor('my-executor', ...)`. */
export function registerExecutor(name: string, factory: ExecutorFactory): void {
  FACTORIES.set(name, factory);
}

/** Names accepted by `--executor` (besides `all`), in registration order. */
export function executorNames(): string[] {
  return [...FACTORIES.keys()];
}

/** Executor names that are clusters (their shape runs get the ws baselines and the cluster table). */
export function isClusterExecutor(name: string): boolean {
  return name === 'cluster' || name === 'cluster-warm';
}

/** The `--executor all` set. */
export const DEFAULT_EXECUTORS: readonly string[] = Object.freeze(['local', 'pool', 'pool-warm']);

export async function createExecutor(name: string, settings: ExecutorSettings): Promise<Executor> {
  const factory = FACTORIES.get(name);
  if (factory === undefined) throw new RangeError(`unknown executor '${name}' (known: ${executorNames().join(', ')})`);
  return factory(settings);
}

/** Closes the shared executors (`pool-warm`, `cluster-warm`): their workers would keep the process alive. */
export async function releaseExecutors(): Promise<void> {
  const all = [...kept.values()];
  kept.clear();
  await Promise.all(all.map((ex) => ex.close?.() ?? ex.shutdown()));
}
