/**
 * Test helpers for the bench tests: a sequential reference evaluator with the shape of
 * `runFlow`, and a do-nothing executor, so the harness and the CLI can be tested without
 * depending on the real runner and executors.
 */
import type { Executor } from '../src/executor/types.ts';
import type { GraphSpec } from '../src/flow/spec.ts';
import { getTask } from '../src/flow/registry.ts';
import type { FlowRunResult, NodeRef, RunOptions, TaskRunRecord } from '../src/runner/types.ts';

const refId = (r: NodeRef | { readonly node: number }): number => (typeof r === 'number' ? r : r.node);

/**
 * Evaluates a spec node by node in id order (bench specs are topologically numbered):
 * checks every input has a smaller id, resolves `ref`/`const` arguments, calls the
 * registered function. Only what the bench graphs use is supported.
 */
export function evaluateSpec(spec: GraphSpec): unknown[] {
  const values = new Array<unknown>(spec.nodes.length);
  for (const node of spec.nodes) {
    for (const u of node.upstream) if (u >= node.id) throw new Error(`node ${node.id}: upstream ${u} is not earlier`);
    const args = node.args.map((a) => {
      if (a.kind === 'const') return a.value;
      if (a.node >= node.id) throw new Error(`node ${node.id}: input ${a.node} is not earlier`);
      return values[a.node];
    });
    const def = getTask(node.taskKey);
    if (def === undefined) throw new Error(`node ${node.id}: task ${node.taskKey} is not registered`);
    values[node.id] = def.fn(...args);
  }
  return values;
}

/** A fake `runFlow`: evaluates in-process, records calls, never touches the executor beyond its fields. */
export function fakeRunFlow(calls: { spec: GraphSpec; opts: RunOptions | undefined }[] = []) {
  return async (spec: GraphSpec, opts?: RunOptions): Promise<FlowRunResult> => {
    calls.push({ spec, opts });
    const startMs = performance.timeOrigin + performance.now();
    const values = evaluateSpec(spec);
    const endMs = performance.timeOrigin + performance.now();
    const tasks: TaskRunRecord[] = spec.nodes.map((n) => ({
      key: n.key,
      node: n.id,
      mapIndex: -1,
      state: 'Success',
      attempts: 1,
      startMs,
      endMs,
    }));
    return {
      runId: 'test-run',
    flowName: spec.name,
      state: 'Success',
      message: 'All reference tasks succeeded.',
      startMs,
      endMs,
      durationMs: endMs - startMs,
      parameters: {},
      tasks,
      result: <T>(ref: NodeRef | { readonly node: number }) => values[refId(ref)] as T,
      stateOf: () => 'Success',
      runsOf: (ref: NodeRef) => tasks.filter((t) => t.node === refId(ref)),
      story: () => [],
    };
  };
}

/** An executor that is never driven (the fake runner evaluates in-process). */
export function fakeExecutor(kind: string, workers: number): Executor {
  return {
    kind,
    workers,
    start: async () => {},
    freeSlots: () => Infinity,
    submit: () => {},
    cancel: () => {},
    shutdown: async () => {},
  };
}

/** Collects what a command writes. */
export function sink(): { write(s: string): boolean; text(): string } {
  let buf = '';
  return {
    write(s: string) {
      buf += s;
      return true;
    },
    text: () => buf,
  };
}
