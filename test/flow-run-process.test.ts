/**
 * The flow-run process (src/deploy/flow-run.ts) in this process, against a Store on a
 * temp SQLite file: the claim's version check, task states and logs, parameters,
 * failures, load errors, cancel, a run taken away, restarts from checkpoints, and the
 * server's task tag limits. `weft execute flow-run` as a real process against a real
 * server is in agent-local.test.ts.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { executeFlowRun, type FlowRunProcessOptions } from '../src/deploy/flow-run.ts';
import { TaskStateWriter } from '../src/deploy/task-states.ts';
import type { Store } from '../src/server/store.ts';
import { registerFixture, tempStore, waitFor, type TempStore } from './fixtures/deploy/harness.ts';

/** Flows checkpointing under `{runId}` (registered here: the harness does not know them). */
const RUN_ID_FLOWS = fileURLToPath(new URL('./fixtures/runner-run-id-tasks.ts', import.meta.url));

let t: TempStore;
let store: Store;
let work: string;

beforeAll(async () => {
  t = await tempStore();
  store = t.store;
  work = mkdtempSync(join(tmpdir(), 'weft-frp-'));
});

afterAll(async () => {
  await t.close();
  rmSync(work, { recursive: true, force: true });
});

const lines: string[] = [];
afterEach(() => {
  lines.length = 0;
});

function opts(flowRunId: string, extra: Partial<FlowRunProcessOptions> = {}): FlowRunProcessOptions {
  return {
    backend: store,
    flowRunId,
    cwd: work,
    resultDir: join(work, 'results'),
    captureConsole: false,
    heartbeatMs: 100,
    stateIntervalMs: 50,
    print: (l) => lines.push(l),
    ...extra,
  };
}

/** A Scheduled run moved to Submitted, as an agent's claim does. */
async function submitted(flow: string, parameters: Record<string, unknown> = {}): Promise<string> {
  const run = await store.createFlowRun({ project: 'tests', flowName: flow, parameters });
  await store.setFlowRunState(run.id, 'Submitted', { expectVersion: run.stateVersion });
  return run.id;
}

