/**
 * The backend's operations over HTTP (BackendClient → weft server → database), the same
 * suite against SQLite (a temp file) and a real PostgreSQL: registration and versions,
 * runs and their history, conflicts, claims and labels, racing claimers, task-run
 * versions, logs, bundles, concurrency limits, schedules, the zombie killer and lazarus,
 * agent records (one per name, claims as heartbeats, status from last-seen, the migration
 * that folds older servers' per-start records).
 *
 * Every test gets a fresh database and server, so claims never see another test's runs.
 */
import { createHash, randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { BackendClient } from '../src/server/client.ts';
import { openDb } from '../src/server/db.ts';
import { startServer, type RunningServer, type ServerOptions } from '../src/server/index.ts';
import { migrate, MIGRATIONS } from '../src/server/migrations.ts';
import { BackendError, type FlowRun, type RegisterFlowInput } from '../src/server/model.ts';
import { startPostgres, type TestPostgres } from './helpers/postgres.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitFor<T>(what: string, check: () => Promise<T | undefined | false>, timeoutMs = 15_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await check();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(25);
  }
}

/** The BackendError a promise rejects with. */
async function refusal(p: Promise<unknown>): Promise<BackendError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof BackendError) return err;
    throw err;
  }
  throw new Error('expected a BackendError, got success');
}

function flowInput(over: Partial<RegisterFlowInput> = {}): RegisterFlowInput {
  return {
    project: 'proj',
    name: 'etl',
    graph: { nodes: [{ key: 'extract' }, { key: 'load', deps: ['extract'] }] },
    storage: { kind: 'module', specifier: './flows/etl.ts', flow: 'etl' },
    runConfig: { kind: 'universal' },
    executor: { kind: 'local' },
    parameters: [
      { name: 'n', required: false, default: 10 },
      { name: 'mode', required: false, default: 'fast' },
    ],
    labels: [],
    ...over,
  };
}

