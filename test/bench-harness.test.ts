import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { benchReplay, benchShape, taskSpanS, withRatios, withStartup, type HarnessDeps, type ShapeResult } from '../bench/harness.ts';
import { defaultWorkflowDir } from '../bench/replay.ts';
import { clusterTable, replayJson } from '../bench/report.ts';
import { CLUSTER_TARGETS } from '../bench/cluster.ts';
import { mapreduce, tree } from '../bench/shapes.ts';
import { fmt, median, parseCount, table, timeRuns, usPer } from '../bench/stats.ts';
import { benchCommand, type BenchIO } from '../src/cli/bench.ts';
import { fakeExecutor, fakeRunFlow, sink } from './bench-helpers.ts';

describe('stats', () => {
  it('median of odd and even counts, unsorted input untouched', () => {
    const xs = [5, 1, 3];
    expect(median(xs)).toBe(3);
    expect(xs).toEqual([5, 1, 3]);
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([7])).toBe(7);
    expect(() => median([])).toThrow(RangeError);
  });

  it('timeRuns: one warm-up, then R samples; a returned number replaces the wall clock', async () => {
    let calls = 0;
    const s = await timeRuns(3, () => {
      calls++;
      return 0.25;
    });
    expect(calls).toBe(4);
    expect(s).toEqual([0.25, 0.25, 0.25]);
    await expect(timeRuns(0, () => {})).rejects.toThrow(RangeError);
  });

  it('counts, µs per task and formatting', () => {
    expect(parseCount('10k')).toBe(10_000);
    expect(parseCount('1M')).toBe(1_000_000);
    expect(parseCount('100_000')).toBe(100_000);
    expect(parseCount('16384')).toBe(16_384);
    expect(() => parseCount('ten')).toThrow(RangeError);
    expect(() => parseCount('0')).toThrow(RangeError);
    expect(usPer(2, 1_000_000)).toBe(2);
    expect(fmt(1234.5)).toBe('1,235');
    expect(fmt(0.5)).toBe('0.500');
    const t = table(['a', 'n'], [['x', '10'], ['yy', '5']]).split('\n');
    expect(t[2]).toBe('x   10');
    expect(t[3]).toBe('yy   5');
  });
});

function deps(calls: Parameters<typeof fakeRunFlow>[0] = []): HarnessDeps {
  return { runFlow: fakeRunFlow(calls), createExecutor: async (name, s) => fakeExecutor(name, name === 'local' ? 1 : s.workers) };
}

describe('harness', () => {
  it('benchShape: warm-up keeps results, timed runs do not; medians and per-task figures', async () => {
    const calls: Parameters<typeof fakeRunFlow>[0] = [];
    const b = tree(64);
    const r = await benchShape(b, 'pool', { workers: 2 }, 3, deps(calls));
    expect(calls).toHaveLength(4);
    expect(calls.map((c) => c.opts?.keepResults)).toEqual([true, false, false, false]);
    expect(calls.every((c) => c.spec === b.spec && c.opts?.executor?.kind === 'pool')).toBe(true);
    expect(r).toMatchObject({ shape: 'tree', n: 64, executor: 'pool', workers: 2, tasks: 127, runs: 3 });
    expect(r.samples_s).toHaveLength(3);
    expect(r.median_s).toBe(median(r.samples_s));
    expect(r.us_per_task).toBeCloseTo((r.median_s * 1e6) / 127, 9);
    expect(r.tasks_per_s).toBeCloseTo(127 / r.median_s, 6);
    withRatios([r], r.us_per_task / 4);
    expect(r.ratio_vs_postmessage).toBeCloseTo(4, 9);
    withStartup([r], new Map([['pool', r.median_s / 2]]));
    expect(r.startup_s).toBe(r.median_s / 2);
    expect(r.net_us_per_task).toBeCloseTo(r.us_per_task / 2, 9);
  });

  it('benchShape fails on a wrong answer or a failed flow', async () => {
    const b = mapreduce(300);
    const wrong: HarnessDeps = {
      ...deps(),
      runFlow: async (spec, opts) => {
        const res = await fakeRunFlow()(spec, opts);
        return { ...res, result: <T>() => 42 as T };
      },
    };
    await expect(benchShape(b, 'local', { workers: 1 }, 1, wrong)).rejects.toThrow(/wrong result 42, expected 300/);
    const failed: HarnessDeps = {
      ...deps(),
      runFlow: async (spec, opts) => ({ ...(await fakeRunFlow()(spec, opts)), state: 'Failed', message: 'boom' }),
    };
    await expect(benchShape(b, 'local', { workers: 1 }, 1, failed)).rejects.toThrow(/ended Failed: boom/);
  });

  it('benchReplay: lower bound uses the executor workers; ratio = makespan / bound', async () => {
    const file = join(defaultWorkflowDir(), 'montage-chameleon-2mass-01d-001.json');
    const r = await benchReplay(file, 'pool', { workers: 2 }, { totalWorkS: 0.05 }, 2, deps());
    expect(r.graph).toBe('montage-chameleon-2mass-01d-001');
    expect(r.tasks).toBe(103);
    expect(r.total_work_s).toBeCloseTo(0.05, 9);
    // Montage: work/2 = 181.3 s > critical path 21.1 s, so the bound is work / 2.
    expect(r.lower_bound_s).toBeCloseTo(0.025, 9);
    expect(r.ratio).toBeCloseTo(r.makespan_s / r.lower_bound_s, 9);
    // The fake runner runs the busy tasks one after the other: at least the total work.
    expect(r.makespan_s).toBeGreaterThanOrEqual(0.05);
    expect(r.samples_s).toHaveLength(2);
    expect(taskSpanS({ tasks: [{ startMs: 10, endMs: 20 }, { startMs: 15, endMs: 1010 }, { startMs: 0, endMs: 0 }] } as never)).toBe(1);
  });

  it('replay JSON: one object for one replay, an array for several', () => {
    const one = { graph: 'g' } as never;
    expect(replayJson([one])).toBe(one);
    expect(replayJson([one, one])).toEqual([one, one]);
  });
});

