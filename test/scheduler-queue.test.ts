/**
 * The ready queue (a sorted run merged with a binary heap) and the core's fast paths:
 * the dispatch order must be exactly "highest priority first, then static order",
 * whichever source a task sits in, with or without user priorities.
 */
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { SchedulerCore } from '../src/scheduler/core.ts';
import { ReadyHeap } from '../src/scheduler/heap.ts';
import { staticOrder } from '../src/scheduler/order.ts';
import { SpecBuilder, mapped, take, type NodeOpts } from './helpers/spec-builder.ts';

type Op = { push: number } | { pop: true };

/** Replays ops on a ReadyHeap and on a sorted array; returns both pop sequences. */
function replay(n: number, ranks: number[] | null, ops: readonly Op[]): { got: number[]; want: number[] } {
  const order = new Float64Array(n);
  // A permutation as the static order, so keys are unique as in the core.
  for (let i = 0; i < n; i++) order[i] = (i * 7919) % n;
  const rank = ranks === null ? new Float64Array(0) : Float64Array.from(ranks);
  const heap = new ReadyHeap(rank, order, 4);
  heap.setUniformRank(ranks === null);
  const key = (id: number): [number, number] => [ranks === null ? 0 : ranks[id]!, order[id]!];
  const ref: number[] = [];
  const queued = new Set<number>();
  const got: number[] = [];
  const want: number[] = [];
  for (const op of ops) {
    if ('push' in op) {
      if (queued.has(op.push)) continue; // the core never queues a task twice
      queued.add(op.push);
      heap.push(op.push);
      ref.push(op.push);
      expect(heap.has(op.push)).toBe(true);
    } else {
      ref.sort((a, b) => key(a)[0] - key(b)[0] || key(a)[1] - key(b)[1]);
      const w = ref.shift() ?? -1;
      expect(heap.peek()).toBe(w);
      const g = heap.pop();
      got.push(g);
      want.push(w);
      queued.delete(g);
    }
    expect(heap.size).toBe(ref.length);
  }
  return { got, want };
}

describe('ReadyHeap', () => {
  const N = 64;
  const ops = fc.array(fc.oneof(fc.integer({ min: 0, max: N - 1 }).map((push): Op => ({ push })), fc.constant<Op>({ pop: true })), {
    maxLength: 400,
  });

  it('pops in (rank, order) order with interleaved pushes: uniform ranks', () => {
    fc.assert(
      fc.property(ops, (o) => {
        const { got, want } = replay(N, null, o);
        expect(got).toEqual(want);
      }),
    );
  });

  it('pops in (rank, order) order with interleaved pushes: mixed ranks', () => {
    fc.assert(
      fc.property(ops, fc.array(fc.integer({ min: -3, max: 3 }), { minLength: N, maxLength: N }), (o, ranks) => {
        const { got, want } = replay(N, ranks, o);
        expect(got).toEqual(want);
      }),
    );
  });

  it('keys pushed in increasing order stay in the run (grows and compacts)', () => {
    const n = 5000;
    const order = new Float64Array(n).map((_, i) => i);
    const heap = new ReadyHeap(new Float64Array(0), order, 16);
    heap.setUniformRank(true);
    const popped: number[] = [];
    for (let i = 0; i < n; i++) {
      heap.push(i);
      if (i % 3 === 0) popped.push(heap.pop());
    }
    while (heap.size > 0) popped.push(heap.pop());
    expect(popped).toEqual(Array.from({ length: n }, (_, i) => i));
    expect(heap.pop()).toBe(-1);
    heap.push(3);
    heap.clear();
    expect([heap.size, heap.peek(), heap.has(3)]).toEqual([0, -1, false]);
  });
});

