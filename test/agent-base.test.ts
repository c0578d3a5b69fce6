/**
 * The agent base (src/agent/agent.ts) with an in-process deploy, against a Store on a
 * temp SQLite file: claims by labels and kind, the poll backoff, runs due later started
 * at their time, deploy errors, release on stop, one record across restarts, `maxRuns`,
 * the health endpoint.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent, type AgentOptions } from '../src/agent/agent.ts';
import { LogBatcher } from '../src/agent/logs.ts';
import { BackendError, type Backend, type ClaimedRun, type ClaimInput, type LogEntry } from '../src/server/model.ts';
import type { Store } from '../src/server/store.ts';
import { HOST_LABEL, registerFixture, tempStore, waitFor, type TempStore } from './fixtures/deploy/harness.ts';

let t: TempStore;
let store: Store;

beforeAll(async () => {
  t = await tempStore();
  store = t.store;
  await registerFixture(store, 'trivial.ts', 'deploy-trivial');
  await registerFixture(store, 'trivial.ts', 'deploy-trivial', { name: 'docker-only', runConfig: { kind: 'docker' } });
  await registerFixture(store, 'trivial.ts', 'deploy-trivial', { name: 'gpu-only', labels: ['gpu'] });
});

afterAll(async () => {
  await t.close();
});

/** An agent whose deploy only records the run (and may throw). */
class TestAgent extends Agent {
  readonly kind = 'local' as const;
  readonly started: { id: string; at: number }[] = [];
  failNext: string | null = null;
  hold: Promise<void> | null = null;

  constructor(opts: Partial<AgentOptions> & { backend: Backend }) {
    super({ labels: [HOST_LABEL], pollMinMs: 20, pollMaxMs: 200, ...opts });
  }

  protected override async deploy(c: ClaimedRun): Promise<void> {
    if (this.failNext !== null) {
      const msg = this.failNext;
      this.failNext = null;
      throw new Error(msg);
    }
    this.started.push({ id: c.run.id, at: Date.now() });
    if (this.hold !== null) await this.hold;
  }
}

const create = (flowName: string, extra: { scheduledStart?: number; parameters?: Record<string, unknown> } = {}) =>
  store.createFlowRun({ project: 'tests', flowName, ...extra });

