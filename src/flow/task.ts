/**
 * `task(fn)` / `task(options, fn)`: define a task (Prefect 1's `@task`).
 *
 * Every definition is registered under a stable key, `<module url>#<name>`, so that a
 * worker that imports the same module (running the same top-level `task()` calls in the
 * same order) finds the same function:
 *
 * - module URL: `options.module`, else the caller's module read from the stack (once per
 *   definition, never per call);
 * - name: `options.name ?? fn.name`; an unnamed function gets its ordinal in the module,
 *   `@3` (the third `task()` of that module);
 * - a second definition with the same name in the same module gets `name~2`, a third
 *   `name~3`: deterministic, because a module's top level runs in the same order in
 *   every thread;
 * - a task defined while a flow builder runs is a closure (`closure: true`): it exists
 *   only in this thread, gets a process-unique key (`name~closure<n>`, unnamed: `@c<n>`),
 *   and only in-process executors run it.
 *
 * Calling a task inside a flow builder adds a node and returns a typed `Ref`; outside a
 * builder it throws — use `t.fn(...)` to call the function itself.
 */
import { FlowValidationError } from '../errors.ts';
import { currentBuilder, type CallSettings } from './builder.ts';
import { callerModuleUrl, toModuleUrl } from './module-url.ts';
import { resolveOptions, type TaskOptionsInput, type TaskOverrides } from './options.ts';
import type { MapArgs, Ref, TaskArgs } from './ref.ts';
import { registerTask, type TaskDef } from './registry.ts';
import type { TaskOptions } from './spec.ts';

/** Options for one use of a task: a node key, ordering-only upstream refs, option overrides. */
export interface CallOptions extends TaskOverrides {
  /** Key of this node in the flow (default: the task name, then `name-2`...). Must be unique. */
  name?: string;
  /** Ordering-only upstream edges: run after these (their states reach the trigger). */
  upstream?: readonly Ref<unknown>[];
}

/** A task with per-use options applied: call it, or `.map()` it, inside a flow builder. */
export interface BoundTask<A extends unknown[], R> {
  (...args: TaskArgs<A>): Ref<Awaited<R>>;
  /** One child per element of the mapped arguments: a ref to the list of results. */
  map(...args: MapArgs<A>): Ref<Awaited<R>[]>;
}

/** A task definition. */
export interface Task<A extends unknown[] = any[], R = unknown> extends BoundTask<A, R> {
  /** The function itself: `t.fn(1, 2)` calls it directly. */
  readonly fn: (...args: A) => R;
  /** Registry key, `<module url>#<name>`. */
  readonly key: string;
  readonly name: string;
  /** File URL of the defining module ('' when unknown). */
  readonly module: string;
  readonly options: TaskOptions;
  /** True when defined inside a flow builder (only in-process executors can run it). */
  readonly closure: boolean;
  readonly def: TaskDef;
  /** The same task with per-use options: `t.with({ name: 'load_a', maxRetries: 2 })(x)`. */
  with(opts: CallOptions): BoundTask<A, R>;
}

interface ModuleCounters {
  /** task() definitions seen in this module (for `@n` names). */
  ordinal: number;
  /** Definitions per name (for `name~n`). */
  readonly names: Map<string, number>;
}

// On globalThis, like the registry: two copies of weft in one thread count together.
const COUNTERS = Symbol.for('weft.taskModuleCounters');
const CLOSURES = Symbol.for('weft.closureCount');
const g = globalThis as unknown as Record<symbol, unknown>;
const modules = (g[COUNTERS] ??= new Map<string, ModuleCounters>()) as Map<string, ModuleCounters>;

function countersOf(module: string): ModuleCounters {
  let c = modules.get(module);
  if (c === undefined) {
    c = { ordinal: 0, names: new Map() };
    modules.set(module, c);
  }
  return c;
}

