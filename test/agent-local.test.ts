/**
 * LocalAgent end to end: a real server (startServer, temp SQLite file, 127.0.0.1, port
 * 0), the agent in this process, and real `weft execute flow-run` child processes that
 * it starts. Children are stopped by PID in teardown.
 *
 * Covered: a registered flow (LocalStorage ref to a fixture file) runs to Success with
 * task runs and logs on the server; parameters reach it; a failing flow ends Failed
 * with the error in its logs; deploy errors (a missing flow file, a missing working
 * directory) fail the run and the agent starts the next one; kill -9 of a flow-run
 * process: the zombie killer reschedules the run, the agent starts it again and the
 * checkpointed task is not recomputed; cancel stops the process within 2 s; a second
 * `weft execute flow-run` of a Running run runs nothing; `weft agent local` as a
 * command.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalAgent, WEFT_BIN } from '../src/agent/local.ts';
import { BackendClient } from '../src/server/client.ts';
import { startServer, type RunningServer } from '../src/server/index.ts';
import type { FlowRun } from '../src/server/model.ts';
import { alive, finishedRun, killQuietly, LOCAL_AGENT_SERVER, registerFixture, waitFor } from './fixtures/deploy/harness.ts';

let srv: RunningServer;
let api: BackendClient;
let dir: string;
let agent: LocalAgent;
const spawned = new Set<number>();
const agentLines: string[] = [];


beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'weft-agent-local-'));
  srv = await startServer({ db: `sqlite:${join(dir, 'server.db')}`, port: 0, host: '127.0.0.1', ...LOCAL_AGENT_SERVER });
  api = new BackendClient(srv.url);
  await registerFixture(api, 'ok.ts', 'deploy-ok');
  await registerFixture(api, 'fail.ts', 'deploy-fail');
  await registerFixture(api, 'slow.ts', 'deploy-slow');
  await registerFixture(api, 'restart.ts', 'deploy-restart');
  await registerFixture(api, 'ok.ts', 'deploy-ok', { name: 'missing-file', path: join(dir, 'gone', 'flow.ts') });
  await registerFixture(api, 'ok.ts', 'deploy-ok', { name: 'bad-cwd', runConfig: { kind: 'local', workingDir: join(dir, 'no-such-dir') } });
  agent = new LocalAgent({
    backend: new BackendClient(srv.url),
    serverUrl: srv.url,
    cwd: dir,
    resultDir: join(dir, 'results'),
    runHeartbeatMs: 200,
    pollMinMs: 50,
    pollMaxMs: 500,
    log: (l) => agentLines.push(l),
  });
  await agent.start();
  track();
});

afterAll(async () => {
  await agent?.stop({ stopRuns: true });
  for (const pid of spawned) killQuietly(pid);
  await srv?.close();
  rmSync(dir, { recursive: true, force: true });
});

/** Remember every child PID the agent has (for teardown). */
function track(): void {
  const t = setInterval(() => {
    for (const pid of agent.processes.keys()) spawned.add(pid);
  }, 20);
  t.unref();
}

const finished = (id: string, timeoutMs?: number): Promise<FlowRun> => finishedRun(api, id, timeoutMs);

const create = (flowName: string, parameters: Record<string, unknown> = {}) => api.createFlowRun({ project: 'tests', flowName, parameters });

