/**
 * The internal graph builder behind `Flow`: records nodes and edges as the builder
 * function (or the imperative API) runs, and turns them into a validated `GraphSpec`.
 *
 * Build-time mistakes that are about the graph (a ref from another flow, a duplicate
 * explicit key, a mapped argument that is not a list, a cycle...) are recorded and thrown
 * as one `FlowValidationError` by `spec()` — so a flow either yields a valid spec or says
 * exactly what is wrong with it, before anything runs.
 *
 * Hot path: building 1,000,000 nodes through `Flow.add` must stay well under a second, so
 * a node is one small record, edges are plain number arrays, and nothing here captures a
 * stack or allocates a closure per node.
 */
import { FlowValidationError } from '../errors.ts';
import { inlineFn } from './inline.ts';
import { defaultOptions } from './options.ts';
import { isFlatten, isRef, isUnmapped, RefImpl, type Ref, type RefOwner } from './ref.ts';
import type { TaskDef } from './registry.ts';
import type { ArgBinding, BindMode, GraphSpec, NodeKind, NodeSpec, TaskOptions } from './spec.ts';

const EMPTY_NUMS: readonly number[] = Object.freeze([]);
const EMPTY_ARGS: readonly ArgBinding[] = Object.freeze([]);
const SUFFIXED = /^(.*)-([1-9]\d*)$/;

export type ParameterType = 'string' | 'number' | 'boolean' | 'object' | 'array';

/**
 * One node: the `NodeSpec` itself, so that `spec()` hands out the records without copying
 * a million objects. Records in a published spec are never changed afterwards: a later
 * edit replaces the record with a changed copy (see `mutable()`).
 */
class NodeRec implements NodeSpec {
  /** Ordering-only upstream node ids (a shared empty array until the first one). */
  upstream: readonly number[] = EMPTY_NUMS;
  parameter?: NodeSpec['parameter'];
  inline?: (...args: unknown[]) => unknown;
  constructor(
    readonly id: number,
    readonly key: string,
    readonly kind: NodeKind,
    readonly taskKey: string,
    readonly module: string,
    readonly args: readonly ArgBinding[],
    readonly mapped: boolean,
    readonly options: TaskOptions,
  ) {}

  clone(): NodeRec {
    const c = new NodeRec(this.id, this.key, this.kind, this.taskKey, this.module, this.args, this.mapped, this.options);
    c.upstream = this.upstream;
    if (this.parameter !== undefined) c.parameter = this.parameter;
    if (this.inline !== undefined) c.inline = this.inline;
    return c;
  }
}

/** A `caseOf` block being built: the compare node, and the nodes created directly inside it. */
export interface CaseFrame {
  readonly compare: number;
  /** The compare node's base name (to release its key when the block is empty). */
  readonly base: string;
  readonly nodes: number[];
}

interface BaseCounter {
  /** Next suffix to try for an implicit key (`base-<next>`). */
  next: number;
  /** Suffixes below `next` that were taken by other keys, so are not this base's. */
  skipped: Set<number> | null;
}

export interface CallSettings {
  /** Explicit node key (must be unique in the flow). */
  readonly name?: string | undefined;
  /** Ordering-only upstream refs. */
  readonly upstream?: readonly unknown[] | undefined;
}

export class GraphBuilder implements RefOwner {
  private nodes: NodeRec[] = [];
  /**
   * Keys. Implicit keys (`name`, `name-2`...) are counted per base name rather than kept
   * in one big map: hashing a million fresh strings costs more than building the rest.
   * - `claimed`: keys taken as a whole string (explicit keys, and each base's first use);
   * - `suffixClaims`: for claimed keys shaped `P-N`, P → {N} (so `name-N` can skip them);
   * - `bases`: base → its next implicit suffix, and the suffixes it had to skip.
   */
  private readonly claimed = new Map<string, number>();
  private readonly suffixClaims = new Map<string, Set<number>>();
  private readonly bases = new Map<string, BaseCounter>();
  private readonly cases: CaseFrame[] = [];
  /** First build-time problem (thrown by `spec()`), and how many there were. */
  private problem: FlowValidationError | null = null;
  private problemCount = 0;
  private cached: GraphSpec | null = null;
  /** Records with id < publishedCount belong to a spec handed out: copy before changing (unless in `copied`). */
  private publishedCount = 0;
  private readonly copied = new Set<number>();
  /** Explicit reference tasks (refs or node ids, checked by `spec()`); null = terminal nodes. */
  private referenceTasks: readonly unknown[] | null = null;

