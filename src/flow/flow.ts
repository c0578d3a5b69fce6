/**
 * `Flow`: a named graph of task uses, built by a builder function (Prefect 1's
 * `with Flow(...) as f:`) or imperatively (`f.add`, `f.setDependencies`), and run with
 * `flow.run()`.
 *
 *   const double = task((x: number) => x * 2);
 *   const f = flow('demo', () => {
 *     const n = parameter('n', 3);
 *     return { out: double(n) };
 *   });
 *   const r = await f.run({ parameters: { n: 5 } });
 *   r.result(f.outputs.out); // number
 *
 * `Flow` is a thin facade over the internal `GraphBuilder` (builder.ts), which keeps
 * the nodes and produces the validated `GraphSpec`.
 */
import { WeftError } from '../errors.ts';
import type { Executor } from '../executor/types.ts';
import type { RunConfig } from '../run-config/index.ts';
import type { Schedule } from '../server/model.ts';
import type { Storage } from '../storage/types.ts';
import type { FlowRunResult, RunOptions } from '../runner/types.ts';
import { GraphBuilder, requireBuilder, withBuilder, type ParameterType } from './builder.ts';
import type { MapArgs, Ref, TaskArgs } from './ref.ts';
import type { GraphSpec } from './spec.ts';
import { resolveCall, type CallOptions, type Task } from './task.ts';

export interface FlowOptions<O> {
  /**
   * Nodes whose states decide the flow's state: refs, or a function of the builder's
   * outputs. Default: the terminal nodes (no downstream, counting ordering edges).
   */
  referenceTasks?: readonly Ref<unknown>[] | ((outputs: O) => readonly Ref<unknown>[]);
  /** Default executor of `run()` (a `RunOptions.executor` overrides it); also what a registered flow's runs use. */
  executor?: Executor;
  /** Where `weft register` keeps the flow's code (default: LocalStorage). */
  storage?: Storage;
  /** Where and how a registered flow's runs start (default: UniversalRun, any agent). */
  runConfig?: RunConfig;
  /** Clocks that create runs of the registered flow. */
  schedule?: Schedule;
}

export interface ParameterOptions {
  /** Default: true when no default value is given. */
  required?: boolean;
  /** Checked against the run's value (and the default). */
  type?: ParameterType;
}

export interface Dependencies {
  /** Ordering-only edges: the node runs after these. */
  upstream?: readonly (Ref<unknown> | number)[];
  /** Ordering-only edges: these run after the node. */
  downstream?: readonly (Ref<unknown> | number)[];
}

export class Flow<O = unknown> {
  readonly name: string;
  /** What the builder returned (a ref, an object of refs...): typed handles for `result.result(...)`. */
  readonly outputs: O;
  /** Default executor of `run()`. */
  executor: Executor | undefined;
  /** Deployment settings, read by `weft register` (Prefect 1's `Flow(storage=..., run_config=..., schedule=...)`). */
  storage: Storage | undefined;
  runConfig: RunConfig | undefined;
  schedule: Schedule | undefined;
  readonly #graph: GraphBuilder;

  constructor(name: string, builder?: (flow: Flow<O>) => O, opts: FlowOptions<O> = {}) {
    if (typeof name !== 'string' || name === '') throw new TypeError('Flow: a flow needs a non-empty name');
    this.name = name;
    this.#graph = new GraphBuilder(name);
    this.executor = opts.executor;
    this.storage = opts.storage;
    this.runConfig = opts.runConfig;
    this.schedule = opts.schedule;
    this.outputs = (builder === undefined ? undefined : this.build(builder)) as O;
    const rt = opts.referenceTasks;
    if (rt !== undefined) this.#graph.setReferenceTasks(typeof rt === 'function' ? rt(this.outputs) : rt);
  }

