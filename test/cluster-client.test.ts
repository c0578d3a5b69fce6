/**
 * The client side of a weft cluster: RunRecords → FlowRunResult (no I/O), then
 * ClusterClient / ClusterExecutor against a real scheduler (in this process, port 0)
 * and real `weft worker` child processes, a temporary LocalCluster, adapt, and
 * `weft run --executor cluster` as a child process. Every process is stopped by PID.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ClusterConnectionError, ClusterExecutor, flow, parameter, type TaskStateEvent } from '../src/index.ts';
import { runResultFrom, progressFromCounts, countsOf } from '../src/cluster/run-result.ts';
import { ClusterClient } from '../src/cluster/client.ts';
import { STATE_ORDER, ProtocolError, type RunRecords } from '../src/cluster/protocol.ts';
import { startScheduler, type SchedulerServer } from '../src/cluster/scheduler.ts';
import type { TaskStateName } from '../src/flow/spec.ts';
import { nap, square, total } from './fixtures/cluster-client-tasks.ts';

const S = (name: TaskStateName): number => STATE_ORDER.indexOf(name);

// ---- RunRecords → FlowRunResult -------------------------------------------------------

describe('runResultFrom (RunRecords → FlowRunResult)', () => {
  const f = flow('records', () => {
    const n = parameter('n', 3);
    const sq = square.map([1, 2, 3]);
    const t = total(sq);
    const none = square.map([]);
    return { n, sq, t, none };
  });
  const spec = f.spec();
  // Task ids: 0 n, 1 square (mapped), 2 total, 3 square-2 (mapped, width 0); 4..6 the
  // children of square, listed out of index order on purpose.
  const records: RunRecords = {
    runId: 'run-1',
    state: 'Failed',
    message: 'some reference tasks failed',
    startMs: 1000,
    endMs: 1500,
    parameters: { n: 3 },
    node: [0, 1, 2, 3, 1, 1, 1],
    mapIndex: [-1, -1, -1, -1, 2, 0, 1],
    state_: [S('Success'), S('Mapped'), S('Failed'), S('Mapped'), S('Success'), S('Success'), S('Cancelled')],
    attempts: [1, 1, 3, 1, 1, 1, 1],
    start: [1001, 1002, 1400, 1003, 1010, 1011, 1012],
    end: [1001, 1300, 1450, 1003, 1020, 1021, 1300],
    worker: [-1, -1, 1, -1, 0, 1, 0],
    workerNames: ['w-a', 'w-b'],
    errors: [[2, { name: 'RangeError', message: 'bad total', stack: 'RangeError: bad total\n    at total' }]],
    stories: [
      [2, ['pending -> ready', 'ready -> running', 'running -> failed']],
      [6, ['ready -> running', 'running -> cancelled']],
    ],
  };
  const values = [3, undefined, undefined, undefined, 9, 1, undefined];

  it('gives states, records, mapped results (children by map index) and stories like the runner', () => {
    const r = runResultFrom(spec, records, values);
    expect(r).toMatchObject({ flowName: 'records', runId: 'run-1', state: 'Failed', message: 'some reference tasks failed', startMs: 1000, endMs: 1500, durationMs: 500 });
    expect(r.parameters).toEqual({ n: 3 });
    expect(r.tasks).toHaveLength(7);
    expect(r.result(f.outputs.n)).toBe(3);
    expect(r.result(f.outputs.sq)).toEqual([1, undefined, 9]);
    expect(r.result(f.outputs.none)).toEqual([]);
    expect(r.stateOf(f.outputs.sq)).toBe('Mapped');
    expect(r.stateOf(f.outputs.t)).toBe('Failed');
    const runs = r.runsOf(f.outputs.sq);
    expect(runs.map((t) => [t.key, t.mapIndex, t.state, t.worker])).toEqual([
      ['square', -1, 'Mapped', undefined],
      ['square', 0, 'Success', 'w-b'],
      ['square', 1, 'Cancelled', 'w-a'],
      ['square', 2, 'Success', 'w-a'],
    ]);
    // A cancelled run without an error record gets the runner's CancelledError.
    expect(runs[2]!.error).toEqual({ name: 'CancelledError', message: 'cancelled: the run was cancelled' });
    expect(r.runsOf(f.outputs.none)).toHaveLength(1);
    const t = r.runsOf(f.outputs.t)[0]!;
    expect(t).toMatchObject({ key: 'total', node: 2, mapIndex: -1, state: 'Failed', attempts: 3, startMs: 1400, endMs: 1450, worker: 'w-b' });
    expect(t.error).toMatchObject({ name: 'RangeError', message: 'bad total' });
    expect(r.story(f.outputs.t)).toEqual(['pending -> ready', 'ready -> running', 'running -> failed']);
    expect(r.story(f.outputs.sq, 1)).toEqual(['ready -> running', 'running -> cancelled']);
    expect(r.story(f.outputs.sq, 0)).toEqual([]);
    expect(r.story(f.outputs.sq, 7)).toEqual([]);
    expect(r.story(f.outputs.n)).toEqual([]);
    expect(() => r.result(4)).toThrow(RangeError);
    expect(() => r.stateOf(-1)).toThrow(/no node -1 in flow "records"/);
  });

  it('without kept results: undefined, and [] for a mapped node (as the runner)', () => {
    const r = runResultFrom(spec, records, null);
    expect(r.result(f.outputs.n)).toBeUndefined();
    expect(r.result(f.outputs.sq)).toEqual([]);
    expect(r.result(f.outputs.none)).toEqual([]);
  });

  it('refuses records whose columns do not line up', () => {
    expect(() => runResultFrom(spec, { ...records, attempts: [1, 1] }, null)).toThrow(ProtocolError);
    expect(() => runResultFrom(spec, { ...records, attempts: [1, 1] }, null)).toThrow(/column "attempts" has 2 entries for 7 task runs/);
  });

  it('progress from counts by state; the final counts from the records', () => {
    expect(progressFromCounts({ Pending: 2, Running: 1, Success: 3, Failed: 1, Skipped: 1 }, 2000)).toEqual({
      total: 8,
      done: 5,
      running: 1,
      failed: 1,
      skipped: 1,
      rate: 2.5,
      elapsedMs: 2000,
    });
    expect(countsOf(records)).toEqual({ Success: 3, Mapped: 2, Failed: 1, Cancelled: 1 });
    expect(progressFromCounts(countsOf(records), 0)).toMatchObject({ total: 7, done: 7, failed: 1, rate: 0 });
  });
});

// ---- against a scheduler with no workers -------------------------------------------------

describe('ClusterExecutor against a scheduler (no workers)', () => {
  let scheduler: SchedulerServer;
  beforeAll(async () => {
    scheduler = await startScheduler({ port: 0, log: () => undefined });
  });
  afterAll(async () => {
    await scheduler?.close();
  });

  it('rejects before sending anything what cannot travel (a custom trigger)', async () => {
    const sometimes = (): boolean => true;
    const f = flow('custom-trigger', () => ({ t: total.with({ trigger: sometimes })([1, 2]) }));
    await expect(f.run({ executor: new ClusterExecutor({ address: scheduler.address }) })).rejects.toThrow(
      /custom trigger "sometimes" is a function and cannot be sent to a cluster scheduler/,
    );
  });

  it('an unreachable scheduler is a ClusterConnectionError naming the address', async () => {
    const dead = await startScheduler({ port: 0, log: () => undefined });
    const address = dead.address;
    await dead.close();
    const f = flow('unreachable', () => ({ a: parameter('a', 1) }));
    const err = await f.run({ executor: new ClusterExecutor({ address, connectTimeoutMs: 2_000 }) }).catch((e: unknown) => e as Error);
    expect(err).toBeInstanceOf(ClusterConnectionError);
    expect((err as Error).message).toContain(`cannot connect to the weft scheduler at ${address}`);
  });

  // With no worker nothing leaves Scheduled (the scheduler's runner dispatches, parameters
  // included, only into free slots): what is tested here needs no task to run.
  it('a run cancelled through its signal finishes Cancelled (its task never got a worker)', async () => {
    const f = flow('cancel-queued', () => ({ n: nap(10_000) }));
    const ac = new AbortController();
    const seen: TaskStateEvent[] = [];
    const p = f.run({
      executor: new ClusterExecutor({ address: scheduler.address }),
      signal: ac.signal,
      onTaskState: (e) => {
        seen.push(e);
        if (e.key === 'nap' && e.to === 'Scheduled') ac.abort();
      },
    });
    const r = await p;
    expect(r.state).toBe('Cancelled');
    expect(r.stateOf(f.outputs.n)).toBe('Cancelled');
    expect(seen.some((e) => e.key === 'nap' && e.to === 'Cancelled')).toBe(true);
  });

  it('a scheduler lost during a run rejects it with an error naming its address', async () => {
    const s2 = await startScheduler({ port: 0, log: () => undefined });
    const f = flow('lost', () => ({ n: nap(10_000) }));
    const p = f.run({
      executor: new ClusterExecutor({ address: s2.address }),
      onTaskState: (e) => {
        if (e.to === 'Scheduled') void s2.close();
      },
    });
    const err = await p.catch((e: unknown) => e as Error);
    expect(err).toBeInstanceOf(ClusterConnectionError);
    expect((err as Error).message).toMatch(new RegExp(`^flow "lost": lost the connection to the weft scheduler at ${s2.address.replace(/\./g, '\\.')}`));
  });

  it('a client connects, reports its id, and closes cleanly (idempotent)', async () => {
    const c = await ClusterClient.connect({ address: scheduler.address });
    expect(c.id).not.toBe('');
    expect(c.closed).toBe(false);
    await c.close();
    await c.close();
    expect(c.closed).toBe(true);
    await expect(c.runGraph(flow('after-close', () => ({ a: parameter('a', 1) })).spec(), { a: 1 })).rejects.toThrow(ClusterConnectionError);
  });
});