describe('Agent', () => {
  it('claims due runs whose labels it holds, once each, and reports health', async () => {
    const runs = await Promise.all([0, 1, 2, 3, 4].map((i) => create('deploy-trivial', { parameters: { i } })));
    const gpu = await create('gpu-only');
    const agent = new TestAgent({ backend: store, healthPort: 0 });
    await agent.start();
    try {
      await waitFor('five starts', () => agent.started.length >= 5);
      expect(new Set(agent.started.map((s) => s.id))).toEqual(new Set(runs.map((r) => r.id)));
      for (const r of runs) expect((await store.getFlowRun(r.id)).agentId).toBe(agent.id);
      // Not its labels: left for another agent.
      expect((await store.getFlowRun(gpu.id)).state).toBe('Scheduled');
      const health = (await (await fetch(agent.healthUrl!)).json()) as Record<string, unknown>;
      expect(health).toMatchObject({ runsStarted: 5, agent: { id: agent.id, kind: 'local', labels: [HOST_LABEL] } });
      expect(typeof health.lastPoll).toBe('number');
      expect((await fetch(agent.healthUrl!.replace('/health', '/other'))).status).toBe(404);
    } finally {
      await agent.stop();
      await store.cancelFlowRun(gpu.id);
    }
    expect(agent.healthUrl).toBeNull();
  });

  it('backs off 0.25 s doubling to 10 s while idle, and polls again at once after finding work', async () => {
    const calls: number[] = [];
    const spy = Object.create(store) as Store;
    spy.claimFlowRuns = (input: ClaimInput) => {
      calls.push(Date.now());
      return store.claimFlowRuns(input);
    };
    const agent = new TestAgent({ backend: spy, pollMinMs: 40, pollMaxMs: 320 });
    await agent.start();
    try {
      await waitFor('eight polls', () => calls.length >= 8, 10_000, 10);
      const gaps = calls.slice(1, 8).map((c, i) => c - calls[i]!);
      // 0 (first), then 40, 80, 160, 320, 320, ...: doubling, capped.
      expect(gaps[0]).toBeGreaterThanOrEqual(35);
      expect(gaps[1]).toBeGreaterThanOrEqual(75);
      expect(gaps[2]).toBeGreaterThanOrEqual(155);
      expect(gaps[3]).toBeGreaterThanOrEqual(315);
      expect(gaps[4]).toBeLessThan(600);
      const n = calls.length;
      await create('deploy-trivial');
      await waitFor('the start', () => agent.started.length === 1, 5_000, 5);
      // The poll that found work is followed by another at once (not after the backoff).
      await waitFor('the poll after it', () => calls.length >= n + 2, 2_000, 5);
      expect(calls[n + 1]! - calls[n]!).toBeLessThan(150);
    } finally {
      await agent.stop();
    }
  });

  it('starts a run due later at its scheduled time (prefetched)', async () => {
    const when = Date.now() + 1_200;
    const run = await create('deploy-trivial', { scheduledStart: when });
    const agent = new TestAgent({ backend: store });
    await agent.start();
    try {
      await waitFor('the claim', async () => (await store.getFlowRun(run.id)).state === 'Submitted', 5_000);
      expect(agent.started).toHaveLength(0);
      await waitFor('the start', () => agent.started.length === 1, 5_000, 10);
      expect(agent.started[0]!.at).toBeGreaterThanOrEqual(when);
    } finally {
      await agent.stop();
    }
  });

  it('fails a run whose deploy throws, with the cause in its logs, and keeps polling', async () => {
    const agent = new TestAgent({ backend: store });
    agent.failNext = 'no room for it';
    const bad = await create('deploy-trivial');
    await agent.start();
    try {
      await waitFor('the failure', async () => (await store.getFlowRun(bad.id)).state === 'Failed');
      const run = await store.getFlowRun(bad.id);
      expect(run.message).toMatch(/could not start the run: no room for it/);
      const logs = await store.getLogs(bad.id);
      expect(logs).toEqual([expect.objectContaining({ source: 'agent', level: 'error', message: expect.stringMatching(/no room for it/) })]);
      const next = await create('deploy-trivial');
      await waitFor('the next start', () => agent.started.some((s) => s.id === next.id));
      expect(agent.healthReport().runsFailed).toBe(1);
    } finally {
      await agent.stop();
    }
  });

  it('is not handed runs of another run config kind; fails one that reaches it anyway', async () => {
    const docker = await create('docker-only');
    const agent = new TestAgent({ backend: store });
    await agent.start();
    try {
      await waitFor('a few polls', () => agent.healthReport().polls >= 3);
      expect((await store.getFlowRun(docker.id)).state).toBe('Scheduled');
    } finally {
      await agent.stop();
    }
    // A server that does not filter by kind.
    const blind = Object.create(store) as Store;
    blind.claimFlowRuns = (input: ClaimInput) => store.claimFlowRuns({ ...input, kind: undefined } as ClaimInput);
    const agent2 = new TestAgent({ backend: blind });
    await agent2.start();
    try {
      await waitFor('the failure', async () => (await store.getFlowRun(docker.id)).state === 'Failed');
      expect((await store.getFlowRun(docker.id)).message).toMatch(/a local agent cannot start a run whose run config is docker/);
      expect(agent2.started).toHaveLength(0);
    } finally {
      await agent2.stop();
    }
  });

  it('gives runs waiting for their start time back when it stops', async () => {
    const later = await create('deploy-trivial', { scheduledStart: Date.now() + 8_000 });
    const agent = new TestAgent({ backend: store });
    await agent.start();
    await waitFor('the claim', async () => (await store.getFlowRun(later.id)).state === 'Submitted');
    await agent.stop();
    const run = await store.getFlowRun(later.id);
    expect(run.state).toBe('Scheduled');
    expect(run.message).toMatch(/released: the agent stopped before its start time/);
    expect(agent.started).toHaveLength(0);
    await store.cancelFlowRun(later.id);
  });

  it('keeps one record across restarts under its name, labels as they are now, seen at every poll', async () => {
    const first = new TestAgent({ backend: store, name: 'restarting-agent', labels: [HOST_LABEL, 'old'] });
    await first.start();
    await first.stop();
    const second = new TestAgent({ backend: store, name: 'restarting-agent', labels: [HOST_LABEL, 'new'] });
    await second.start();
    try {
      expect(second.id).toBe(first.id);
      const record = async () => (await store.listAgents()).filter((a) => a.name === 'restarting-agent');
      const [before] = await record();
      expect(before).toMatchObject({ id: first.id, kind: 'local', labels: [HOST_LABEL, 'new'].sort(), status: 'healthy' });
      // Its polls (claims) refresh lastSeen.
      await waitFor('a later poll', async () => ((await record())[0]?.lastSeen ?? 0) > before!.lastSeen);
      expect(await record()).toHaveLength(1);
    } finally {
      await second.stop();
    }
  });

  it('claims no more than maxRuns runs at once', async () => {
    let release!: () => void;
    const agent = new TestAgent({ backend: store, maxRuns: 2 });
    agent.hold = new Promise<void>((r) => (release = r));
    const runs = await Promise.all([0, 1, 2, 3].map((i) => create('deploy-trivial', { parameters: { i } })));
    await agent.start();
    try {
      await waitFor('two starts', () => agent.started.length === 2);
      await new Promise((r) => setTimeout(r, 300));
      const states = await Promise.all(runs.map(async (r) => (await store.getFlowRun(r.id)).state));
      expect(states.filter((s) => s === 'Scheduled')).toHaveLength(2);
      release();
      await waitFor('all four', () => agent.started.length === 4);
    } finally {
      release();
      await agent.stop();
    }
  });
});

