import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import {
  analyzeWorkflow,
  DEFAULT_PRIORITY,
  parsePriority,
  upwardRanks,
  defaultWorkflowDir,
  graphName,
  loadWorkflow,
  lowerBoundS,
  parseDurationS,
  parseWorkflow,
  replayGraph,
  scaleFactor,
  workflowFiles,
  type Workflow,
} from '../bench/replay.ts';
import { BENCH_TASK_OPTIONS, taskKey } from '../bench/tasks.ts';
import { benchReplay, loadRunFlow, taskSpanS } from '../bench/harness.ts';
import { replayTable } from '../bench/report.ts';
import type { FlowRunResult, TaskRunRecord } from '../src/runner/types.ts';

interface MetaStats {
  tasks: number;
  edges: number;
  depth: number;
  critical_path_s: number;
  total_work_s: number;
  lb_makespan_2cores_s: number;
}

function wf(tasks: { id: string; runtime_s: number; deps?: string[] }[]): Workflow {
  return parseWorkflow({ name: 't', tasks: tasks.map((t) => ({ deps: [], out_bytes: 0, in_bytes: 0, cores: 1, ...t })) });
}

describe('replay loader', () => {
  const files = workflowFiles();

  it('finds the shared workflow traces next to the repo', () => {
    expect(defaultWorkflowDir()).toMatch(/shared[/\\]workflows[/\\]?$/);
    expect(files.length).toBeGreaterThanOrEqual(5);
  });

  it.each(workflowFiles().map((f) => [graphName(f), f]))('%s: parses, and its stats match the trace metadata', (_name, file) => {
    const w = loadWorkflow(file);
    const a = analyzeWorkflow(w);
    const stats = (w.meta as { stats: MetaStats }).stats;
    expect(a.tasks).toBe(stats.tasks);
    expect(a.tasks).toBe(w.tasks.length);
    expect(a.edges).toBe(stats.edges);
    expect(a.depth).toBe(stats.depth);
    // The metadata is rounded to 3 decimals.
    expect(a.criticalPathS).toBeCloseTo(stats.critical_path_s, 2);
    expect(a.totalWorkS).toBeCloseTo(stats.total_work_s, 2);
    expect(lowerBoundS(a, 2, 1)).toBeCloseTo(stats.lb_makespan_2cores_s, 2);
    // Topological order covers every task once, inputs first.
    const pos = new Int32Array(a.tasks);
    a.order.forEach((t, i) => (pos[t] = i));
    expect(new Set(a.order).size).toBe(a.tasks);
    a.deps.forEach((ds, t) => ds.forEach((d) => expect(pos[d]).toBeLessThan(pos[t]!)));
  });

  it.each(workflowFiles().map((f) => [graphName(f), f]))('%s: replay graph has one busy node per task and scaled runtimes', (_name, file) => {
    const w = loadWorkflow(file);
    const g = replayGraph(w, { totalWorkS: 2 });
    expect(g.spec.nodes).toHaveLength(w.tasks.length);
    expect(g.totalWorkS).toBeCloseTo(2, 9);
    let ms = 0;
    let edges = 0;
    const keys = new Set<string>();
    for (const node of g.spec.nodes) {
      expect(node.taskKey).toBe(taskKey('busy'));
      const arg = node.args[0];
      expect(arg?.kind).toBe('const');
      ms += (arg as { value: number }).value;
      for (const u of node.upstream) expect(u).toBeLessThan(node.id);
      edges += node.upstream.length;
      keys.add(node.key);
    }
    expect(ms).toBeCloseTo(2000, 6);
    expect(edges).toBe(g.analysis.edges);
    // Keys are the trace's task ids.
    expect(keys).toEqual(new Set(w.tasks.map((t) => t.id)));
    expect(g.spec.referenceTasks.length).toBeGreaterThan(0);
  });
});