describe('LocalAgent', () => {
  it('starts a registered flow: Success, task runs, logs, parameters', async () => {
    const run = await create('deploy-ok', { n: 20 });
    const done = await finished(run.id);
    expect(done.state).toBe('Success');
    expect(done.agentId).toBe(agent.id);
    const tasks = new Map((await api.getTaskRuns(run.id)).map((t) => [t.key, t]));
    expect(tasks.get('double')?.state).toBe('Success');
    expect(tasks.get('add')?.state).toBe('Success');
    const logs = await waitFor('the forwarded output', async () => {
      const l = await api.getLogs(run.id);
      return l.some((e) => e.message === 'double got n=20') ? l : undefined;
    });
    // The task's console line, forwarded by the agent from the child's stdout: once.
    expect(logs.filter((e) => e.message === 'double got n=20')).toHaveLength(1);
    expect(logs.some((e) => /running flow deploy-ok/.test(e.message))).toBe(true);
    const history = (await api.getFlowRunHistory(run.id)).map((h) => h.state);
    expect(history).toEqual(['Scheduled', 'Submitted', 'Running', 'Success']);
  });

  it('a failing flow ends Failed with the error in its logs', async () => {
    const run = await create('deploy-fail');
    const done = await finished(run.id);
    expect(done.state).toBe('Failed');
    const logs = await api.getLogs(run.id);
    const err = logs.find((l) => l.source === 'task' && l.taskKey === 'explode');
    expect(err?.message).toMatch(/Error: boom: deliberate failure after 1/);
    expect((await api.getTaskRuns(run.id)).find((t) => t.key === 'explode')?.message).toMatch(/boom/);
  });

  it('deploy errors fail the run with the cause in its logs, and the agent starts the next run', async () => {
    const missing = await create('missing-file');
    const badCwd = await create('bad-cwd');
    const next = await create('deploy-ok', { n: 1 });
    const m = await finished(missing.id);
    expect(m.state).toBe('Failed');
    expect(m.message).toMatch(/cannot load the flow: .*flow\.ts does not exist/);
    expect((await api.getLogs(missing.id)).some((l) => l.level === 'error' && /flow\.ts does not exist/.test(l.message))).toBe(true);
    const c = await finished(badCwd.id);
    expect(c.state).toBe('Failed');
    expect(c.message).toMatch(/could not start the run: working directory .*no-such-dir does not exist/);
    expect((await api.getLogs(badCwd.id))).toEqual([expect.objectContaining({ source: 'agent', level: 'error' })]);
    expect((await finished(next.id)).state).toBe('Success');
  });

  it('kill -9 mid-run: the zombie killer reschedules it, the agent starts it again, checkpointed results are reused', async () => {
    const counter = join(dir, 'kill.counter');
    const marker = join(dir, 'kill.marker');
    const run = await create('deploy-restart', { counter, marker });
    await waitFor('b to start', () => existsSync(marker) && readFileSync(marker, 'utf8') !== '');
    await waitFor('a Success on the server', async () => (await api.getTaskRuns(run.id)).some((t) => t.key === 'a' && t.state === 'Success'));
    const pid = Number(readFileSync(marker, 'utf8'));
    expect(agent.processes.get(pid)).toBe(run.id);
    process.kill(pid, 'SIGKILL');
    const done = await finished(run.id, 40_000);
    expect(done.state).toBe('Success');
    expect(done.restarts).toBe(1);
    expect(readFileSync(counter, 'utf8')).toBe('a ran\n');
    const tasks = new Map((await api.getTaskRuns(run.id)).map((t) => [t.key, t]));
    expect(tasks.get('a')?.state).toBe('Cached');
    expect(tasks.get('b')?.state).toBe('Success');
    const history = (await api.getFlowRunHistory(run.id)).map((h) => h.state);
    expect(history).toEqual(['Scheduled', 'Submitted', 'Running', 'Scheduled', 'Submitted', 'Running', 'Success']);
    const logs = await api.getLogs(run.id);
    expect(logs.some((l) => l.source === 'agent' && /was killed by SIGKILL/.test(l.message))).toBe(true);
    expect(logs.some((l) => /restart 1: \d+ of \d+ task runs ended well before/.test(l.message))).toBe(true);
  });

  it('cancel while running: the process stops within 2 s and the run ends Cancelled', async () => {
    const marker = join(dir, 'cancel.marker');
    const run = await create('deploy-slow', { marker });
    await waitFor('the task to start', () => existsSync(marker) && readFileSync(marker, 'utf8') !== '');
    const pid = Number(readFileSync(marker, 'utf8'));
    expect(alive(pid)).toBe(true);
    const t0 = Date.now();
    await api.cancelFlowRun(run.id);
    await waitFor('the process to exit', () => !alive(pid), 5_000, 20);
    const took = Date.now() - t0;
    expect(took).toBeLessThan(2_000);
    const done = await finished(run.id);
    expect(done.state).toBe('Cancelled');
    expect((await api.getTaskRuns(run.id)).find((t) => t.key === 'wait')?.state).toBe('Cancelled');
  });

  it('a second weft execute flow-run of a Running run exits 0 without running a task', async () => {
    const marker = join(dir, 'second.marker');
    const run = await create('deploy-slow', { marker, ms: 3_000 });
    await waitFor('the task to start', () => existsSync(marker) && readFileSync(marker, 'utf8') !== '');
    const before = await waitFor('its Running task state', async () => {
      const t = await api.getTaskRuns(run.id);
      return t.some((x) => x.key === 'wait' && x.state === 'Running') ? t : undefined;
    });
    const second = await execute(['execute', 'flow-run', run.id, '--server', srv.url]);
    expect(second.code).toBe(0);
    expect(second.stderr).toMatch(/it is Running: nothing to run here/);
    expect(existsSync(join(dir, 'second.marker'))).toBe(true);
    const during = await api.getTaskRuns(run.id);
    expect(during.map((t) => t.processId)).toEqual(before.map((t) => t.processId));
    expect((await finished(run.id)).state).toBe('Success');
  });
});

