/**
 * LocalAgent with standby processes (`standby: 1`): a real server (startServer, temp
 * SQLite file, 127.0.0.1, port 0), the agent in this process, and real
 * `weft execute flow-run --standby` children. Every PID seen is stopped in teardown.
 *
 * Covered: a run goes to the standby that was waiting before it was created and ends
 * Success; the run config's env and working directory are in place before the flow's
 * module loads; the agent starts a replacement; a run whose env sets a start-up-only
 * variable (NODE_OPTIONS) gets a fresh process and leaves the standby waiting; cancel
 * and kill -9 of a run on a former standby; stop() ends every standby; a standby whose
 * stdin closes exits at once; bad standby invocations are usage errors; the deploy
 * bench's `standby` rows.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { benchDeploy, ONE_RUN_ROWS, oneRunName } from '../bench/deploy/harness.ts';
import { LocalAgent, WEFT_BIN } from '../src/agent/local.ts';
import { STANDBY_READY } from '../src/cli/execute.ts';
import { BackendClient } from '../src/server/client.ts';
import { startServer, type RunningServer } from '../src/server/index.ts';
import type { FlowRun } from '../src/server/model.ts';
import type { RunConfig } from '../src/run-config/index.ts';
import { alive, finishedRun, fixture, HOST_LABEL, killQuietly, LOCAL_AGENT_SERVER, registerFixture, waitFor } from './fixtures/deploy/harness.ts';

let srv: RunningServer;
let api: BackendClient;
let dir: string;
let workDir: string;
let agent: LocalAgent;
const seen = new Set<number>();
const agentLines: string[] = [];
let tracker: NodeJS.Timeout | undefined;


async function registerEnvFlow(name: string, runConfig: RunConfig): Promise<void> {
  await api.registerFlow({
    project: 'tests',
    name,
    graph: { fixture: 'env.ts' },
    storage: { kind: 'local', path: fixture('env.ts'), host: hostname(), flow: 'deploy-env' },
    runConfig,
    executor: { kind: 'local' },
    parameters: [],
    labels: [HOST_LABEL],
  });
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'weft-agent-warm-'));
  workDir = join(dir, 'work');
  mkdirSync(workDir);
  srv = await startServer({ db: `sqlite:${join(dir, 'server.db')}`, port: 0, host: '127.0.0.1', ...LOCAL_AGENT_SERVER });
  api = new BackendClient(srv.url);
  await registerFixture(api, 'slow.ts', 'deploy-slow');
  await registerEnvFlow('deploy-env', { kind: 'local', workingDir: workDir, env: { WEFT_TEST_VAR: 'from-run-config' } });
  await registerEnvFlow('deploy-env-node-options', { kind: 'local', env: { WEFT_TEST_VAR: 'fresh', NODE_OPTIONS: '--no-warnings' } });
  agent = new LocalAgent({
    backend: new BackendClient(srv.url),
    serverUrl: srv.url,
    cwd: dir,
    resultDir: join(dir, 'results'),
    runHeartbeatMs: 200,
    pollMinMs: 50,
    pollMaxMs: 500,
    standby: 1,
    log: (l) => agentLines.push(l),
  });
  await agent.start();
  tracker = setInterval(() => {
    for (const pid of agent.processes.keys()) seen.add(pid);
    for (const pid of agent.standbys.keys()) seen.add(pid);
  }, 20);
  tracker.unref();
});

afterAll(async () => {
  clearInterval(tracker);
  await agent?.stop({ stopRuns: true });
  for (const pid of seen) killQuietly(pid);
  await srv?.close();
  rmSync(dir, { recursive: true, force: true });
});

const finished = (id: string, timeoutMs?: number): Promise<FlowRun> => finishedRun(api, id, timeoutMs);

/** The PIDs of the agent's ready standbys, once there is one. */
async function readyStandbys(): Promise<number[]> {
  return waitFor('a ready standby', () => {
    const ready = [...agent.standbys].filter(([, r]) => r).map(([pid]) => pid);
    for (const pid of ready) seen.add(pid);
    return ready.length > 0 ? ready : undefined;
  });
}

const create = (flowName: string, parameters: Record<string, unknown> = {}) => api.createFlowRun({ project: 'tests', flowName, parameters });

async function logLine(id: string, re: RegExp): Promise<RegExpExecArray> {
  return waitFor(`a log line ${re} of run ${id}`, async () => {
    for (const l of await api.getLogs(id)) {
      const m = re.exec(l.message);
      if (m !== null) return m;
    }
    return undefined;
  });
}

