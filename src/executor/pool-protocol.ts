/**
 * The PoolExecutor wire protocol: every message between the pool (main side) and one of
 * its workers (a thread or a child process), in one place.
 *
 * Calls and outcomes travel as *columns*: a batch of n calls is one message holding an
 * Int32Array of n × CALL_STRIDE integers plus two arrays (node keys, argument lists);
 * a batch of outcomes is one message holding an Int32Array of slots, a Uint8Array of
 * statuses, a Float64Array of start/end times and one array of values. Typed arrays
 * cost one memcpy to clone (or nothing when transferred), so the per-task cost of the
 * wire is a few pointer writes — never an object, a message or a promise per task.
 *
 * A call is named on the wire by its *slot*: the index of the pool's in-flight table
 * entry that holds it. The worker sends the slot back; the pool checks that the slot
 * still belongs to the same worker generation before it trusts the outcome.
 */
import type { SerializedError } from '../errors.ts';

/** Integers per call in `RunMsg.ints`: slot, task index, mapIndex, attempt, loopCount. */
export const CALL_STRIDE = 5;

/** Outcome status codes in `DoneMsg.status`. */
export const ST_OK = 0;
export const ST_ERROR = 1;

/** What a worker needs before it runs anything. */
export interface WorkerInit {
  readonly flowName: string;
  readonly modules: readonly string[];
  /** Index i on the wire = taskKeys[i]. The pool appends keys later with `RunMsg.newKeys`. */
  readonly taskKeys: readonly string[];
  readonly parameters: Readonly<Record<string, unknown>>;
  /** 'threads' or 'processes': only used in error messages ("between threads"). */
  readonly mode: 'threads' | 'processes';
}

// ---- main → worker --------------------------------------------------------------

/** Processes only (threads get `WorkerInit` as their piscina task). */
export interface InitMsg extends WorkerInit {
  readonly op: 'init';
}

/** A batch of calls. */
export interface RunMsg {
  readonly op: 'run';
  /** n × CALL_STRIDE: [slot, taskIndex, mapIndex, attempt, loopCount]. */
  readonly ints: Int32Array;
  /** Node keys (for the task context). */
  readonly keys: string[];
  readonly args: unknown[][];
  /** Present only when some call has loopCount > 0: loopResults[i] for call i. */
  readonly loopResults?: unknown[];
  /** Task keys appended to the worker's table (indices continue after the known ones). */
  readonly newKeys?: string[];
}

/** Finish: stop reading, resolve the serving task (threads) or exit (processes). */
export interface StopMsg {
  readonly op: 'stop';
}

export type ToWorker = InitMsg | RunMsg | StopMsg;

// ---- worker → main --------------------------------------------------------------

export interface ReadyMsg {
  readonly op: 'ready';
  /** 'thread-<threadId>' or 'process-<pid>'. */
  readonly worker: string;
}

/** Start failed: a module did not import or a task key did not resolve. */
export interface StartErrorMsg {
  readonly op: 'startError';
  readonly error: SerializedError;
}

/** A batch of outcomes. */
export interface DoneMsg {
  readonly op: 'done';
  readonly slots: Int32Array;
  /** ST_OK or ST_ERROR per outcome. */
  readonly status: Uint8Array;
  /** The result (ST_OK) or a SerializedError (ST_ERROR). */
  readonly values: unknown[];
  /** 2 per outcome: wall-clock start, end (ms). */
  readonly times: Float64Array;
}

export type FromWorker = ReadyMsg | StartErrorMsg | DoneMsg;
