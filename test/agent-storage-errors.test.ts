/**
 * A flow's storage unreachable at run time, end to end: a real server (temp SQLite file,
 * 127.0.0.1, port 0), a LocalAgent in this process and the real `weft execute flow-run`
 * processes it starts. A run whose code sits behind an S3 endpoint nobody listens on, a
 * git repository that does not exist, or a bundle the server does not hold ends Failed
 * with the cause (the place and the reason) in its message and its logs; the agent keeps
 * polling and the next run, whose code is reachable, ends Success. Children are stopped
 * by PID in teardown.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { LocalAgent } from '../src/agent/local.ts';
import { BackendClient } from '../src/server/client.ts';
import { startServer, type RunningServer } from '../src/server/index.ts';
import type { FlowRun } from '../src/server/model.ts';
import type { StorageRef } from '../src/storage/types.ts';
import { finishedRun, killQuietly, registerFixture } from './fixtures/deploy/harness.ts';

let srv: RunningServer;
let api: BackendClient;
let dir: string;
let agent: LocalAgent;
let closedPort: number;
const spawned = new Set<number>();

const HASH = 'a'.repeat(64);

/** A port that was free a moment ago and that nothing listens on now. */
async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as { port: number }).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

async function register(name: string, storage: StorageRef): Promise<void> {
  await api.registerFlow({
    project: 'tests',
    name,
    graph: { fixture: name },
    storage,
    runConfig: { kind: 'local' },
    executor: { kind: 'local' },
    parameters: [{ name: 'n', required: false, default: 2 }],
    labels: [],
  });
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'weft-agent-storage-'));
  closedPort = await freePort();
  srv = await startServer({ db: `sqlite:${join(dir, 'server.db')}`, port: 0, host: '127.0.0.1', schedulerIntervalMs: 60_000 });
  api = new BackendClient(srv.url);
  await registerFixture(api, 'ok.ts', 'deploy-ok');
  await register('s3-unreachable', {
    kind: 's3',
    bucket: 'flows',
    key: `deploy-ok/${HASH}.mjs`,
    hash: HASH,
    endpoint: `http://127.0.0.1:${closedPort}`,
    region: 'us-east-1',
    forcePathStyle: true,
    flow: 'deploy-ok',
  });
  await register('git-missing', { kind: 'git', url: `file://${join(dir, 'no-such-repo.git')}`, ref: 'main', path: 'flow.ts', flow: 'deploy-ok' });
  await register('bundle-missing', { kind: 'bundle', hash: HASH, flow: 'deploy-ok' });
  agent = new LocalAgent({
    backend: new BackendClient(srv.url),
    serverUrl: srv.url,
    cwd: dir,
    resultDir: join(dir, 'results'),
    // The S3 client needs some credentials before it finds the endpoint unreachable.
    env: { AWS_ACCESS_KEY_ID: 'weft-test', AWS_SECRET_ACCESS_KEY: 'weft-test-secret' },
    runHeartbeatMs: 200,
    pollMinMs: 50,
    pollMaxMs: 500,
    log: () => undefined,
  });
  await agent.start();
  const t = setInterval(() => {
    for (const pid of agent.processes.keys()) spawned.add(pid);
  }, 20);
  t.unref();
});

afterAll(async () => {
  await agent?.stop({ stopRuns: true });
  for (const pid of spawned) killQuietly(pid);
  await srv?.close();
  rmSync(dir, { recursive: true, force: true });
});

const finished = (id: string): Promise<FlowRun> => finishedRun(api, id, 40_000);

const create = (flowName: string) => api.createFlowRun({ project: 'tests', flowName, parameters: {} });

describe('a flow whose storage cannot be reached at run time', () => {
  it.each([
    ['s3-unreachable', new RegExp(`s3 storage: cannot download s3://flows/deploy-ok/${HASH}\\.mjs at http://127\\.0\\.0\\.1:\\d+: the endpoint is unreachable`)],
    ['git-missing', /git storage: .*no-such-repo\.git/],
    ['bundle-missing', new RegExp(`bundle storage: .*${HASH.slice(0, 12)}`)],
  ])('%s: the run fails with the cause in its logs; the agent starts the next run', async (name, cause) => {
    const bad = await create(name);
    const good = await create('deploy-ok');
    const b = await finished(bad.id);
    expect(b.state).toBe('Failed');
    expect(b.message).toMatch(/cannot load the flow/);
    expect(b.message).toMatch(cause);
    // The cause's code is said once, not appended again after a message that names it.
    expect(b.message).not.toMatch(/\) \([A-Z_]+\)$/);
    const logs = await api.getLogs(bad.id);
    expect(logs.some((l) => l.level === 'error' && cause.test(l.message))).toBe(true);
    expect((await api.getTaskRuns(bad.id)).length).toBe(0);
    const g = await finished(good.id);
    expect(g.state).toBe('Success');
  });
});