describe('LogBatcher', () => {
  const entry = (i: number): LogEntry => ({ flowRunId: 'r1', level: 'info', message: `line ${i}`, at: i, source: 'test' });

  it('sends in order, in batches, and keeps what a failed write carried', async () => {
    const sent: LogEntry[][] = [];
    let fail = 1;
    const b = new LogBatcher(
      async (entries) => {
        if (fail-- > 0) throw new Error('server down');
        sent.push([...entries]);
      },
      { intervalMs: 5, maxBatch: 3 },
    );
    for (let i = 0; i < 7; i++) b.push(entry(i));
    await waitFor('all sent', () => sent.flat().length === 7, 2_000, 5);
    expect(sent.flat().map((e) => e.message)).toEqual([0, 1, 2, 3, 4, 5, 6].map((i) => `line ${i}`));
    expect(Math.max(...sent.map((s) => s.length))).toBe(3);
    await b.close();
  });

  it('keeps the newest entries when over its bound and says how many it dropped', async () => {
    let up = false;
    const sent: LogEntry[] = [];
    const b = new LogBatcher(
      async (entries) => {
        if (!up) throw new Error('server down');
        sent.push(...entries);
      },
      { intervalMs: 5, maxBuffered: 4 },
    );
    for (let i = 0; i < 10; i++) b.push(entry(i));
    up = true;
    await b.close();
    expect(sent[0]).toMatchObject({ level: 'warn', message: '6 log lines were dropped: the server did not take them in time' });
    expect(sent.slice(1).map((e) => e.message)).toEqual(['line 6', 'line 7', 'line 8', 'line 9']);
  });

  it('drops a batch the server refuses as malformed instead of retrying it forever', async () => {
    const errors: boolean[] = [];
    const b = new LogBatcher(
      async () => {
        throw new BackendError(400, 'BAD_REQUEST', 'no such run');
      },
      { intervalMs: 5, onError: (_e, dropped) => errors.push(dropped) },
    );
    b.push(entry(1));
    await b.close();
    expect(errors).toEqual([true]);
    expect(b.pending).toBe(0);
  });
});
