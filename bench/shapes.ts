/**
 * The standard benchmark graph shapes, built directly as `GraphSpec` objects.
 *
 * Every node is explicit (no `mapped` nodes), so the same graph runs unchanged on every
 * executor and the core sees the whole graph up front. Nodes are numbered in a
 * topological order (every input has a smaller id). Builders allocate one small object
 * per node and per edge and share the options objects, so 1M nodes take well under a
 * second (see `test/bench-shapes.test.ts`).
 */
import type { ArgBinding, GraphSpec, NodeSpec } from '../src/flow/spec.ts';
import { BENCH_TASK_OPTIONS, TASKS_MODULE, taskKey, type BenchTaskName } from './tasks.ts';

export const SHAPES = ['independent', 'chain', 'tree', 'mapreduce'] as const;
export type ShapeName = (typeof SHAPES)[number];

export function isShapeName(s: string): s is ShapeName {
  return (SHAPES as readonly string[]).includes(s);
}

/** What the leaves return: `null`/`1` (default) or a 1 KiB string that has to travel to its consumer. */
export type Payload = 'none' | 'kib';

export interface ShapeOptions {
  payload?: Payload;
}

export interface BuiltShape {
  readonly shape: ShapeName;
  /** The size parameter the shape was built with (tasks, chain length, leaves). */
  readonly n: number;
  readonly spec: GraphSpec;
  /** Number of task nodes (what µs/task divides by). */
  readonly tasks: number;
  /** Number of edges (data edges for the shapes: `ref` arguments). */
  readonly edges: number;
  /** The value the reference task(s) should return, when the shape has a single sink. */
  readonly expected: unknown;
}

const NO_ARGS: readonly ArgBinding[] = Object.freeze([]);
const NO_UPSTREAM: readonly number[] = Object.freeze([]);

const TASK_INDEX: Readonly<Record<BenchTaskName, number>> = { noop: 0, one: 1, sum: 2, busy: 3, kib: 4 };
const TASK_KEYS: Readonly<Record<BenchTaskName, string>> = {
  noop: taskKey('noop'),
  one: taskKey('one'),
  sum: taskKey('sum'),
  busy: taskKey('busy'),
  kib: taskKey('kib'),
};

/** Appends nodes with keys `name`, `name-2`, `name-3`... per task, as the flow model names repeated uses. */
export class SpecBuilder {
  readonly nodes: NodeSpec[];
  private count = 0;
  edges = 0;
  private readonly uses = new Float64Array(5);

  /** `size`: the exact number of nodes, so the array is allocated once. */
  constructor(size: number) {
    this.nodes = new Array<NodeSpec>(size);
  }

  /** `key` overrides the default `name` / `name-<use>` key (it must stay unique in the graph). */
  add(
    task: BenchTaskName,
    args: readonly ArgBinding[] = NO_ARGS,
    upstream: readonly number[] = NO_UPSTREAM,
    key?: string,
  ): number {
    const id = this.count++;
    const t = TASK_INDEX[task];
    const use = ++this.uses[t]!;
    this.nodes[id] = {
      id,
      key: key ?? (use === 1 ? task : `${task}-${use}`),
      kind: 'task',
      taskKey: TASK_KEYS[task],
      module: TASKS_MODULE,
      args,
      upstream,
      mapped: false,
      options: BENCH_TASK_OPTIONS[task],
    };
    let edges = upstream.length;
    for (let i = 0; i < args.length; i++) if (args[i]!.kind === 'ref') edges++;
    this.edges += edges;
    return id;
  }

  /** `referenceTasks`: the terminal nodes (the builders know them; weft's default is the same set). */
  build(name: string, referenceTasks: readonly number[]): GraphSpec {
    if (this.count !== this.nodes.length) throw new Error(`internal: built ${this.count} of ${this.nodes.length} nodes`);
    return { name, nodes: this.nodes, referenceTasks, modules: [TASKS_MODULE] };
  }
}

export function ref(node: number): ArgBinding {
  return { kind: 'ref', node, mode: 'plain' };
}

function checkN(shape: string, n: number, min: number): void {
  if (!Number.isSafeInteger(n) || n < min) throw new RangeError(`${shape}: n must be an integer >= ${min} (got ${n})`);
}

/** n independent no-op tasks (or n `kib` producers). The pure per-task overhead. */
export function independent(n: number, opts: ShapeOptions = {}): BuiltShape {
  checkN('independent', n, 1);
  const b = new SpecBuilder(n);
  const leaf: BenchTaskName = opts.payload === 'kib' ? 'kib' : 'noop';
  const sinks = new Array<number>(n);
  for (let i = 0; i < n; i++) sinks[i] = b.add(leaf);
  return { shape: 'independent', n, spec: b.build(`bench-independent-${n}`, sinks), tasks: n, edges: 0, expected: undefined };
}

