/**
 * The client side of a weft cluster: RunRecords → FlowRunResult (no I/O), then
 * ClusterClient / ClusterExecutor against a real scheduler (in this process, port 0)
 * and real `weft worker` child processes, a temporary LocalCluster, adapt, and
 * `weft run --executor cluster` as a child process. Every process is stopped by PID.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { ClusterConnectionError, ClusterExecutor, LocalCluster, flow, parameter, type RunProgress, type TaskStateEvent } from '../src/index.ts';
import type { LogRecord } from '../src/cluster/protocol.ts';
import { fetchStatus } from '../src/cluster/local-cluster.ts';
import { killAll, runWeft } from './fixtures/cli-spawn.ts';
import { makePki, type TestPki } from './helpers/tls.ts';
import { alive, sleep, spawnWorker, stopProcess, waitFor, type Spawned } from './helpers/cluster-procs.ts';
import { runResultFrom, progressFromCounts, countsOf } from '../src/cluster/run-result.ts';
import { ClusterClient, unsendable } from '../src/cluster/client.ts';
import { FlowValidationError, TaskSerializationError } from '../src/errors.ts';
import { STATE_ORDER, ProtocolError, type RunRecords } from '../src/cluster/protocol.ts';
import { startScheduler, type SchedulerServer } from '../src/cluster/scheduler.ts';
import type { TaskStateName } from '../src/flow/spec.ts';
import { handlerCalls, nap, shout, square, total, watched } from './fixtures/cluster-client-tasks.ts';
import { MODULE, key } from './fixtures/exec-tasks.ts';
import { tree } from '../bench/shapes.ts';
import { runFlow } from '../src/runner/run.ts';

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
    expect(() => runResultFrom(spec, { ...records, end: new Float64Array(3) }, null)).toThrow(/column "end" has 3 entries for 7 task runs/);
    expect(() => runResultFrom(spec, { ...records, worker: 'x' as never }, null)).toThrow(/column "worker" has no entries/);
  });

  it('reads the columns the scheduler sends as typed arrays', () => {
    const typed: RunRecords = {
      ...records,
      node: Int32Array.from(records.node),
      mapIndex: Int32Array.from(records.mapIndex),
      state_: Uint8Array.from(records.state_),
      attempts: Int32Array.from(records.attempts),
      start: Float64Array.from(records.start),
      end: Float64Array.from(records.end),
      worker: Int32Array.from(records.worker),
    };
    const a = runResultFrom(spec, typed, values);
    const b = runResultFrom(spec, records, values);
    expect(a.tasks).toEqual(b.tasks);
    expect(a.result(f.outputs.sq)).toEqual([1, undefined, 9]);
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

describe('unsendable (what msgpack cannot carry)', () => {
  it('names functions, symbols, wide bigints and cycles with their path; passes what travels', () => {
    const cyclic: Record<string, unknown> = { a: 1 };
    cyclic.self = cyclic;
    expect(unsendable([1, { f: () => 2 }], 'args')).toBe('a function (f) at args[1].f');
    expect(unsendable({ s: Symbol('x') })).toBe('a symbol at value.s');
    expect(unsendable([2n ** 70n])).toBe('a bigint wider than 64 bits at value[0]');
    expect(unsendable(cyclic)).toBe('a cycle at value.self');
    expect(unsendable(new Map([[1, () => 0]]))).toBe('a function (anonymous) at value.get(1)');
    expect(unsendable([1, 'two', null, undefined, 2n ** 62n, new Date(0), /x/g, new Uint8Array(4), new ArrayBuffer(2), new Set([1]), { a: [{}] }])).toBeNull();
    const shared = { x: 1 };
    expect(unsendable([shared, shared])).toBeNull(); // the same object twice is not a cycle
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

  it('rejects before sending anything what cannot travel (a custom trigger, graph mode)', async () => {
    const sometimes = (): boolean => true;
    const f = flow('custom-trigger', () => ({ t: total.with({ trigger: sometimes })([1, 2]) }));
    await expect(f.run({ executor: new ClusterExecutor({ address: scheduler.address, callModeMaxTasks: 0 }) })).rejects.toThrow(
      /custom trigger "sometimes" is a function and cannot be sent to a cluster scheduler/,
    );
  });

  it('rejects before sending anything a constant argument or parameter that cannot travel', async () => {
    const f = flow('fn-arg', () => ({ t: total([1, 2]), u: square.with({ name: 'sq' })(3), p: parameter('p', 0) }));
    const spec = f.spec();
    const bad = { ...spec, nodes: spec.nodes.map((n) => (n.key === 'sq' ? { ...n, args: [{ kind: 'const' as const, value: { f: Math.max }, mode: 'plain' as const }] } : n)) };
    const c = await ClusterClient.connect({ address: scheduler.address });
    try {
      await expect(c.runGraph(bad, { p: 0 })).rejects.toThrow(TaskSerializationError);
      await expect(c.runGraph(bad, { p: 0 })).rejects.toThrow('task "sq": its arguments cannot be sent to a cluster scheduler: a function (max) at argument 0.f');
      await expect(c.runGraph(spec, { p: Symbol('s') })).rejects.toThrow('flow "fn-arg": parameter "p" cannot be sent to a cluster scheduler: it holds a symbol at p');
    } finally {
      await c.close();
    }
  });

  it("a graph the scheduler rejects rejects the run with the scheduler's error, rebuilt into its class", async () => {
    const f = flow('needs-n', () => ({ n: parameter<number>('n') }));
    const c = await ClusterClient.connect({ address: scheduler.address });
    try {
      // runFlow checks parameters before handing the graph over; a client that does not is refused by the scheduler.
      const err = await c.runGraph(f.spec(), {}).catch((e: unknown) => e as Error);
      expect(err).toBeInstanceOf(FlowValidationError);
      expect(err!.message).toBe('flow "needs-n": required parameter "n" was not given');
    } finally {
      await c.close();
    }
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

  it.each([
    ['as calls', 16],
    ['graph mode', 0],
  ])('a scheduler lost during a run rejects it with an error naming its address (%s)', async (_mode, callModeMaxTasks) => {
    const s2 = await startScheduler({ port: 0, log: () => undefined });
    const f = flow('lost', () => ({ n: nap(10_000) }));
    const p = f.run({
      executor: new ClusterExecutor({ address: s2.address, callModeMaxTasks }),
      onTaskState: (e) => {
        if (e.to === 'Scheduled') void s2.close();
      },
    });
    const err = await p.catch((e: unknown) => e as Error);
    expect(err).toBeInstanceOf(ClusterConnectionError);
    expect((err as Error).message).toMatch(new RegExp(`^flow "lost": lost the connection to the weft scheduler at ${s2.address.replace(/\./g, '\\.')}`));
  });

  it('wss with a token: the client verifies the scheduler by its CA and proves the token; a wrong token is refused', async () => {
    let pki: TestPki | null = null;
    let secure: SchedulerServer | null = null;
    try {
      pki = makePki();
      secure = await startScheduler({ port: 0, token: 'sesame', tls: { cert: pki.serverCert, key: pki.serverKey }, log: () => undefined });
      expect(secure.address).toMatch(/^wss:\/\//);
      const c = await ClusterClient.connect({ address: secure.address, token: 'sesame', tls: { ca: pki.caCert } });
      await c.close();
      const wrong = await ClusterClient.connect({ address: secure.address, token: 'nope', tls: { ca: pki.caCert } }).catch((e: unknown) => e as Error);
      expect(wrong).toBeInstanceOf(ClusterConnectionError);
      expect((wrong as Error).message).toContain(`cannot connect to the weft scheduler at ${secure.address}`);
      const none = await ClusterClient.connect({ address: secure.address, tls: { ca: pki.caCert } }).catch((e: unknown) => e as Error);
      expect((none as Error).message).toMatch(/asks for a token and none is configured/);
      const untrusted = await ClusterClient.connect({ address: secure.address, token: 'sesame' }).catch((e: unknown) => e as Error);
      expect(untrusted).toBeInstanceOf(ClusterConnectionError);
    } finally {
      await secure?.close();
      pki?.remove();
    }
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

// ---- against a scheduler with worker processes -----------------------------------------

describe('ClusterExecutor against a scheduler with two worker processes', () => {
  let scheduler: SchedulerServer;
  const workers: Spawned[] = [];
  beforeAll(async () => {
    scheduler = await startScheduler({ port: 0, log: () => undefined });
    // One thread each: a worker captures task console output only when tasks run in its own thread.
    workers.push(spawnWorker(scheduler.address, 'cc-a', ['--threads', '1']), spawnWorker(scheduler.address, 'cc-b', ['--threads', '1']));
    await waitFor('two workers', async () => (await fetchStatus(scheduler.httpUrl)).workers.length === 2, 30_000).catch((err: Error) => {
      throw new Error(`${err.message}; worker output: ${workers.map((w) => w.output).join(' | ')}`);
    });
  });
  afterAll(async () => {
    await Promise.all(workers.map(stopProcess));
    await scheduler?.close();
  });
  const executor = (o: { onLog?: (r: LogRecord) => void; callModeMaxTasks?: number } = {}): ClusterExecutor => new ClusterExecutor({ address: scheduler.address, ...o });

  it('runs a flow of parameters only: records, results, events and progress', async () => {
    const f = flow('params-only', () => ({ a: parameter('a', 1), b: parameter('b', 'x') }));
    const events: TaskStateEvent[] = [];
    const progress: number[] = [];
    const r = await f.run({
      executor: executor(),
      parameters: { a: 5 },
      onTaskState: (e) => events.push(e),
      onProgress: (p) => progress.push(p.done),
    });
    expect(r.state).toBe('Success');
    expect(r.parameters).toEqual({ a: 5, b: 'x' });
    expect(r.result(f.outputs.a)).toBe(5);
    expect(r.result(f.outputs.b)).toBe('x');
    expect(r.tasks.map((t) => t.state)).toEqual(['Success', 'Success']);
    expect(typeof r.runId).toBe('string');
    const a = events.filter((e) => e.key === 'a');
    expect(a.at(-1)).toMatchObject({ id: 0, key: 'a', mapIndex: -1, to: 'Success' });
    expect(a[0]!.from).toBe('Pending');
    for (let i = 1; i < a.length; i++) expect(a[i]!.from).toBe(a[i - 1]!.to);
    expect(progress.at(-1)).toBe(2);
  });


  it('maps, reduces and reports: results, records with worker names, ordered events, final progress', async () => {
    const f = flow('cc-map', () => {
      const n = parameter('n', 4);
      const sq = square.map([1, 2, 3, 4]);
      const t = total(sq);
      const none = square.map([]);
      return { n, sq, t, none };
    });
    const events: TaskStateEvent[] = [];
    const progress: RunProgress[] = [];
    const r = await f.run({ executor: executor(), validate: true, onTaskState: (e) => events.push(e), onProgress: (p) => progress.push(p) });
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs.sq)).toEqual([1, 4, 9, 16]);
    expect(r.result(f.outputs.t)).toBe(30);
    expect(r.result(f.outputs.none)).toEqual([]);
    expect(r.result(f.outputs.n)).toBe(4);
    expect(r.runsOf(f.outputs.sq).map((t) => t.mapIndex)).toEqual([-1, 0, 1, 2, 3]);
    const t = r.runsOf(f.outputs.t)[0]!;
    expect(['cc-a', 'cc-b']).toContain(t.worker);
    expect(t.endMs).toBeGreaterThanOrEqual(t.startMs);
    expect(t.startMs).toBeGreaterThan(0);
    // Per task run: from Pending, each event's `from` is the previous event's `to`.
    const byId = new Map<number, TaskStateEvent[]>();
    for (const e of events) byId.set(e.id!, [...(byId.get(e.id!) ?? []), e]);
    expect(byId.size).toBe(r.tasks.length);
    for (const list of byId.values()) {
      expect(list[0]!.from).toBe('Pending');
      for (let i = 1; i < list.length; i++) expect(list[i]!.from).toBe(list[i - 1]!.to);
    }
    expect(progress.at(-1)).toMatchObject({ total: r.tasks.length, done: r.tasks.length, running: 0, failed: 0 });
  });

  it('graph mode: runs state handlers on the client (without info.result) and onFailure on failures', async () => {
    handlerCalls.length = 0;
    const f = flow('cc-handlers', () => ({ ok: watched(1), bad: watched.with({ name: 'watched-bad' })(-1) }));
    const r = await f.run({ executor: executor({ callModeMaxTasks: 0 }) });
    expect(r.state).toBe('Failed');
    expect(r.result(f.outputs.ok)).toBe(2);
    await sleep(10); // handlers run in a microtask after their event
    const ok = handlerCalls.filter((c) => c.key === 'watched');
    expect(ok.at(-1)).toMatchObject({ kind: 'state', to: 'Success', hasResult: false });
    const bad = handlerCalls.filter((c) => c.key === 'watched-bad');
    expect(bad.filter((c) => c.kind === 'state').at(-1)).toMatchObject({ to: 'Failed' });
    expect(bad.filter((c) => c.kind === 'failure')).toEqual([expect.objectContaining({ to: 'Failed', hasResult: false })]);
  });

  it('a small flat graph runs as calls: state handlers see info.result, a custom trigger works, the scheduler runs no graph', async () => {
    handlerCalls.length = 0;
    const before = scheduler.status().started;
    const sometimes = (): boolean => true;
    const f = flow('cc-calls', () => ({ ok: watched(1), bad: watched.with({ name: 'watched-bad' })(-1), t: total.with({ trigger: sometimes })([1, 2]) }));
    const r = await f.run({ executor: executor() });
    expect(r.state).toBe('Failed');
    expect(r.result(f.outputs.ok)).toBe(2);
    expect(r.result(f.outputs.t)).toBe(3);
    await sleep(10);
    expect(handlerCalls.filter((c) => c.key === 'watched').at(-1)).toMatchObject({ kind: 'state', to: 'Success', hasResult: true });
    expect(handlerCalls.filter((c) => c.key === 'watched-bad' && c.kind === 'failure')).toEqual([expect.objectContaining({ to: 'Failed' })]);
    expect(scheduler.status().started).toEqual({ graphRuns: before.graphRuns, callSessions: before.callSessions + 1 });
  });

  it('a big reduction over results held on the workers keeps each pair of leaves and their sum on one worker', async () => {
    // 16,384 leaves of 1 KiB: the leaves' placement in blocks and the sums' pull to the
    // worker that holds their inputs (a little past its credits) keep most inputs in place.
    const built = tree(16_384, { payload: 'kib' });
    const leaves = 16_384;
    let best = 0;
    for (let k = 0; k < 2; k++) {
      const r = await runFlow(built.spec, { executor: executor(), keepResults: false });
      expect(r.state).toBe('Success');
      const w = r.tasks.map((t) => t.worker);
      expect(new Set(w).size).toBe(2);
      let local = 0;
      // The first level of sums: ids leaves..leaves + leaves/2 - 1, sum i over leaves 2i and 2i+1.
      for (let i = 0; i < leaves / 2; i++) if (w[2 * i] === w[leaves + i] && w[2 * i + 1] === w[leaves + i]) local++;
      best = Math.max(best, local / (leaves / 2));
    }
    expect(best).toBeGreaterThanOrEqual(0.75);
  });

  it('back-to-back one-task runs on an idle cluster go to the same (warm) worker; parallel tasks still spread', async () => {
    const one = flow('cc-sticky', () => ({ s: square(3) }));
    const seen: string[] = [];
    for (let i = 0; i < 6; i++) {
      const r = await one.run({ executor: executor() });
      expect(r.result(one.outputs.s)).toBe(9);
      seen.push(r.tasks.find((t) => t.key === 'square')!.worker!);
    }
    expect(new Set(seen).size).toBe(1);
    const wide = flow('cc-spread', () => ({ a: nap(200), b: nap(200), c: nap(200), d: nap(200) }));
    const r = await wide.run({ executor: executor() });
    expect(r.state).toBe('Success');
    expect(new Set(r.tasks.map((t) => t.worker)).size).toBe(2);
  });

  it('keepResults: false fetches no result', async () => {
    const f = flow('cc-no-results', () => ({ t: total([1, 2, 3]) }));
    const r = await f.run({ executor: executor(), keepResults: false });
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs.t)).toBeUndefined();
  });

  it('an AbortSignal cancels a running task: the run finishes Cancelled long before the task would', async () => {
    const f = flow('cc-cancel', () => {
      const n = nap(10_000);
      return { n, after: square(n) };
    });
    const ac = new AbortController();
    const t0 = Date.now();
    const r = await f.run({
      executor: executor(),
      signal: ac.signal,
      onTaskState: (e) => {
        if (e.key === 'nap' && e.to === 'Running') setTimeout(() => ac.abort(), 100);
      },
    });
    expect(Date.now() - t0).toBeLessThan(5_000);
    expect(r.state).toBe('Cancelled');
    expect(r.stateOf(f.outputs.n)).toBe('Cancelled');
    expect(r.stateOf(f.outputs.after)).toBe('Cancelled');
  });

  it("forwards a task's console output to onLog", async () => {
    const logs: LogRecord[] = [];
    const f = flow('cc-logs', () => ({ s: shout('hello from a worker') }));
    const r = await f.run({ executor: executor({ onLog: (rec) => logs.push(rec) }) });
    expect(r.state).toBe('Success');
    await waitFor('the log record', () => logs.some((l) => l.msg.includes('hello from a worker')), 5_000);
    expect(logs.find((l) => l.msg.includes('hello from a worker'))).toMatchObject({ key: 'shout' });
  });

  it('a warm executor (keepAlive) runs graphs and a call session on one connection, then close() ends it', async () => {
    const warm = new ClusterExecutor({ address: scheduler.address, keepAlive: true });
    const f = flow('cc-warm', () => ({ t: total(square.map([1, 2, 3])) }));
    const a = await f.run({ executor: warm });
    const b = await f.run({ executor: warm });
    expect([a.result(f.outputs.t), b.result(f.outputs.t)]).toEqual([14, 14]);
    expect(a.runId).not.toBe(b.runId);
    expect(warm.workers).toBe(2); // 2 workers × 1 thread, from /status
    // A call session on the same executor.
    const got: unknown[] = [];
    let done!: () => void;
    const all = new Promise<void>((r) => (done = r));
    await warm.start({
      flowName: 'calls',
      modules: [MODULE],
      taskKeys: [key('add')],
      parameters: {},
      onOutcomes: (outs) => {
        for (const o of outs) got[o.id] = o.value;
        if (got.filter((v) => v !== undefined).length === 10) done();
      },
    });
    expect(warm.freeSlots()).toBe(64);
    warm.submit(Array.from({ length: 10 }, (_, i) => ({ id: i, runId: 1, taskKey: key('add'), key: 'add', args: [i, 1], timeoutMs: 0, mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined })));
    await all;
    expect(got).toEqual(Array.from({ length: 10 }, (_, i) => i + 1));
    await warm.shutdown();
    expect(warm.freeSlots()).toBe(0);
    await warm.close();
    await warm.close();
    await expect(f.run({ executor: warm })).rejects.toThrow(/closed/);
  });
});

// ---- temporary clusters ---------------------------------------------------------------

describe('temporary local clusters', () => {
  afterEach(() => killAll());

  it('ClusterExecutor without an address starts a LocalCluster for the run and stops it after', async () => {
    const ex = new ClusterExecutor({ workers: 2 });
    const f = flow('cc-temp', () => ({ t: total(square.map([1, 2, 3, 4, 5])) }));
    let pids: number[] = [];
    const r = await f.run({
      executor: ex,
      onTaskState: () => {
        const c = ex.localCluster;
        if (c !== null && pids.length === 0) pids = [c.schedulerPid, ...c.workerPids];
      },
    });
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs.t)).toBe(55);
    expect(pids).toHaveLength(3);
    expect(ex.localCluster).toBeNull();
    expect(pids.filter(alive)).toEqual([]);
  });

  it('a temporary cluster with a token: every process reads it from a mode-600 file, the run proves it', async () => {
    const f = flow('cc-token', () => ({ t: total(square.map([2, 3])) }));
    const r = await f.run({ executor: new ClusterExecutor({ workers: 1, token: 'local-secret' }) });
    expect(r.result(f.outputs.t)).toBe(13);
  });

  it('the nanny restarts a worker that dies; scale() grows and shrinks; close() stops every process', async () => {
    const c = await LocalCluster.start({ workers: 2 });
    try {
      const [first] = c.workerPids;
      process.kill(first!, 'SIGKILL');
      await waitFor('a replacement worker', async () => !c.workerPids.includes(first!) && c.workerPids.length === 2 && (await c.status()).workers.length === 2);
      expect(c.workerPids).not.toContain(first);
      await c.scale(3);
      expect(c.workerPids).toHaveLength(3);
      await c.scale(1);
      expect(c.workerPids).toHaveLength(1);
      expect((await c.status()).workers).toHaveLength(1);
    } finally {
      const pids = [c.schedulerPid, ...c.workerPids];
      await c.close();
      expect(pids.filter(alive)).toEqual([]);
    }
  });

  it('adapt grows from 1 to 2 workers under a queue and shrinks back when idle', async () => {
    const c = await LocalCluster.start({ adapt: { min: 1, max: 2 }, threads: 1 });
    try {
      expect((await c.status()).workers).toHaveLength(1);
      let most = 0;
      const watch = setInterval(() => {
        void c.status().then((s) => (most = Math.max(most, s.workers.length)), () => undefined);
      }, 100);
      const f = flow('cc-adapt', () => ({ naps: nap.map(Array.from({ length: 24 }, () => 250)) }));
      const r = await f.run({ executor: new ClusterExecutor({ address: c.address }) });
      clearInterval(watch);
      expect(r.state).toBe('Success');
      expect(most).toBe(2);
      await waitFor('the cluster to shrink back to 1 worker', async () => (await c.status()).workers.length === 1, 15_000);
      expect(c.size).toBe(1);
    } finally {
      await c.close();
    }
  });

  it('weft run examples/etl.ts --executor cluster --workers 2 exits 0', async () => {
    const r = await runWeft(['run', 'examples/etl.ts', '--executor', 'cluster', '--workers', '2', '--quiet']);
    expect(r.stderr).toBe('');
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^flow etl: Success in /m);
  });
});