  constructor(readonly flowName: string) {}

  get size(): number {
    return this.nodes.length;
  }

  setReferenceTasks(refs: readonly unknown[] | null): void {
    this.referenceTasks = refs === null ? null : [...refs];
    this.cached = null;
  }

  keyOf(node: number): string {
    return this.nodes[node]?.key ?? `<missing node ${node}>`;
  }

  // -------------------------------------------------------------------------------
  // Adding nodes

  /** A use of a task. `mapped`: created by `.map()`. */
  addTask(def: TaskDef, options: TaskOptions, args: readonly unknown[], mapped: boolean, call: CallSettings | null): RefImpl {
    const id = this.nodes.length;
    const explicit = call === null ? undefined : call.name;
    const key = explicit === undefined ? this.implicitKey(def.name, id) : this.explicitKey(explicit, id);
    const bindings = mapped ? this.mappedBindings(key, args) : this.plainBindings(key, args);
    this.push(new NodeRec(id, key, 'task', def.key, def.module, bindings, mapped, options), true);
    if (call !== null && call.upstream !== undefined && call.upstream.length > 0) this.addUpstream(id, call.upstream);
    return new RefImpl(this, id);
  }

  addParameter(name: string, defaultValue: unknown, required: boolean, type: ParameterType | undefined): RefImpl {
    if (typeof name !== 'string' || name === '') {
      this.report(`flow "${this.flowName}": a parameter needs a non-empty name`);
    }
    const id = this.nodes.length;
    const key = this.explicitKey(name, id, 'parameter');
    const rec = new NodeRec(id, key, 'parameter', '', '', EMPTY_ARGS, false, defaultOptions(name));
    rec.parameter = type === undefined
      ? Object.freeze({ name, default: defaultValue, required })
      : Object.freeze({ name, default: defaultValue, required, type });
    if (type !== undefined && !['string', 'number', 'boolean', 'object', 'array'].includes(type)) {
      this.report(`parameter "${name}": unknown type "${String(type)}" (string, number, boolean, object or array)`, name);
    }
    if (type !== undefined && defaultValue !== undefined && !matchesType(defaultValue, type)) {
      this.report(`parameter "${name}": default ${safeJson(defaultValue)} is not of type ${type}`, name);
    }
    this.push(rec, false);
    return new RefImpl(this, id);
  }

  /** A built-in node the runner evaluates in the main thread (compare, merge, getItem). */
  addInline(
    name: string,
    fn: (...args: unknown[]) => unknown,
    args: readonly unknown[],
    options: TaskOptions = defaultOptions(name),
  ): RefImpl {
    const id = this.nodes.length;
    const key = this.implicitKey(name, id);
    const rec = new NodeRec(id, key, 'inline', '', '', this.plainBindings(key, args), false, options);
    rec.inline = fn;
    this.push(rec, true);
    return new RefImpl(this, id);
  }

  getItem(ref: RefImpl, key: PropertyKey): Ref<unknown> {
    const name = `${this.keyOf(ref.node)}[${typeof key === 'symbol' ? key.toString() : String(key)}]`;
    // Symbol keys cannot be described as data (see inline.ts): a plain function then.
    const fn = typeof key === 'symbol'
      ? (v: unknown): unknown => (v as Record<symbol, unknown>)[key]
      : inlineFn({ op: 'getItem', key });
    return this.addInline(name, fn as (...args: unknown[]) => unknown, [ref]);
  }

  private push(rec: NodeRec, inCase: boolean): void {
    this.nodes.push(rec);
    this.cached = null;
    if (inCase && this.cases.length > 0) this.cases[this.cases.length - 1]!.nodes.push(rec.id);
  }

