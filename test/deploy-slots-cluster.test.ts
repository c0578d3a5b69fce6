/**
 * The server's task tag concurrency limits under a cluster executor: a real weft server
 * (startServer, temp SQLite file, 127.0.0.1 port 0), the flow-run process (in this
 * process, over HTTP) with the version's executor `cluster, 2 workers` (a temporary
 * LocalCluster of worker processes). With a limit on a tag of the flow's tasks the run
 * goes in call mode behind the SlotGate and the tagged tasks never overlap; without one
 * it stays in graph mode. Every cluster process started is stopped by PID afterwards.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { alive } from './helpers/cluster-procs.ts';
import { LocalCluster } from '../src/cluster/local-cluster.ts';
import { executeFlowRun } from '../src/deploy/flow-run.ts';
import { BackendClient } from '../src/server/client.ts';
import { startServer, type RunningServer } from '../src/server/index.ts';
import { waitFor } from './fixtures/deploy/harness.ts';

const FLOW_FILE = fileURLToPath(new URL('./fixtures/deploy-slots-cluster-flow.ts', import.meta.url));
/** `a` checkpoints (default location) and counts its runs; `b` waits a minute on its first run. */
const RESTART_FLOW_FILE = fileURLToPath(new URL('./fixtures/deploy/restart.ts', import.meta.url));
const TAG = 'slots-db';

let tmp: string;
let server: RunningServer;
let backend: BackendClient;
/** Every temporary cluster the flow-run process started, with the PIDs it had. */
const clusters: { cluster: LocalCluster; pids: number[] }[] = [];

beforeAll(async () => {
  tmp = mkdtempSync(join(tmpdir(), 'weft-slots-cluster-'));
  server = await startServer({ db: `sqlite:${join(tmp, 'server.db')}`, host: '127.0.0.1', port: 0, services: false });
  backend = new BackendClient(server.url);
  const start = LocalCluster.start.bind(LocalCluster);
  vi.spyOn(LocalCluster, 'start').mockImplementation(async (o) => {
    const c = await start(o);
    clusters.push({ cluster: c, pids: [c.schedulerPid, ...c.workerPids] });
    return c;
  });
  await backend.registerFlow({
    project: 'tests',
    name: 'deploy-slots-cluster',
    graph: { fixture: 'deploy-slots-cluster-flow.ts' },
    storage: { kind: 'local', path: FLOW_FILE, host: hostname(), flow: 'deploy-slots-cluster' },
    runConfig: { kind: 'local' },
    executor: { kind: 'cluster', workers: 2 },
    parameters: [{ name: 'log', required: true }],
    labels: [],
  });
  await backend.registerFlow({
    project: 'tests',
    name: 'deploy-restart-cluster',
    graph: { fixture: 'deploy/restart.ts' },
    storage: { kind: 'local', path: RESTART_FLOW_FILE, host: hostname(), flow: 'deploy-restart' },
    runConfig: { kind: 'local' },
    executor: { kind: 'cluster', workers: 2 },
    parameters: [
      { name: 'counter', required: true },
      { name: 'marker', required: true },
    ],
    labels: [],
  });
}, 60_000);

afterAll(async () => {
  vi.restoreAllMocks();
  for (const { cluster, pids } of clusters) {
    await cluster.close();
    for (const pid of pids) if (alive(pid)) process.kill(pid, 'SIGKILL'); // close() waits for exits: a safety net
  }
  await server?.close();
  rmSync(tmp, { recursive: true, force: true });
}, 60_000);

/** Run the flow once through the flow-run process; its logs and the task log's lines. */
async function runOnce(name: string): Promise<{ code: number; state: string | null; logs: string[]; lines: string[][]; id: string }> {
  const log = join(tmp, `${name}.log`);
  const run = await backend.createFlowRun({ project: 'tests', flowName: 'deploy-slots-cluster', parameters: { log } });
  await backend.setFlowRunState(run.id, 'Submitted', { expectVersion: run.stateVersion });
  const r = await executeFlowRun({
    backend,
    flowRunId: run.id,
    cwd: tmp,
    resultDir: join(tmp, 'results'),
    captureConsole: false,
    heartbeatMs: 500,
    stateIntervalMs: 50,
    print: () => undefined,
  });
  const logs = (await backend.getLogs(run.id)).map((l) => l.message);
  const lines = existsSync(log) ? readFileSync(log, 'utf8').trim().split('\n').map((l) => l.split(' ')) : [];
  return { code: r.code, state: r.state, logs, lines, id: run.id };
}

/** The most tagged tasks running at once, in the order their lines were appended. */
function maxOverlap(lines: string[][]): number {
  let open = 0;
  let max = 0;
  for (const [what] of lines) {
    if (what === 'start') open++;
    else if (what === 'end') open--;
    max = Math.max(max, open);
  }
  return max;
}

