import { describe, expect, it } from 'vitest';
import {
  analyzeWorkflow,
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
import { taskKey } from '../bench/tasks.ts';

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
