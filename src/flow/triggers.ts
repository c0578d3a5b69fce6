/**
 * Trigger helpers (Prefect 1's `prefect.triggers`): when may a task run, given the
 * final states of its upstream tasks? The scheduler core evaluates them; this module
 * only builds the `TriggerSpec` data.
 *
 *   task({ trigger: triggers.anyFailed }, cleanup)
 *   task({ trigger: triggers.someSuccessful({ atLeast: 2 }) }, report)
 *   task({ trigger: (up) => up.length > 0 && up.every((u) => u.state !== 'Failed') }, custom)
 */
import { FlowValidationError } from '../errors.ts';
import type { TriggerFn, TriggerName, TriggerSpec } from './spec.ts';

/** Bounds for `someSuccessful` / `someFailed` (inclusive; either may be left out). */
export interface TriggerBounds {
  readonly atLeast?: number;
  readonly atMost?: number;
}

const FACTORY = Symbol.for('weft.triggerFactory');

/** A trigger helper that must be called with its bounds (`someSuccessful({ atLeast: 1 })`). */
export interface TriggerFactory {
  (bounds?: TriggerBounds): TriggerSpec;
  readonly [FACTORY]: TriggerName;
}

const builtin = (name: TriggerName): TriggerSpec => Object.freeze({ kind: 'builtin', name });

function factory(name: 'someSuccessful' | 'someFailed'): TriggerFactory {
  const make = (bounds: TriggerBounds = {}): TriggerSpec => {
    const { atLeast, atMost } = bounds;
    for (const [k, v] of [['atLeast', atLeast], ['atMost', atMost]] as const) {
      if (v !== undefined && !(Number.isInteger(v) && v >= 0)) {
        throw new FlowValidationError(`triggers.${name}: ${k} must be a non-negative integer, got ${String(v)}`);
      }
    }
    if (atLeast !== undefined && atMost !== undefined && atLeast > atMost) {
      throw new FlowValidationError(`triggers.${name}: atLeast (${atLeast}) is greater than atMost (${atMost})`);
    }
    const spec: { kind: 'builtin'; name: TriggerName; atLeast?: number; atMost?: number } = { kind: 'builtin', name };
    if (atLeast !== undefined) spec.atLeast = atLeast;
    if (atMost !== undefined) spec.atMost = atMost;
    return Object.freeze(spec);
  };
  return Object.assign(make, { [FACTORY]: name }) as TriggerFactory;
}

export const triggers = Object.freeze({
  /** Run when every upstream succeeded (Success, Cached, Mapped, Skipped count as success). The default. */
  allSuccessful: builtin('allSuccessful'),
  /** Run when every upstream failed. */
  allFailed: builtin('allFailed'),
  /** Run when at least one upstream succeeded. */
  anySuccessful: builtin('anySuccessful'),
  /** Run when at least one upstream failed. */
  anyFailed: builtin('anyFailed'),
  /** Run once every upstream finished, whatever its state. */
  allFinished: builtin('allFinished'),
  /** Same as allFinished (Prefect's `always_run`). */
  alwaysRun: builtin('alwaysRun'),
  /** Run unless every upstream was skipped (then skip); fail the trigger if an upstream failed. */
  notAllSkipped: builtin('notAllSkipped'),
  /** Never start on its own: the task pauses until the run is resumed. */
  manualOnly: builtin('manualOnly'),
  /** Run when the number of successful upstreams is within the bounds. */
  someSuccessful: factory('someSuccessful'),
  /** Run when the number of failed upstreams is within the bounds. */
  someFailed: factory('someFailed'),
});

const NAMES = new Set<string>([
  'allSuccessful', 'allFailed', 'anySuccessful', 'anyFailed', 'allFinished',
  'alwaysRun', 'notAllSkipped', 'manualOnly', 'someSuccessful', 'someFailed',
]);

/** What the `trigger` option accepts. */
export type TriggerInput = TriggerSpec | TriggerName | TriggerFn;

/** Normalise a `trigger` option; `where` names the task for the error message. */
export function resolveTrigger(input: TriggerInput, where: string, task?: string): TriggerSpec {
  if (typeof input === 'string') {
    if (!NAMES.has(input)) {
      throw new FlowValidationError(`${where}: option trigger: unknown trigger "${input}" (one of ${[...NAMES].join(', ')})`, task);
    }
    return builtin(input);
  }
  if (typeof input === 'function') {
    const fac = (input as Partial<TriggerFactory>)[FACTORY];
    if (fac !== undefined) {
      throw new FlowValidationError(`${where}: option trigger: call triggers.${fac}({ atLeast, atMost }) instead of passing it uncalled`, task);
    }
    return Object.freeze({ kind: 'custom', fn: input, name: input.name || 'custom' });
  }
  if (input !== null && typeof input === 'object' && (input.kind === 'builtin' || input.kind === 'custom')) {
    if (input.kind === 'builtin' && !NAMES.has(input.name)) {
      throw new FlowValidationError(`${where}: option trigger: unknown trigger "${String(input.name)}"`, task);
    }
    return input;
  }
  throw new FlowValidationError(`${where}: option trigger: expected a trigger from \`triggers\`, a trigger name or a function`, task);
}