/**
 * n no-op tasks, each taking the previous one's result: no parallelism at all, so it
 * measures the latency of one round trip (core → executor → core) per task.
 */
export function chain(n: number, _opts: ShapeOptions = {}): BuiltShape {
  checkN('chain', n, 1);
  const b = new SpecBuilder(n);
  let prev = b.add('noop');
  for (let i = 1; i < n; i++) prev = b.add('noop', [ref(prev)]);
  return { shape: 'chain', n, spec: b.build(`bench-chain-${n}`, [prev]), tasks: n, edges: b.edges, expected: null };
}

/**
 * Binary tree reduction over `leaves` leaves: 2L-1 tasks. Each level sums pairs of the
 * level below; an odd node out moves up unchanged, so any L gives exactly L-1 sums.
 */
export function tree(leaves: number, opts: ShapeOptions = {}): BuiltShape {
  checkN('tree', leaves, 1);
  const b = new SpecBuilder(2 * leaves - 1);
  const leaf: BenchTaskName = opts.payload === 'kib' ? 'kib' : 'one';
  let level: number[] = new Array<number>(leaves);
  for (let i = 0; i < leaves; i++) level[i] = b.add(leaf);
  while (level.length > 1) {
    const next: number[] = [];
    for (let i = 0; i + 1 < level.length; i += 2) next.push(b.add('sum', [ref(level[i]!), ref(level[i + 1]!)]));
    if (level.length % 2 === 1) next.push(level[level.length - 1]!);
    level = next;
  }
  return {
    shape: 'tree',
    n: leaves,
    spec: b.build(`bench-tree-${leaves}`, [level[0]!]),
    tasks: 2 * leaves - 1,
    edges: b.edges,
    expected: leaves * (leaf === 'kib' ? 1024 : 1),
  };
}

/** Number of partial reducers in `mapreduce` (fewer when there are fewer leaves). */
export const MAPREDUCE_PARTIALS = 100;

/**
 * N leaves → 100 partial sums (each over a contiguous N/100 slice; slices differ by at
 * most one leaf when 100 does not divide N) → 1 final sum. N + 101 tasks for N ≥ 100.
 */
export function mapreduce(leaves: number, opts: ShapeOptions = {}): BuiltShape {
  checkN('mapreduce', leaves, 1);
  const parts = Math.min(MAPREDUCE_PARTIALS, leaves);
  const b = new SpecBuilder(leaves + parts + 1);
  const leaf: BenchTaskName = opts.payload === 'kib' ? 'kib' : 'one';
  for (let i = 0; i < leaves; i++) b.add(leaf);
  const partials: ArgBinding[] = [];
  for (let j = 0; j < parts; j++) {
    const lo = Math.floor((j * leaves) / parts);
    const hi = Math.floor(((j + 1) * leaves) / parts);
    const args = new Array<ArgBinding>(hi - lo);
    for (let i = lo; i < hi; i++) args[i - lo] = ref(i);
    partials.push(ref(b.add('sum', args)));
  }
  const root = b.add('sum', partials);
  return {
    shape: 'mapreduce',
    n: leaves,
    spec: b.build(`bench-mapreduce-${leaves}`, [root]),
    tasks: leaves + parts + 1,
    edges: b.edges,
    expected: leaves * (leaf === 'kib' ? 1024 : 1),
  };
}

export function buildShape(shape: ShapeName, n: number, opts: ShapeOptions = {}): BuiltShape {
  switch (shape) {
    case 'independent':
      return independent(n, opts);
    case 'chain':
      return chain(n, opts);
    case 'tree':
      return tree(n, opts);
    case 'mapreduce':
      return mapreduce(n, opts);
  }
}

/** The `--shape all` set: independent 10k and 100k, chain 10k, tree over 16384 leaves, mapreduce over 10k leaves. */
export const DEFAULT_SUITE: readonly { shape: ShapeName; n: number }[] = Object.freeze([
  { shape: 'independent', n: 10_000 },
  { shape: 'independent', n: 100_000 },
  { shape: 'chain', n: 10_000 },
  { shape: 'tree', n: 16_384 },
  { shape: 'mapreduce', n: 10_000 },
]);

/** Default n of one shape when `--n` is not given. */
export const DEFAULT_N: Readonly<Record<ShapeName, number>> = Object.freeze({
  independent: 100_000,
  chain: 10_000,
  tree: 16_384,
  mapreduce: 10_000,
});
