import { describe, expect, it } from 'vitest';
import type { GraphSpec } from '../src/flow/spec.ts';
import { getTask } from '../src/flow/registry.ts';
import { buildShape, chain, DEFAULT_SUITE, independent, mapreduce, SHAPES, tree } from '../bench/shapes.ts';
import { busy, kib, sum, TASKS_MODULE, taskKey } from '../bench/tasks.ts';
import { evaluateSpec } from './bench-helpers.ts';

/** Structural checks every bench spec must pass. */
function checkSpec(spec: GraphSpec): { edges: number; sinks: number[] } {
  const keys = new Set<string>();
  const hasDown = new Uint8Array(spec.nodes.length);
  let edges = 0;
  spec.nodes.forEach((node, i) => {
    expect(node.id).toBe(i);
    expect(node.kind).toBe('task');
    expect(node.mapped).toBe(false);
    expect(node.module).toBe(TASKS_MODULE);
    expect(node.taskKey.startsWith(`${TASKS_MODULE}#`)).toBe(true);
    expect(getTask(node.taskKey)?.closure).toBe(false);
    keys.add(node.key);
    for (const a of node.args) {
      if (a.kind === 'ref') {
        expect(a.node).toBeLessThan(i);
        hasDown[a.node] = 1;
        edges++;
      }
    }
    for (const u of node.upstream) {
      expect(u).toBeLessThan(i);
      hasDown[u] = 1;
      edges++;
    }
  });
  expect(keys.size).toBe(spec.nodes.length);
  expect(spec.modules).toEqual([TASKS_MODULE]);
  const sinks: number[] = [];
  hasDown.forEach((d, i) => {
    if (d === 0) sinks.push(i);
  });
  expect([...spec.referenceTasks]).toEqual(sinks);
  return { edges, sinks };
}

describe('bench tasks', () => {
  it('registers every task under <module url>#<name>', () => {
    for (const name of ['noop', 'one', 'sum', 'busy', 'kib'] as const) {
      const def = getTask(taskKey(name));
      expect(def?.name).toBe(name);
      expect(def?.options.name).toBe(name);
    }
  });

  it('sum adds numbers and lengths; kib is 1024 bytes; busy spins for its time', () => {
    expect(sum(1, 2, 3)).toBe(6);
    expect(sum(kib(), kib(), new Uint8Array(5), null)).toBe(2053);
    const t0 = performance.now();
    expect(busy(20)).toBeNull();
    expect(performance.now() - t0).toBeGreaterThanOrEqual(20);
  });
});

describe('bench shapes', () => {
  it('independent: n nodes, no edges, every node a sink', () => {
    const b = independent(7);
    expect(b.tasks).toBe(7);
    expect(b.spec.nodes).toHaveLength(7);
    expect(checkSpec(b.spec).edges).toBe(0);
    expect(b.spec.nodes.map((x) => x.key)).toEqual(['noop', 'noop-2', 'noop-3', 'noop-4', 'noop-5', 'noop-6', 'noop-7']);
  });

  it('chain: n nodes, each on the previous', () => {
    const b = chain(5);
    expect(b.spec.nodes).toHaveLength(5);
    const { edges, sinks } = checkSpec(b.spec);
    expect(edges).toBe(4);
    expect(b.edges).toBe(4);
    expect(sinks).toEqual([4]);
    b.spec.nodes.slice(1).forEach((node, i) => expect(node.args).toEqual([{ kind: 'ref', node: i, mode: 'plain' }]));
    expect(evaluateSpec(b.spec)[4]).toBeNull();
  });

  it.each([1, 2, 3, 5, 8, 13, 16])('tree over %i leaves: 2L-1 nodes, binary sums, root = L', (leaves) => {
    const b = tree(leaves);
    expect(b.tasks).toBe(2 * leaves - 1);
    expect(b.spec.nodes).toHaveLength(2 * leaves - 1);
    const { edges, sinks } = checkSpec(b.spec);
    expect(edges).toBe(2 * (leaves - 1));
    expect(sinks).toHaveLength(1);
    for (const node of b.spec.nodes.slice(leaves)) expect(node.args).toHaveLength(2);
    const values = evaluateSpec(b.spec);
    expect(values[sinks[0]!]).toBe(leaves);
    expect(b.expected).toBe(leaves);
  });

  it('tree depth is ceil(log2 L) + 1 levels', () => {
    const b = tree(16);
    const depth = new Int32Array(b.spec.nodes.length);
    for (const node of b.spec.nodes) for (const a of node.args) if (a.kind === 'ref') depth[node.id] = Math.max(depth[node.id]!, depth[a.node]! + 1);
    expect(Math.max(...depth)).toBe(4);
  });

  it('mapreduce 10k → 100 → 1', () => {
    const b = mapreduce(10_000);
    expect(b.tasks).toBe(10_101);
    expect(b.spec.nodes).toHaveLength(10_101);
    const { edges, sinks } = checkSpec(b.spec);
    expect(edges).toBe(10_100);
    expect(sinks).toEqual([10_100]);
    const partials = b.spec.nodes.slice(10_000, 10_100);
    for (const p of partials) expect(p.args).toHaveLength(100);
    expect(b.spec.nodes[10_100]!.args).toHaveLength(100);
    expect(evaluateSpec(b.spec)[10_100]).toBe(10_000);
  });

  it('mapreduce with n not divisible by 100, and with fewer than 100 leaves', () => {
    const b = mapreduce(1234);
    expect(b.tasks).toBe(1234 + 101);
    checkSpec(b.spec);
    const sizes = b.spec.nodes.slice(1234, 1334).map((p) => p.args.length);
    expect(Math.min(...sizes)).toBe(12);
    expect(Math.max(...sizes)).toBe(13);
    expect(evaluateSpec(b.spec)[b.tasks - 1]).toBe(1234);

    const small = mapreduce(7);
    expect(small.tasks).toBe(7 + 7 + 1);
    checkSpec(small.spec);
    expect(evaluateSpec(small.spec)[small.tasks - 1]).toBe(7);
  });

  it('kib payload: leaves return 1 KiB, reductions sum bytes', () => {
    const b = tree(8, { payload: 'kib' });
    expect(b.expected).toBe(8 * 1024);
    expect(evaluateSpec(b.spec)[b.tasks - 1]).toBe(8 * 1024);
    expect(independent(3, { payload: 'kib' }).spec.nodes[0]!.taskKey).toBe(taskKey('kib'));
  });

  it('rejects bad sizes', () => {
    expect(() => independent(0)).toThrow(RangeError);
    expect(() => chain(1.5)).toThrow(RangeError);
    expect(() => tree(-1)).toThrow(RangeError);
  });

  it('the default suite is independent 10k/100k, chain 10k, tree 16384 leaves, mapreduce 10k', () => {
    expect(DEFAULT_SUITE).toEqual([
      { shape: 'independent', n: 10_000 },
      { shape: 'independent', n: 100_000 },
      { shape: 'chain', n: 10_000 },
      { shape: 'tree', n: 16_384 },
      { shape: 'mapreduce', n: 10_000 },
    ]);
  });

  it('builds 1M-node graphs fast', () => {
    // Target: well under a second each (~0.2-0.5 s on an idle 2-core box); the bound is loose for busy shared runners.
    for (const shape of SHAPES) {
      const n = shape === 'tree' ? 500_000 : 1_000_000;
      const t0 = performance.now();
      const b = buildShape(shape, n);
      const ms = performance.now() - t0;
      expect(b.spec.nodes.length).toBeGreaterThanOrEqual(999_999);
      expect(ms).toBeLessThan(5000);
    }
  });
});