describe('dispatch order through the core', () => {
  /** Static order of the graph the builder made (as the core computes it). */
  function orderOf(g: SpecBuilder): Float64Array {
    const nodes = g.nodes;
    const n = nodes.length;
    const depPtr = new Int32Array(n + 1);
    const deps: number[] = [];
    const hasDown = new Uint8Array(n);
    nodes.forEach((s, i) => {
      for (const a of s.args) if (a.kind === 'ref') deps.push(a.node);
      deps.push(...s.upstream);
      depPtr[i + 1] = deps.length;
    });
    for (const d of deps) hasDown[d] = 1;
    return staticOrder(n, depPtr, Int32Array.from(deps), hasDown);
  }

  it('random DAGs and priorities: each dispatch is the best ready task', () => {
    const graph = fc.array(
      fc.record({ deps: fc.array(fc.nat(), { maxLength: 3 }), priority: fc.oneof(fc.constant(0), fc.integer({ min: -2, max: 2 })) }),
      { minLength: 1, maxLength: 40 },
    );
    fc.assert(
      fc.property(graph, fc.integer({ min: 1, max: 4 }), (spec, batch) => {
        const g = new SpecBuilder();
        const prio: number[] = [];
        spec.forEach((s, i) => {
          const deps = i === 0 ? [] : [...new Set(s.deps.map((d) => d % i))];
          const opts: NodeOpts = s.priority === 0 ? {} : { priority: s.priority };
          g.task(`t${i}`, deps, opts);
          prio.push(s.priority);
        });
        const order = orderOf(g);
        const core = new SchedulerCore(g.build(), { validate: true });
        core.start();
        const better = (a: number, b: number): boolean => prio[a]! > prio[b]! || (prio[a] === prio[b] && order[a]! < order[b]!);
        let done = 0;
        while (!core.isDone) {
          const ready: number[] = [];
          for (let id = 0; id < core.size; id++) if (core.stateName(id) === 'Scheduled') ready.push(id);
          ready.sort((a, b) => (better(a, b) ? -1 : better(b, a) ? 1 : 0));
          const got = take(core, batch);
          expect(got).toEqual(ready.slice(0, batch));
          for (const id of got) core.success(id, core.runId[id]!);
          done += got.length;
        }
        expect(done).toBe(spec.length);
        expect(core.transitions).toBe(3 * spec.length);
      }),
    );
  });

  it('a priority that first differs late in the spec still wins, and mapped children inherit it', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b');
    const src = g.task('src');
    const m = g.map('m', [mapped(src)], { priority: 3 });
    const c = g.task('c', [], { priority: 1 });
    const core = new SchedulerCore(g.build(), { validate: true, inputLength: () => 2 });
    core.start();
    expect(take(core, 3)).toEqual([c, a, b]);
    expect(take(core, 1)).toEqual([src]);
    core.success(src, core.runId[src]!);
    const r = core.mapRange(m)!;
    expect(take(core, 2)).toEqual([r.start, r.start + 1]);
  });

  it('a lost worker under a mapped child (arrays grown before the first loss)', () => {
    const g = new SpecBuilder();
    const src = g.task('src');
    const m = g.map('m', [mapped(src)]);
    const core = new SchedulerCore(g.build(), { validate: true, inputLength: () => 40, poisonLimit: 2 });
    core.start();
    const [s] = take(core, 1);
    core.success(s!, core.runId[s!]!);
    const child = core.mapRange(m)!.start + 39;
    const kids = take(core, 64);
    expect(kids).toContain(child);
    expect(core.failure(child, core.runId[child]!, 'lost')).toBe(true);
    expect(core.stateName(child)).toBe('Scheduled');
    expect(take(core, 1)).toEqual([child]);
    expect(core.failure(child, core.runId[child]!, 'lost')).toBe(true);
    expect(core.stateName(child)).toBe('Failed');
    expect(core.messages.get(child)).toContain('is a suspected poison task: 2 workers died');
  });
});

describe('staticOrder', () => {
  /** The definition, recursively: post-order DFS into the dependencies from each terminal node, then from anything left. */
  function reference(deps: readonly number[][], hasDown: Uint8Array): number[] {
    const n = deps.length;
    const order = new Array<number>(n).fill(-1);
    let next = 0;
    const visit = (v: number): void => {
      if (order[v] !== -1) return;
      order[v] = -2;
      for (const d of deps[v]!) if (order[d] === -1) visit(d);
      order[v] = next++;
    };
    for (let i = 0; i < n; i++) if (hasDown[i] === 0) visit(i);
    for (let i = 0; i < n; i++) if (order[i]! < 0) visit(i);
    return order;
  }

  it('matches the recursive definition on random graphs (cycles and repeated edges included)', () => {
    const graph = fc.integer({ min: 1, max: 30 }).chain((n) =>
      fc.array(fc.array(fc.integer({ min: 0, max: n - 1 }), { maxLength: 4 }), { minLength: n, maxLength: n }),
    );
    fc.assert(
      fc.property(graph, (deps) => {
        const n = deps.length;
        const depPtr = new Int32Array(n + 1);
        const flat: number[] = [];
        const hasDown = new Uint8Array(n);
        deps.forEach((ds, i) => {
          flat.push(...ds);
          for (const d of ds) hasDown[d] = 1;
          depPtr[i + 1] = flat.length;
        });
        const got = Array.from(staticOrder(n, depPtr, Int32Array.from(flat), hasDown));
        expect(got).toEqual(reference(deps, hasDown));
        // Written into a given array too.
        const out = new Float64Array(n + 3);
        staticOrder(n, depPtr, Int32Array.from(flat), hasDown, out);
        expect(Array.from(out.subarray(0, n))).toEqual(got);
      }),
    );
  });
});
