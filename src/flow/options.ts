/**
 * User-facing task options and their resolution into `TaskOptions` (spec.ts): defaults
 * filled in, durations parsed, everything checked once at definition time with an error
 * that names the task and the option.
 */
import { FlowValidationError } from '../errors.ts';
import type {
  CacheValidatorName,
  ResultSpec,
  StateHandlerFn,
  TaskOptions,
  TriggerSpec,
} from './spec.ts';
import { resolveTrigger, triggers, type TriggerInput } from './triggers.ts';

/** Milliseconds, or a string such as `'200ms'`, `'5s'`, `'1.5m'`, `'2h'`, `'1d'`. */
export type Duration = number | `${number}${'ms' | 's' | 'm' | 'h' | 'd'}`;

/** An error class, or an error name, that `retryOn` matches. */
export type RetryOnInput = string | (abstract new (...args: any[]) => Error);

/** Options of `task(options, fn)`; every field is optional. */
export interface TaskOptionsInput {
  /** Task name (default: the function's name; an ordinal `@n` when it has none). */
  name?: string;
  tags?: readonly string[];
  /** How many times to retry after a failure (default 0). */
  maxRetries?: number;
  /** Wait between retries (default 0). */
  retryDelay?: Duration;
  /** Only retry on these errors (classes or names, matched up the prototype chain). Default: any error. */
  retryOn?: RetryOnInput | readonly RetryOnInput[];
  /** Stop the task after this long (default: no timeout). */
  timeout?: Duration;
  /** When the task may run given its upstream states (default `triggers.allSuccessful`). */
  trigger?: TriggerInput;
  /** Skip when an upstream was skipped (default true). */
  skipOnUpstreamSkip?: boolean;
  /** Reuse a result for this long (default: no caching). */
  cacheFor?: Duration;
  cacheValidator?: CacheValidatorName | ((args: readonly unknown[], cached: readonly unknown[]) => boolean);
  cacheKey?: string;
  /** Write results to `result.location` (default: true when `result` or `target` is given). */
  checkpoint?: boolean;
  result?: ResultSpec;
  /** Shorthand for `result: { target }`. */
  target?: string;
  stateHandlers?: readonly StateHandlerFn[];
  onFailure?: StateHandlerFn;
  /** Higher runs first among ready tasks (default 0). */
  priority?: number;
  /** Abstract resources, e.g. `{ GPU: 1 }`. */
  resources?: Readonly<Record<string, number>>;
  /** Override of the defining module's URL (default: detected from the call stack of `task()`). */
  module?: string;
}

/** Options that a single use of a task may override (everything but `module`). */
export type TaskOverrides = Omit<TaskOptionsInput, 'module'>;

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const DURATION_RE = /^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)?\s*$/;

/** Parse a duration to ms; `where` names the task and option for the error. */
export function parseDuration(value: unknown, where: string, task?: string): number {
  if (typeof value === 'number') {
    if (Number.isFinite(value) && value >= 0) return value;
    throw new FlowValidationError(`${where}: expected a non-negative number of ms, got ${String(value)}`, task);
  }
  if (typeof value === 'string') {
    const m = DURATION_RE.exec(value);
    if (m !== null) return Math.round(Number(m[1]) * (UNITS[m[2] ?? 'ms'] ?? 1));
    throw new FlowValidationError(`${where}: bad duration "${value}" (use ms as a number, or a string like '200ms', '5s', '1m', '2h')`, task);
  }
  throw new FlowValidationError(`${where}: expected a duration (ms number or string like '5s'), got ${typeof value}`, task);
}

const KNOWN = new Set<string>([
  'name', 'tags', 'maxRetries', 'retryDelay', 'retryOn', 'timeout', 'trigger', 'skipOnUpstreamSkip',
  'cacheFor', 'cacheValidator', 'cacheKey', 'checkpoint', 'result', 'target', 'stateHandlers',
  'onFailure', 'priority', 'resources', 'module',
]);
const VALIDATORS = new Set<string>(['durationOnly', 'allInputs', 'allParameters', 'partialInputsOnly']);

const EMPTY: readonly never[] = Object.freeze([]);
const NO_RESOURCES: Readonly<Record<string, number>> = Object.freeze({});

/** Options of a node that is not a user task (parameter, inline): defaults with a name. */
export function defaultOptions(name: string, trigger: TriggerSpec = triggers.allSuccessful, skipOnUpstreamSkip = true): TaskOptions {
  return Object.freeze({
    name,
    tags: EMPTY,
    maxRetries: 0,
    retryDelayMs: 0,
    retryOn: null,
    timeoutMs: 0,
    trigger,
    skipOnUpstreamSkip,
    cacheForMs: 0,
    cacheValidator: 'durationOnly',
    cacheKey: null,
    checkpoint: false,
    result: null,
    stateHandlers: EMPTY,
    onFailure: null,
    priority: 0,
    resources: NO_RESOURCES,
  });
}

/**
 * Resolve user options into `TaskOptions`. `name` is the resolved task name (used in
 * errors as `task "name"`); unknown keys are an error too (a typo would otherwise be
 * silently ignored).
 */
