// The cluster benchmarks at tiny sizes: the raw ws+msgpackr baselines, the scheduler
// driving simulated workers (every call assigned exactly once), the cluster executors
// and modes through `weft bench`. No timing assertions; every process and socket closed.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { benchSchedulerSim, percentile, wsBaseline, wsRelayBaseline, wsRoundTripBaseline, WS_REFERENCE } from '../bench/cluster.ts';
import { loadRunFlow } from '../bench/harness.ts';
import { benchCommand } from '../src/cli/bench.ts';
import { captureIO, openHandles, settledHandles } from './helpers/bench-io.ts';


const dir = mkdtempSync(join(tmpdir(), 'weft-bench-cluster-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('raw ws + msgpackr baselines', () => {
  it('batched: sane numbers for a tiny n, echo processes stopped', async () => {
    const before = openHandles();
    const b = await wsBaseline(2_000, 2, 1, 100);
    expect(b.name).toBe(WS_REFERENCE);
    expect(b.n).toBe(2_000);
    expect(b.workers).toBe(2);
    expect(b.batch).toBe(100);
    expect(b.samples_s).toHaveLength(1);
    expect(b.median_s).toBeGreaterThan(0);
    expect(Number.isFinite(b.us_per_task) && b.us_per_task > 0).toBe(true);
    expect(await settledHandles(before)).toBe(before);
  });

  it('round trip: one message in flight', async () => {
    const before = openHandles();
    const b = await wsRoundTripBaseline(50, 1);
    expect(b.name).toBe('ws-msgpackr-roundtrip');
    expect(b.n).toBe(50);
    expect(b.us_per_task).toBeGreaterThan(0);
    expect(await settledHandles(before)).toBe(before);
  });

  it('relay: one message through a relay process and an echo process and back, both stopped after', async () => {
    const before = openHandles();
    const b = await wsRelayBaseline(50, 1);
    expect(b.name).toBe('ws-msgpackr-relay');
    expect(b.n).toBe(50);
    expect(b.samples_s).toHaveLength(1);
    expect(b.us_per_task).toBeGreaterThan(0);
    expect(await settledHandles(before)).toBe(before);
  });

  it('percentile is nearest-rank', () => {
    const xs = Array.from({ length: 10 }, (_, i) => i + 1);
    expect(percentile(xs, 0.5)).toBe(5);
    expect(percentile(xs, 0.9)).toBe(9);
    expect(percentile(xs, 0.99)).toBe(10);
    expect(percentile([7], 0.9)).toBe(7);
    expect(() => percentile([], 0.5)).toThrow(RangeError);
  });
});

describe('scheduler with simulated workers', () => {
  it('2k tasks on 20 simulated workers (scheduler in this process): every call assigned once', async () => {
    const before = openHandles();
    const runFlow = await loadRunFlow();
    const r = await benchSchedulerSim(runFlow, { tasks: 2_000, workers: 20, credits: 2, runs: 1, scheduler: 'this', track: true });
    // Warm-up, one timed run, the heap-probe run: three graphs of 2k tasks.
    expect(r.calls_received).toBe(3 * 2_000);
    expect(r.calls_distinct).toBe(3 * 2_000);
    expect(r.duplicates).toBe(0);
    expect(r.assigned).toBe(3 * 2_000);
    expect(r.sim_workers).toBe(20);
    expect(r.samples_s).toHaveLength(1);
    expect(r.assignments_per_s).toBeGreaterThan(0);
    expect(await settledHandles(before)).toBe(before);
  });

  it('the scheduler in a child process: heap measured there, child stopped', async () => {
    const before = openHandles();
    const runFlow = await loadRunFlow();
    const r = await benchSchedulerSim(runFlow, { tasks: 1_000, workers: 10, runs: 1, scheduler: 'child', track: true });
    expect(r.scheduler_process).toBe('child');
    expect(r.calls_distinct).toBe(3 * 1_000);
    expect(r.duplicates).toBe(0);
    expect(r.heap_idle_b).toBeGreaterThan(0);
    expect(r.heap_mid_b).toBeGreaterThan(0);
    expect(await settledHandles(before)).toBe(before);
  });

  it('refuses sizes out of bounds', async () => {
    const runFlow = await loadRunFlow();
    await expect(benchSchedulerSim(runFlow, { tasks: 0 })).rejects.toThrow(RangeError);
    await expect(benchSchedulerSim(runFlow, { tasks: 10, workers: 1_000_000 })).rejects.toThrow(RangeError);
  });
});

