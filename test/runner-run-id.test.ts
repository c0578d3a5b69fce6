/**
 * `RunOptions.runId`: the id a run uses for `{runId}` in result locations and reports.
 * Two runs with the same id share their `{runId}` checkpoints and targets (what lets a
 * rerun of a deployment's flow run restart from them); different ids do not. Task bodies
 * append to a counter file, so what ran is seen on disk.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { ClusterExecutor, LocalExecutor, PoolExecutor, type Flow, type FlowRunResult, type RunOptions } from '../src/index.ts';
import type { RestartRecord } from '../src/runner/types.ts';
import { byRunId, byRunIdTarget } from './fixtures/runner-run-id-tasks.ts';

const root = mkdtempSync(join(tmpdir(), 'weft-runid-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
let resultDir = '';
let counter = '';

beforeEach(() => {
  n++;
  resultDir = join(root, `results-${n}`);
  counter = join(root, `counter-${n}`);
});

const run = <O>(f: Flow<O>, opts: RunOptions = {}): Promise<FlowRunResult> =>
  f.run({ executor: new LocalExecutor(), validate: true, resultDir, parameters: { counter }, ...opts });

/** Lines of the counter file: one per task body that ran. */
const ran = (): string[] => (existsSync(counter) ? readFileSync(counter, 'utf8').trim().split('\n') : []);

/** What a deployment keeps of a run: its id, parameters and task states (no values in memory). */
const record = (r: FlowRunResult, runId: string): RestartRecord => ({
  runId,
  parameters: r.parameters,
  tasks: r.tasks.map((t) => ({ key: t.key, mapIndex: t.mapIndex, state: t.state })),
});

describe('RunOptions.runId', () => {
  it('names the run: its result and its {runId} checkpoint path', async () => {
    const r = await run(byRunId, { runId: 'run-42' });
    expect(r.state).toBe('Success');
    expect(r.runId).toBe('run-42');
    expect(JSON.parse(readFileSync(join(resultDir, 'by-run', 'run-42', 'stamp.json'), 'utf8'))).toBe(21);
    // Without one: a fresh id per run.
    const a = await run(byRunId);
    const b = await run(byRunId);
    expect(a.runId).not.toBe(b.runId);
    expect(a.runId).not.toBe('run-42');
  });

  it('a restart with the same runId loads the {runId} checkpoint instead of running the task again', async () => {
    const first = await run(byRunId, { runId: 'flow-run-1' });
    expect(first.state).toBe('Success');
    expect(ran()).toEqual(['stamp ran', 'double ran']);
    // The rerun knows only the states (as a server does): `double` did not finish, `stamp` did.
    const prev = record(first, 'flow-run-1');
    const tasks = prev.tasks.map((t) => (t.key === 'double' ? { ...t, state: 'Failed' as const } : t));
    const second = await run(byRunId, { runId: 'flow-run-1', restartFrom: { ...prev, tasks } });
    expect(second.state).toBe('Success');
    expect(second.stateOf(byRunId.spec().nodes.findIndex((x) => x.key === 'stamp'))).toBe('Cached');
    expect(second.result<number>(byRunId.spec().nodes.findIndex((x) => x.key === 'double'))).toBe(42);
    expect(ran()).toEqual(['stamp ran', 'double ran', 'double ran']);
  });

  it('a first attempt under another id leaves nothing to restore: the task runs again', async () => {
    // What happened before runIds could be given: each attempt of one server run had its own.
    const first = await run(byRunId);
    expect(first.runId).not.toBe('flow-run-2');
    const prev = record(first, 'flow-run-2');
    const second = await run(byRunId, { runId: 'flow-run-2', restartFrom: prev });
    expect(second.state).toBe('Success');
    expect(ran()).toEqual(['stamp ran', 'double ran', 'stamp ran', 'double ran']);
  });

  it('a {runId} target is found by a run with the same id, not by one with another', async () => {
    const r1 = await run(byRunIdTarget, { runId: 'same' });
    expect(r1.stateOf(1)).toBe('Success');
    const r2 = await run(byRunIdTarget, { runId: 'same' });
    expect(r2.stateOf(1)).toBe('Cached');
    expect(r2.result<number>(1)).toBe(7);
    expect(ran()).toEqual(['stampTarget ran']);
    const r3 = await run(byRunIdTarget, { runId: 'other' });
    expect(r3.stateOf(1)).toBe('Success');
    expect(ran()).toEqual(['stampTarget ran', 'stampTarget ran']);
  });

  it('holds on a pool executor too (task bodies in worker threads)', async () => {
    const exec = (): PoolExecutor => new PoolExecutor({ threads: 2 });
    const first = await run(byRunId, { executor: exec(), runId: 'pooled' });
    expect(first.state).toBe('Success');
    const second = await run(byRunId, { executor: exec(), runId: 'pooled', restartFrom: record(first, 'pooled') });
    expect(second.state).toBe('Success');
    // `double` keeps no checkpoint: it runs again; `stamp` is restored.
    expect(ran()).toEqual(['stamp ran', 'double ran', 'double ran']);
  });

  it.each(['', '../escape', 'a/b', '..', 'x y'])('rejects %j before any task runs (it is part of result paths)', async (bad) => {
    await expect(run(byRunId, { runId: bad })).rejects.toMatchObject({ name: 'FlowValidationError', message: expect.stringMatching(/runId/) });
    expect(ran()).toEqual([]);
  });
});

describe('RunOptions.runId on a cluster (the graph runs on the scheduler)', () => {
  // One worker process for the whole block; keepAlive so both runs use it. Closed (its
  // processes stopped) in afterAll.
  let cluster: ClusterExecutor | undefined;
  const exec = (): ClusterExecutor => (cluster ??= new ClusterExecutor({ workers: 1, threads: 1, keepAlive: true }));
  afterAll(async () => {
    await cluster?.close();
  });

  it('the scheduler runs under the given id, and a restart with it resumes from the {runId} checkpoint', async () => {
    const first = await run(byRunId, { executor: exec(), runId: 'on-cluster' });
    expect(first.state).toBe('Success');
    expect(first.runId).toBe('on-cluster');
    expect(JSON.parse(readFileSync(join(resultDir, 'by-run', 'on-cluster', 'stamp.json'), 'utf8'))).toBe(21);
    // A restart (refused by the scheduler's graph mode) runs as calls from here.
    const prev = record(first, 'on-cluster');
    const tasks = prev.tasks.map((t) => (t.key === 'double' ? { ...t, state: 'Failed' as const } : t));
    const second = await run(byRunId, { executor: exec(), runId: 'on-cluster', restartFrom: { ...prev, tasks } });
    expect(second.state).toBe('Success');
    expect(second.result<number>(byRunId.spec().nodes.findIndex((x) => x.key === 'double'))).toBe(42);
    expect(ran()).toEqual(['stamp ran', 'double ran', 'double ran']);
  });

  it('a malformed id is refused for that run only; the next run on the same cluster works', async () => {
    await expect(run(byRunId, { executor: exec(), runId: '../x' })).rejects.toMatchObject({ message: expect.stringMatching(/runId/) });
    expect((await run(byRunId, { executor: exec(), runId: 'fine' })).state).toBe('Success');
  });
});