function io(cwd: string): BenchIO & { out: ReturnType<typeof sink>; err: ReturnType<typeof sink> } {
  const out = sink();
  const err = sink();
  return {
    stdout: out,
    stderr: err,
    cwd,
    out,
    err,
    runFlow: fakeRunFlow(),
    createExecutor: async (name, s) => fakeExecutor(name, name === 'local' ? 1 : s.workers),
  };
}

describe('cluster table', () => {
  it('judges a shape against its target only at the size the target is stated for', () => {
    const row = (shape: string, n: number, us: number): ShapeResult => ({
      shape, n, executor: 'cluster-warm', workers: 2, median_s: (us * n) / 1e6, us_per_task: us, tasks_per_s: 1e6 / us, tasks: n, runs: 5, samples_s: [], run_median_s: 0,
    });
    const lines = clusterTable([row('independent', 10_000, 9), row('independent', 100_000, 4), row('chain', 10_000, 25)], CLUSTER_TARGETS).split('\n');
    const verdict = (shape: string, n: number): string[] => lines.find((l) => l.startsWith(shape) && l.split(/\s+/)[1] === String(n))!.trim().split(/\s+/).slice(-2);
    expect(verdict('independent', 10_000)).toEqual(['-', '-']);
    expect(verdict('independent', 100_000)).toEqual(['5.00', 'yes']);
    expect(verdict('chain', 10_000)).toEqual(['20.0', 'NO']);
  });
});

