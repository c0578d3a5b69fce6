/**
 * Finding task functions by key, shared by every executor that runs tasks in a thread
 * it controls (LocalExecutor in-process, PoolExecutor's workers): import the run's
 * modules (their top-level `task()` calls register the tasks), then resolve each key.
 */
import { getTask } from '../flow/registry.ts';
import { TaskResolutionError } from '../errors.ts';

export type TaskFn = (...args: any[]) => unknown;

/** The name part of a task key `<module url>#<name>`. */
export function taskNameOf(key: string): string {
  const i = key.lastIndexOf('#');
  return i < 0 ? key : key.slice(i + 1);
}

/** Module URLs this thread has imported successfully. */
const imported = new Set<string>();

/** Import the run's modules, then resolve every task key (in order). Throws TaskResolutionError. */
/** Whether every one of `modules` was imported here already (`loadTasks` would import nothing). */
export function modulesLoaded(modules: readonly string[]): boolean {
  for (const url of modules) if (!imported.has(url)) return false;
  return true;
}

export async function loadTasks(modules: readonly string[], taskKeys: readonly string[], where = 'a worker'): Promise<TaskFn[]> {
  // Everything already registered here (the thread that built the flow, a warm worker):
  // import nothing. Importing would also deadlock a module that runs its flow with a
  // top-level await: its own import waits for its evaluation, which waits for the run.
  if (taskKeys.length > 0 && taskKeys.every((k) => getTask(k) !== undefined)) return taskKeys.map((k) => resolveTask(k, where));
  for (const url of modules) {
    // A module imported once stays in the module map: importing it again would only cost
    // a trip through the loader's resolve hook (off-thread under tsx), per run.
    if (imported.has(url)) continue;
    try {
      await import(url);
      imported.add(url);
    } catch (err) {
      const cause = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
      throw new TaskResolutionError(`module ${url} could not be imported in ${where}: ${cause}`);
    }
  }
  return taskKeys.map((k) => resolveTask(k, where));
}

export function resolveTask(key: string, where = 'a worker'): TaskFn {
  const fn = getTask(key)?.fn;
  if (fn === undefined) {
    throw new TaskResolutionError(
      `task "${taskNameOf(key)}" (${key}) cannot be found in ${where}: it is defined inside a function or its module did not register it`,
      key,
    );
  }
  return fn;
}