describe('task tag limits with a cluster executor', () => {
  it('a limit on a tag of the flow: call mode behind the gate, tagged tasks one at a time, untagged ones run', async () => {
    await backend.setConcurrencyLimit('tag', TAG, 1);
    try {
      await limitedRun();
    } finally {
      await backend.setConcurrencyLimit('tag', TAG, null);
    }
  }, 90_000);

  async function limitedRun(): Promise<void> {
    const r = await runOnce('limited');
    expect(r).toMatchObject({ code: 0, state: 'Success' });
    expect(r.logs.some((m) => /cluster executor in call mode .*limits the task tag\(s\) slots-db/.test(m))).toBe(true);
    expect(r.logs.some((m) => /graph mode/.test(m))).toBe(false);
    const starts = r.lines.filter(([w]) => w === 'start');
    const ends = r.lines.filter(([w]) => w === 'end');
    expect(starts.map((l) => l[1]).sort()).toEqual(['0', '1', '2', '3']);
    expect(ends).toHaveLength(4);
    expect(maxOverlap(r.lines)).toBe(1);
    // By the clocks too: each tagged task starts after the one before it ended.
    const spans = [0, 1, 2, 3].map((i) => {
      const s = Number(starts.find((l) => l[1] === String(i))![3]);
      const e = Number(ends.find((l) => l[1] === String(i))![3]);
      return [s, e] as const;
    });
    spans.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < spans.length; i++) expect(spans[i]![0]).toBeGreaterThanOrEqual(spans[i - 1]![1]);
    // They ran on the cluster's workers, not here; the untagged tasks ran as well.
    const pids = new Set(r.lines.map((l) => Number(l[2])));
    expect(pids.has(process.pid)).toBe(false);
    expect(r.lines.filter(([w]) => w === 'plain').map((l) => l[1]).sort()).toEqual(['1', '2']);
    const tasks = await backend.getTaskRuns(r.id);
    expect(tasks.filter((t) => t.state === 'Success').map((t) => t.key).sort()).toEqual(['log', 'plain', 'plain-2', 'query', 'query-2', 'query-3', 'query-4', 'total']);
    // Every slot was given back.
    const limits = await server.store.listConcurrencyLimits();
    expect(limits.find((l) => l.name === TAG)).toMatchObject({ limit: 1, used: 0 });
  }

  it('no limit on any of its tags: graph mode (the whole graph on the scheduler), tagged tasks side by side', async () => {
    const r = await runOnce('free');
    expect(r).toMatchObject({ code: 0, state: 'Success' });
    expect(r.logs.some((m) => /cluster executor in graph mode .*: the server limits none of the task tags/.test(m))).toBe(true);
    expect(r.logs.some((m) => /call mode/.test(m))).toBe(false);
    expect(r.lines.filter(([w]) => w === 'end')).toHaveLength(4);
    // Two workers and nothing holding them back.
    expect(maxOverlap(r.lines)).toBe(2);
  }, 90_000);
});

describe('a rerun of a server run on a cluster executor', () => {
  it('restarts from checkpoints in call mode (a scheduler-side run cannot restart)', async () => {
    const counter = join(tmp, 'restart.counter');
    const marker = join(tmp, 'restart.marker');
    const run = await backend.createFlowRun({ project: 'tests', flowName: 'deploy-restart-cluster', parameters: { counter, marker } });
    await backend.setFlowRunState(run.id, 'Submitted', { expectVersion: run.stateVersion });
    const opts = {
      backend,
      flowRunId: run.id,
      cwd: tmp,
      resultDir: join(tmp, 'results'),
      captureConsole: false,
      heartbeatMs: 200,
      stateIntervalMs: 50,
      stopGraceMs: 500,
      print: () => undefined,
    };
    // First attempt, in graph mode: `a` runs and checkpoints, `b` waits; then lazarus's move takes the run away.
    const first = executeFlowRun(opts);
    await waitFor('b to start', () => existsSync(marker));
    await waitFor('a Success on the server', async () => (await backend.getTaskRuns(run.id)).some((x) => x.key === 'a' && x.state === 'Success'));
    const back = await backend.setFlowRunState(run.id, 'Scheduled', { message: 'rescheduled by a test' });
    expect((await first).state).toBeNull();
    await backend.setFlowRunState(run.id, 'Submitted', { expectVersion: back.stateVersion });
    const second = await executeFlowRun(opts);
    expect(second).toMatchObject({ code: 0, state: 'Success' });
    expect(readFileSync(counter, 'utf8')).toBe('a ran\n');
    const tasks = new Map((await backend.getTaskRuns(run.id)).map((x) => [x.key, x]));
    expect(tasks.get('a')?.state).toBe('Cached');
    expect(tasks.get('b')?.state).toBe('Success');
    const logs = (await backend.getLogs(run.id)).map((l) => l.message);
    expect(logs.some((m) => /cluster executor in graph mode .*no task has tags/.test(m))).toBe(true);
    expect(logs.some((m) => /cluster executor in call mode .*the run restarts from checkpoints/.test(m))).toBe(true);
  }, 90_000);
});
