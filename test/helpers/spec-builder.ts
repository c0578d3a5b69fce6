/**
 * A tiny builder of `GraphSpec`s for scheduler tests (no flow model, no modules), plus
 * two helpers that drive a `SchedulerCore` by hand.
 *
 *   const g = new SpecBuilder();
 *   const a = g.task('a');
 *   const b = g.task('b', [a], { maxRetries: 2 });
 *   const m = g.map('m', [mapped(b)]);
 *   const spec = g.build();            // referenceTasks default to the terminal nodes
 */
import type { ArgBinding, BindMode, GraphSpec, NodeSpec, TaskOptions } from '../../src/flow/spec.ts';
import { taskOptions } from '../../src/flow/defaults.ts';
import type { Instruction, SchedulerCore } from '../../src/scheduler/core.ts';

/** An argument: a node id (a plain ref) or a binding made with `ref` / `mapped` / `konst`. */
export type Arg = number | ArgBinding;

export const ref = (node: number, mode: BindMode = 'plain'): ArgBinding => ({ kind: 'ref', node, mode });
export const mapped = (node: number): ArgBinding => ref(node, 'mapped');
export const flatten = (node: number): ArgBinding => ref(node, 'flatten');
export const unmapped = (node: number): ArgBinding => ref(node, 'unmapped');
export const konst = (value: unknown, mode: BindMode = 'plain'): ArgBinding => ({ kind: 'const', value, mode });

export interface NodeOpts extends Partial<TaskOptions> {
  /** Ordering-only upstream edges. */
  readonly upstream?: readonly number[];
}

const EMPTY: readonly number[] = Object.freeze([]);

export class SpecBuilder {
  readonly nodes: NodeSpec[] = [];
  private refs: number[] | null = null;
  /** One options object per distinct partial (by identity), so big graphs stay small. */
  private readonly shared = new Map<object, TaskOptions>();
  private readonly plain = taskOptions();

  /** A task with plain refs (numbers) and/or bindings. Returns its id. */
  task(key: string, args: readonly Arg[] = [], opts: NodeOpts = {}): number {
    return this.add(key, args, opts, false);
  }

  /** A mapped task (`.map()`): give mapped args with `mapped(id)` / `konst([...], 'mapped')`. */
  map(key: string, args: readonly Arg[], opts: NodeOpts = {}): number {
    return this.add(key, args, opts, true);
  }

  /** Set the reference tasks (default: every node without a downstream). */
  reference(...ids: number[]): this {
    this.refs = ids;
    return this;
  }

  build(name = 'test'): GraphSpec {
    let refs = this.refs;
    if (refs === null) {
      const hasDown = new Uint8Array(this.nodes.length);
      for (const n of this.nodes) {
        for (const a of n.args) if (a.kind === 'ref') hasDown[a.node] = 1;
        for (const u of n.upstream) hasDown[u] = 1;
      }
      refs = [];
      for (let i = 0; i < this.nodes.length; i++) if (hasDown[i] === 0) refs.push(i);
    }
    return { name, nodes: this.nodes, referenceTasks: refs, modules: [] };
  }

  private add(key: string, args: readonly Arg[], opts: NodeOpts, isMapped: boolean): number {
    const id = this.nodes.length;
    const { upstream, ...partial } = opts;
    let options = this.plain;
    if (Object.keys(partial).length > 0) {
      options = this.shared.get(opts) ?? taskOptions({ name: key, ...partial });
      this.shared.set(opts, options);
    }
    this.nodes.push({
      id,
      key,
      kind: 'task',
      taskKey: `test#${key}`,
      module: '',
      args: args.map((a) => (typeof a === 'number' ? ref(a) : a)),
      upstream: upstream ?? EMPTY,
      mapped: isMapped,
      options,
    });
    return id;
  }
}

/** Dispatch up to `max` ready tasks; returns their ids in dispatch order. */
export function take(core: SchedulerCore, max = 1 << 20): number[] {
  const out = new Int32Array(Math.max(1, Math.min(max, core.readyCount + 1)));
  const k = core.takeReady(max, out);
  return Array.from(out.subarray(0, k));
}

/** The instructions since the last drain (and clears them). */
export function drain(core: SchedulerCore): Instruction[] {
  const ins = core.instructions;
  core.instructions = [];
  return ins;
}

/** Run ids of `ids` (the current dispatch of each). */
export const runOf = (core: SchedulerCore, id: number): number => core.runId[id]!;