describe('replay maths', () => {
  // a(1) → b(2) → d(1); a → c(5) → d : critical path a,c,d = 7; work 9; depth 3.
  const diamond = wf([
    { id: 'a', runtime_s: 1 },
    { id: 'd', runtime_s: 1, deps: ['b', 'c'] },
    { id: 'b', runtime_s: 2, deps: ['a'] },
    { id: 'c', runtime_s: 5, deps: ['a', 'a'] },
  ]);

  it('critical path, total work, depth, deduplicated edges', () => {
    const a = analyzeWorkflow(diamond);
    expect(a.criticalPathS).toBe(7);
    expect(a.totalWorkS).toBe(9);
    expect(a.depth).toBe(3);
    expect(a.edges).toBe(4);
    expect(a.order[0]).toBe(0);
    expect(a.order[a.order.length - 1]).toBe(1);
  });

  it('lower bound = max(critical path, work / workers) × scale', () => {
    const a = analyzeWorkflow(diamond);
    expect(lowerBoundS(a, 1, 1)).toBe(9);
    expect(lowerBoundS(a, 2, 1)).toBe(7);
    expect(lowerBoundS(a, 2, 0.5)).toBe(3.5);
    expect(lowerBoundS({ criticalPathS: 1, totalWorkS: 10 }, 4, 0.1)).toBeCloseTo(0.25, 12);
    expect(() => lowerBoundS(a, 0, 1)).toThrow(RangeError);
  });

  it('scale from --total-work or --scale', () => {
    const a = analyzeWorkflow(diamond);
    expect(scaleFactor(a, { totalWorkS: 2 })).toBeCloseTo(2 / 9, 12);
    expect(scaleFactor(a, { scale: 0.01 })).toBe(0.01);
    expect(() => scaleFactor(a, { scale: 0 })).toThrow(RangeError);
    const g = replayGraph(diamond, { totalWorkS: 0.9 });
    expect(g.scale).toBeCloseTo(0.1, 12);
    expect(g.criticalPathS).toBeCloseTo(0.7, 12);
    // Nodes are in topological order; the sink 'd' is the one reference task.
    expect(g.spec.nodes.map((n) => n.key)).toEqual(['a', 'b', 'c', 'd']);
    expect(g.spec.nodes[3]!.upstream).toEqual([1, 2]);
    expect(g.spec.referenceTasks).toEqual([3]);
    expect((g.spec.nodes[2]!.args[0] as { value: number }).value).toBeCloseTo(500, 9);
  });

  it('parses durations', () => {
    expect(parseDurationS('2s')).toBe(2);
    expect(parseDurationS('2')).toBe(2);
    expect(parseDurationS('500ms')).toBe(0.5);
    expect(parseDurationS('1.5m')).toBe(90);
    expect(() => parseDurationS('fast')).toThrow(RangeError);
    expect(() => parseDurationS('0s')).toThrow(RangeError);
  });

  it('rejects malformed traces', () => {
    expect(() => parseWorkflow({ name: 'x' })).toThrow(/tasks/);
    expect(() => parseWorkflow({ name: 'x', tasks: [{ id: 'a', runtime_s: -1, deps: [] }] })).toThrow(/runtime_s/);
    expect(() => analyzeWorkflow(wf([{ id: 'a', runtime_s: 1, deps: ['zz'] }]))).toThrow(/unknown task 'zz'/);
    expect(() => analyzeWorkflow(wf([{ id: 'a', runtime_s: 1 }, { id: 'a', runtime_s: 1 }]))).toThrow(/duplicate/);
    expect(() =>
      analyzeWorkflow(
        wf([
          { id: 'a', runtime_s: 1, deps: ['b'] },
          { id: 'b', runtime_s: 1, deps: ['a'] },
        ]),
      ),
    ).toThrow(/cycle/);
  });
});

