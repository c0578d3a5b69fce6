/**
 * `weft register`, `weft flows`, `weft runs` and `weft run --remote`, in-process against a
 * real `weft server` (embedded SQLite in a temp dir, port 0). The agent's side of a
 * remote run is played by this test through the same HTTP API an agent uses (claim,
 * Running, task states, Success), so the CLI's following is checked without a process.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../src/cli/main.ts';
import { BackendClient } from '../src/server/client.ts';
import { startServer } from '../src/server/index.ts';

let tmp: string;
let server: { url: string; close(): Promise<void> };
let backend: BackendClient;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'weft-deploy-cli-'));
  server = await startServer({ db: `sqlite:${join(tmp, 'server.db')}`, host: '127.0.0.1', port: 0 });
  backend = new BackendClient(server.url);
});
afterAll(async () => {
  await server?.close();
  await rm(tmp, { recursive: true, force: true });
});

interface Captured {
  code: number;
  out: string;
  err: string;
}

async function weft(args: string[]): Promise<Captured> {
  let out = '';
  let err = '';
  const io: CliIO = { stdout: { write: (s: string) => (out += s) }, stderr: { write: (s: string) => (err += s) }, cwd: process.cwd() };
  const code = await main([...args, '--server', server.url], io);
  return { code, out, err };
}

describe('weft register', () => {
  it('records a flow once; the same code again keeps its version', async () => {
    const a = await weft(['register', 'test/fixtures/cli-real-params.ts', '--project', 'cli']);
    expect(a.err).toBe('');
    expect(a.code).toBe(0);
    expect(a.out).toMatch(/^registered cli\/real-params version 1 \(local storage, universal run config, labels host:\S+\) id \S+\n$/);
    const b = await weft(['register', 'test/fixtures/cli-real-params.ts', '--project', 'cli']);
    expect(b.code).toBe(0);
    expect(b.out).toMatch(/^unchanged: cli\/real-params version 1 /);
    // A different run config is a new version.
    const c = await weft(['register', 'test/fixtures/cli-real-params.ts', '--project', 'cli', '--run-config', 'local', '--label', 'team-a']);
    expect(c.code).toBe(0);
    expect(c.out).toMatch(/^registered cli\/real-params version 2 \(local storage, local run config, labels team-a, host:/);
    const flow = await backend.getFlow({ project: 'cli', name: 'real-params' });
    const v = await backend.getFlowVersion(flow.versionId);
    expect(v.parameters.map((p) => p.name).sort()).toEqual(['label', 'n', 'opts', 'tags']);
    expect(v.executor).toEqual({ kind: 'local' });
    expect(v.storage.kind).toBe('local');
    expect((v.graph as { nodes: { key: string }[] }).nodes.map((n) => n.key)).toContain('echo');
  });

  it('a file that does not load: one clear line, exit 2, nothing recorded', async () => {
    const broken = join(tmp, 'broken.ts');
    await writeFile(broken, "import { flow } from 'weft';\nexport default flow('broken', () => ({ x: ( }));\n");
    const r = await weft(['register', broken, '--project', 'bad']);
    expect(r.code).toBe(2);
    expect(r.err.trim().split('\n')).toHaveLength(1);
    expect(r.err).toContain(`weft register: cannot load ${broken}: `);
    expect(await backend.listFlows({ project: 'bad' })).toEqual([]);
    const none = await weft(['register', 'test/fixtures/cli-no-flow.ts', '--project', 'bad']);
    expect(none.code).toBe(2);
    expect(none.err).toContain('exports no flow');
    expect(await backend.listFlows({ project: 'bad' })).toEqual([]);
  });

  it('usage errors name the problem', async () => {
    const r = await weft(['register', 'test/fixtures/cli-real-params.ts']);
    expect(r.code).toBe(2);
    expect(r.err).toContain('--project is required');
    const s = await weft(['register', 'test/fixtures/cli-real-params.ts', '--project', 'x', '--storage', 'ftp://nowhere']);
    expect(s.code).toBe(2);
    expect(s.err).toContain('--storage ftp://nowhere');
    const i = await weft(['register', 'test/fixtures/cli-real-params.ts', '--project', 'x', '--image', 'busybox']);
    expect(i.code).toBe(2);
    expect(i.err).toContain('--image applies to a docker or kubernetes run config');
  });

  it('an unreachable server: one line, exit 1', async () => {
    let err = '';
    const io: CliIO = { stdout: { write: () => true }, stderr: { write: (s: string) => (err += s) }, cwd: process.cwd() };
    // A port that was free a moment ago: nothing listens there.
    const probe = createServer();
    await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
    const port = (probe.address() as { port: number }).port;
    await new Promise((r) => probe.close(r));
    const code = await main(['flows', '--server', `http://127.0.0.1:${port}`], io);
    expect(code).toBe(1);
    expect(err).toMatch(/^weft flows: cannot reach the server/);
  });
});

describe('weft flows and weft runs', () => {
  it('lists flows, creates a remote run that an agent plays out, shows it, lists it, prints its logs', async () => {
    const f = await weft(['flows', '--project', 'cli']);
    expect(f.code).toBe(0);
    expect(f.out.split('\n')[0]).toMatch(/^PROJECT\s+FLOW\s+VERSION\s+SCHEDULE\s+UPDATED\s+ID$/);
    expect(f.out).toMatch(/\ncli\s+real-params\s+2\s+-\s+/);

    // The agent's side, through the API, while the CLI follows the run.
    const agent = await backend.registerAgent({ name: 'test-agent', kind: 'local', labels: ['team-a', `host:${(await import('node:os')).hostname()}`] });
    const playing = (async () => {
      for (let i = 0; i < 200; i++) {
        const claimed = await backend.claimFlowRuns({ agentId: agent.id, labels: agent.labels, before: Date.now() + 10_000, limit: 1 });
        const c = claimed[0];
        if (c !== undefined) {
          const running = await backend.setFlowRunState(c.run.id, 'Running', { expectVersion: c.run.stateVersion });
          expect(running.parameters).toEqual({ n: 7 });
          const w = await backend.setTaskRunStates(c.run.id, 'p1', [{ key: 'echo', mapIndex: -1, state: 'Running', expectVersion: 0 }]);
          await backend.writeLogs([{ flowRunId: c.run.id, level: 'info', message: 'echo says hello', at: Date.now(), source: 'task', taskKey: 'echo' }]);
          await backend.setTaskRunStates(c.run.id, 'p1', [{ key: 'echo', mapIndex: -1, state: 'Success', expectVersion: w[0]!.version }]);
          await backend.setFlowRunState(c.run.id, 'Success', { expectVersion: running.stateVersion });
          return c.run.id;
        }
        await new Promise((r) => setTimeout(r, 25));
      }
      throw new Error('no run to claim');
    })();
    const r = await weft(['run', 'real-params', '--remote', '--param', 'n=7', '--label', 'team-a']);
    const runId = await playing;
    expect(r.err).toContain(`run ${runId}: cli/real-params v2 created (Scheduled)`);
    expect(r.out).toMatch(new RegExp(`real-params: Success in \\S+ \\(run ${runId}\\)\\n$`));
    expect(r.code).toBe(0);

    const list = await weft(['runs', '--project', 'cli']);
    expect(list.code).toBe(0);
    expect(list.out).toMatch(new RegExp(`\\n${runId}\\s+cli/real-params\\s+v2\\s+Success\\s`));
    const show = await weft(['runs', 'show', runId]);
    expect(show.out).toContain(`run ${runId}: cli/real-params v2, Success`);
    expect(show.out).toMatch(/\necho\s+Success\s/);
    const logs = await weft(['runs', 'logs', runId]);
    expect(logs.out).toMatch(/INFO  task echo: echo says hello\n/);
  });

  it('a remote run of an unknown flow, or with a parameter the flow lacks, is refused before anything is created', async () => {
    const before = (await backend.listFlowRuns({ project: 'cli' })).length;
    const u = await weft(['run', 'nope', '--remote', '--project', 'cli']);
    expect(u.code).toBe(1);
    expect(u.err).toMatch(/^weft run: the server answered 404/);
    const bare = await weft(['run', 'nope', '--remote']);
    expect(bare.code).toBe(2);
    expect(bare.err).toBe("weft run: no flow named 'nope' is registered (see 'weft flows')\n");
    const p = await weft(['run', 'real-params', '--remote', '--project', 'cli', '--param', 'zzz=1']);
    expect(p.code).toBe(2);
    expect(p.err).toContain('has no parameter zzz');
    expect((await backend.listFlowRuns({ project: 'cli' })).length).toBe(before);
    const local = await weft(['run', 'real-params', '--remote', '--executor', 'pool']);
    expect(local.code).toBe(2);
    expect(local.err).toContain('--executor applies to a local run');
  });

  it('runs cancel: a run no agent took ends Cancelled', async () => {
    const flow = await backend.getFlow({ project: 'cli', name: 'real-params' });
    const run = await backend.createFlowRun({ flowId: flow.id, labels: ['nobody-has-this'] });
    const c = await weft(['runs', 'cancel', run.id]);
    expect(c.code).toBe(0);
    expect(c.out).toBe(`run ${run.id} (real-params): Cancelled\n`);
    expect((await backend.getFlowRun(run.id)).state).toBe('Cancelled');
    const json = await weft(['runs', '--project', 'cli', '--state', 'Cancelled', '--json']);
    expect((JSON.parse(json.out) as { id: string }[]).map((x) => x.id)).toContain(run.id);
    const bad = await weft(['runs', '--state', 'Sleeping']);
    expect(bad.code).toBe(2);
    expect(bad.err).toContain('--state must be one of');
  });
});
