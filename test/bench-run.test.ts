// The harness against the real runner and executors, with tiny graphs: every shape
// gives the right answer on every executor, and a replay finishes above its lower bound.
import { describe, expect, it } from 'vitest';
import { benchReplay, benchShape, loadRunFlow } from '../bench/harness.ts';
import { defaultWorkflowDir } from '../bench/replay.ts';
import { buildShape, SHAPES } from '../bench/shapes.ts';
import { join } from 'node:path';

const SIZES = { independent: 200, chain: 50, tree: 64, mapreduce: 300 } as const;

describe('bench with the real runner', () => {
  it.each(['local', 'pool'])('every shape on %s', async (executor) => {
    const deps = { runFlow: await loadRunFlow() };
    for (const shape of SHAPES) {
      // The warm-up run checks the sink's value against the shape's expectation.
      const r = await benchShape(buildShape(shape, SIZES[shape]), executor, { workers: 2 }, 1, deps);
      expect(r.median_s).toBeGreaterThan(0);
      if (executor === 'pool') expect(r.workers).toBe(2);
    }
  });

  it('replay on the pool: makespan at least the lower bound', async () => {
    const deps = { runFlow: await loadRunFlow() };
    const file = join(defaultWorkflowDir(), 'epigenomics-chameleon-hep-2seq-50k-001.json');
    const r = await benchReplay(file, 'pool', { workers: 2 }, { totalWorkS: 0.2 }, 1, deps);
    expect(r.tasks).toBe(223);
    expect(r.makespan_s).toBeGreaterThanOrEqual(r.lower_bound_s * 0.99);
  });
});
