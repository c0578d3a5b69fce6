/**
 * `Ref<T>`: what calling a task inside a flow builder returns — a typed handle on a node
 * of the graph, to pass to other tasks. No value exists at build time; `T` is the value
 * the node will have at run time (`FlowRunResult.result(ref)` returns it typed).
 *
 * Refs, `unmapped(x)` and `flatten(x)` are recognised by a symbol brand rather than by
 * `instanceof`, so that two copies of weft loaded in one thread still understand each
 * other's refs.
 */

const REF = Symbol.for('weft.ref');
const UNMAPPED = Symbol.for('weft.unmapped');
const FLATTEN = Symbol.for('weft.flatten');

/** What a ref needs from the graph that made it (the internal `GraphBuilder`). */
export interface RefOwner {
  readonly flowName: string;
  keyOf(node: number): string;
  addUpstream(node: number, upstream: readonly unknown[]): void;
  getItem(ref: RefImpl, key: PropertyKey): Ref<unknown>;
}

/** A typed handle on a node of a flow. */
export interface Ref<T> {
  /** The node's id in the flow's spec. */
  readonly node: number;
  /** The node's key in the flow (unique). */
  readonly key: string;
  /** Phantom: the value type at run time. Never set. */
  readonly __type?: T;
  /** Add ordering-only edges: this node runs after `refs` (their states reach its trigger). Returns this ref. */
  after(...refs: readonly Ref<unknown>[]): this;
  /** A new node whose value is `value[key]` (evaluated inline by the runner). */
  get<K extends keyof T>(key: K): Ref<T[K]>;
}

/** The value of a ref (`RefValue<Ref<number>>` is `number`). */
export type RefValue<R> = R extends Ref<infer T> ? T : never;

export class RefImpl implements Ref<any> {
  declare readonly __type?: any;
  constructor(
    readonly owner: RefOwner,
    readonly node: number,
  ) {}

  get key(): string {
    return this.owner.keyOf(this.node);
  }

  after(...refs: readonly Ref<unknown>[]): this {
    this.owner.addUpstream(this.node, refs);
    return this;
  }

  get(key: PropertyKey): Ref<any> {
    return this.owner.getItem(this, key);
  }

  toString(): string {
    return `Ref(${this.owner.flowName}:${this.key})`;
  }
}
Object.defineProperty(RefImpl.prototype, REF, { value: true });

export function isRef(v: unknown): v is RefImpl {
  return typeof v === 'object' && v !== null && (v as Record<symbol, unknown>)[REF] === true;
}

/** Inside `.map()`: pass the whole value to every child. */
export interface Unmapped<T> {
  readonly [UNMAPPED]: true;
  readonly value: T | Ref<T>;
}

/** Inside `.map()`: map over the concatenation of a list of lists. */
export interface Flatten<T> {
  readonly [FLATTEN]: true;
  readonly value: Ref<readonly (readonly T[])[]> | readonly (readonly T[])[];
}

/** Inside `.map()`: pass `value` whole to every mapped child instead of mapping over it. */
export function unmapped<T>(value: T | Ref<T>): Unmapped<T> {
  return { [UNMAPPED]: true, value };
}

/** Inside `.map()`: map over the concatenation of `value`'s lists (e.g. a mapped task that returned lists). */
export function flatten<T>(value: Ref<readonly (readonly T[])[]> | readonly (readonly T[])[]): Flatten<T> {
  return { [FLATTEN]: true, value };
}

export function isUnmapped(v: unknown): v is Unmapped<unknown> {
  return typeof v === 'object' && v !== null && (v as Record<symbol, unknown>)[UNMAPPED] === true;
}

export function isFlatten(v: unknown): v is Flatten<unknown> {
  return typeof v === 'object' && v !== null && (v as Record<symbol, unknown>)[FLATTEN] === true;
}

/** Arguments of a plain call: each value or a ref to it. */
export type TaskArgs<A extends readonly unknown[]> = { [K in keyof A]: A[K] | Ref<A[K]> };

/** Arguments of `.map()`: a list (or a ref to one) to map over, or `unmapped(x)`, or `flatten(listOfLists)`. */
export type MapArgs<A extends readonly unknown[]> = {
  [K in keyof A]: Ref<readonly A[K][]> | readonly A[K][] | Unmapped<A[K]> | Flatten<A[K]>;
};