describe('weft bench on a cluster', () => {
  it('--executor cluster --shape independent --n 2000 --runs 1 completes, with the ws baselines and the cluster table', async () => {
    const before = openHandles();
    const io = captureIO(dir);
    const out = join(dir, 'cluster.json');
    const code = await benchCommand(['--executor', 'cluster', '--shape', 'independent', '--n', '2000', '--runs', '1', '--baseline-n', '2000', '--json', out], io);
    expect(code, io.errText()).toBe(0);
    expect(io.text()).toContain(WS_REFERENCE);
    expect(io.text()).toContain('Cluster');
    const doc = JSON.parse(readFileSync(out, 'utf8')) as { results: { executor: string; tasks: number; relayed_bytes_per_run?: number }[]; baselines: { name: string }[] };
    expect(doc.results).toHaveLength(1);
    expect(doc.results[0]!.executor).toBe('cluster');
    expect(doc.results[0]!.tasks).toBe(2_000);
    expect(doc.results[0]!.relayed_bytes_per_run).toBe(0);
    expect(doc.baselines.map((b) => b.name)).toContain(WS_REFERENCE);
    expect(await settledHandles(before)).toBe(before);
  });

  it('--shape latency on cluster-warm: median and p90 of one-task flow runs and of single calls, against the relay floor', async () => {
    const before = openHandles();
    const io = captureIO(dir);
    const out = join(dir, 'latency.json');
    const code = await benchCommand(['--shape', 'latency', '--executor', 'cluster-warm', '--n', '20', '--runs', '1', '--json', out], io);
    expect(code, io.errText()).toBe(0);
    const doc = JSON.parse(readFileSync(out, 'utf8')) as {
      latency: { executor: string; measures: string; n: number; median_us: number; p90_us: number }[];
      baselines: { name: string }[];
    };
    expect(doc.latency.map((r) => [r.executor, r.measures])).toEqual([
      ['cluster-warm', 'flow run'],
      ['cluster-warm', 'one call'],
    ]);
    for (const r of doc.latency) {
      expect(r.n).toBe(20);
      expect(r.p90_us).toBeGreaterThanOrEqual(r.median_us);
    }
    expect(doc.baselines.map((b) => b.name)).toContain('ws-msgpackr-relay');
    expect(io.text()).toMatch(/cluster-warm\s+one call/);
    expect(await settledHandles(before)).toBe(before);
  });

  it('--shape scheduler: a small simulated fleet through the CLI', async () => {
    const io = captureIO(dir);
    const code = await benchCommand(['--shape', 'scheduler', '--n', '1000', '--sim-workers', '10', '--runs', '1', '--baseline-n', '2000'], io);
    expect(code, io.errText()).toBe(0);
    expect(io.text()).toContain('assignments/s');
  });

  it('usage errors: flags of other modes', async () => {
    const io = captureIO(dir);
    expect(await benchCommand(['--shape', 'scheduler', '--executor', 'pool'], io)).toBe(2);
    expect(await benchCommand(['--shape', 'tree', '--sim-workers', '5'], io)).toBe(2);
  });
});

describe('BenchClusterExecutor', () => {
  it('a run over its time bound fails with the scheduler status, and the cluster is stopped', async () => {
    const before = openHandles();
    const { BenchClusterExecutor } = await import('../bench/cluster.ts');
    const { independent } = await import('../bench/shapes.ts');
    const runFlow = await loadRunFlow();
    const ex = new BenchClusterExecutor('cluster', { workers: 1, runTimeoutMs: 30 }, false);
    await expect(runFlow(independent(50_000).spec, { executor: ex, keepResults: false })).rejects.toThrow(/did not (finish|end) within 30 ms/);
    expect(await settledHandles(before)).toBe(before);
  });
});