describe('LocalAgent with standby processes', () => {
  it('runs a run on the standby that waited before it, with its env and working directory, and starts a replacement', async () => {
    const before = await readyStandbys();
    const run = await create('deploy-env');
    const done = await finished(run.id);
    expect(done.state).toBe('Success');
    const m = await logLine(run.id, /^module pid=(\d+) cwd=(.*) var=(.*)$/);
    expect(before).toContain(Number(m[1]));
    // Set before the flow's module loaded, not only by the time its task ran.
    expect(m[2]).toBe(workDir);
    expect(m[3]).toBe('from-run-config');
    const t = await logLine(run.id, /^task pid=(\d+) cwd=(.*) var=(.*)$/);
    expect([Number(t[1]), t[2], t[3]]).toEqual([Number(m[1]), workDir, 'from-run-config']);
    // The protocol's line is not output of the run.
    expect((await api.getLogs(run.id)).some((l) => l.message === STANDBY_READY)).toBe(false);
    const history = (await api.getFlowRunHistory(run.id)).map((h) => h.state);
    expect(history).toEqual(['Scheduled', 'Submitted', 'Running', 'Success']);
    const after = await readyStandbys();
    expect(after.some((pid) => !before.includes(pid))).toBe(true);
    await waitFor('the used process to exit', () => !alive(Number(m[1])), 5_000);
  });

  it('a run that sets a start-up-only variable (NODE_OPTIONS) gets a fresh process; the standby keeps waiting', async () => {
    const before = await readyStandbys();
    const run = await create('deploy-env-node-options');
    expect((await finished(run.id)).state).toBe('Success');
    const m = await logLine(run.id, /^module pid=(\d+) cwd=(.*) var=(.*)$/);
    expect(before).not.toContain(Number(m[1]));
    expect(m[2]).toBe(dir);
    expect(m[3]).toBe('fresh');
    for (const pid of before) expect(agent.standbys.has(pid)).toBe(true);
  });

  it('cancel of a run on a former standby: the process stops and the run ends Cancelled', async () => {
    const before = await readyStandbys();
    const marker = join(dir, 'cancel.marker');
    const run = await create('deploy-slow', { marker });
    await waitFor('the task to start', () => existsSync(marker) && readFileSync(marker, 'utf8') !== '');
    const pid = Number(readFileSync(marker, 'utf8'));
    expect(before).toContain(pid);
    expect(agent.processes.get(pid)).toBe(run.id);
    expect(agent.standbys.has(pid)).toBe(false);
    await api.cancelFlowRun(run.id);
    await waitFor('the process to exit', () => !alive(pid), 10_000, 20);
    const done = await finished(run.id);
    expect(done.state).toBe('Cancelled');
    expect((await api.getTaskRuns(run.id)).find((t) => t.key === 'wait')?.state).toBe('Cancelled');
  });

  it('kill -9 of a run on a former standby: the run stays Running, the zombie killer reschedules it, it runs again', async () => {
    const before = await readyStandbys();
    const marker = join(dir, 'kill.marker');
    const run = await create('deploy-slow', { marker, ms: 1_000 });
    await waitFor('the task to start', () => existsSync(marker) && readFileSync(marker, 'utf8') !== '');
    const pid = Number(readFileSync(marker, 'utf8'));
    expect(before).toContain(pid);
    rmSync(marker);
    process.kill(pid, 'SIGKILL');
    const done = await finished(run.id, 40_000);
    expect(done.state).toBe('Success');
    expect(done.restarts).toBe(1);
    const second = Number(readFileSync(marker, 'utf8'));
    expect(second).not.toBe(pid);
    const logs = await api.getLogs(run.id);
    expect(logs.some((l) => l.source === 'agent' && /was killed by SIGKILL/.test(l.message))).toBe(true);
    const history = (await api.getFlowRunHistory(run.id)).map((h) => h.state);
    expect(history).toEqual(['Scheduled', 'Submitted', 'Running', 'Scheduled', 'Submitted', 'Running', 'Success']);
  });

  it('stop() ends every standby process', async () => {
    await readyStandbys();
    const standbys = [...agent.standbys.keys()];
    expect(standbys.length).toBeGreaterThan(0);
    for (const pid of standbys) expect(alive(pid)).toBe(true);
    await agent.stop();
    for (const pid of standbys) expect(alive(pid)).toBe(false);
    expect(agent.standbys.size).toBe(0);
  });
});

describe('weft execute flow-run --standby', () => {
  it('exits at once, code 0, when its stdin closes before a run came', async () => {
    const child = spawn(process.execPath, [WEFT_BIN, 'execute', 'flow-run', '--standby'], { cwd: dir, stdio: ['pipe', 'pipe', 'pipe'] });
    seen.add(child.pid!);
    let out = '';
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
    await waitFor('the ready line', () => out.includes(`${STANDBY_READY}\n`), 20_000);
    expect(alive(child.pid!)).toBe(true);
    child.stdin.end();
    await waitFor('the standby to exit', () => !alive(child.pid!), 5_000, 20);
    expect(await exited).toBe(0);
    expect(err).toBe('');
  });

  it('a bad assignment or a run id beside --standby is a usage error (exit 2)', async () => {
    const run = (args: readonly string[], input: string): Promise<{ code: number | null; stderr: string }> =>
      new Promise((resolve) => {
        const child = spawn(process.execPath, [WEFT_BIN, ...args], { cwd: dir, stdio: ['pipe', 'ignore', 'pipe'] });
        seen.add(child.pid!);
        let stderr = '';
        child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
        child.stdin.on('error', () => {});
        child.stdin.end(input);
        child.once('close', (code) => resolve({ code, stderr }));
      });
    const bad = await run(['execute', 'flow-run', '--standby'], '{"args":[1],"env":{},"cwd":"/"}\n');
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/bad standby assignment on stdin: args: expected an array of strings/);
    const withId = await run(['execute', 'flow-run', 'abc', '--standby'], '');
    expect(withId.code).toBe(2);
    expect(withId.stderr).toMatch(/--standby takes no run id/);
  });
});

describe('the deploy bench with standby processes', () => {
  it('adds the one-run rows of an agent with standbys, and leaves no process behind', async () => {
    const res = await benchDeploy({ runs: 1, drainN: 1, drainRuns: 1, agents: [], maxRuns: 2, pollMs: 20, httpN: 2, claimN: 2, claimBatches: [], standby: 1 });
    const names = res.rows.map((r) => r.name);
    for (const k of Object.keys(ONE_RUN_ROWS) as (keyof typeof ONE_RUN_ROWS)[]) {
      expect(names).toContain(oneRunName(k, 0));
      const row = res.rows.find((r) => r.name === oneRunName(k, 1));
      expect(row, oneRunName(k, 1)).toBeDefined();
      expect(row!.median_ms).toBeGreaterThan(0);
    }
    expect(res.settings.standby).toBe(1);
    for (const pid of res.pids) expect(alive(pid), `process ${pid}`).toBe(false);
  });
});