  /** The record of `id`, copied first if a published spec holds it. */
  private mutable(id: number): NodeRec | undefined {
    const rec = this.nodes[id];
    if (rec === undefined || id >= this.publishedCount || this.copied.has(id)) return rec;
    const c = rec.clone();
    this.nodes[id] = c;
    this.copied.add(id);
    return c;
  }

  // -------------------------------------------------------------------------------
  // Edges

  /** Ordering-only edges: `node` runs after each of `upstream` (refs or node ids). */
  addUpstream(node: number, upstream: readonly unknown[]): void {
    const rec = this.mutable(node);
    if (rec === undefined) {
      this.report(`flow "${this.flowName}": no node ${node} to add dependencies to`);
      return;
    }
    const list = rec.upstream.slice();
    for (const u of upstream) {
      const id = this.nodeIdOf(u, rec.key, 'upstream');
      if (id >= 0 && !list.includes(id)) list.push(id);
    }
    rec.upstream = list;
    this.cached = null;
  }

  /** Ordering-only edges the other way: each of `downstream` runs after `node`. */
  addDownstream(node: number, downstream: readonly unknown[]): void {
    for (const d of downstream) {
      const id = this.nodeIdOf(d, this.keyOf(node), 'downstream');
      if (id >= 0) this.addUpstream(id, [node]);
    }
  }

  /** Resolve a ref or node id of this flow; -1 (and a recorded problem) otherwise. Missing ids are caught by `spec()`. */
  nodeIdOf(v: unknown, forKey: string | null, what: string): number {
    const where = forKey === null ? `flow "${this.flowName}"` : `task "${forKey}"`;
    const task = forKey ?? undefined;
    if (isRef(v)) {
      if (v.owner !== this) {
        this.report(`${where}: ${what} "${v.owner.keyOf(v.node)}" is a ref from another flow ("${v.owner.flowName}")`, task);
        return -1;
      }
      return v.node;
    }
    if (typeof v === 'number' && Number.isInteger(v)) return v;
    this.report(`${where}: ${what} must be refs of this flow (or node ids), got ${describe(v)}`, task);
    return -1;
  }

  // -------------------------------------------------------------------------------
  // Argument bindings

  private plainBindings(key: string, args: readonly unknown[]): ArgBinding[] {
    // Exact-size arrays: `[]` + push would reserve a 17-slot backing store per node.
    // Exact-size arrays: `[]` + push would reserve a 17-slot backing store per node.
    const out = new Array<ArgBinding>(args.length);
    for (let i = 0; i < args.length; i++) {
      let a = args[i];
      if (isRef(a)) {
        out[i] = this.refBinding(key, i, a, 'plain');
        continue;
      }
      if (isUnmapped(a)) a = a.value; // harmless outside .map(): the whole value
      if (isFlatten(a)) {
        this.report(`task "${key}": argument ${i} uses flatten() outside .map()`, key);
        out[i] = { kind: 'const', value: undefined, mode: 'plain' };
      } else {
        out[i] = this.binding(key, i, a, 'plain');
      }
    }
    return out;
  }

  private mappedBindings(key: string, args: readonly unknown[]): ArgBinding[] {
    const out = new Array<ArgBinding>(args.length);
    let mappedCount = 0;
    for (let i = 0; i < args.length; i++) {
      const a = args[i];
      if (isUnmapped(a)) {
        out[i] = this.binding(key, i, a.value, 'unmapped');
      } else if (isFlatten(a)) {
        mappedCount++;
        const v = a.value;
        if (!isRef(v) && !(Array.isArray(v) && v.every((x) => Array.isArray(x)))) {
          this.report(`task "${key}": flattened argument ${i} is not a list of lists (got ${describe(v)})`, key);
        }
        out[i] = this.binding(key, i, v, 'flatten');
      } else {
        mappedCount++;
        if (!isRef(a) && !Array.isArray(a)) {
          this.report(`task "${key}": mapped argument ${i} is not a list (got ${describe(a)}); wrap it in unmapped() to pass it whole`, key);
        }
        out[i] = this.binding(key, i, a, 'mapped');
      }
    }
    if (mappedCount === 0) this.report(`task "${key}": .map() needs at least one argument to map over (all are unmapped)`, key);
    return out;
  }

