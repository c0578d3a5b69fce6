/**
 * The live feed across servers on one PostgreSQL database (LISTEN/NOTIFY): a subscriber
 * of server A sees the changes made through server B, each once and with the same record
 * B's own subscriber sees; a server's own changes are not doubled by its relay; big
 * messages and log batches arrive whole; a dropped listener connection reconnects, and
 * the feed clients of the server that missed changes are told to reconnect (1012).
 * Plus the notice encoding on its own (payload size, cut messages, read-back overlay).
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BackendClient } from '../src/server/client.ts';
import { startServer, type RunningServer } from '../src/server/index.ts';
import type { FlowRun, RegisterFlowInput, ServerEvent, TaskRun } from '../src/server/model.ts';
import { decodeNotice, encodeNotices, eventFromRead, MAX_MESSAGE, MAX_NOTICE_BYTES } from '../src/server/notices.ts';
import { waitFor } from './fixtures/deploy/harness.ts';
import { startPostgres, type TestPostgres } from './helpers/postgres.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const flowInput: RegisterFlowInput = {
  project: 'proj',
  name: 'etl',
  graph: null,
  storage: { kind: 'module', specifier: './flows/etl.ts', flow: 'etl' },
  runConfig: { kind: 'universal' },
  executor: { kind: 'local' },
  parameters: [{ name: 'n', required: false, default: 1 }],
  labels: [],
};

const baseRun: FlowRun = {
  id: 'r1',
  flowId: 'f1',
  flowName: 'etl',
  project: 'proj',
  versionId: 'v1',
  version: 1,
  state: 'Running',
  stateVersion: 3,
  message: null,
  parameters: { n: 1 },
  labels: ['a'],
  scheduledStart: 1,
  startedAt: 2,
  endedAt: null,
  heartbeatAt: 2,
  agentId: 'ag',
  restarts: 0,
  idempotencyKey: null,
  createdAt: 1,
};

describe('notices', () => {
  it('fit each payload under the limit, in order, and keep what a write changes', () => {
    const runs: ServerEvent[] = Array.from({ length: 200 }, (_, i) => ({ type: 'flowRun', run: { ...baseRun, id: `r${i}`, parameters: { big: 'x'.repeat(5000) } } }));
    const payloads = encodeNotices('me', runs);
    expect(payloads.length).toBeGreaterThan(1);
    for (const p of payloads) expect(Buffer.byteLength(p)).toBeLessThan(MAX_NOTICE_BYTES);
    const items = payloads.flatMap((p) => decodeNotice(p)!.items);
    expect(items.map((it) => (it.type === 'flowRun' ? it.id : '?'))).toEqual(runs.map((e) => (e as { run: FlowRun }).run.id));
    // Parameters are read back, not sent.
    expect(items[0]).toEqual({ type: 'flowRun', id: 'r0', version: 3, set: { state: 'Running', stateVersion: 3, message: null, startedAt: 2, endedAt: null, heartbeatAt: 2, agentId: 'ag', restarts: 0 } });
    expect(decodeNotice('not json')).toBeNull();
    expect(decodeNotice('{"x":1}')).toBeNull();
  });

  it('cut a long message, and lay a notice over a record read back at a newer version', () => {
    const long = 'é'.repeat(MAX_MESSAGE * 5);
    const [payload] = encodeNotices('me', [{ type: 'flowRun', run: { ...baseRun, state: 'Failed', stateVersion: 4, message: long, endedAt: 9 } }]);
    expect(Buffer.byteLength(payload!)).toBeLessThan(MAX_NOTICE_BYTES);
    const item = decodeNotice(payload!)!.items[0]!;
    if (item.type !== 'flowRun') throw new Error('expected a flowRun item');
    expect(item.cut).toBe(true);
    // Still at that version: the record read back, message whole.
    const atVersion = { ...baseRun, state: 'Failed' as const, stateVersion: 4, message: long, endedAt: 9 };
    expect(eventFromRead(item, atVersion)).toEqual(atVersion);
    // Moved on: the notice's state over the newer record, the message cut.
    const newer = { ...baseRun, state: 'Scheduled' as const, stateVersion: 5, message: 'rescheduled', endedAt: null, restarts: 1 };
    expect(eventFromRead(item, newer)).toEqual({ ...baseRun, state: 'Failed', stateVersion: 4, message: `${long.slice(0, MAX_MESSAGE)}…`, endedAt: 9 });
    // Task runs the same way.
    const task: TaskRun = { id: 't1', flowRunId: 'r1', key: 'load', mapIndex: -1, state: 'Running', version: 2, attempts: 1, startedAt: 5, endedAt: null, message: null, processId: 'p' };
    const [tp] = encodeNotices('me', [{ type: 'taskRun', task }]);
    const titem = decodeNotice(tp!)!.items[0]!;
    if (titem.type !== 'taskRun') throw new Error('expected a taskRun item');
    expect(eventFromRead(titem, { ...task, state: 'Success', version: 3, endedAt: 8 })).toEqual(task);
    // Only a newer version known and nothing to lay over it: skipped (a later notice has it).
    expect(eventFromRead({ type: 'taskRun', id: 't1', version: 2 }, { ...task, version: 3 })).toBeNull();
  });
});

describe('live feed across servers on one PostgreSQL database', () => {
  let pg: TestPostgres;
  let dbCount = 0;
  const servers: RunningServer[] = [];
  const closers: (() => void)[] = [];

  beforeAll(async () => {
    pg = await startPostgres();
  });
  afterAll(async () => {
    await pg?.stop();
  });
  afterEach(async () => {
    for (const c of closers.splice(0)) c();
    await Promise.all(servers.splice(0).map((s) => s.close()));
  });

  const twoServers = async (): Promise<{ a: RunningServer; b: RunningServer; ca: BackendClient; cb: BackendClient; db: string }> => {
    const db = await pg.database(`feed${++dbCount}`);
    const a = await startServer({ port: 0, services: false, db });
    servers.push(a);
    const b = await startServer({ port: 0, services: false, db });
    servers.push(b);
    return { a, b, ca: new BackendClient(a.url), cb: new BackendClient(b.url), db };
  };

  /** Subscribe; the events received so far, and the close code once closed. */
  const watch = async (c: BackendClient): Promise<{ events: ServerEvent[]; closed: { code: number } | null }> => {
    const w: { events: ServerEvent[]; closed: { code: number } | null } = { events: [], closed: null };
    const close = await c.subscribe((e) => w.events.push(e), { onClose: (code) => (w.closed = { code }) });
    closers.push(close);
    return w;
  };
  const runEvents = (events: readonly ServerEvent[], id: string): FlowRun[] =>
    events.flatMap((e) => (e.type === 'flowRun' && e.run.id === id ? [e.run] : []));

  it("a subscriber of server A sees each change made through server B once, as B's subscriber sees it", async () => {
    const { ca, cb } = await twoServers();
    const onA = await watch(ca);
    const onB = await watch(cb);

    const { flow } = await cb.registerFlow(flowInput);
    const run = await cb.createFlowRun({ flowId: flow.id, parameters: { n: 7 } });
    const agent = await cb.registerAgent({ name: 'agent-b', kind: 'local', labels: [] });
    await cb.claimFlowRuns({ agentId: agent.id, labels: [], before: Date.now(), limit: 1 });
    // Back to back: A reads these back after later ones committed, and still sees each state.
    await cb.setFlowRunState(run.id, 'Running');
    await cb.setTaskRunStates(run.id, 'proc-1', [{ key: 'load', mapIndex: -1, state: 'Running', expectVersion: 0, attempts: 1, startedAt: Date.now() }]);
    await cb.writeLogs([{ flowRunId: run.id, level: 'info', message: 'hello from B', at: Date.now(), source: 'task' }]);
    await cb.setTaskRunStates(run.id, 'proc-1', [{ key: 'load', mapIndex: -1, state: 'Success', expectVersion: 1, endedAt: Date.now() }]);
    await cb.setFlowRunState(run.id, 'Success', { message: 'done' });

    await waitFor('Success on A', () => runEvents(onA.events, run.id).some((r) => r.state === 'Success'));
    await sleep(300); // anything doubled would arrive by now
    const states = runEvents(onA.events, run.id).map((r) => `${r.state}@${r.stateVersion}`);
    expect(states).toEqual(['Scheduled@1', 'Submitted@2', 'Running@3', 'Success@4']);
    // The very records B's own subscriber got, in the same order (flows, task runs, logs too).
    expect(onA.events).toEqual(onB.events);
    expect(onB.events.map((e) => e.type)).toEqual(['flow', 'flowRun', 'flowRun', 'flowRun', 'taskRun', 'log', 'taskRun', 'flowRun']);
    expect(runEvents(onA.events, run.id)[0]!.parameters).toEqual({ n: 7 });
    expect(runEvents(onA.events, run.id).at(-1)!.message).toBe('done');
  });

  it("a server's own changes reach its subscribers once; big messages and log batches arrive whole", async () => {
    const { ca, cb } = await twoServers();
    const onA = await watch(ca);
    const { flow } = await ca.registerFlow(flowInput);
    const run = await ca.createFlowRun({ flowId: flow.id });
    const long = `failure: ${'y'.repeat(20_000)}`;
    await ca.setFlowRunState(run.id, 'Failed', { message: long });
    const entries = Array.from({ length: 600 }, (_, i) => ({ flowRunId: run.id, level: 'info' as const, message: `line ${i} ${'z'.repeat(50)}`, at: Date.now(), source: 'task' }));
    await cb.writeLogs(entries);

    await waitFor('600 log lines on A', () => onA.events.filter((e) => e.type === 'log').length >= 600);
    await sleep(300);
    const mine = runEvents(onA.events, run.id);
    expect(mine.map((r) => r.state)).toEqual(['Scheduled', 'Failed']);
    expect(mine[1]!.message).toBe(long);
    const logs = onA.events.flatMap((e) => (e.type === 'log' ? [e.entry] : []));
    expect(logs.map((l) => l.message)).toEqual(entries.map((e) => e.message));
    expect(new Set(logs.map((l) => l.seq)).size).toBe(600);

    // B, on the other side, got A's long message whole as well.
    const onB = await watch(cb);
    await ca.setFlowRunState(run.id, 'Scheduled', { message: long.slice(0, 5000) });
    const back = await waitFor('Scheduled on B', () => runEvents(onB.events, run.id).find((r) => r.state === 'Scheduled'));
    expect(back.message).toBe(long.slice(0, 5000));
  });

  it('a dropped listener connection reconnects; the feed clients of its server are told to re-read', async () => {
    const { ca, cb, db } = await twoServers();
    const onA = await watch(ca);
    const { default: pgLib } = await import('pg');
    const admin = new pgLib.Client({ connectionString: db });
    await admin.connect();
    try {
      const listeners = async (): Promise<number[]> =>
        (
          await admin.query<{ pid: number }>("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()")
        ).rows.map((r) => r.pid);
      const before = await waitFor('two listeners', async () => {
        const l = await listeners();
        return l.length === 2 ? l : undefined;
      });
      // Drop both servers' listener connections.
      for (const pid of before) await admin.query('SELECT pg_terminate_backend($1)', [pid]);
      const closed = await waitFor("A's feed client closed", () => onA.closed ?? undefined);
      expect(closed.code).toBe(1012);
      await waitFor('two new listeners', async () => {
        const l = await listeners();
        return l.length === 2 && l.every((p) => !before.includes(p));
      });
      const again = await watch(ca);
      const { flow } = await cb.registerFlow(flowInput);
      const run = await cb.createFlowRun({ flowId: flow.id });
      const seen = await waitFor('the run on A after the reconnect', () => runEvents(again.events, run.id)[0]);
      expect(seen).toEqual(run);
    } finally {
      await admin.end();
    }
  });
});
