/**
 * `weft register`, `weft flows`, `weft runs` and `weft run --remote`, in-process against a
 * real `weft server` (embedded SQLite in a temp dir, port 0). The agent's side of a
 * remote run is played by this test through the same HTTP API an agent uses (claim,
 * Running, task states, Success), so the CLI's following is checked without a process.
 * Following reads the live feed: the server's per-route request counts (`/metrics`) show
 * it does not poll, and a small proxy that refuses or cuts the feed shows the fallback.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer as createHttpServer, request as httpRequest } from 'node:http';
import { connect, createServer, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
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

async function weft(args: string[], url = server.url): Promise<Captured> {
  return weftLive(args, url).done;
}

/** A command still running: its output so far, and its end. */
function weftLive(args: string[], url = server.url): { done: Promise<Captured>; out(): string; err(): string } {
  let out = '';
  let err = '';
  const io: CliIO = { stdout: { write: (s: string) => (out += s) }, stderr: { write: (s: string) => (err += s) }, cwd: process.cwd() };
  const done = main([...args, '--server', url], io).then((code) => ({ code, out, err }));
  return { done, out: () => out, err: () => err };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(what: string, ok: () => boolean | Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

/** `/metrics`: a sample's value by metric name and exact label text (0 when absent). */
async function metric(name: string, labels = ''): Promise<number> {
  const text = await (await fetch(`${server.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name}${labels} `));
  return line === undefined ? 0 : Number(line.slice(line.lastIndexOf(' ') + 1));
}

/** Successful GETs of one route so far. */
const gets = (route: string): Promise<number> => metric('weft_server_http_requests_total', `{method="GET",route="${route}",status="200"}`);

/** The agent's side of one run, through the API: claims the next run carrying `label`. */
async function claimOne(label: string): Promise<{ id: string; stateVersion: number }> {
  const agent = await backend.registerAgent({ name: `agent-${label}`, kind: 'local', labels: [label, 'team-a', `host:${(await import('node:os')).hostname()}`] });
  for (let i = 0; i < 400; i++) {
    const c = (await backend.claimFlowRuns({ agentId: agent.id, labels: agent.labels, before: Date.now() + 10_000, limit: 1 }))[0];
    if (c !== undefined) return { id: c.run.id, stateVersion: c.run.stateVersion };
    await sleep(25);
  }
  throw new Error('no run to claim');
}

/**
 * Plays a run whose task runs change faster than a poll: `echo` mapped over 6 children,
 * each Running then Success 40 ms apart, then the run's Success. `beforeTasks` runs
 * once the run is Running, before any task run is written.
 */
async function playMapped(label: string, beforeTasks: (runId: string) => Promise<void> = async () => undefined): Promise<string> {
  const c = await claimOne(label);
  const running = await backend.setFlowRunState(c.id, 'Running', { expectVersion: c.stateVersion });
  await beforeTasks(c.id);
  const versions = new Map<number, number>();
  const write = async (mapIndex: number, state: 'Running' | 'Success' | 'Mapped'): Promise<void> => {
    const [w] = await backend.setTaskRunStates(c.id, 'p1', [{ key: 'echo', mapIndex, state, expectVersion: versions.get(mapIndex) ?? 0 }]);
    versions.set(mapIndex, w!.version);
  };
  await write(-1, 'Mapped');
  for (let i = 0; i < 6; i++) {
    await write(i, 'Running');
    await sleep(40);
    await write(i, 'Success');
    await sleep(40);
  }
  await backend.setFlowRunState(c.id, 'Success', { expectVersion: running.stateVersion });
  return c.id;
}

/**
 * A proxy in front of the server: HTTP requests pass through; a feed upgrade is refused
 * (502) when `refuseFeed`, else piped through, and `cutFeeds()` drops those connections.
 */
async function startProxy(target: string): Promise<{ url: string; refuseFeed: boolean; cutFeeds(): number; close(): Promise<void> }> {
  const t = new URL(target);
  const feeds = new Set<Duplex>();
  const srv = createHttpServer((req, res) => {
    const up = httpRequest({ host: t.hostname, port: t.port, method: req.method, path: req.url, headers: req.headers }, (r) => {
      res.writeHead(r.statusCode ?? 502, r.headers);
      r.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  const proxy = {
    url: '',
    refuseFeed: false,
    cutFeeds(): number {
      const n = feeds.size;
      for (const s of feeds) s.destroy();
      feeds.clear();
      return n;
    },
    close: (): Promise<void> =>
      new Promise<void>((r) => {
        proxy.cutFeeds();
        srv.close(() => r());
        srv.closeAllConnections();
      }),
  };
  srv.on('upgrade', (req, socket: Duplex, head: Buffer) => {
    socket.on('error', () => socket.destroy());
    if (proxy.refuseFeed) {
      socket.end('HTTP/1.1 502 Bad Gateway\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
      return;
    }
    const up: Socket = connect(Number(t.port), t.hostname, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      up.write(`${lines.join('\r\n')}\r\n\r\n`);
      up.write(head);
      socket.pipe(up);
      up.pipe(socket);
    });
    up.on('error', () => socket.destroy());
    up.on('close', () => socket.destroy());
    socket.on('close', () => up.destroy());
    feeds.add(socket);
    feeds.add(up);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  proxy.url = `http://127.0.0.1:${(srv.address() as { port: number }).port}`;
  return proxy;
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

describe('following a remote run', () => {
  it('reads the live feed: every task run in the final progress, no polling of the task runs', async () => {
    const taskRunGets = await gets('/api/flow-runs/:id/task-runs');
    const runGets = await gets('/api/flow-runs/:id');
    const playing = playMapped('feed-a');
    const r = await weft(['run', 'real-params', '--remote', '--label', 'feed-a']);
    const runId = await playing;
    expect(r.code).toBe(0);
    expect(r.out).toMatch(new RegExp(`^real-params: Success in \\S+ \\(run ${runId}\\)\\n$`));
    expect(r.err).toContain(`run ${runId}: Running\n`);
    expect(r.err).not.toContain('polling');
    // 5 graph nodes, but echo mapped over 6 children: 7 task runs, all done.
    expect(r.err).toMatch(/progress: 7\/7 done · 0 running · 0 failed/);
    // The run ran ~0.6 s: a 250 ms poll would have read it and its task runs several times.
    // Its task runs are read twice: once when it starts, once to settle the summary.
    expect((await gets('/api/flow-runs/:id/task-runs')) - taskRunGets).toBe(2);
    expect((await gets('/api/flow-runs/:id')) - runGets).toBe(1);
  });

  it('polls when the feed is refused (a proxy in the way), saying so once', async () => {
    const proxy = await startProxy(server.url);
    try {
      proxy.refuseFeed = true;
      const taskRunGets = await gets('/api/flow-runs/:id/task-runs');
      const playing = playMapped('feed-b');
      const r = await weft(['run', 'real-params', '--remote', '--label', 'feed-b'], proxy.url);
      const runId = await playing;
      expect(r.code).toBe(0);
      expect(r.out).toMatch(new RegExp(`^real-params: Success in \\S+ \\(run ${runId}\\)\\n$`));
      expect(r.err.match(/polling/g)).toHaveLength(1);
      expect(r.err).toContain('weft run: no live feed (the server answered 502 FEED_REFUSED); polling the run every 250ms\n');
      expect(r.err).toMatch(/progress: 7\/7 done/);
      expect((await gets('/api/flow-runs/:id/task-runs')) - taskRunGets).toBeGreaterThan(1);
    } finally {
      await proxy.close();
    }
  });

  it('polls when the feed drops mid-run, and still ends with the run', async () => {
    const proxy = await startProxy(server.url);
    try {
      const runGets = await gets('/api/flow-runs/:id');
      const playing = playMapped('feed-c', async () => {
        // The CLI reads the run once its feed is open: cut the feed after that read.
        await until("the CLI's first read", async () => (await gets('/api/flow-runs/:id')) > runGets);
        expect(proxy.cutFeeds()).toBeGreaterThan(0);
      });
      const r = await weft(['run', 'real-params', '--remote', '--label', 'feed-c'], proxy.url);
      const runId = await playing;
      expect(r.code).toBe(0);
      expect(r.out).toMatch(new RegExp(`^real-params: Success in \\S+ \\(run ${runId}\\)\\n$`));
      expect(r.err.match(/polling/g)).toHaveLength(1);
      expect(r.err).toMatch(/weft run: the live feed closed \(\d+[^)]*\); polling the run every 250ms\n/);
      expect(r.err).toMatch(/progress: 7\/7 done/);
    } finally {
      await proxy.close();
    }
  });
});

describe('weft runs logs --follow', () => {
  const log = (flowRunId: string, message: string): Promise<void> =>
    backend.writeLogs([{ flowRunId, level: 'info', message, at: Date.now(), source: 'task', taskKey: 'echo' }]);

  it('prints the lines so far, then the lines written after it started, and exits 1 when the run fails', async () => {
    const flow = await backend.getFlow({ project: 'cli', name: 'real-params' });
    await backend.createFlowRun({ flowId: flow.id, labels: ['logs-a'] });
    const c = await claimOne('logs-a');
    const running = await backend.setFlowRunState(c.id, 'Running', { expectVersion: c.stateVersion });
    await log(c.id, 'line 1, before');
    const clients = await metric('weft_server_feed_clients');
    const f = weftLive(['runs', 'logs', c.id, '-f']);
    await until('the first line', () => f.out().includes('line 1, before'));
    await until('the feed', async () => (await metric('weft_server_feed_clients')) > clients);
    await log(c.id, 'line 2, after');
    await until('a fed line', () => f.out().includes('line 2, after'));
    await log(c.id, 'line 3, just before the end');
    await backend.setFlowRunState(c.id, 'Failed', { expectVersion: running.stateVersion, message: 'echo failed' });
    const r = await f.done;
    expect(r.code).toBe(1);
    expect(r.err).toBe('');
    const lines = r.out.trimEnd().split('\n');
    expect(lines.map((l) => l.replace(/^\S+ /, ''))).toEqual([
      'INFO  task echo: line 1, before',
      'INFO  task echo: line 2, after',
      'INFO  task echo: line 3, just before the end',
    ]);
  });

  it('--follow exits 0 when the run succeeds; a run already over prints its logs and exits at once', async () => {
    const flow = await backend.getFlow({ project: 'cli', name: 'real-params' });
    await backend.createFlowRun({ flowId: flow.id, labels: ['logs-b'] });
    const c = await claimOne('logs-b');
    const running = await backend.setFlowRunState(c.id, 'Running', { expectVersion: c.stateVersion });
    const f = weftLive(['runs', 'logs', '--follow', c.id]);
    await sleep(300);
    await log(c.id, 'late line');
    await until('the late line', () => f.out().includes('late line'));
    await backend.setFlowRunState(c.id, 'Success', { expectVersion: running.stateVersion });
    const r = await f.done;
    expect(r.code).toBe(0);
    expect(r.out).toMatch(/^\S+ INFO  task echo: late line\n$/);
    const again = await weft(['runs', 'logs', c.id, '-f']);
    expect(again.code).toBe(0);
    expect(again.out).toBe(r.out);
    // Without --follow, as before; and -f still means --flow for the other runs commands.
    expect((await weft(['runs', 'logs', c.id])).out).toBe(r.out);
    const byFlow = await weft(['runs', '-f', 'real-params', '--project', 'cli', '--state', 'Success']);
    expect(byFlow.code).toBe(0);
    expect(byFlow.out).toContain(c.id);
  });
});