  private binding(key: string, i: number, a: unknown, mode: BindMode): ArgBinding {
    if (isRef(a)) return this.refBinding(key, i, a, mode);
    return { kind: 'const', value: a, mode };
  }

  private refBinding(key: string, i: number, a: RefImpl, mode: BindMode): ArgBinding {
    if (a.owner !== this) return { kind: 'ref', node: this.nodeIdOf(a, key, `argument ${i}`), mode };
    return { kind: 'ref', node: a.node, mode };
  }

  // -------------------------------------------------------------------------------
  // Keys

  /** `name`, then `name-2`, `name-3`... for further uses (skipping keys already taken). */
  private implicitKey(base: string, id: number): string {
    const c = this.bases.get(base);
    if (c === undefined) {
      const fresh: BaseCounter = { next: 2, skipped: null };
      this.bases.set(base, fresh);
      if (!this.isTaken(base)) {
        this.claim(base, id);
        return base;
      }
      return this.suffixedKey(base, fresh);
    }
    return this.suffixedKey(base, c);
  }

  private suffixedKey(base: string, c: BaseCounter): string {
    let n = c.next;
    const claims = this.suffixClaims.get(base);
    if (claims !== undefined) {
      while (claims.has(n)) (c.skipped ??= new Set()).add(n++);
    }
    c.next = n + 1;
    return `${base}-${n}`;
  }

  private explicitKey(key: string, id: number, what = 'task'): string {
    if (this.isTaken(key)) {
      const prev = this.claimed.get(key);
      const by = prev === undefined ? 'another use of a task' : `${this.nodes[prev]?.kind ?? 'node'} ${prev}`;
      this.report(`${what} "${key}": duplicate key in flow "${this.flowName}" (already used by ${by}); give this use another name`, key);
    } else {
      this.claim(key, id);
    }
    return key;
  }

  private claim(key: string, id: number): void {
    this.claimed.set(key, id);
    const m = key.includes('-') ? SUFFIXED.exec(key) : null;
    if (m !== null) {
      const p = m[1]!;
      let set = this.suffixClaims.get(p);
      if (set === undefined) this.suffixClaims.set(p, (set = new Set()));
      set.add(Number(m[2]));
    }
  }

  private isTaken(key: string): boolean {
    if (this.claimed.has(key)) return true;
    const m = key.includes('-') ? SUFFIXED.exec(key) : null;
    if (m === null) return false;
    const c = this.bases.get(m[1]!);
    const n = Number(m[2]);
    return c !== undefined && n >= 2 && n < c.next && !(c.skipped?.has(n) ?? false);
  }

  // -------------------------------------------------------------------------------
  // Conditional blocks (see conditional.ts)

  beginCase(compare: number, base: string): CaseFrame {
    const frame: CaseFrame = { compare, base, nodes: [] };
    this.cases.push(frame);
    return frame;
  }

  /**
   * Close a `caseOf` block. As in Prefect 1's `case.__exit__`: every node created in the
   * block that has no upstream inside the block gets an ordering edge from the compare
   * node; the others skip through skip propagation. An empty block removes its compare.
   */
  endCase(frame: CaseFrame): void {
    const top = this.cases.pop();
    if (top !== frame) throw new Error('weft: caseOf blocks closed out of order');
    if (frame.nodes.length === 0) {
      if (frame.compare === this.nodes.length - 1) this.dropLast(frame.base);
      return;
    }
    const inBlock = new Set(frame.nodes);
    for (const id of frame.nodes) {
      const rec = this.nodes[id]!;
      let rooted = false;
      for (const b of rec.args) if (b.kind === 'ref' && inBlock.has(b.node)) rooted = true;
      for (const u of rec.upstream) if (inBlock.has(u)) rooted = true;
      if (!rooted) this.addUpstream(id, [frame.compare]);
    }
  }