describe('weft bench (CLI)', () => {
  it('writes the documented JSON schema, with baselines and ratios', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-bench-'));
    const t = io(dir);
    const code = await benchCommand(
      ['--shape', 'all', '--n', '200', '--executor', 'all', '--runs', '1', '--baseline-n', '2000', '--json', 'out/b.json'],
      t,
    );
    expect(t.err.text()).not.toMatch(/failed/);
    expect(code).toBe(0);
    const doc = JSON.parse(readFileSync(join(dir, 'out/b.json'), 'utf8')) as {
      results: Record<string, unknown>[];
      baselines: Record<string, unknown>[];
    };
    expect(doc.results).toHaveLength(4 * 3);
    for (const r of doc.results) {
      for (const k of ['shape', 'executor']) expect(typeof r[k]).toBe('string');
      for (const k of ['n', 'workers', 'median_s', 'us_per_task', 'tasks_per_s', 'ratio_vs_postmessage', 'startup_s', 'net_us_per_task']) {
        expect(typeof r[k]).toBe('number');
      }
      expect(r.n).toBe(200);
    }
    expect(doc.results.map((r) => `${r.shape}/${r.executor}`)).toEqual([
      'independent/local',
      'independent/pool',
      'independent/pool-warm',
      'chain/local',
      'chain/pool',
      'chain/pool-warm',
      'tree/local',
      'tree/pool',
      'tree/pool-warm',
      'mapreduce/local',
      'mapreduce/pool',
      'mapreduce/pool-warm',
    ]);
    expect(doc.baselines.map((b) => b.name)).toEqual(['loop-noop', 'postmessage-batched', 'postmessage-unbatched', 'postmessage-roundtrip', 'piscina-run']);
    for (const b of doc.baselines) {
      expect(typeof b.name).toBe('string');
      for (const k of ['n', 'median_s', 'us_per_task']) expect(b[k]).toBeGreaterThan(0);
    }
    const text = t.out.text();
    expect(text).toMatch(/Baselines/);
    expect(text).toMatch(/ratio vs postMessage/);
    expect(text).toMatch(/mapreduce\s+200\s+301\s+pool\s+2/);
  });

  it('replays a named trace and writes one JSON object', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-bench-'));
    const t = io(dir);
    const code = await benchCommand(
      ['--graph', 'seismology-chameleon-1100p-001', '--total-work', '20ms', '--executor', 'pool', '--runs', '1', '--json', 'r.json'],
      t,
    );
    expect(code).toBe(0);
    const doc = JSON.parse(readFileSync(join(dir, 'r.json'), 'utf8')) as Record<string, unknown>;
    expect(doc).toMatchObject({ graph: 'seismology-chameleon-1100p-001', tasks: 1101 });
    for (const k of ['makespan_s', 'lower_bound_s', 'ratio']) expect(doc[k]).toBeGreaterThan(0);
    expect(t.out.text()).toMatch(/lower bound/);
  });

  it('--graph all replays every trace into an array', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-bench-'));
    const t = io(dir);
    const code = await benchCommand(['--graph', 'all', '--scale', '1e-6', '--executor', 'local', '--runs', '1', '--json', 'r.json'], t);
    expect(code).toBe(0);
    const doc = JSON.parse(readFileSync(join(dir, 'r.json'), 'utf8')) as { graph: string; tasks: number }[];
    expect(doc.map((d) => d.graph)).toEqual([
      'blast-chameleon-large-001',
      'cycles-chameleon-5l-1c-12p-001',
      'epigenomics-chameleon-hep-2seq-50k-001',
      'montage-chameleon-2mass-01d-001',
      'seismology-chameleon-1100p-001',
    ]);
    for (const d of doc as unknown as Record<string, unknown>[]) {
      expect(d.priority).toBe('critical-path');
      for (const k of ['makespan_s', 'lower_bound_s', 'ratio', 'makespan_tasks_s', 'ratio_tasks']) expect(typeof d[k]).toBe('number');
    }
    const t2 = io(dir);
    expect(await benchCommand(['--graph', 'blast-chameleon-large-001', '--scale', '1e-6', '--executor', 'local', '--runs', '1', '--priority', 'none', '--json', 'n.json'], t2)).toBe(0);
    expect((JSON.parse(readFileSync(join(dir, 'n.json'), 'utf8')) as { priority: string }).priority).toBe('none');
  });

  it('usage errors exit 2 and name the flag', async () => {
    const cases: [string[], RegExp][] = [
      [['--shape', 'ring'], /--shape must be one of/],
      [['--n', 'lots'], /--n: not a count/],
      [['--graph', 'all', '--total-work', '1s', '--scale', '2'], /not both/],
      [['--scale', '2'], /--scale applies to --graph only/],
      [['--priority', 'none'], /--priority applies to --graph only/],
      [['--graph', 'all', '--priority', 'soonest'], /--priority must be one of/],
      [['--graph', 'all', '--shape', 'tree'], /--shape does not apply/],
      [['--graph', 'no-such-trace'], /no file 'no-such-trace'/],
      [['--graph', 'all', '--total-work', 'soon'], /--total-work: not a duration/],
      [['extra'], /unexpected argument/],
    ];
    for (const [argv, re] of cases) {
      const t = io(tmpdir());
      expect(await benchCommand(argv, t)).toBe(2);
      expect(t.err.text()).toMatch(re);
    }
  });

  it('--help exits 0 and documents the flags', async () => {
    const t = io(tmpdir());
    expect(await benchCommand(['--help'], t)).toBe(0);
    expect(t.out.text()).toMatch(/--total-work/);
  });
});
