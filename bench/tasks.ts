/**
 * The benchmark task module.
 *
 * Every benchmark graph calls only the tasks defined here. They are registered at this
 * module's top level under `<module url>#<name>`, so a worker thread or process that
 * imports this file (the graph spec lists it in `modules`) finds the same functions.
 * The bodies are as cheap as possible: a benchmark of a no-op measures the scheduler,
 * the runner and the executor, not the task.
 */
import { registerTask } from '../src/flow/registry.ts';
import { taskOptions } from '../src/flow/defaults.ts';
import type { TaskOptions } from '../src/flow/spec.ts';

/** File URL of this module: the `module` of every benchmark node, and the one entry of `GraphSpec.modules`. */
export const TASKS_MODULE: string = import.meta.url;

/** Resolved options with weft's defaults (no retries, no timeout, all-successful trigger, no cache). */
export function benchOptions(name: string): TaskOptions {
  return Object.freeze(taskOptions({ name }));
}

/** Returns null whatever it is given. Independent tasks and chain links. */
export function noop(..._args: unknown[]): null {
  return null;
}

/** Returns 1: a leaf of a reduction, so the root's value is the leaf count. */
export function one(): number {
  return 1;
}

/**
 * Sum of the inputs: numbers count as themselves, strings and byte arrays as their
 * length, anything else as 0. Reductions (tree, mapreduce) use it; with `one` leaves
 * the root equals the number of leaves, with `kib` leaves it equals 1024 × leaves.
 */
export function sum(...xs: unknown[]): number {
  let s = 0;
  for (const x of xs) {
    if (typeof x === 'number') s += x;
    else if (typeof x === 'string') s += x.length;
    else if (x instanceof Uint8Array) s += x.byteLength;
  }
  return s;
}

/**
 * Spin for `ms` milliseconds on the clock, then return null. Replays use it: the lower
 * bound max(critical path, work / workers) assumes busy cores, so sleeping would be wrong
 * (a sleeping thread frees its core and the bound no longer holds).
 */
export function busy(ms: number): null {
  const end = performance.now() + ms;
  while (performance.now() < end) {}
  return null;
}

const KIB = 'x'.repeat(1024);

/** Returns a 1 KiB string (1024 one-byte characters): a leaf with a result that costs something to move. */
export function kib(): string {
  return KIB;
}

/** The benchmark tasks by name. */
export const BENCH_TASKS = { noop, one, sum, busy, kib } as const;
export type BenchTaskName = keyof typeof BENCH_TASKS;

/** Registry key of a benchmark task. */
export function taskKey(name: BenchTaskName): string {
  return `${TASKS_MODULE}#${name}`;
}

/** One frozen options object per task, shared by every node that calls it. */
export const BENCH_TASK_OPTIONS: Readonly<Record<BenchTaskName, TaskOptions>> = Object.freeze({
  noop: benchOptions('noop'),
  one: benchOptions('one'),
  sum: benchOptions('sum'),
  busy: benchOptions('busy'),
  kib: benchOptions('kib'),
});

for (const name of Object.keys(BENCH_TASKS) as BenchTaskName[]) {
  registerTask({
    key: taskKey(name),
    name,
    module: TASKS_MODULE,
    fn: BENCH_TASKS[name],
    options: BENCH_TASK_OPTIONS[name],
    closure: false,
  });
}