  /** Remove the last node (an unused compare), releasing its implicit key. */
  private dropLast(base: string): void {
    const rec = this.nodes.pop()!;
    const c = this.bases.get(base);
    if (rec.key === base) {
      this.claimed.delete(base);
      if (c !== undefined && c.next === 2) this.bases.delete(base);
    } else if (c !== undefined && rec.key === `${base}-${c.next - 1}`) {
      c.next--;
    }
    const parent = this.cases[this.cases.length - 1];
    if (parent !== undefined && parent.nodes[parent.nodes.length - 1] === rec.id) parent.nodes.pop();
    if (this.publishedCount > this.nodes.length) this.publishedCount = this.nodes.length;
    this.cached = null;
  }

  // -------------------------------------------------------------------------------
  // Problems and the spec

  report(message: string, task?: string): void {
    this.problemCount++;
    if (this.problem === null) this.problem = new FlowValidationError(message, task);
    this.cached = null;
  }

  /** The validated spec (cached until the graph changes). */
  spec(): GraphSpec {
    if (this.cached !== null) return this.cached;
    if (this.problem !== null) throw this.withCount(this.problem, this.problemCount);
    const nodes = this.nodes;
    const n = nodes.length;
    // outStart[j+1] - outStart[j] = number of j's downstream edges (0: a terminal node).
    const outStart = this.checkEdges();

    const referenceTasks: number[] = [];
    if (this.referenceTasks === null) {
      for (let i = 0; i < n; i++) if (outStart[i + 1] === outStart[i]) referenceTasks.push(i);
    } else {
      for (const r of this.referenceTasks) {
        const id = this.nodeIdOf(r, null, 'reference task');
        if (this.problem !== null) throw this.withCount(this.problem, this.problemCount);
        if (!(id >= 0 && id < n)) throw new FlowValidationError(`flow "${this.flowName}": reference task ${id} is not a node of the flow`);
        if (!referenceTasks.includes(id)) referenceTasks.push(id);
      }
    }

    const modules: string[] = [];
    let last = '';
    for (let i = 0; i < n; i++) {
      const m = nodes[i]!.module;
      if (m !== '' && m !== last) {
        last = m;
        if (!modules.includes(m)) modules.push(m);
      }
    }

    this.publishedCount = n;
    this.copied.clear();
    this.cached = Object.freeze({
      name: this.flowName,
      nodes: Object.freeze(nodes.slice()),
      referenceTasks: Object.freeze(referenceTasks),
      modules: Object.freeze(modules),
    });
    return this.cached;
  }

  private missing(rec: NodeRec, id: number): FlowValidationError {
    return new FlowValidationError(`task "${rec.key}": depends on node ${id}, which is not in flow "${this.flowName}"`, rec.key);
  }

  private withCount(err: FlowValidationError, count: number): FlowValidationError {
    if (count <= 1) return err;
    return new FlowValidationError(`${err.message} (and ${count - 1} more problem${count > 2 ? 's' : ''} in flow "${this.flowName}")`, err.task);
  }

