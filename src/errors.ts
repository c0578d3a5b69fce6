/**
 * Errors with stable names and codes, and the task signals.
 *
 * Errors cross threads and sockets as plain `{ name, message, stack, code, data }`
 * records and are rebuilt into their classes on arrival, so `instanceof` works on the
 * runner's side whatever executor ran the task.
 */

export interface SerializedError {
  name: string;
  message: string;
  stack?: string;
  code?: string;
  /** Signal payload (loop value, skip result, retry delay...) or error-specific data. */
  data?: unknown;
}

/** Base of every error weft raises itself. */
export class WeftError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'WeftError';
    this.code = code;
  }
}

/** The flow is malformed (cycle, missing dependency, duplicate key, bad parameter...). Raised before any task runs. */
export class FlowValidationError extends WeftError {
  constructor(message: string, readonly task?: string) {
    super('FLOW_INVALID', message);
    this.name = 'FlowValidationError';
  }
}

/** A worker could not find a task's function (defined in a closure, module failed to load...). */
export class TaskResolutionError extends WeftError {
  constructor(message: string, readonly task?: string) {
    super('TASK_UNRESOLVABLE', message);
    this.name = 'TaskResolutionError';
  }
}

/** A task's result (or an argument) cannot be sent between threads or processes. */
export class TaskSerializationError extends WeftError {
  constructor(message: string) {
    super('TASK_UNSENDABLE', message);
    this.name = 'TaskSerializationError';
  }
}

/** A task ran past its timeout and was stopped. */
export class TaskTimeoutError extends WeftError {
  constructor(message: string) {
    super('TASK_TIMEOUT', message);
    this.name = 'TaskTimeoutError';
  }
}

/** The worker running the task died (crash, exit, lost connection). */
export class WorkerLostError extends WeftError {
  constructor(message: string) {
    super('WORKER_LOST', message);
    this.name = 'WorkerLostError';
  }
}

/** The run (or the task) was cancelled. */
export class CancelledError extends WeftError {
  constructor(message = 'cancelled') {
    super('CANCELLED', message);
    this.name = 'CancelledError';
  }
}

// ---------------------------------------------------------------------------------
// Signals: a task throws one to choose its own next state (Prefect 1's `signals`).

/** Base class of task signals. */
export class Signal extends Error {
  constructor(message: string, readonly data?: unknown) {
    super(message);
    this.name = 'Signal';
  }
}

/** Fail the task (retries still apply, as for any failure). */
export class FailSignal extends Signal {
  constructor(message = 'failed by signal', data?: unknown) {
    super(message, data);
    this.name = 'FailSignal';
  }
}

/** Skip the task: state Skipped, `data` becomes its result. Downstream tasks skip too unless `skipOnUpstreamSkip: false`. */
export class SkipSignal extends Signal {
  constructor(message = 'skipped', data?: unknown) {
    super(message, data);
    this.name = 'SkipSignal';
  }
}

/** Retry the task after `data.delayMs` (default: the task's retryDelay), whatever maxRetries says. */
export class RetrySignal extends Signal {
  constructor(message = 'retry requested', data?: { delayMs?: number }) {
    super(message, data);
    this.name = 'RetrySignal';
  }
}

/** Pause the task (state Paused) until the run is resumed. */
export class PauseSignal extends Signal {
  constructor(message = 'paused', data?: unknown) {
    super(message, data);
    this.name = 'PauseSignal';
  }
}

/** Run the task again with `data` as the carried loop value (`context().loopResult`). */
export class LoopSignal extends Signal {
  constructor(message = 'loop', data?: unknown) {
    super(message, data);
    this.name = 'LoopSignal';
  }
}

/** Throw from a task: `throw fail('bad row')`. */
export const fail = (message?: string, data?: unknown): FailSignal => new FailSignal(message, data);
export const skip = (message?: string, data?: unknown): SkipSignal => new SkipSignal(message, data);
export const retry = (message?: string, delayMs?: number): RetrySignal =>
  new RetrySignal(message, delayMs === undefined ? undefined : { delayMs });
export const pause = (message?: string): PauseSignal => new PauseSignal(message);
export const loop = (data: unknown, message?: string): LoopSignal => new LoopSignal(message, data);

type ErrorCtor = new (...args: never[]) => Error;
const known = new Map<string, ErrorCtor>([
  ['WeftError', WeftError],
  ['FlowValidationError', FlowValidationError],
  ['TaskResolutionError', TaskResolutionError],
  ['TaskSerializationError', TaskSerializationError],
  ['TaskTimeoutError', TaskTimeoutError],
  ['WorkerLostError', WorkerLostError],
  ['CancelledError', CancelledError],
  ['FailSignal', FailSignal],
  ['SkipSignal', SkipSignal],
  ['RetrySignal', RetrySignal],
  ['PauseSignal', PauseSignal],
  ['LoopSignal', LoopSignal],
  ['TypeError', TypeError],
  ['RangeError', RangeError],
  ['SyntaxError', SyntaxError],
  ['ReferenceError', ReferenceError],
]);

/**
 * Make `deserializeError` rebuild records named `name` as instances of `ctor` (modules
 * that define their own error classes register them, so `instanceof` works after a hop).
 */
export function registerErrorClass(name: string, ctor: ErrorCtor): void {
  known.set(name, ctor);
}

/** Turn anything thrown into a record that survives structured clone and msgpack. */
export function serializeError(err: unknown): SerializedError {
  if (err instanceof Error) {
    const out: SerializedError = { name: err.name, message: err.message };
    if (err.stack !== undefined) out.stack = err.stack;
    const code = (err as { code?: unknown }).code;
    if (typeof code === 'string') out.code = code;
    const data = (err as { data?: unknown }).data;
    if (data !== undefined) out.data = data;
    return out;
  }
  return { name: 'Error', message: typeof err === 'string' ? err : safeString(err) };
}

/** Rebuild a record into an instance of its class (plain `Error` with the name kept, when unknown). */
export function deserializeError(rec: SerializedError): Error {
  const Ctor = known.get(rec.name);
  const err: Error = Object.create((Ctor ?? Error).prototype) as Error;
  Object.defineProperty(err, 'message', { value: rec.message, writable: true, configurable: true });
  Object.defineProperty(err, 'name', { value: rec.name, writable: true, configurable: true });
  if (rec.stack !== undefined) Object.defineProperty(err, 'stack', { value: rec.stack, writable: true, configurable: true });
  if (rec.code !== undefined) Object.defineProperty(err, 'code', { value: rec.code, writable: true, configurable: true });
  if (rec.data !== undefined) Object.defineProperty(err, 'data', { value: rec.data, writable: true, configurable: true });
  return err;
}

function safeString(v: unknown): string {
  try {
    return String(v);
  } catch {
    return Object.prototype.toString.call(v);
  }
}