export function resolveOptions(name: string, input: TaskOptionsInput): TaskOptions {
  const where = (opt: string): string => `task "${name}": option ${opt}`;
  for (const k of Object.keys(input)) {
    if (!KNOWN.has(k)) throw new FlowValidationError(`task "${name}": unknown option "${k}"`, name);
  }

  let tags: readonly string[] = EMPTY;
  if (input.tags !== undefined) {
    if (!Array.isArray(input.tags) || !input.tags.every((t) => typeof t === 'string')) {
      throw new FlowValidationError(`${where('tags')}: expected an array of strings`, name);
    }
    tags = Object.freeze([...new Set(input.tags)]);
  }

  const maxRetries = input.maxRetries ?? 0;
  if (!Number.isInteger(maxRetries) || maxRetries < 0) {
    throw new FlowValidationError(`${where('maxRetries')}: must be a non-negative integer, got ${String(maxRetries)}`, name);
  }
  const retryDelayMs = input.retryDelay === undefined ? 0 : parseDuration(input.retryDelay, where('retryDelay'), name);
  const timeoutMs = input.timeout === undefined ? 0 : parseDuration(input.timeout, where('timeout'), name);
  const cacheForMs = input.cacheFor === undefined ? 0 : parseDuration(input.cacheFor, where('cacheFor'), name);

  let retryOn: readonly string[] | null = null;
  if (input.retryOn !== undefined) {
    const list = (Array.isArray(input.retryOn) ? input.retryOn : [input.retryOn]) as readonly unknown[];
    retryOn = Object.freeze(
      list.map((e) => {
        if (typeof e === 'string' && e !== '') return e;
        if (typeof e === 'function' && typeof e.name === 'string' && e.name !== '') return e.name;
        throw new FlowValidationError(`${where('retryOn')}: expected error classes or error names, got ${String(e)}`, name);
      }),
    );
  }

  const trigger = input.trigger === undefined ? triggers.allSuccessful : resolveTrigger(input.trigger, `task "${name}"`, name);

  const skipOnUpstreamSkip = input.skipOnUpstreamSkip ?? true;
  if (typeof skipOnUpstreamSkip !== 'boolean') throw new FlowValidationError(`${where('skipOnUpstreamSkip')}: expected a boolean`, name);

  const cacheValidator = input.cacheValidator ?? 'durationOnly';
  if (typeof cacheValidator !== 'function' && !VALIDATORS.has(cacheValidator)) {
    throw new FlowValidationError(`${where('cacheValidator')}: unknown validator "${String(cacheValidator)}" (one of ${[...VALIDATORS].join(', ')}, or a function)`, name);
  }
  const cacheKey = input.cacheKey ?? null;
  if (cacheKey !== null && (typeof cacheKey !== 'string' || cacheKey === '')) {
    throw new FlowValidationError(`${where('cacheKey')}: expected a non-empty string`, name);
  }

  let result: ResultSpec | null = null;
  if (input.result !== undefined || input.target !== undefined) {
    const r = { ...(input.result ?? {}) } as { location?: string; target?: string; serializer?: 'json' | 'msgpack' };
    if (input.target !== undefined) r.target = input.target;
    for (const k of ['location', 'target'] as const) {
      if (r[k] !== undefined && (typeof r[k] !== 'string' || r[k] === '')) {
        throw new FlowValidationError(`${where(k === 'target' && input.target !== undefined ? 'target' : `result.${k}`)}: expected a non-empty string`, name);
      }
    }
    if (r.serializer !== undefined && r.serializer !== 'json' && r.serializer !== 'msgpack') {
      throw new FlowValidationError(`${where('result.serializer')}: expected 'json' or 'msgpack', got "${String(r.serializer)}"`, name);
    }
    result = Object.freeze(r);
  }
  const checkpoint = input.checkpoint ?? result !== null;
  if (typeof checkpoint !== 'boolean') throw new FlowValidationError(`${where('checkpoint')}: expected a boolean`, name);

  let stateHandlers: readonly StateHandlerFn[] = EMPTY;
  if (input.stateHandlers !== undefined) {
    if (!Array.isArray(input.stateHandlers) || !input.stateHandlers.every((h) => typeof h === 'function')) {
      throw new FlowValidationError(`${where('stateHandlers')}: expected an array of functions`, name);
    }
    stateHandlers = Object.freeze([...input.stateHandlers]);
  }
  const onFailure = input.onFailure ?? null;
  if (onFailure !== null && typeof onFailure !== 'function') throw new FlowValidationError(`${where('onFailure')}: expected a function`, name);

  const priority = input.priority ?? 0;
  if (typeof priority !== 'number' || !Number.isFinite(priority)) {
    throw new FlowValidationError(`${where('priority')}: expected a finite number, got ${String(priority)}`, name);
  }

  let resources: Readonly<Record<string, number>> = NO_RESOURCES;
  if (input.resources !== undefined) {
    if (input.resources === null || typeof input.resources !== 'object') throw new FlowValidationError(`${where('resources')}: expected an object of amounts`, name);
    for (const [k, v] of Object.entries(input.resources)) {
      if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) {
        throw new FlowValidationError(`${where(`resources.${k}`)}: expected a non-negative number, got ${String(v)}`, name);
      }
    }
    resources = Object.freeze({ ...input.resources });
  }

  return Object.freeze({
    name,
    tags,
    maxRetries,
    retryDelayMs,
    retryOn,
    timeoutMs,
    trigger,
    skipOnUpstreamSkip,
    cacheForMs,
    cacheValidator,
    cacheKey,
    checkpoint,
    result,
    stateHandlers,
    onFailure,
    priority,
    resources,
  });
}