  /**
   * Check every edge points at a node, and that the graph is acyclic (Kahn's algorithm
   * over CSR-packed edges; on a cycle, walk it to name its tasks). Returns the CSR
   * offsets (`outStart`), from which terminal nodes are read.
   */
  private checkEdges(): Int32Array {
    const nodes = this.nodes;
    const n = nodes.length;
    const indeg = new Int32Array(n);
    const outStart = new Int32Array(n + 1);
    let edges = 0;
    for (let i = 0; i < n; i++) {
      const rec = nodes[i]!;
      const args = rec.args;
      for (let j = 0; j < args.length; j++) {
        const b = args[j]!;
        if (b.kind !== 'ref') continue;
        if (!(b.node >= 0 && b.node < n)) throw this.missing(rec, b.node);
        indeg[i]!++;
        outStart[b.node + 1]!++;
        edges++;
      }
      const up = rec.upstream;
      for (let j = 0; j < up.length; j++) {
        const u = up[j]!;
        if (!(u >= 0 && u < n)) throw this.missing(rec, u);
        indeg[i]!++;
        outStart[u + 1]!++;
        edges++;
      }
    }
    // Prefix sums: out[outStart[j] .. outStart[j+1]) are j's downstream nodes.
    for (let j = 0; j < n; j++) outStart[j + 1]! += outStart[j]!;
    const fill = outStart.slice(0, n);
    const out = new Int32Array(edges);
    for (let i = 0; i < n; i++) {
      const rec = nodes[i]!;
      const args = rec.args;
      for (let j = 0; j < args.length; j++) {
        const b = args[j]!;
        if (b.kind === 'ref') out[fill[b.node]!++] = i;
      }
      const up = rec.upstream;
      for (let j = 0; j < up.length; j++) out[fill[up[j]!]!++] = i;
    }
    const queue = new Int32Array(n);
    let head = 0;
    let tail = 0;
    for (let i = 0; i < n; i++) if (indeg[i] === 0) queue[tail++] = i;
    while (head < tail) {
      const j = queue[head++]!;
      const end = outStart[j + 1]!;
      for (let e = outStart[j]!; e < end; e++) {
        const d = out[e]!;
        if (--indeg[d]! === 0) queue[tail++] = d;
      }
    }
    if (tail === n) return outStart;
    // Every node left has an upstream that is left too: walking upstream must revisit a node.
    let start = 0;
    while (indeg[start] === 0) start++;
    const pos = new Map<number, number>();
    const path: number[] = [];
    let cur = start;
    while (!pos.has(cur)) {
      pos.set(cur, path.length);
      path.push(cur);
      const rec = nodes[cur]!;
      let next = -1;
      for (const b of rec.args) if (b.kind === 'ref' && indeg[b.node]! > 0) { next = b.node; break; }
      if (next < 0) for (const u of rec.upstream) if (indeg[u]! > 0) { next = u; break; }
      cur = next;
    }
    // The path runs downstream → upstream; print the cycle in execution order.
    const cycle = path.slice(pos.get(cur)).reverse();
    // Start at the earliest node, so the message does not depend on where the walk began.
    const first = cycle.indexOf(Math.min(...cycle));
    cycle.push(...cycle.splice(0, first));
    const names = cycle.map((id) => `"${this.keyOf(id)}"`);
    names.push(names[0]!);
    throw new FlowValidationError(`flow "${this.flowName}" has a cycle: ${names.join(' -> ')}`, this.keyOf(cycle[0]!));
  }
}

function matchesType(v: unknown, type: ParameterType): boolean {
  if (type === 'array') return Array.isArray(v);
  if (type === 'object') return typeof v === 'object' && v !== null && !Array.isArray(v);
  return typeof v === type;
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (typeof v === 'object') return Array.isArray(v) ? 'an array' : `an object (${Object.prototype.toString.call(v)})`;
  if (typeof v === 'function') return 'a function';
  return `${typeof v} ${safeJson(v)}`;
}

function safeJson(v: unknown): string {
  try {
    return JSON.stringify(v) ?? String(v);
  } catch {
    return String(v);
  }
}

// ---------------------------------------------------------------------------------
// The current builder: a stack on globalThis (shared by every copy of weft in a thread),
// so that calling a task inside a flow builder finds its flow.

const STACK = Symbol.for('weft.builderStack');
const builders: GraphBuilder[] = ((globalThis as unknown as Record<symbol, GraphBuilder[] | undefined>)[STACK] ??= []);

export function currentBuilder(): GraphBuilder | undefined {
  return builders[builders.length - 1];
}

/** Run `fn` with `b` as the current builder. Building another flow inside is an error. */
export function withBuilder<T>(b: GraphBuilder, fn: () => T): T {
  const top = currentBuilder();
  if (top !== undefined && top !== b) {
    throw new FlowValidationError(
      `flow "${b.flowName}" is being built inside the builder of flow "${top.flowName}"; flows cannot nest (build it outside, or use tasks directly)`,
    );
  }
  builders.push(b);
  try {
    return fn();
  } finally {
    builders.pop();
  }
}

/** The current builder, or a clear error naming what needed it. */
export function requireBuilder(what: string): GraphBuilder {
  const b = currentBuilder();
  if (b === undefined) throw new Error(`${what} called outside a flow builder`);
  return b;
}
