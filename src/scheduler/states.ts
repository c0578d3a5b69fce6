/**
 * Task state codes: small integers in the core's hot arrays, names at the edges.
 *
 * The finished states split into three classes that triggers and the flow's final
 * state reason about: success-like (Success, Cached, Mapped), skipped, and failed-like
 * (Failed, TimedOut, TriggerFailed, Cancelled). As in Prefect 1, Skipped also counts
 * as successful for triggers.
 */
import type { TaskStateName } from '../flow/spec.ts';

export const PENDING = 0; // waiting for upstream tasks
export const READY = 1; // all inputs there, trigger passed, queued ("Scheduled")
export const RUNNING = 2; // dispatched to the executor with the current run id
export const RETRYING = 3; // failed, waiting for its retry time
export const MAPPING = 4; // a mapped parent whose children are not all finished
export const PAUSED = 5; // paused by a signal or a manualOnly trigger; waits for resume
export const LOOPED = 6; // raised the loop signal: passes straight on to READY (transient, visible to listeners)
export const SUCCESS = 7;
export const CACHED = 8;
export const MAPPED = 9; // a mapped parent whose children all finished
export const SKIPPED = 10;
export const FAILED = 11;
export const TIMED_OUT = 12;
export const TRIGGER_FAILED = 13;
export const CANCELLED = 14;
export const N_STATES = 15;

export type StateCode = number;

export const STATE_NAMES: readonly TaskStateName[] = [
  'Pending',
  'Scheduled',
  'Running',
  'Retrying',
  'Mapped',
  'Paused',
  'Looped',
  'Success',
  'Cached',
  'Mapped',
  'Skipped',
  'Failed',
  'TimedOut',
  'TriggerFailed',
  'Cancelled',
];

/** Every task state name once (MAPPING and MAPPED are both 'Mapped'): the names the edges accept. */
export const TASK_STATE_NAMES = [...new Set(STATE_NAMES)] as readonly TaskStateName[] as readonly [TaskStateName, ...TaskStateName[]];

/** Short names that tell MAPPING and MAPPED apart, for stories and errors. */
export const STATE_LABELS: readonly string[] = [
  'pending',
  'ready',
  'running',
  'retrying',
  'mapping',
  'paused',
  'looped',
  'success',
  'cached',
  'mapped',
  'skipped',
  'failed',
  'timed-out',
  'trigger-failed',
  'cancelled',
];

export const isFinished = (s: StateCode): boolean => s >= SUCCESS;
/** The states a task run does not leave again (`isFinished`), by name. */
export const FINISHED_STATE_NAMES: ReadonlySet<TaskStateName> = new Set(STATE_NAMES.filter((_, code) => isFinished(code)));
export const isSuccessLike = (s: StateCode): boolean => s === SUCCESS || s === CACHED || s === MAPPED;
export const isFailedLike = (s: StateCode): boolean => s >= FAILED;

/** Outcome classes as indices into per-task counters. */
export const CLS_SUCCESS = 0;
export const CLS_SKIPPED = 1;
export const CLS_FAILED = 2;

export function classOf(s: StateCode): number {
  if (s === SKIPPED) return CLS_SKIPPED;
  return isFailedLike(s) ? CLS_FAILED : CLS_SUCCESS;
}