describe('weft agent local (the command)', () => {
  it('polls, starts runs, serves /health and exits on SIGTERM', async () => {
    await agent.stop({ stopRuns: true });
    const child = spawn(process.execPath, [WEFT_BIN, 'agent', 'local', '--server', srv.url, '--health-port', '0', '--name', 'cmd-agent', '--label', 'extra'], {
      cwd: dir,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    spawned.add(child.pid!);
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    const first = await waitFor('the first line', () => (out.includes('\n') ? out.split('\n')[0] : undefined), 20_000);
    expect(first).toMatch(/^weft agent cmd-agent \(local\) polling http:\/\/127\.0\.0\.1:\d+ with labels \[extra, host:[^\]]+\] health http:\/\/127\.0\.0\.1:\d+\/health$/);
    const health = /health (\S+)$/.exec(first)![1]!;
    // Its labels include `extra`; the flow's runs need only the host label.
    const run = await create('deploy-ok', { n: 3 });
    expect((await finished(run.id)).state).toBe('Success');
    const h = (await (await fetch(health)).json()) as { runsStarted: number; agent: { id: string; name: string } };
    expect(h.agent.name).toBe('cmd-agent');
    expect(h.runsStarted).toBeGreaterThanOrEqual(1);
    expect((await api.getFlowRun(run.id)).agentId).toBe(h.agent.id);
    child.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(err).toMatch(/started run/);
  });
});

describe('an agent that dies', () => {
  it('leaves its flow-run processes running: they finish their runs on their own', async () => {
    const child = spawn(process.execPath, [WEFT_BIN, 'agent', 'local', '--server', srv.url, '--name', 'doomed-agent', '--run-heartbeat-ms', '200'], {
      cwd: dir,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    spawned.add(child.pid!);
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.resume();
    const exited = new Promise<void>((r) => child.once('exit', () => r()));
    await waitFor('the agent to poll', () => out.includes('polling'), 20_000);
    const marker = join(dir, 'orphan.marker');
    const run = await create('deploy-slow', { marker, ms: 1_500 });
    await waitFor('the task to start', () => existsSync(marker) && readFileSync(marker, 'utf8') !== '');
    const pid = Number(readFileSync(marker, 'utf8'));
    spawned.add(pid);
    child.kill('SIGKILL');
    await exited;
    const done = await finished(run.id);
    expect(done.state).toBe('Success');
    expect(done.restarts).toBe(0);
    await waitFor('the orphan to exit', () => !alive(pid), 5_000);
  });
});

/** `weft <args>` as a child process. */
function execute(args: readonly string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [WEFT_BIN, ...args], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    spawned.add(child.pid!);
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.once('close', (code) => resolve({ code, stdout, stderr }));
  });
}