  /** Run `fn` with this flow as the current builder (task calls inside add nodes to it). */
  build<T>(fn: (flow: this) => T): T {
    return withBuilder(this.#graph, () => fn(this));
  }

  /** Number of nodes so far. */
  get size(): number {
    return this.#graph.size;
  }

  /** Add a use of `t` with `args` (values or refs). */
  add<A extends unknown[], R>(t: Task<A, R>, args: TaskArgs<A>, opts?: CallOptions): Ref<Awaited<R>> {
    if (opts === undefined) return this.#graph.addTask(t.def, t.def.options, args, false, null);
    const { options, call } = resolveCall(t.def, opts);
    return this.#graph.addTask(t.def, options, args, false, call);
  }

  /** Add a mapped use of `t` (see `Task.map`). */
  map<A extends unknown[], R>(t: Task<A, R>, args: MapArgs<A>, opts?: CallOptions): Ref<Awaited<R>[]> {
    if (opts === undefined) return this.#graph.addTask(t.def, t.def.options, args, true, null);
    const { options, call } = resolveCall(t.def, opts);
    return this.#graph.addTask(t.def, options, args, true, call);
  }

  /** Add a parameter node (see `parameter()`). */
  parameter<T>(name: string, defaultValue?: T, opts: ParameterOptions = {}): Ref<T> {
    return addParameter(this.#graph, name, defaultValue, opts, arguments.length >= 2);
  }

  /** Ordering-only edges around an existing node. */
  setDependencies(ref: Ref<unknown> | number, deps: Dependencies): void {
    const id = this.#graph.nodeIdOf(ref, null, 'setDependencies target');
    if (id < 0) return;
    if (deps.upstream !== undefined) this.#graph.addUpstream(id, deps.upstream);
    if (deps.downstream !== undefined) this.#graph.addDownstream(id, deps.downstream);
  }

  /** Replace the reference tasks (whose states decide the flow's state); null: back to the terminal nodes. */
  setReferenceTasks(refs: readonly (Ref<unknown> | number)[] | null): void {
    this.#graph.setReferenceTasks(refs);
  }

  /** The validated graph spec (cached until the flow changes). Throws `FlowValidationError`. */
  spec(): GraphSpec {
    return this.#graph.spec();
  }

  /**
   * Run the flow (see `RunOptions`). The runner is loaded on first use: a worker that
   * imports a flow module to find its tasks never loads the scheduler and runner.
   */
  async run(opts: RunOptions = {}): Promise<FlowRunResult> {
    if ((globalThis as Record<symbol, unknown>)[Symbol.for('weft.worker')] === true) {
      throw new WeftError(
        'FLOW_RUN_IN_WORKER',
        `flow "${this.name}": run() was called inside a weft worker, which imports flow modules only to find their tasks; ` +
          'a module that defines tasks must not run flows at its top level (run them from another module, or only when it is the entry point)',
      );
    }
    const spec = this.spec();
    const { runFlow } = await import('../runner/run.ts');
    return runFlow(spec, this.executor === undefined ? opts : { executor: this.executor, ...opts });
  }

  toString(): string {
    return `Flow(${this.name}, ${this.#graph.size} nodes)`;
  }
}

/** Build a flow: `flow('etl', () => { ... return { out } })`. */
export function flow<O>(name: string, builder: (flow: Flow<O>) => O, opts?: FlowOptions<O>): Flow<O> {
  return new Flow<O>(name, builder, opts);
}

/**
 * A flow parameter inside a builder: `parameter('n', 3)` is a `Ref<number>` whose value
 * comes from `run({ parameters: { n } })`, else the default. Required by default when no
 * default is given.
 */
export function parameter<T>(name: string, defaultValue?: T, opts: ParameterOptions = {}): Ref<T> {
  return addParameter(requireBuilder(`parameter("${name}")`), name, defaultValue, opts, arguments.length >= 2);
}

function addParameter<T>(g: GraphBuilder, name: string, defaultValue: T | undefined, opts: ParameterOptions, hasDefault: boolean): Ref<T> {
  const required = opts.required ?? !(hasDefault && defaultValue !== undefined);
  return g.addParameter(name, defaultValue, required, opts.type);
}