describe.each(['sqlite', 'postgres'] as const)('backend on %s', (kind) => {
  let pg: TestPostgres | null = null;
  let tmp: string;
  let dbCount = 0;
  const servers: RunningServer[] = [];

  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'weft-server-store-'));
    if (kind === 'postgres') pg = await startPostgres();
  });
  afterAll(async () => {
    await pg?.stop();
    await rm(tmp, { recursive: true, force: true });
  });
  afterEach(async () => {
    await Promise.all(servers.splice(0).map((s) => s.close()));
  });

  /** A fresh database's URL. */
  const freshDb = async (): Promise<string> => {
    dbCount++;
    return pg !== null ? pg.database(`t${dbCount}`) : `sqlite:${join(tmp, `t${dbCount}.db`)}`;
  };
  /** A server on `db` (default: a fresh database); services off unless asked for. */
  const serve = async (opts: ServerOptions = {}): Promise<{ server: RunningServer; c: BackendClient }> => {
    const server = await startServer({ port: 0, services: false, ...opts, db: opts.db ?? (await freshDb()) });
    servers.push(server);
    return { server, c: new BackendClient(server.url) };
  };

  it('registers flows, bumping the version only when what decides it changes', async () => {
    const { c } = await serve();
    const p1 = await c.createProject('proj');
    expect(await c.createProject('proj')).toEqual(p1);

    const a = await c.registerFlow(flowInput());
    expect(a.created).toBe(true);
    expect(a.version.version).toBe(1);
    expect(a.flow).toMatchObject({ project: 'proj', name: 'etl', version: 1, versionId: a.version.id, projectId: p1.id, schedule: null });

    const again = await c.registerFlow(flowInput());
    expect(again.created).toBe(false);
    expect(again.version.id).toBe(a.version.id);
    expect(again.flow.version).toBe(1);

    const b = await c.registerFlow(flowInput({ graph: { nodes: [{ key: 'extract' }] } }));
    expect(b).toMatchObject({ created: true, version: { version: 2 }, flow: { id: a.flow.id, version: 2 } });
    const sched = { clocks: [{ kind: 'interval' as const, everyMs: 3_600_000 }] };
    const withSchedule = await c.registerFlow(flowInput({ graph: { nodes: [{ key: 'extract' }] }, schedule: sched }));
    expect(withSchedule.version.version).toBe(3);
    expect(withSchedule.flow.schedule).toEqual({ ...sched, paused: false });
    // Pausing through registration is not a new version.
    const paused = await c.registerFlow(flowInput({ graph: { nodes: [{ key: 'extract' }] }, schedule: { ...sched, paused: true } }));
    expect(paused).toMatchObject({ created: false, flow: { version: 3, schedule: { paused: true } } });
    for (const change of [
      { storage: { kind: 'bundle' as const, hash: 'a'.repeat(64), flow: 'etl' } },
      { runConfig: { kind: 'local' as const, labels: ['x'] } },
      { executor: { kind: 'pool' as const, threads: 2 } },
      { parameters: [] },
    ]) {
      const before = (await c.getFlow(a.flow.id)).version;
      const r = await c.registerFlow(flowInput({ graph: { nodes: [{ key: 'extract' }] }, schedule: sched, ...change }));
      expect(r.version.version).toBe(before + 1);
    }

    // The same name in another project is another flow.
    const other = await c.registerFlow(flowInput({ project: 'other' }));
    expect(other.flow.id).not.toBe(a.flow.id);
    expect(other.version.version).toBe(1);

    expect(await c.getFlow({ project: 'proj', name: 'etl' })).toMatchObject({ id: a.flow.id, version: 7 });
    expect((await c.getFlow('proj/etl')).id).toBe(a.flow.id);
    expect((await c.listFlows({ project: 'other' })).map((f) => f.id)).toEqual([other.flow.id]);
    expect((await c.listFlows()).length).toBe(2);
    expect((await c.listProjects()).map((p) => p.name)).toEqual(['other', 'proj']);
    const v1 = await c.getFlowVersion(a.version.id);
    expect(v1).toMatchObject({ flowId: a.flow.id, version: 1, storage: flowInput().storage, graph: flowInput().graph, parameters: flowInput().parameters });
    expect((await c.listFlowVersions(a.flow.id)).map((v) => v.version)).toEqual([7, 6, 5, 4, 3, 2, 1]);

    for (const call of [() => c.getFlow('nope'), () => c.getFlow({ project: 'proj', name: 'nope' }), () => c.getFlowVersion('nope')]) {
      expect(await refusal(call())).toMatchObject({ status: 404, code: 'NOT_FOUND' });
    }
  });

  it('concurrent registrations of one flow make one version', async () => {
    const { server, c } = await serve();
    const c2 = new BackendClient(server.url);
    const results = await Promise.all(Array.from({ length: 8 }, (_, i) => (i % 2 === 0 ? c : c2).registerFlow(flowInput())));
    expect(results.filter((r) => r.created).length).toBe(1);
    expect(new Set(results.map((r) => r.version.id)).size).toBe(1);
  });

  it('runs: creation rules, lifecycle, history and listing', async () => {
    const { c } = await serve();
    const { flow, version } = await c.registerFlow(flowInput({ labels: ['team-a'], parameters: [{ name: 'n', required: true }] }));

    expect(await refusal(c.createFlowRun({ flowId: flow.id }))).toMatchObject({ status: 400, message: expect.stringMatching(/missing required parameter 'n'/) });
    expect(await refusal(c.createFlowRun({ flowId: flow.id, parameters: { n: 1, zzz: 2 } }))).toMatchObject({
      status: 400,
      message: expect.stringMatching(/unknown parameter 'zzz'/),
    });
    expect(await refusal(c.createFlowRun({ flowId: 'nope' }))).toMatchObject({ status: 404 });
    expect(await refusal(c.createFlowRun({}))).toMatchObject({ status: 400 });

    const before = Date.now();
    const run = await c.createFlowRun({ project: 'proj', flowName: 'etl', parameters: { n: 5 }, labels: ['gpu', 'team-a'] });
    expect(run).toMatchObject({
      flowId: flow.id,
      flowName: 'etl',
      project: 'proj',
      versionId: version.id,
      version: 1,
      state: 'Scheduled',
      stateVersion: 1,
      parameters: { n: 5 },
      labels: ['gpu', 'team-a'],
      agentId: null,
      restarts: 0,
      idempotencyKey: null,
      startedAt: null,
      endedAt: null,
    });
    expect(run.scheduledStart).toBeGreaterThanOrEqual(before);

    // An idempotency key gives back the first run.
    const k1 = await c.createFlowRun({ flowId: flow.id, parameters: { n: 1 }, idempotencyKey: 'nightly-2025-01-01' });
    const k2 = await c.createFlowRun({ flowId: flow.id, parameters: { n: 2 }, idempotencyKey: 'nightly-2025-01-01' });
    expect(k2.id).toBe(k1.id);
    expect(k2.parameters).toEqual({ n: 1 });

    const running = await c.setFlowRunState(run.id, 'Running', { expectVersion: 1, message: 'process 1' });
    expect(running).toMatchObject({ state: 'Running', stateVersion: 2, message: 'process 1' });
    expect(running.startedAt).not.toBeNull();
    expect(running.heartbeatAt).not.toBeNull();
    const hb = await c.heartbeatFlowRun(run.id);
    expect(hb.state).toBe('Running');
    expect(hb.heartbeatAt!).toBeGreaterThanOrEqual(running.heartbeatAt!);
    const done = await c.setFlowRunState(run.id, 'Success', { expectVersion: 2 });
    expect(done).toMatchObject({ state: 'Success', stateVersion: 3, message: null });
    expect(done.endedAt).not.toBeNull();
    expect((await c.getFlowRunHistory(run.id)).map((h) => [h.state, h.message])).toEqual([
      ['Scheduled', null],
      ['Running', 'process 1'],
      ['Success', null],
    ]);
    expect(await c.getFlowRun(run.id)).toEqual(done);

    expect((await c.listFlowRuns({ flowId: flow.id })).length).toBe(2);
    expect((await c.listFlowRuns({ states: ['Success'] })).map((r) => r.id)).toEqual([run.id]);
    expect((await c.listFlowRuns({ states: ['Success', 'Scheduled'], project: 'proj' })).length).toBe(2);
    expect((await c.listFlowRuns({ limit: 1 })).length).toBe(1);
    expect(await c.listFlowRuns({ project: 'none' })).toEqual([]);
    for (const call of [() => c.getFlowRun('nope'), () => c.getFlowRunHistory('nope'), () => c.heartbeatFlowRun('nope'), () => c.setFlowRunState('nope', 'Running')]) {
      expect(await refusal(call())).toMatchObject({ status: 404, code: 'NOT_FOUND' });
    }
  });

  it('a stale state write is a CONFLICT; cancel follows the run state', async () => {
    const { c } = await serve();
    const { flow } = await c.registerFlow(flowInput());
    const run = await c.createFlowRun({ flowId: flow.id });
    await c.setFlowRunState(run.id, 'Running', { expectVersion: 1 });
    const err = await refusal(c.setFlowRunState(run.id, 'Failed', { expectVersion: 1 }));
    expect(err).toMatchObject({ status: 409, code: 'CONFLICT' });
    expect(err.message).toMatch(/state version 2 \(Running\), not 1/);
    expect((await c.getFlowRun(run.id)).state).toBe('Running');

    // Running → Cancelling (its process stops it), then the process ends it.
    const cancelling = await c.cancelFlowRun(run.id);
    expect(cancelling.state).toBe('Cancelling');
    expect((await c.heartbeatFlowRun(run.id)).state).toBe('Cancelling');
    expect((await c.cancelFlowRun(run.id)).stateVersion).toBe(cancelling.stateVersion);
    await c.setFlowRunState(run.id, 'Cancelled', { expectVersion: cancelling.stateVersion });

    // Scheduled and Submitted → Cancelled at once; a final run stays as it is.
    const s = await c.createFlowRun({ flowId: flow.id });
    expect((await c.cancelFlowRun(s.id)).state).toBe('Cancelled');
    const t = await c.createFlowRun({ flowId: flow.id });
    const agent = await c.registerAgent({ name: 'a', kind: 'local', labels: [] });
    expect((await c.claimFlowRuns({ agentId: agent.id, labels: [], before: Date.now(), limit: 10 })).map((x) => x.run.id)).toEqual([t.id]);
    const cancelled = await c.cancelFlowRun(t.id);
    expect(cancelled).toMatchObject({ state: 'Cancelled' });
    expect(await c.cancelFlowRun(t.id)).toEqual(cancelled);
    expect(await refusal(c.cancelFlowRun('nope'))).toMatchObject({ status: 404 });
  });

  it('claims: due runs whose labels the agent covers, oldest first, each once, of its kind', async () => {
    const { c } = await serve();
    const { flow } = await c.registerFlow(flowInput());
    const docker = await c.registerFlow(flowInput({ name: 'docker-flow', runConfig: { kind: 'docker', image: 'x' } }));
    const now = Date.now();
    const mk = (labels: string[], offset: number): Promise<FlowRun> => c.createFlowRun({ flowId: flow.id, labels, scheduledStart: now - 10_000 + offset });
    const none = await mk([], 3);
    const a = await mk(['a'], 1);
    const ab = await mk(['a', 'b'], 2);
    const cOnly = await mk(['c'], 0);
    const future = await c.createFlowRun({ flowId: flow.id, scheduledStart: now + 60_000 });
    const dockerRun = await c.createFlowRun({ flowId: docker.flow.id, scheduledStart: now - 20_000 });

    const agentA = await c.registerAgent({ name: 'agent-a', kind: 'local', labels: ['a'] });
    const gotA = await c.claimFlowRuns({ agentId: agentA.id, labels: ['a'], before: now, limit: 10, kind: 'local' });
    expect(gotA.map((x) => x.run.id)).toEqual([a.id, none.id]);
    for (const x of gotA) {
      expect(x.run).toMatchObject({ state: 'Submitted', agentId: agentA.id, stateVersion: 2 });
      expect(x.version).toMatchObject({ id: x.run.versionId, flowId: flow.id, storage: flowInput().storage });
    }
    expect((await c.getFlowRun(a.id)).state).toBe('Submitted');
    expect((await c.getFlowRunHistory(a.id)).at(-1)).toMatchObject({ state: 'Submitted', message: `claimed by agent ${agentA.id}` });

    const agentAll = await c.registerAgent({ name: 'agent-all', kind: 'local', labels: ['a', 'b', 'c', 'd'] });
    const gotAll = await c.claimFlowRuns({ agentId: agentAll.id, labels: ['a', 'b', 'c', 'd'], before: now, limit: 1, kind: 'local' });
    expect(gotAll.map((x) => x.run.id)).toEqual([cOnly.id]);
    expect((await c.claimFlowRuns({ agentId: agentAll.id, labels: ['a', 'b', 'c', 'd'], before: now, limit: 10, kind: 'local' })).map((x) => x.run.id)).toEqual([
      ab.id,
    ]);
    // Not due yet, unless the agent looks far enough ahead; a docker run only for a docker (or kind-less) agent.
    expect(await c.claimFlowRuns({ agentId: agentAll.id, labels: [], before: now, limit: 10, kind: 'local' })).toEqual([]);
    expect((await c.claimFlowRuns({ agentId: agentAll.id, labels: [], before: now, limit: 10, kind: 'docker' })).map((x) => x.run.id)).toEqual([dockerRun.id]);
    expect((await c.claimFlowRuns({ agentId: agentAll.id, labels: [], before: now + 120_000, limit: 10 })).map((x) => x.run.id)).toEqual([future.id]);
    expect((await c.listAgents()).map((x) => x.name).sort()).toEqual(['agent-a', 'agent-all']);
  });

  it('two clients racing over 200 due runs claim each exactly once', async () => {
    const db = await freshDb();
    const { server, c } = await serve({ db });
    const { flow } = await c.registerFlow(flowInput({ labels: ['race'] }));
    const past = Date.now() - 60_000;
    for (let i = 0; i < 200; i += 20) {
      await Promise.all(Array.from({ length: 20 }, (_, j) => c.createFlowRun({ flowId: flow.id, scheduledStart: past + i + j })));
    }
    // On PostgreSQL the second claimer talks to a second server on the same database.
    let url = server.url;
    if (kind === 'postgres') url = (await serve({ db })).server.url;
    const clients = [new BackendClient(server.url), new BackendClient(url)];
    const agents = await Promise.all(clients.map((cl, i) => cl.registerAgent({ name: `racer-${i}`, kind: 'local', labels: ['race'] })));
    const got: string[][] = [[], []];
    await Promise.all(
      clients.map(async (cl, i) => {
        for (;;) {
          const claimed = await cl.claimFlowRuns({ agentId: agents[i]!.id, labels: ['race'], before: Date.now(), limit: 7 });
          if (claimed.length === 0) return;
          for (const x of claimed) {
            expect(x.run.agentId).toBe(agents[i]!.id);
            got[i]!.push(x.run.id);
          }
        }
      }),
    );
    const all = [...got[0]!, ...got[1]!];
    expect(all.length).toBe(200);
    expect(new Set(all).size).toBe(200);
    // Both took part (the loop interleaves their requests).
    expect(got[0]!.length).toBeGreaterThan(0);
    expect(got[1]!.length).toBeGreaterThan(0);
    const runs = await c.listFlowRuns({ flowId: flow.id, limit: 1000 });
    expect(runs.every((r) => r.state === 'Submitted')).toBe(true);
    for (const r of runs) expect(r.agentId).toBe(got[0]!.includes(r.id) ? agents[0]!.id : agents[1]!.id);
  });

  it('task runs: a write names the version it saw; a stale one is refused with the stored version', async () => {
    const { c } = await serve();
    const { flow } = await c.registerFlow(flowInput());
    const run = await c.createFlowRun({ flowId: flow.id });
    const t0 = Date.now();
    expect(
      await c.setTaskRunStates(run.id, 'proc-1', [
        { key: 'extract', mapIndex: -1, state: 'Running', expectVersion: 0, startedAt: t0, attempts: 1 },
        { key: 'load', mapIndex: 0, state: 'Pending', expectVersion: 0 },
        { key: 'load', mapIndex: 1, state: 'Pending', expectVersion: 0 },
      ]),
    ).toEqual([
      { key: 'extract', mapIndex: -1, ok: true, version: 1 },
      { key: 'load', mapIndex: 0, ok: true, version: 1 },
      { key: 'load', mapIndex: 1, ok: true, version: 1 },
    ]);
    // Another process that thinks the task run is new, or read an old version, is refused.
    expect(await c.setTaskRunStates(run.id, 'proc-2', [{ key: 'extract', mapIndex: -1, state: 'Running', expectVersion: 0 }])).toEqual([
      { key: 'extract', mapIndex: -1, ok: false, version: 1 },
    ]);
    expect(
      await c.setTaskRunStates(run.id, 'proc-1', [
        { key: 'extract', mapIndex: -1, state: 'Success', expectVersion: 1, endedAt: t0 + 5 },
        { key: 'load', mapIndex: 0, state: 'Running', expectVersion: 3 },
        { key: 'never', mapIndex: -1, state: 'Running', expectVersion: 4 },
      ]),
    ).toEqual([
      { key: 'extract', mapIndex: -1, ok: true, version: 2 },
      { key: 'load', mapIndex: 0, ok: false, version: 1 },
      { key: 'never', mapIndex: -1, ok: false, version: 0 },
    ]);
    expect(await c.setTaskRunStates(run.id, 'proc-2', [{ key: 'extract', mapIndex: -1, state: 'Failed', expectVersion: 1 }])).toEqual([
      { key: 'extract', mapIndex: -1, ok: false, version: 2 },
    ]);
    const tasks = await c.getTaskRuns(run.id);
    expect(tasks.map((t) => [t.key, t.mapIndex, t.state, t.version, t.processId])).toEqual([
      ['extract', -1, 'Success', 2, 'proc-1'],
      ['load', 0, 'Pending', 1, 'proc-1'],
      ['load', 1, 'Pending', 1, 'proc-1'],
    ]);
    expect(tasks[0]).toMatchObject({ attempts: 1, startedAt: t0, endedAt: t0 + 5, flowRunId: run.id });
    expect(await refusal(c.getTaskRuns('nope'))).toMatchObject({ status: 404 });
    expect(await refusal(c.setTaskRunStates('nope', 'p', []))).toMatchObject({ status: 404 });
  });

  it('logs page by seq; a batch for an unknown run is refused whole', async () => {
    const { c } = await serve();
    const { flow } = await c.registerFlow(flowInput());
    const run = await c.createFlowRun({ flowId: flow.id });
    const other = await c.createFlowRun({ flowId: flow.id });
    const at = Date.now();
    await c.writeLogs(
      Array.from({ length: 25 }, (_, i) => ({
        flowRunId: i % 5 === 4 ? other.id : run.id,
        level: 'info' as const,
        message: `line ${i}`,
        at: at + i,
        source: i % 2 === 0 ? 'task' : 'flow-run',
        ...(i === 0 ? { taskKey: 'extract', mapIndex: 3 } : {}),
      })),
    );
    const page1 = await c.getLogs(run.id, { limit: 10 });
    expect(page1.length).toBe(10);
    expect(page1[0]).toMatchObject({ flowRunId: run.id, message: 'line 0', taskKey: 'extract', mapIndex: 3, level: 'info', source: 'task', at });
    expect(page1[1]).not.toHaveProperty('taskKey');
    const page2 = await c.getLogs(run.id, { after: page1.at(-1)!.seq, limit: 10 });
    const page3 = await c.getLogs(run.id, { after: page2.at(-1)!.seq });
    const all = [...page1, ...page2, ...page3];
    expect(all.map((e) => e.message)).toEqual(Array.from({ length: 25 }, (_, i) => i).filter((i) => i % 5 !== 4).map((i) => `line ${i}`));
    for (let i = 1; i < all.length; i++) expect(all[i]!.seq).toBeGreaterThan(all[i - 1]!.seq);
    expect(await c.getLogs(run.id, { after: all.at(-1)!.seq })).toEqual([]);
    expect((await c.getLogs(other.id)).length).toBe(5);

    const err = await refusal(
      c.writeLogs([
        { flowRunId: run.id, level: 'warn', message: 'kept?', at, source: 'agent' },
        { flowRunId: 'nope', level: 'warn', message: 'x', at, source: 'agent' },
      ]),
    );
    expect(err).toMatchObject({ status: 404 });
    expect((await c.getLogs(run.id, { after: all.at(-1)!.seq })).length).toBe(0);
    expect(await refusal(c.getLogs('nope'))).toMatchObject({ status: 404 });
  });

  it('bundles: bytes round-trip by sha256; a hash that does not match is refused', async () => {
    const { c } = await serve();
    const code = new Uint8Array(randomBytes(300_000));
    const hash = createHash('sha256').update(code).digest('hex');
    await c.putBundle(hash, code);
    await c.putBundle(hash, code);
    const back = await c.getBundle(hash);
    expect(back.byteLength).toBe(code.byteLength);
    expect(Buffer.from(back).equals(Buffer.from(code))).toBe(true);
    const wrong = await refusal(c.putBundle('0'.repeat(64), code));
    expect(wrong).toMatchObject({ status: 400, code: 'HASH_MISMATCH' });
    expect(await refusal(c.getBundle('0'.repeat(64)))).toMatchObject({ status: 404 });
    expect(await refusal(c.getBundle('not-a-hash'))).toMatchObject({ status: 400 });
    // Empty bundles are bundles too.
    const empty = new Uint8Array(0);
    const emptyHash = createHash('sha256').update(empty).digest('hex');
    await c.putBundle(emptyHash, empty);
    expect((await c.getBundle(emptyHash)).byteLength).toBe(0);
  });

  it('task-tag limits: all-or-nothing across tags, idempotent, released on release and when the run ends', async () => {
    const { c } = await serve();
    const { flow } = await c.registerFlow(flowInput());
    const r1 = await c.createFlowRun({ flowId: flow.id });
    const r2 = await c.createFlowRun({ flowId: flow.id });
    await c.setConcurrencyLimit('tag', 'db', 2);
    await c.setConcurrencyLimit('tag', 'gpu', 1);
    const used = async (): Promise<Record<string, number>> =>
      Object.fromEntries((await c.listConcurrencyLimits()).filter((l) => l.kind === 'tag').map((l) => [l.name, l.used]));

    expect(await c.acquireTaskSlots(r1.id, 'a', ['db', 'unlimited'])).toBe(true);
    expect(await c.acquireTaskSlots(r1.id, 'a', ['db'])).toBe(true); // already held
    expect(await c.acquireTaskSlots(r2.id, 'b', ['gpu'])).toBe(true);
    expect(await used()).toEqual({ db: 1, gpu: 1 });
    // gpu is full: nothing is taken, not even the free db slot.
    expect(await c.acquireTaskSlots(r1.id, 'c', ['db', 'gpu'])).toBe(false);
    expect(await used()).toEqual({ db: 1, gpu: 1 });
    expect(await c.acquireTaskSlots(r1.id, 'd', ['db'])).toBe(true);
    expect(await c.acquireTaskSlots(r2.id, 'e', ['db'])).toBe(false);
    await c.releaseTaskSlots(r1.id, 'a');
    expect(await c.acquireTaskSlots(r2.id, 'e', ['db'])).toBe(true);
    expect(await used()).toEqual({ db: 2, gpu: 1 });
    // r2 ends: its slots (e: db, b: gpu) go back.
    await c.setFlowRunState(r2.id, 'Failed');
    expect(await used()).toEqual({ db: 1, gpu: 0 });
    expect(await c.acquireTaskSlots(r1.id, 'c', ['db', 'gpu'])).toBe(true);
    // Without a limit a tag never waits; limit 0 always waits.
    await c.setConcurrencyLimit('tag', 'db', null);
    expect(await c.acquireTaskSlots(r1.id, 'f', ['db'])).toBe(true);
    await c.setConcurrencyLimit('tag', 'frozen', 0);
    expect(await c.acquireTaskSlots(r1.id, 'g', ['frozen'])).toBe(false);
    expect(await c.acquireTaskSlots(r1.id, 'h', [])).toBe(true);
    expect(await refusal(c.acquireTaskSlots('nope', 'a', ['gpu']))).toMatchObject({ status: 404 });
  });

  it('concurrent acquirers never exceed a tag limit', async () => {
    const { server, c } = await serve();
    const { flow } = await c.registerFlow(flowInput());
    const run = await c.createFlowRun({ flowId: flow.id });
    await c.setConcurrencyLimit('tag', 'api', 3);
    const c2 = new BackendClient(server.url);
    const granted = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 === 0 ? c : c2).acquireTaskSlots(run.id, `t${i}`, ['api'])));
    expect(granted.filter(Boolean).length).toBe(3);
  });

  it('flow-run label limits: claims skip runs whose label is at its limit of Submitted and Running runs', async () => {
    const { c } = await serve();
    const { flow } = await c.registerFlow(flowInput());
    const past = Date.now() - 10_000;
    const heavy = await Promise.all([0, 1, 2].map((i) => c.createFlowRun({ flowId: flow.id, labels: ['heavy'], scheduledStart: past + i })));
    const light = await c.createFlowRun({ flowId: flow.id, labels: ['light'], scheduledStart: past + 10 });
    await c.setConcurrencyLimit('label', 'heavy', 1);
    const agent = await c.registerAgent({ name: 'a', kind: 'local', labels: ['heavy', 'light'] });
    const claim = async (): Promise<string[]> =>
      (await c.claimFlowRuns({ agentId: agent.id, labels: ['heavy', 'light'], before: Date.now(), limit: 10 })).map((x) => x.run.id);
    expect(await claim()).toEqual([heavy[0]!.id, light.id]);
    expect(await claim()).toEqual([]);
    await c.setFlowRunState(heavy[0]!.id, 'Running');
    expect(await claim()).toEqual([]);
    await c.setFlowRunState(heavy[0]!.id, 'Success');
    expect(await claim()).toEqual([heavy[1]!.id]);
    await c.setConcurrencyLimit('label', 'heavy', 5);
    expect(await claim()).toEqual([heavy[2]!.id]);
    expect((await c.listConcurrencyLimits()).find((l) => l.kind === 'label')).toEqual({ kind: 'label', name: 'heavy', limit: 5, used: 2 });
  });

  it('schedules: the next 10 runs are materialised once; pausing deletes the unstarted ones; a new version remakes them', async () => {
    const { server, c } = await serve();
    const schedule = {
      clocks: [
        { kind: 'interval' as const, everyMs: 3_600_000, parameters: { n: 1 } },
        { kind: 'cron' as const, cron: '30 */2 * * *', labels: ['cron'], parameters: { mode: 'slow' } },
      ],
    };
    const { flow } = await c.registerFlow(flowInput({ schedule }));
    const made = await server.store.materializeSchedules();
    expect(made.length).toBe(10);
    expect(await server.store.materializeSchedules()).toEqual([]);
    const runs = (await c.listFlowRuns({ flowId: flow.id })).sort((a, b) => a.scheduledStart - b.scheduledStart);
    expect(runs.length).toBe(10);
    const now = Date.now();
    for (const r of runs) {
      expect(r.scheduledStart).toBeGreaterThan(now - 5_000);
      expect(r.idempotencyKey).toMatch(new RegExp(`^schedule:${flow.id}:[0-9a-f]{16}:${r.scheduledStart}$`));
      expect(r.state).toBe('Scheduled');
      if (r.labels.includes('cron')) {
        expect(new Date(r.scheduledStart).getUTCMinutes()).toBe(30);
        expect(r.parameters).toEqual({ mode: 'slow' });
      } else {
        expect(r.scheduledStart % 3_600_000).toBe(0);
        expect(r.parameters).toEqual({ n: 1 });
      }
    }
    expect(new Set(runs.map((r) => r.idempotencyKey)).size).toBe(10);
    expect(runs.some((r) => r.labels.includes('cron'))).toBe(true);

    // Pausing deletes the schedule's unstarted runs, not a run started, nor one made by hand.
    const agent = await c.registerAgent({ name: 'a', kind: 'local', labels: ['cron'] });
    const [taken] = await c.claimFlowRuns({ agentId: agent.id, labels: ['cron'], before: Date.now() + 10 * 3_600_000, limit: 1 });
    const byHand = await c.createFlowRun({ flowId: flow.id, scheduledStart: Date.now() + 3_600_000 });
    const paused = await c.setSchedulePaused(flow.id, true);
    expect(paused.schedule?.paused).toBe(true);
    expect((await c.listFlowRuns({ flowId: flow.id })).map((r) => r.id).sort()).toEqual([taken!.run.id, byHand.id].sort());
    expect(await server.store.materializeSchedules()).toEqual([]);

    const resumed = await c.setSchedulePaused(flow.id, false);
    expect(resumed.schedule?.paused).toBe(false);
    const remade = await server.store.materializeSchedules();
    // The claimed run's time is taken already (same idempotency key).
    expect(remade.length).toBe(9);

    // A new version replaces the unstarted scheduled runs with runs of the new version.
    const v2 = await c.registerFlow(flowInput({ schedule, graph: { nodes: [] } }));
    expect((await c.listFlowRuns({ flowId: flow.id, states: ['Scheduled'] })).map((r) => r.id)).toEqual([byHand.id]);
    const again = await server.store.materializeSchedules();
    expect(again.length).toBe(9);
    expect(again.every((r) => r.versionId === v2.version.id)).toBe(true);

    expect(await refusal(c.setSchedulePaused((await c.registerFlow(flowInput({ name: 'plain' }))).flow.id, true))).toMatchObject({
      status: 409,
      code: 'NO_SCHEDULE',
    });
    expect(await refusal(c.setSchedulePaused('nope', true))).toMatchObject({ status: 404 });
  });

  it('the scheduler service materialises a newly registered schedule by itself', async () => {
    const { c } = await serve({ services: true, schedulerIntervalMs: 60_000, reaperIntervalMs: 60_000 });
    const { flow } = await c.registerFlow(flowInput({ schedule: { clocks: [{ kind: 'interval', everyMs: 60_000 }] } }));
    // The registration pokes the scheduler: no need to wait for its interval.
    await waitFor('10 scheduled runs', async () => (await c.listFlowRuns({ flowId: flow.id })).length === 10);
  });

  it('lazarus: a run Submitted but never Running goes back to Scheduled, then Failed after max restarts', async () => {
    const { c } = await serve({ services: true, schedulerIntervalMs: 60_000, reaperIntervalMs: 40, lazarusTimeoutMs: 300, zombieTimeoutMs: 60_000, maxRestarts: 1 });
    const { flow } = await c.registerFlow(flowInput());
    const run = await c.createFlowRun({ flowId: flow.id });
    const agent = await c.registerAgent({ name: 'a', kind: 'local', labels: [] });
    const claim = async (): Promise<void> => {
      expect((await c.claimFlowRuns({ agentId: agent.id, labels: [], before: Date.now(), limit: 1 })).map((x) => x.run.id)).toEqual([run.id]);
    };
    await claim();
    const back = await waitFor('rescheduled', async () => {
      const r = await c.getFlowRun(run.id);
      return r.state === 'Scheduled' ? r : undefined;
    });
    expect(back).toMatchObject({ restarts: 1, agentId: null, message: expect.stringMatching(/rescheduled by lazarus \(restart 1 of 1\)/) });
    await claim();
    const failed = await waitFor('failed', async () => {
      const r = await c.getFlowRun(run.id);
      return r.state === 'Failed' ? r : undefined;
    });
    expect(failed).toMatchObject({ restarts: 1, message: expect.stringMatching(/marked Failed by lazarus/) });
    expect((await c.getFlowRunHistory(run.id)).map((h) => h.state)).toEqual(['Scheduled', 'Submitted', 'Scheduled', 'Submitted', 'Failed']);
  });

  it('zombie killer: a Running run whose heartbeat stops is rescheduled (done task runs kept, running ones Failed), then Failed', async () => {
    const { c } = await serve({ services: true, schedulerIntervalMs: 60_000, reaperIntervalMs: 40, zombieTimeoutMs: 400, lazarusTimeoutMs: 60_000, maxRestarts: 1 });
    const { flow } = await c.registerFlow(flowInput());
    const run = await c.createFlowRun({ flowId: flow.id });
    await c.setConcurrencyLimit('tag', 'db', 1);
    const agent = await c.registerAgent({ name: 'a', kind: 'local', labels: [] });
    await c.claimFlowRuns({ agentId: agent.id, labels: [], before: Date.now(), limit: 1 });
    let r = await c.setFlowRunState(run.id, 'Running', { expectVersion: 2 });
    await c.setTaskRunStates(run.id, 'proc-1', [
      { key: 'extract', mapIndex: -1, state: 'Success', expectVersion: 0 },
      { key: 'load', mapIndex: -1, state: 'Running', expectVersion: 0 },
    ]);
    expect(await c.acquireTaskSlots(run.id, 'load', ['db'])).toBe(true);
    // Heartbeats keep it alive well past the timeout.
    const until = Date.now() + 1_000;
    while (Date.now() < until) {
      r = await c.heartbeatFlowRun(run.id);
      expect(r.state).toBe('Running');
      await sleep(100);
    }
    // The process "dies" (kill -9): heartbeats stop.
    const back = await waitFor('rescheduled', async () => {
      const x = await c.getFlowRun(run.id);
      return x.state === 'Scheduled' ? x : undefined;
    });
    expect(back).toMatchObject({ restarts: 1, agentId: null, endedAt: null, message: expect.stringMatching(/heartbeat lost .*rescheduled by lazarus \(restart 1 of 1\)/) });
    const tasks = await c.getTaskRuns(run.id);
    expect(tasks.map((t) => [t.key, t.state, t.version])).toEqual([
      ['extract', 'Success', 1],
      ['load', 'Failed', 2],
    ]);
    expect(tasks[1]!.message).toMatch(/flow-run process was lost/);
    // Its task slot went back.
    expect(await c.acquireTaskSlots(run.id, 'other', ['db'])).toBe(true);
    await c.releaseTaskSlots(run.id, 'other');

    // The second process starts from those task runs; it dies too: no restarts left.
    const [again] = await c.claimFlowRuns({ agentId: agent.id, labels: [], before: Date.now(), limit: 1 });
    expect(again!.run.id).toBe(run.id);
    await c.setFlowRunState(run.id, 'Running', { expectVersion: again!.run.stateVersion });
    expect((await c.setTaskRunStates(run.id, 'proc-2', [{ key: 'load', mapIndex: -1, state: 'Running', expectVersion: 2 }]))[0]!.ok).toBe(true);
    const failed = await waitFor('failed', async () => {
      const x = await c.getFlowRun(run.id);
      return x.state === 'Failed' ? x : undefined;
    });
    expect(failed.message).toMatch(/heartbeat lost .* after 1 restart: marked Failed by the zombie killer/);
    expect(failed.endedAt).not.toBeNull();
    expect((await c.getTaskRuns(run.id)).map((t) => [t.key, t.state])).toEqual([
      ['extract', 'Success'],
      ['load', 'Failed'],
    ]);
  });

  it('zombie killer: a Cancelling run whose process is gone ends Cancelled', async () => {
    const { c } = await serve({ services: true, schedulerIntervalMs: 60_000, reaperIntervalMs: 40, zombieTimeoutMs: 300, maxRestarts: 3 });
    const { flow } = await c.registerFlow(flowInput());
    const run = await c.createFlowRun({ flowId: flow.id });
    await c.setFlowRunState(run.id, 'Running');
    await c.cancelFlowRun(run.id);
    const done = await waitFor('cancelled', async () => {
      const x = await c.getFlowRun(run.id);
      return x.state === 'Cancelled' ? x : undefined;
    });
    expect(done.restarts).toBe(0);
    expect(done.message).toMatch(/while cancelling/);
  });

  it('registering a name again answers the same record, with its kind and labels updated and seen now', async () => {
    let clock = 1_000_000;
    const { c } = await serve({ now: () => clock });
    const first = await c.registerAgent({ name: 'builder', kind: 'local', labels: ['b', 'a', 'b'] });
    expect(first).toEqual({ id: first.id, name: 'builder', kind: 'local', labels: ['a', 'b'], lastSeen: 1_000_000, status: 'healthy' });
    const other = await c.registerAgent({ name: 'other', kind: 'local', labels: [] });
    expect(other.id).not.toBe(first.id);

    clock += 5_000;
    const again = await c.registerAgent({ name: 'builder', kind: 'docker', labels: ['gpu'] });
    expect(again).toEqual({ id: first.id, name: 'builder', kind: 'docker', labels: ['gpu'], lastSeen: 1_005_000, status: 'healthy' });
    // Concurrent registrations of one name (two starts racing) still make one record.
    const raced = await Promise.all([0, 1, 2, 3].map(() => c.registerAgent({ name: 'racer', kind: 'local', labels: [] })));
    expect(new Set(raced.map((a) => a.id)).size).toBe(1);

    const listed = await c.listAgents();
    expect(listed.map((a) => a.name).sort()).toEqual(['builder', 'other', 'racer']);
    expect(listed.find((a) => a.name === 'builder')).toEqual(again);
  });

  it('an agent not seen within the timeout is unhealthy; a claim (every poll) is its heartbeat', async () => {
    let clock = 2_000_000;
    const { c } = await serve({ now: () => clock, agentTimeoutMs: 30_000 });
    const agent = await c.registerAgent({ name: 'poller', kind: 'local', labels: [] });
    const idle = await c.registerAgent({ name: 'idle', kind: 'local', labels: [] });
    const status = async (): Promise<Record<string, string>> => Object.fromEntries((await c.listAgents()).map((a) => [a.name, `${a.status}@${a.lastSeen}`]));

    clock += 30_000;
    expect(await status()).toEqual({ poller: 'healthy@2000000', idle: 'healthy@2000000' });
    clock += 1;
    expect(await status()).toEqual({ poller: 'unhealthy@2000000', idle: 'unhealthy@2000000' });
    // A claim that takes nothing (an agent at capacity polls with before: 0) still counts.
    expect(await c.claimFlowRuns({ agentId: agent.id, labels: [], before: 0, limit: 1 })).toEqual([]);
    expect(await status()).toEqual({ poller: 'healthy@2030001', idle: 'unhealthy@2000000' });
    // Most recently seen first.
    expect((await c.listAgents()).map((a) => a.id)).toEqual([agent.id, idle.id]);
  });

  it('the migration keeps one record per name: the most recently seen', async () => {
    const url = await freshDb();
    const db = await openDb(url);
    try {
      await migrate(db, MIGRATIONS.filter((m) => m.version === 1));
      const rows: [string, string, number][] = [
        ['old-1', 'restarted', 100],
        ['new-1', 'restarted', 300],
        ['mid-1', 'restarted', 200],
        ['only', 'single', 50],
      ];
      for (const [id, name, seen] of rows) {
        await db.run("INSERT INTO agents (id, name, kind, labels, created_at, last_seen) VALUES ($1, $2, 'local', '[]', $3, $3)", [id, name, seen]);
      }
      expect(await migrate(db)).toContain(2);
      expect((await db.all('SELECT id FROM agents ORDER BY id')).map((r) => r.id)).toEqual(['new-1', 'only']);
    } finally {
      await db.close();
    }
    const { c } = await serve({ db: url });
    expect((await c.registerAgent({ name: 'restarted', kind: 'local', labels: [] })).id).toBe('new-1');
  });
});
