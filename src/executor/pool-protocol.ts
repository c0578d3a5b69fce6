/**
 * The PoolExecutor wire protocol: every message between the pool (main side) and one of
 * its workers (a thread or a child process), in one place.
 *
 * Calls and outcomes travel as *columns*: a batch of n calls is one message holding an
 * Int32Array of n × CALL_STRIDE integers, the node keys of the batch as one string (the
 * lengths are in the integers), and every argument of the batch in one flat column — a
 * Float64Array when they are all numbers, else one array. A batch of outcomes is one
 * message holding an Int32Array of slots, a Uint8Array of statuses, a Float64Array of
 * start/end times and the values (a Float64Array when all are numbers, nothing when all
 * are null or undefined). Typed arrays and flat strings cost one memcpy to clone (or
 * nothing when transferred), whereas the structured clone of an array or a string per
 * call was the largest per-task cost of the pool (profile: ~0.1 µs per call each way).
 *
 * A call is named on the wire by its *slot*: the index of the pool's in-flight table
 * entry that holds it. The worker sends the slot back; the pool checks that the slot
 * still belongs to the same worker spawn before it trusts the outcome.
 *
 * Sessions: a worker serves one flow run (a session) at a time. A pool that stays up
 * across runs (`keepAlive`) opens each run with a `SessionMsg` to every worker it keeps;
 * task-key indices stay valid across sessions (the table only grows).
 */
import type { SerializedError } from '../errors.ts';

/** Integers per call in `RunMsg.ints`: slot, task index, mapIndex, attempt, loopCount, argument count, key length. */
export const CALL_STRIDE = 7;
export const C_SLOT = 0;
export const C_TASK = 1;
export const C_MAP = 2;
export const C_ATTEMPT = 3;
export const C_LOOP = 4;
export const C_ARGC = 5;
export const C_KEYLEN = 6;

/** Outcome status codes in `DoneMsg.status`. */
export const ST_OK = 0;
export const ST_ERROR = 1;

// ---- main → worker --------------------------------------------------------------

/** Opens a session (a flow run): import its modules, check its task keys, then report ready. */
export interface SessionMsg {
  readonly op: 'session';
  /** Echoed by the worker's `ready` / `startError`; a reply with another epoch is stale. */
  readonly epoch: number;
  readonly flowName: string;
  readonly modules: readonly string[];
  /** Appended to the worker's task table (indices continue after the ones it knows). */
  readonly newKeys: readonly string[];
  /** Indices (in the task table) of this session's task keys: each must resolve. */
  readonly check: readonly number[];
  readonly parameters: Readonly<Record<string, unknown>>;
  /** 'threads' or 'processes': only used in error messages ("between threads"). */
  readonly mode: 'threads' | 'processes';
}

/** A batch of calls. */
export interface RunMsg {
  readonly op: 'run';
  /** n × CALL_STRIDE: [slot, taskIndex, mapIndex, attempt, loopCount, argc, keyLength]. */
  readonly ints: Int32Array;
  /** The node keys of the calls, concatenated (call i's is the next `keyLength` characters). */
  readonly names: string;
  /** Every argument of the batch in call order (call i takes the next `argc`), when all are numbers. */
  readonly nums?: Float64Array;
  /** Every argument of the batch in call order, otherwise (absent when no call has arguments). */
  readonly args?: unknown[];
  /** Present only when some call has loopCount > 0: loopResults[i] for call i. */
  readonly loopResults?: unknown[];
  /** Task keys appended to the worker's table (indices continue after the known ones). */
  readonly newKeys?: string[];
}

/** Finish: stop reading, resolve the serving task (threads) or exit (processes). */
export interface StopMsg {
  readonly op: 'stop';
}

export type ToWorker = SessionMsg | RunMsg | StopMsg;

// ---- worker → main --------------------------------------------------------------

export interface ReadyMsg {
  readonly op: 'ready';
  readonly epoch: number;
  /** 'thread-<threadId>' or 'process-<pid>'. */
  readonly worker: string;
}

/** The session could not open: a module did not import or a task key did not resolve. */
export interface StartErrorMsg {
  readonly op: 'startError';
  readonly epoch: number;
  readonly error: SerializedError;
}

/** A batch of outcomes. */
export interface DoneMsg {
  readonly op: 'done';
  readonly slots: Int32Array;
  /** ST_OK or ST_ERROR per outcome. */
  readonly status: Uint8Array;
  /** 2 per outcome: wall-clock start, end (ms). */
  readonly times: Float64Array;
  /** The result (ST_OK) or a SerializedError (ST_ERROR) per outcome, when mixed. */
  readonly values?: unknown[];
  /** Every outcome is ST_OK with a number result. */
  readonly nums?: Float64Array;
  /** With neither `values` nor `nums`: every outcome is ST_OK and its value is `fill` (null or undefined). */
  readonly fill?: null;
}

export type FromWorker = ReadyMsg | StartErrorMsg | DoneMsg;
