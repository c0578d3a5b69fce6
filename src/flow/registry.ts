/**
 * The process-wide task registry: how a worker finds the function the user wrote.
 *
 * `task()` registers every definition under a stable key, `<module url>#<name>`. A worker
 * imports the module (which runs the same `task()` calls at its top level) and looks the
 * key up here. The map lives on `globalThis` under a symbol so that every copy of weft
 * loaded in one thread (a flow importing `weft` through another path) shares it.
 */
import type { TaskOptions } from './spec.ts';

export interface TaskDef {
  /** `<module url>#<name>`, or `<module url>#@<ordinal>` for an unnamed task. */
  readonly key: string;
  readonly name: string;
  /** File URL of the defining module ('' when unknown). */
  readonly module: string;
  readonly fn: (...args: any[]) => unknown;
  readonly options: TaskOptions;
  /**
   * True when the task was defined while a flow builder was running (a closure): it
   * exists only in this thread, so only in-process executors can run it.
   */
  readonly closure: boolean;
}

const REGISTRY = Symbol.for('weft.taskRegistry');
type Registry = Map<string, TaskDef>;

function registry(): Registry {
  const g = globalThis as unknown as Record<symbol, Registry | undefined>;
  let r = g[REGISTRY];
  if (r === undefined) {
    r = new Map();
    g[REGISTRY] = r;
  }
  return r;
}

/** Register a definition. A second definition under the same key replaces the first (module re-evaluation); `task()` prevents real clashes by naming. */
export function registerTask(def: TaskDef): void {
  registry().set(def.key, def);
}

export function getTask(key: string): TaskDef | undefined {
  return registry().get(key);
}

export function hasTask(key: string): boolean {
  return registry().has(key);
}

/** Every registered key (for diagnostics). */
export function taskKeys(): string[] {
  return [...registry().keys()];
}