describe('flow-run process', () => {
  beforeAll(async () => {
    await registerFixture(store, 'ok.ts', 'deploy-ok');
    await registerFixture(store, 'fail.ts', 'deploy-fail');
    await registerFixture(store, 'slow.ts', 'deploy-slow');
    await registerFixture(store, 'restart.ts', 'deploy-restart');
    // A pool, so that the tasks could overlap if nothing held them back.
    await registerFixture(store, 'tagged.ts', 'deploy-tagged', { executor: { kind: 'pool', threads: 4 } });
    await registerFixture(store, 'ok.ts', 'deploy-ok', { name: 'missing-file', path: join(work, 'nope', 'gone.ts') });
  });

  it('runs a Submitted run to Success with its parameters, task runs and logs', async () => {
    const id = await submitted('deploy-ok', { n: 5 });
    const r = await executeFlowRun(opts(id));
    expect(r).toMatchObject({ code: 0, ran: true, state: 'Success' });
    const run = await store.getFlowRun(id);
    expect(run.state).toBe('Success');
    const tasks = await store.getTaskRuns(id);
    const byKey = new Map(tasks.map((x) => [x.key, x]));
    expect(byKey.get('double')?.state).toBe('Success');
    expect(byKey.get('add')?.state).toBe('Success');
    expect(byKey.get('double')?.processId).toBe(r.processId);
    expect(byKey.get('add')?.endedAt).toBeGreaterThan(0);
    const history = (await store.getFlowRunHistory(id)).map((h) => h.state);
    expect(history.slice(-3)).toEqual(['Submitted', 'Running', 'Success']);
    const logs = await store.getLogs(id);
    expect(logs.some((l) => l.source === 'flow-run' && /running flow deploy-ok/.test(l.message))).toBe(true);
    expect(logs.some((l) => /ended Success/.test(l.message))).toBe(true);
  });

  it('leaves a run that is not Submitted or Scheduled alone (exit 0, nothing run)', async () => {
    const id = await submitted('deploy-ok');
    const running = await store.setFlowRunState(id, 'Running', { message: 'another process' });
    const r = await executeFlowRun(opts(id));
    expect(r).toMatchObject({ code: 0, ran: false, state: null });
    expect(lines.join('\n')).toMatch(/it is Running: nothing to run here/);
    expect(await store.getTaskRuns(id)).toEqual([]);
    expect((await store.getFlowRun(id)).stateVersion).toBe(running.stateVersion);
  });

  it('loses the race to Running without running anything', async () => {
    const id = await submitted('deploy-ok');
    // Another process moves it between our read and our write: simulated by a backend whose write conflicts.
    const racing = Object.create(store) as Store;
    racing.setFlowRunState = async (runId, state, o) => {
      await store.setFlowRunState(runId, 'Running', { message: 'the other process' });
      return store.setFlowRunState(runId, state, o);
    };
    const r = await executeFlowRun(opts(id, { backend: racing }));
    expect(r).toMatchObject({ code: 0, ran: false });
    expect(r.message).toMatch(/another process started it first/);
    expect(await store.getTaskRuns(id)).toEqual([]);
  });

  it('fails the run with the task error in its logs', async () => {
    const id = await submitted('deploy-fail');
    const r = await executeFlowRun(opts(id));
    expect(r).toMatchObject({ code: 1, state: 'Failed' });
    const tasks = await store.getTaskRuns(id);
    const explode = tasks.find((x) => x.key === 'explode');
    expect(explode?.state).toBe('Failed');
    expect(explode?.message).toMatch(/boom: deliberate failure after 1/);
    const logs = await store.getLogs(id);
    const entry = logs.find((l) => l.source === 'task' && l.taskKey === 'explode');
    expect(entry?.level).toBe('error');
    expect(entry?.message).toMatch(/boom: deliberate failure/);
  });

  it('fails a run whose flow cannot be loaded, naming the cause', async () => {
    const id = await submitted('missing-file');
    const r = await executeFlowRun(opts(id));
    expect(r).toMatchObject({ code: 1, state: 'Failed' });
    const run = await store.getFlowRun(id);
    expect(run.message).toMatch(/cannot load the flow: .*gone\.ts/);
    const logs = await store.getLogs(id);
    expect(logs.some((l) => l.level === 'error' && /gone\.ts/.test(l.message))).toBe(true);
  });

  it('stops on cancel within the grace and ends Cancelled', async () => {
    const marker = join(work, 'cancel.marker');
    const id = await submitted('deploy-slow', { marker });
    const p = executeFlowRun(opts(id));
    await waitFor('the task to start', () => existsSync(marker));
    const t0 = Date.now();
    await store.cancelFlowRun(id);
    const r = await p;
    expect(Date.now() - t0).toBeLessThan(2_000);
    expect(r).toMatchObject({ code: 1, state: 'Cancelled' });
    expect((await store.getFlowRun(id)).state).toBe('Cancelled');
    const wait = (await store.getTaskRuns(id)).find((x) => x.key === 'wait');
    expect(wait?.state).toBe('Cancelled');
  });

  it('stops without writing anything more when the run is taken away (fail-safe)', async () => {
    const marker = join(work, 'lost.marker');
    const id = await submitted('deploy-slow', { marker });
    const p = executeFlowRun(opts(id));
    await waitFor('the task to start', () => existsSync(marker));
    await waitFor('the Running task state', async () => (await store.getTaskRuns(id)).some((x) => x.state === 'Running'));
    // Lazarus's move: the run goes back to Scheduled for another process.
    const rescheduled = await store.setFlowRunState(id, 'Scheduled', { message: 'rescheduled by a test' });
    const before = await store.getTaskRuns(id);
    const r = await p;
    expect(r).toMatchObject({ code: 0, ran: true, state: null });
    expect(r.message).toMatch(/no longer this process's/);
    const after = await store.getFlowRun(id);
    expect(after.state).toBe('Scheduled');
    expect(after.stateVersion).toBe(rescheduled.stateVersion);
    expect(await store.getTaskRuns(id)).toEqual(before);
  });

  it('restarts from the task runs already Success: checkpointed results are not recomputed', async () => {
    const counter = join(work, 'restart.counter');
    const marker = join(work, 'restart.marker');
    const id = await submitted('deploy-restart', { counter, marker });
    // First attempt: a runs and checkpoints, b waits; then the run is taken away (as the zombie killer does).
    const first = executeFlowRun(opts(id));
    await waitFor('b to start', () => existsSync(marker));
    await waitFor('a Success on the server', async () => (await store.getTaskRuns(id)).some((x) => x.key === 'a' && x.state === 'Success'));
    const back = await store.setFlowRunState(id, 'Scheduled', { message: 'zombie' });
    expect((await first).state).toBeNull();
    await store.setFlowRunState(id, 'Submitted', { expectVersion: back.stateVersion });
    const second = await executeFlowRun(opts(id));
    expect(second).toMatchObject({ code: 0, state: 'Success' });
    expect(readFileSync(counter, 'utf8')).toBe('a ran\n');
    const tasks = new Map((await store.getTaskRuns(id)).map((x) => [x.key, x]));
    expect(tasks.get('a')?.state).toBe('Cached');
    expect(tasks.get('b')?.state).toBe('Success');
    expect(tasks.get('b')?.processId).toBe(second.processId);
  });

  it('a {runId} checkpoint survives a rerun of the same server run (every attempt runs as the flow-run id)', async () => {
    await store.registerFlow({
      project: 'tests',
      name: 'deploy-run-id',
      graph: { fixture: 'runner-run-id-tasks.ts' },
      storage: { kind: 'local', path: RUN_ID_FLOWS, host: hostname(), flow: 'deploy-run-id' },
      runConfig: { kind: 'local' },
      executor: { kind: 'local' },
      parameters: [
        { name: 'counter', required: true },
        { name: 'marker', required: true },
      ],
      labels: [],
    });
    const counter = join(work, 'run-id.counter');
    const marker = join(work, 'run-id.marker');
    const id = await submitted('deploy-run-id', { counter, marker });
    const first = executeFlowRun(opts(id));
    await waitFor('hold to start', () => existsSync(marker));
    await waitFor('stamp Success on the server', async () => (await store.getTaskRuns(id)).some((x) => x.key === 'stamp' && x.state === 'Success'));
    // The checkpoint's path names the server's run, not an attempt.
    expect(existsSync(join(work, 'results', 'by-run', id, 'stamp.json'))).toBe(true);
    const back = await store.setFlowRunState(id, 'Scheduled', { message: 'lazarus' });
    expect((await first).state).toBeNull();
    await store.setFlowRunState(id, 'Submitted', { expectVersion: back.stateVersion });
    const second = await executeFlowRun(opts(id));
    expect(second).toMatchObject({ code: 0, state: 'Success' });
    expect(readFileSync(counter, 'utf8')).toBe('stamp ran\nhold ran\nhold ran\n');
    const tasks = new Map((await store.getTaskRuns(id)).map((x) => [x.key, x]));
    expect(tasks.get('stamp')?.state).toBe('Cached');
    expect(tasks.get('hold')?.state).toBe('Success');
  });

  /** The most `db` tasks that ran at once, from the fixture's start/end lines. */
  function maxOverlap(log: string): number {
    const events = readFileSync(log, 'utf8').trim().split('\n').map((l) => l.split(' '));
    expect(events).toHaveLength(8);
    let open = 0;
    let max = 0;
    for (const [what] of events) {
      open += what === 'start' ? 1 : -1;
      max = Math.max(max, open);
    }
    return max;
  }

  it("applies the server's task tag limits across the run (SlotGate)", async () => {
    // Without a limit the pool runs them side by side.
    const free = join(work, 'tagged-free.log');
    const r0 = await executeFlowRun(opts(await submitted('deploy-tagged', { log: free })));
    expect(r0).toMatchObject({ code: 0, state: 'Success' });
    expect(maxOverlap(free)).toBeGreaterThan(1);

    const log = join(work, 'tagged.log');
    await store.setConcurrencyLimit('tag', 'db', 1);
    try {
      const id = await submitted('deploy-tagged', { log });
      const r = await executeFlowRun(opts(id));
      expect(r).toMatchObject({ code: 0, state: 'Success' });
      expect(maxOverlap(log)).toBe(1);
      const limits = await store.listConcurrencyLimits();
      expect(limits.find((l) => l.name === 'db')?.used).toBe(0);
    } finally {
      await store.setConcurrencyLimit('tag', 'db', null);
    }
  });
});

describe('TaskStateWriter', () => {
  it('coalesces transitions per task run and stops on a refused write', async () => {
    await registerFixture(store, 'ok.ts', 'deploy-ok');
    const run = await store.createFlowRun({ project: 'tests', flowName: 'deploy-ok' });
    let lost: string | null = null;
    const w = new TaskStateWriter(store, run.id, 'p1', [], { intervalMs: 10_000, onLost: (r) => (lost = r) });
    const at = Date.now();
    w.record({ key: 'double', mapIndex: -1, from: 'Pending', to: 'Running', at, attempt: 1 });
    w.record({ key: 'double', mapIndex: -1, from: 'Running', to: 'Success', at: at + 5, attempt: 1 });
    await w.flush();
    const [t1] = await store.getTaskRuns(run.id);
    expect(t1).toMatchObject({ key: 'double', state: 'Success', version: 1, attempts: 1, processId: 'p1' });
    expect(t1?.startedAt).toBe(Math.round(at));
    // Another process writes the same task run: this writer's next write is refused.
    await store.setTaskRunStates(run.id, 'p2', [{ key: 'double', mapIndex: -1, state: 'Running', expectVersion: 1 }]);
    w.record({ key: 'double', mapIndex: -1, from: 'Success', to: 'Failed', at: at + 10 });
    await w.close();
    expect(lost).toMatch(/written by another process/);
    expect(w.lostReason).not.toBeNull();
    const [t2] = await store.getTaskRuns(run.id);
    expect(t2).toMatchObject({ state: 'Running', processId: 'p2', version: 2 });
  });
});
