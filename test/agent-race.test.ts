/**
 * Two agents racing over the same runs, against a real server (HTTP, temp SQLite file):
 * every run starts exactly once.
 *
 * - 200 runs (a quarter of them due a little later, so the prefetch-and-timer path
 *   races too) taken by two agents whose deploy only counts and then moves the run
 *   Running → Success. Spawning 200 flow-run processes on a 2-core machine takes
 *   minutes (~0.5 s of CPU each: Node, the TypeScript loader, the flow's import), so
 *   the full count uses this in-process deploy;
 * - 24 runs taken by two real LocalAgents: each one is a real `weft execute flow-run`
 *   process, counted by PID, and each run has exactly one Running in its history.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Agent } from '../src/agent/agent.ts';
import { LocalAgent } from '../src/agent/local.ts';
import { BackendClient } from '../src/server/client.ts';
import { startServer, type RunningServer } from '../src/server/index.ts';
import type { Backend, ClaimedRun, FlowRun } from '../src/server/model.ts';
import { HOST_LABEL, killQuietly, registerFixture, waitFor } from './fixtures/deploy/harness.ts';

let srv: RunningServer;
let api: BackendClient;
let dir: string;
const pids = new Set<number>();

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'weft-agent-race-'));
  srv = await startServer({ db: `sqlite:${join(dir, 'server.db')}`, port: 0, host: '127.0.0.1', services: false });
  api = new BackendClient(srv.url);
  await registerFixture(api, 'trivial.ts', 'deploy-trivial');
});

afterAll(async () => {
  for (const pid of pids) killQuietly(pid);
  await srv?.close();
  rmSync(dir, { recursive: true, force: true });
});

/** Deploy = count the start, then run it "instantly" (Running → Success, version-checked). */
class CountingAgent extends Agent {
  readonly kind = 'local' as const;
  constructor(
    backend: Backend,
    name: string,
    private readonly starts: Map<string, string[]>,
  ) {
    super({ backend, name, labels: [HOST_LABEL], claimLimit: 5, pollMinMs: 20, pollMaxMs: 200 });
  }

  protected override async deploy(c: ClaimedRun): Promise<void> {
    const seen = this.starts.get(c.run.id) ?? [];
    seen.push(this.name);
    this.starts.set(c.run.id, seen);
    const running = await this.backend.setFlowRunState(c.run.id, 'Running', { expectVersion: c.run.stateVersion });
    await this.backend.setFlowRunState(c.run.id, 'Success', { expectVersion: running.stateVersion });
  }
}

async function createRuns(n: number, laterShare: number): Promise<FlowRun[]> {
  const now = Date.now();
  const out: FlowRun[] = [];
  for (let i = 0; i < n; i += 25) {
    const batch = await Promise.all(
      Array.from({ length: Math.min(25, n - i) }, (_, j) => {
        const k = i + j;
        const later = k % Math.round(1 / laterShare) === 0;
        return api.createFlowRun({ project: 'tests', flowName: 'deploy-trivial', parameters: { i: k }, ...(later ? { scheduledStart: now + 500 + (k % 7) * 300 } : {}) });
      }),
    );
    out.push(...batch);
  }
  return out;
}

async function onlyOneRunning(runs: readonly FlowRun[]): Promise<void> {
  for (const r of runs) {
    const states = (await api.getFlowRunHistory(r.id)).map((h) => h.state);
    expect(states.filter((s) => s === 'Running'), `run ${r.id}: ${states.join(' → ')}`).toHaveLength(1);
    expect(states.filter((s) => s === 'Submitted')).toHaveLength(1);
    expect(states.at(-1)).toBe('Success');
  }
}

describe('two agents racing', () => {
  it('over 200 runs: each run starts exactly once', async () => {
    const runs = await createRuns(200, 0.25);
    const starts = new Map<string, string[]>();
    const a = new CountingAgent(new BackendClient(srv.url), 'racer-a', starts);
    const b = new CountingAgent(new BackendClient(srv.url), 'racer-b', starts);
    await Promise.all([a.start(), b.start()]);
    try {
      await waitFor('200 starts', () => starts.size === 200 && a.healthReport().activeRuns + b.healthReport().activeRuns === 0, 60_000);
    } finally {
      await Promise.all([a.stop(), b.stop()]);
    }
    expect([...starts.values()].filter((who) => who.length !== 1)).toEqual([]);
    expect(a.runsStarted + b.runsStarted).toBe(200);
    // Both took part (the claims interleave through the server's transactions).
    expect(a.runsStarted).toBeGreaterThan(0);
    expect(b.runsStarted).toBeGreaterThan(0);
    await onlyOneRunning(runs);
  });

  it('with real flow-run processes: each run is one process, started once', async () => {
    const runs = await createRuns(24, 0.25);
    const mk = (name: string): LocalAgent =>
      new LocalAgent({ backend: new BackendClient(srv.url), serverUrl: srv.url, name, cwd: dir, claimLimit: 4, pollMinMs: 20, pollMaxMs: 200 });
    const a = mk('proc-a');
    const b = mk('proc-b');
    const byPid = new Map<number, string>();
    const watch = setInterval(() => {
      for (const ag of [a, b]) for (const [pid, id] of ag.processes) byPid.set(pid, id);
      for (const pid of byPid.keys()) pids.add(pid);
    }, 5);
    await Promise.all([a.start(), b.start()]);
    try {
      await waitFor(
        'every run to finish',
        async () => {
          const all = await api.listFlowRuns({ states: ['Success', 'Failed', 'Cancelled'], limit: 1000 });
          return runs.every((r) => all.some((x) => x.id === r.id));
        },
        120_000,
        200,
      );
    } finally {
      await Promise.all([a.stop({ stopRuns: true }), b.stop({ stopRuns: true })]);
      clearInterval(watch);
    }
    expect(a.runsStarted + b.runsStarted).toBe(24);
    // One process per run (PIDs seen while they ran; a process may end between two looks, so at most).
    const perRun = new Map<string, number>();
    for (const id of byPid.values()) perRun.set(id, (perRun.get(id) ?? 0) + 1);
    expect([...perRun.values()].every((n) => n === 1)).toBe(true);
    expect(perRun.size).toBeGreaterThanOrEqual(20);
    // And the server's view: one process wrote each run's task runs.
    for (const r of runs) {
      const writers = new Set((await api.getTaskRuns(r.id)).map((t) => t.processId));
      expect(writers.size).toBe(1);
    }
    await onlyOneRunning(runs);
  }, 150_000);
});