describe('replay priorities (upward rank)', () => {
  // Same diamond: a(1) → b(2) → d(1); a → c(5) → d. File order a, d, b, c.
  const diamond = wf([
    { id: 'a', runtime_s: 1 },
    { id: 'd', runtime_s: 1, deps: ['b', 'c'] },
    { id: 'b', runtime_s: 2, deps: ['a'] },
    { id: 'c', runtime_s: 5, deps: ['a', 'a'] },
  ]);

  it('upward rank = own runtime + the longest path below to an exit', () => {
    expect([...upwardRanks(diamond)]).toEqual([7, 1, 3, 6]);
    // Two exits, a chain and a fork: x(2) → y(3), x → z(1) → w(4).
    const fork = wf([
      { id: 'w', runtime_s: 4, deps: ['z'] },
      { id: 'x', runtime_s: 2 },
      { id: 'y', runtime_s: 3, deps: ['x'] },
      { id: 'z', runtime_s: 1, deps: ['x'] },
      { id: 'solo', runtime_s: 0.5 },
    ]);
    expect([...upwardRanks(fork)]).toEqual([4, 7, 3, 5, 0.5]);
  });

  it('the largest upward rank is the critical path (every trace)', () => {
    for (const file of workflowFiles()) {
      const w = loadWorkflow(file);
      const a = analyzeWorkflow(w);
      expect(Math.max(...upwardRanks(w, a))).toBeCloseTo(a.criticalPathS, 6);
    }
  });

  it('critical-path (the default) sets each node priority to its scaled rank; none leaves 0', () => {
    expect(DEFAULT_PRIORITY).toBe('critical-path');
    const g = replayGraph(diamond, { scale: 0.5 });
    expect(g.priority).toBe('critical-path');
    const byKey = new Map(g.spec.nodes.map((n) => [n.key, n.options]));
    expect(byKey.get('a')!.priority).toBeCloseTo(3.5, 12);
    expect(byKey.get('b')!.priority).toBeCloseTo(1.5, 12);
    expect(byKey.get('c')!.priority).toBeCloseTo(3, 12);
    expect(byKey.get('d')!.priority).toBeCloseTo(0.5, 12);
    // Everything else is the busy task's options.
    expect({ ...byKey.get('c')!, priority: 0 }).toEqual({ ...BENCH_TASK_OPTIONS.busy, priority: 0 });
    const none = replayGraph(diamond, { scale: 0.5 }, analyzeWorkflow(diamond), { priority: 'none' });
    expect(none.priority).toBe('none');
    for (const n of none.spec.nodes) expect(n.options).toBe(BENCH_TASK_OPTIONS.busy);
  });

  it('parses --priority', () => {
    expect(parsePriority('critical-path')).toBe('critical-path');
    expect(parsePriority('CP')).toBe('critical-path');
    expect(parsePriority('none')).toBe('none');
    expect(parsePriority('off')).toBe('none');
    expect(() => parsePriority('fifo')).toThrow(/critical-path, none/);
  });
});

describe('replay measurement (harness)', () => {
  it('task span = last end − first start over the records that ran', () => {
    const rec = (startMs: number, endMs: number) => ({ startMs, endMs }) as TaskRunRecord;
    const res = (tasks: TaskRunRecord[]) => ({ tasks }) as unknown as FlowRunResult;
    expect(taskSpanS(res([]))).toBe(0);
    expect(taskSpanS(res([rec(100, 150), rec(0, 0), rec(120, 400)]))).toBeCloseTo(0.3, 12);
  });

  it('measures a small trace on the local executor: documented and extra fields', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-replay-'));
    try {
      const file = join(dir, 'tiny.json');
      const tasks = [
        { id: 'a', runtime_s: 1, deps: [] },
        { id: 'b', runtime_s: 2, deps: ['a'] },
        { id: 'c', runtime_s: 5, deps: ['a'] },
        { id: 'd', runtime_s: 1, deps: ['b', 'c'] },
      ];
      writeFileSync(file, JSON.stringify({ name: 'tiny', source: 'test', tasks }));
      const deps = { runFlow: await loadRunFlow() };
      for (const priority of ['critical-path', 'none'] as const) {
        const m = await benchReplay(file, 'local', { workers: 1 }, { totalWorkS: 0.018 }, 1, deps, priority);
        expect(m).toMatchObject({ graph: 'tiny', tasks: 4, executor: 'local', workers: 1, priority, runs: 1 });
        // One worker: the bound is the total work.
        expect(m.lower_bound_s).toBeCloseTo(0.018, 9);
        expect(m.makespan_tasks_s).toBeGreaterThanOrEqual(0.018 * 0.999);
        expect(m.makespan_s).toBeGreaterThanOrEqual(m.makespan_tasks_s);
        expect(m.ratio).toBeCloseTo(m.makespan_s / m.lower_bound_s, 9);
        expect(m.ratio_tasks).toBeCloseTo(m.makespan_tasks_s / m.lower_bound_s, 9);
        expect(m.samples_s).toHaveLength(1);
        expect(replayTable([m])).toContain('tiny');
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
