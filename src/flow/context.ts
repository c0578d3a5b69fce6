/**
 * `context()`: what a running task may ask about itself (Prefect 1's `prefect.context`).
 *
 * Executors set the current call around each synchronous task invocation. Read it at the
 * start of the task, before the first `await`: after that point another task may be
 * running on the same thread.
 */
export interface TaskContext {
  readonly flowName: string;
  readonly key: string;
  readonly mapIndex: number;
  readonly attempt: number;
  readonly loopCount: number;
  readonly loopResult: unknown;
  readonly parameters: Readonly<Record<string, unknown>>;
}

let current: TaskContext | null = null;

/** The running task's context. Throws outside a task. */
export function context(): TaskContext {
  if (current === null) throw new Error('context() called outside a running task (call it before the first await)');
  return current;
}

/** For executors: set (or clear with null) the context of the call about to run. */
export function setCurrentContext(ctx: TaskContext | null): void {
  current = ctx;
}