export function task<A extends unknown[], R>(fn: (...args: A) => R): Task<A, R>;
export function task<A extends unknown[], R>(options: TaskOptionsInput, fn: (...args: A) => R): Task<A, R>;
export function task(a: TaskOptionsInput | ((...args: any[]) => unknown), b?: (...args: any[]) => unknown): Task<any[], unknown> {
  const input: TaskOptionsInput = typeof a === 'function' ? {} : (a ?? {});
  const fn = typeof a === 'function' ? a : b;
  if (typeof fn !== 'function') {
    throw new TypeError(`task(): expected a function${input.name === undefined ? '' : ` for task "${input.name}"`}, got ${typeof fn}`);
  }
  if (typeof input !== 'object') throw new TypeError('task(options, fn): options must be an object');

  let module: string;
  if (input.module !== undefined) {
    if (typeof input.module !== 'string' || input.module === '') {
      throw new FlowValidationError(`task "${input.name ?? fn.name}": option module: expected a file URL or an absolute path`);
    }
    module = toModuleUrl(input.module) || input.module;
  } else {
    module = callerModuleUrl();
  }

  // A closure (defined while a builder runs) exists only in this thread: it takes a
  // process-unique key and leaves the module's counters alone, so the keys of the
  // module's top-level tasks do not depend on when flows were built.
  const closure = currentBuilder() !== undefined;
  let name = input.name ?? fn.name;
  let key: string;
  let options: TaskOptions;
  const { module: _m, ...rest } = input;
  if (closure) {
    const n = ((g[CLOSURES] as number | undefined) ?? 0) + 1;
    g[CLOSURES] = n;
    if (typeof name !== 'string') throw new FlowValidationError(`task @c${n} of ${module || 'an unknown module'}: option name: expected a string`);
    if (name === '') name = `@c${n}`;
    options = resolveOptions(name, rest);
    key = `${module}#${name}~closure${n}`;
  } else {
    const counters = countersOf(module);
    const ordinal = ++counters.ordinal;
    if (typeof name !== 'string') throw new FlowValidationError(`task @${ordinal} of ${module || 'an unknown module'}: option name: expected a string`);
    if (name === '') name = `@${ordinal}`;
    options = resolveOptions(name, rest);
    const uses = (counters.names.get(name) ?? 0) + 1;
    counters.names.set(name, uses);
    key = uses === 1 ? `${module}#${name}` : `${module}#${name}~${uses}`;
  }

  const def: TaskDef = Object.freeze({ key, name, module, fn, options, closure });
  registerTask(def);
  return makeTask(def, rest);
}

/** User options of each definition (for per-use overrides, which re-resolve them). */
const rawOptions = new WeakMap<TaskDef, TaskOverrides>();

/** Options and call settings for one use of `t` with `opts` (shared by `t.with()` and `Flow.add`). */
export function resolveCall(def: TaskDef, opts: CallOptions): { options: TaskOptions; call: CallSettings } {
  const { name, upstream, ...overrides } = opts;
  if (name !== undefined && (typeof name !== 'string' || name === '')) {
    throw new FlowValidationError(`task "${def.name}": name of a use must be a non-empty string`, def.name);
  }
  const hasOverrides = Object.keys(overrides).length > 0;
  const options = hasOverrides || name !== undefined
    ? resolveOptions(name ?? def.name, { ...(rawOptions.get(def) ?? {}), ...overrides })
    : def.options;
  return { options, call: { name, upstream } };
}

function makeTask(def: TaskDef, raw: TaskOverrides): Task<any[], unknown> {
  rawOptions.set(def, raw);
  const t = bind(def, def.options, null) as Task<any[], unknown> & Record<string, unknown>;
  Object.defineProperties(t, {
    fn: { value: def.fn, enumerable: true },
    key: { value: def.key, enumerable: true },
    module: { value: def.module, enumerable: true },
    options: { value: def.options, enumerable: true },
    closure: { value: def.closure, enumerable: true },
    def: { value: def, enumerable: false },
    with: {
      value: (opts: CallOptions): BoundTask<any[], unknown> => {
        const { options, call } = resolveCall(def, opts);
        return bind(def, options, call);
      },
    },
  });
  // A function's own `name` is read-only but configurable: make it the task's name.
  Object.defineProperty(t, 'name', { value: def.name });
  return t;
}

function bind(def: TaskDef, options: TaskOptions, call: CallSettings | null): BoundTask<any[], unknown> {
  const f = function (this: unknown, ...args: unknown[]): Ref<unknown> {
    const b = currentBuilder();
    if (b === undefined) {
      throw new Error(`task "${def.name}" called outside a flow builder; use task.fn(...) to call it directly`);
    }
    return b.addTask(def, options, args, false, call);
  } as BoundTask<any[], unknown>;
  f.map = (...args: unknown[]): Ref<any> => {
    const b = currentBuilder();
    if (b === undefined) {
      throw new Error(`task "${def.name}" mapped outside a flow builder; use task.fn(...) to call it directly`);
    }
    return b.addTask(def, options, args, true, call);
  };
  return f;
}
