/**
 * The HTTP edge of `weft server`, on SQLite and PostgreSQL: tokens (401, logged and
 * counted), routing (404, 405), request validation (400 naming the field), body limits
 * (413, declared or chunked), garbage that must not take the server down, the
 * WebSocket live feed, and /metrics.
 */
import { request } from 'node:http';
import { connect } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { BackendClient } from '../src/server/client.ts';
import { startServer, type RunningServer } from '../src/server/index.ts';
import { BackendError, type RegisterFlowInput, type ServerEvent } from '../src/server/model.ts';
import { startPostgres, type TestPostgres } from './helpers/postgres.ts';

const TOKEN = 'tok-7f3a9c';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function waitFor(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

const flowInput = (over: Partial<RegisterFlowInput> = {}): RegisterFlowInput => ({
  project: 'web',
  name: 'f',
  graph: { nodes: [] },
  storage: { kind: 'module', specifier: './f.ts', flow: 'f' },
  runConfig: { kind: 'universal' },
  executor: { kind: 'local' },
  parameters: [],
  labels: [],
  ...over,
});

describe.each(['sqlite', 'postgres'] as const)('HTTP API on %s', (kind) => {
  let pg: TestPostgres | null = null;
  let tmp: string;
  let server: RunningServer;
  let c: BackendClient;
  const logLines: string[] = [];

  /** A request with the token unless told otherwise; the body as JSON when it parses. */
  async function call(
    method: string,
    path: string,
    o: { body?: string | Uint8Array; token?: string | null; headers?: Record<string, string> } = {},
  ): Promise<{ status: number; body: any; headers: Headers }> {
    const headers: Record<string, string> = { ...(o.headers ?? {}) };
    const token = o.token === undefined ? TOKEN : o.token;
    if (token !== null) headers.authorization = `Bearer ${token}`;
    const res = await fetch(`${server.url}${path}`, { method, headers, ...(o.body !== undefined ? { body: o.body } : {}) });
    const text = await res.text();
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      // Not JSON (metrics).
    }
    return { status: res.status, body, headers: res.headers };
  }

  const metric = async (line: RegExp): Promise<number> => {
    const m = (await call('GET', '/metrics')).body as string;
    const hit = m.split('\n').find((l) => line.test(l));
    return hit === undefined ? 0 : Number(hit.split(' ').at(-1));
  };

  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'weft-server-http-'));
    let db = `sqlite:${join(tmp, 'server.db')}`;
    if (kind === 'postgres') {
      pg = await startPostgres();
      db = pg.url;
    }
    server = await startServer({
      db,
      port: 0,
      token: TOKEN,
      services: false,
      maxBodyBytes: 4096,
      maxBundleBytes: 8192,
      log: (l) => logLines.push(l),
    });
    c = new BackendClient(server.url, { token: TOKEN });
  });
  afterAll(async () => {
    await server?.close();
    await pg?.stop();
    await rm(tmp, { recursive: true, force: true });
  });

  it('health needs no token; everything else needs the right one (401, logged, counted)', async () => {
    expect(await call('GET', '/api/health', { token: null })).toMatchObject({ status: 200, body: { ok: true, db: kind } });
    const before = await metric(/^weft_server_auth_refused_total /);
    const logsBefore = logLines.length;

    const none = await call('GET', '/api/flows', { token: null });
    expect(none.status).toBe(401);
    expect(none.body).toEqual({ error: { code: 'UNAUTHORIZED', message: expect.stringMatching(/^no token/) } });
    expect(none.headers.get('www-authenticate')).toBe('Bearer');
    expect((await call('GET', '/api/flows', { token: 'wrong' })).body.error.message).toMatch(/^wrong token/);
    expect((await call('POST', '/api/flows', { token: null, body: '{"x":1}' })).status).toBe(401);
    expect((await call('GET', '/api/flows', { token: null, headers: { authorization: 'Basic abc' } })).status).toBe(401);
    // Unknown routes and /metrics are no way around it.
    expect((await call('GET', '/api/nowhere', { token: null })).status).toBe(401);
    expect((await call('GET', '/metrics', { token: null })).status).toBe(401);

    expect(await metric(/^weft_server_auth_refused_total /)).toBe(before + 6);
    const refusedLines = logLines.slice(logsBefore).filter((l) => l.startsWith('refused '));
    expect(refusedLines.length).toBe(6);
    expect(refusedLines[0]).toMatch(/^refused GET \/api\/flows from 127\.0\.0\.1: no token$/);
    expect(refusedLines[1]).toMatch(/wrong token$/);

    const anonymous = new BackendClient(server.url);
    const err = await anonymous.listFlows().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BackendError);
    expect(err).toMatchObject({ status: 401, code: 'UNAUTHORIZED' });
    expect(await c.listFlows()).toEqual(expect.any(Array));
  });

  it('API tokens stored (hashed) in the database are accepted too', async () => {
    const { id, token } = await server.store.createApiToken('ci');
    const viaDb = new BackendClient(server.url, { token });
    expect(await viaDb.listProjects()).toEqual(expect.any(Array));
    await server.store.deleteApiToken(id);
    // Only the hash was stored.
    const rows = await server.db.all('SELECT hash FROM api_tokens');
    expect(rows.every((r) => r.hash !== token)).toBe(true);
  });

  it('unknown routes are 404, wrong methods 405 with Allow', async () => {
    expect(await call('GET', '/api/nowhere')).toMatchObject({ status: 404, body: { error: { code: 'NOT_FOUND', message: 'no route GET /api/nowhere' } } });
    expect((await call('GET', '/nothing/at/all')).status).toBe(404);
    const wrong = await call('DELETE', '/api/flows');
    expect(wrong.status).toBe(405);
    expect(wrong.body.error.code).toBe('METHOD_NOT_ALLOWED');
    expect(wrong.headers.get('allow')).toBe('GET, POST');
    expect((await call('POST', '/api/flow-runs/x/history')).status).toBe(405);
    expect((await call('GET', '/api/flow-runs/%E0%A4%A')).status).toBe(400);
    // A plain GET of the feed says to upgrade.
    expect((await call('GET', '/api/events')).status).toBe(426);
  });

  it('malformed requests get 400 naming the field', async () => {
    const { flow } = await c.registerFlow(flowInput());
    const post = async (path: string, body: unknown): Promise<string> => {
      const r = await call('POST', path, { body: typeof body === 'string' ? body : JSON.stringify(body), headers: { 'content-type': 'application/json' } });
      expect(r.status).toBe(400);
      expect(r.body.error.code).toBe('BAD_REQUEST');
      return r.body.error.message as string;
    };
    expect(await post('/api/flow-runs', { flowId: flow.id, parameters: 'x' })).toBe('body.parameters: expected object, received string');
    expect(await post('/api/flow-runs', { flowId: flow.id, labels: ['a', 3] })).toBe('body.labels[1]: expected string, received number');
    expect(await post('/api/flow-runs', { flowId: flow.id, scheduledStart: -5 })).toMatch(/^body\.scheduledStart: number must be greater than or equal to 0/);
    expect(await post('/api/flow-runs', '{"flowId": ')).toMatch(/^body: invalid JSON/);
    expect(await post('/api/flow-runs', '[1,2]')).toBe('body: expected object, received array');
    expect(await post('/api/flows', { ...flowInput(), parameters: 'x' })).toBe('body.parameters: expected array, received string');
    expect(await post('/api/flows', { ...flowInput(), name: undefined })).toBe('body.name: required (expected string)');
    expect(await post('/api/flows', { ...flowInput(), runConfig: { kind: 'lambda' } })).toMatch(/^body\.runConfig\.kind: expected one of universal, local, docker, kubernetes/);
    expect(await post('/api/flows', { ...flowInput(), runConfig: { kind: 'docker', ports: { '80/tcp': 'x' } } })).toMatch(/^body\.runConfig\.ports\.80\/tcp: expected a port number/);
    expect(await post('/api/flows', { ...flowInput(), storage: { kind: 'bundle', hash: 'xyz', flow: 'f' } })).toBe('body.storage.hash: expected a sha256 hex digest');
    expect(await post('/api/flows', { ...flowInput(), storage: { kind: 'ftp' } })).toMatch(/^body\.storage\.kind: invalid discriminator value/);
    expect(await post('/api/flows', { ...flowInput(), schedule: { clocks: [{ kind: 'cron', cron: '61 * * * *' }] } })).toMatch(
      /^body\.schedule\.clocks\[0\]\.cron: cron "61 \* \* \* \*": minute field "61": 61 is out of range 0-59/,
    );
    expect(await post('/api/flows', { ...flowInput(), schedule: { clocks: [{ kind: 'interval', everyMs: 5 }] } })).toMatch(/^body\.schedule\.clocks\[0\]\.everyMs: number must be greater than or equal to 1000/);
    const run = await c.createFlowRun({ flowId: flow.id });
    expect(await post(`/api/flow-runs/${run.id}/state`, { state: 'Exploded' })).toMatch(/^body\.state: invalid enum value/);
    expect(await post(`/api/flow-runs/${run.id}/state`, { state: 'Running', expectVersion: 1.5 })).toBe('body.expectVersion: expected integer, received float');
    expect(await post(`/api/flow-runs/${run.id}/task-runs`, { processId: 'p', updates: [{ key: 'a', mapIndex: -1, state: 'Bogus', expectVersion: 0 }] })).toMatch(
      /^body\.updates\[0\]\.state: invalid enum value/,
    );
    expect(await post('/api/logs', { entries: [{ flowRunId: run.id, level: 'loud', message: 'x', at: 1, source: 's' }] })).toMatch(/^body\.entries\[0\]\.level: invalid enum value/);
    expect(await post('/api/agents/a1/claim', { labels: [], before: 'soon', limit: 1 })).toBe('body.before: expected number, received string');
    expect(await post(`/api/flow-runs/${run.id}/slots/acquire`, { taskRunKey: 'k' })).toBe('body.tags: required (expected array)');

    const q = await call('GET', `/api/flow-runs?limit=abc`);
    expect(q).toMatchObject({ status: 400, body: { error: { message: 'query.limit: expected a non-negative integer' } } });
    expect((await call('GET', `/api/flow-runs?state=Running,Nope`)).body.error.message).toMatch(/^query\.state\[1\]: invalid enum value/);
    expect((await call('GET', `/api/flow-runs/${run.id}/logs?after=-1`)).body.error.message).toBe('query.after: expected a non-negative integer');
    expect((await call('PUT', '/api/concurrency-limits/color/x', { body: '{"limit":1}' })).body.error.message).toMatch(/^path\.kind: expected tag or label/);
    expect((await call('PUT', '/api/concurrency-limits/tag/x', { body: '{"limit":-1}' })).body.error.message).toMatch(/^body\.limit: number must be greater than or equal to 0/);
    // Nothing of that was written.
    expect((await c.listFlowRuns({ flowId: flow.id })).length).toBe(1);
  });

  it('bodies over the limit get 413 (declared or chunked) and the server carries on', async () => {
    const big = JSON.stringify({ entries: [], pad: 'x'.repeat(10_000) });
    const declared = await call('POST', '/api/logs', { body: big, headers: { 'content-type': 'application/json' } });
    expect(declared).toMatchObject({ status: 413, body: { error: { code: 'PAYLOAD_TOO_LARGE' } } });

    // Chunked, no Content-Length: counted as it arrives.
    const chunked = await new Promise<{ status: number; text: string }>((resolve, reject) => {
      const req = request(`${server.url}/api/logs`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' } }, (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (d: string) => (text += d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
      });
      req.on('error', reject);
      for (let i = 0; i < 10; i++) req.write('x'.repeat(1000));
      req.end();
    });
    expect(chunked.status).toBe(413);
    expect(JSON.parse(chunked.text)).toEqual({ error: { code: 'PAYLOAD_TOO_LARGE', message: 'request body over the limit of 4096 bytes' } });

    // Bundles have their own limit.
    const code = new Uint8Array(10_000);
    expect(await c.putBundle('a'.repeat(64), code).catch((e: unknown) => e)).toMatchObject({ status: 413 });
    expect((await call('GET', '/api/health')).status).toBe(200);
    expect(await c.listProjects()).toEqual(expect.any(Array));
  });

  it('garbage on the socket gets 400 and never takes the server down', async () => {
    const raw = (bytes: string, waitMs = 2_000): Promise<string> =>
      new Promise((resolve) => {
        const s = connect(server.port, '127.0.0.1');
        let got = '';
        s.on('data', (d) => (got += d.toString()));
        s.on('close', () => resolve(got));
        s.on('error', () => resolve(got));
        s.write(bytes);
        setTimeout(() => s.destroy(), waitMs);
      });
    expect(await raw('GARBAGE\r\n\r\n')).toMatch(/^HTTP\/1\.1 400/);
    expect(await raw(`POST /api/logs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}`)).toMatch(/^HTTP\/1\.1 400/);
    // A body cut short: the request fails, nothing else does.
    await raw(`POST /api/logs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nContent-Length: 100\r\n\r\n{"entries":`, 200);
    // A binary body where JSON is expected.
    expect((await call('POST', '/api/projects', { body: new Uint8Array([0xff, 0xfe, 0, 1, 2]) })).status).toBe(400);
    // A feed upgrade to the wrong path.
    expect(await raw('GET /api/elsewhere HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n')).toMatch(
      /^HTTP\/1\.1 404/,
    );
    expect((await call('GET', '/api/health')).status).toBe(200);
    expect((await c.createProject('still-here')).name).toBe('still-here');
  });

  it('the live feed delivers events after they commit, optionally for one run', async () => {
    const all: ServerEvent[] = [];
    const one: ServerEvent[] = [];
    const closeAll = await c.subscribe((e) => all.push(e));
    const { flow } = await c.registerFlow(flowInput({ name: 'fed' }));
    const a = await c.createFlowRun({ flowId: flow.id });
    const closed: number[] = [];
    const closeOne = await c.subscribe((e) => one.push(e), { flowRun: a.id, onClose: (code) => closed.push(code) });
    const b = await c.createFlowRun({ flowId: flow.id });
    await c.setFlowRunState(a.id, 'Running');
    await c.setTaskRunStates(a.id, 'p', [{ key: 't', mapIndex: -1, state: 'Running', expectVersion: 0 }]);
    await c.writeLogs([
      { flowRunId: a.id, level: 'info', message: 'for a', at: Date.now(), source: 'task' },
      { flowRunId: b.id, level: 'info', message: 'for b', at: Date.now(), source: 'task' },
    ]);
    // A refused write publishes nothing.
    await c.setFlowRunState(a.id, 'Success', { expectVersion: 1 }).catch(() => undefined);
    await c.setFlowRunState(a.id, 'Success');

    const describeEvent = (e: ServerEvent): string =>
      e.type === 'flow'
        ? `flow ${e.flow.name}`
        : e.type === 'flowRun'
          ? `run ${e.run.id === a.id ? 'a' : 'b'} ${e.run.state}`
          : e.type === 'taskRun'
            ? `task ${e.task.key} ${e.task.state}`
            : `log ${e.entry.message}`;
    await waitFor('all events', () => all.length >= 8);
    await waitFor('run a events', () => one.length >= 4);
    expect(all.map(describeEvent)).toEqual(['flow fed', 'run a Scheduled', 'run b Scheduled', 'run a Running', 'task t Running', 'log for a', 'log for b', 'run a Success']);
    expect(one.map(describeEvent)).toEqual(['run a Running', 'task t Running', 'log for a', 'run a Success']);
    const log = all.find((e) => e.type === 'log');
    expect(log).toMatchObject({ entry: { seq: expect.any(Number), flowRunId: a.id } });
    expect(await metric(/^weft_server_feed_clients /)).toBe(2);
    closeOne();
    closeAll();
    await waitFor('feed closed', async () => (await metric(/^weft_server_feed_clients /)) === 0);
    expect(closed).toEqual([1000]);
  });

  it('the feed needs the token too (header or ?token=)', async () => {
    const anonymous = new BackendClient(server.url);
    expect(await anonymous.subscribe(() => undefined).catch((e: unknown) => e)).toMatchObject({ status: 401, code: 'UNAUTHORIZED' });
    const url = `${server.url.replace('http:', 'ws:')}/api/events?token=${TOKEN}`;
    const ws = new WebSocket(url);
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    const got = new Promise<string>((resolve) => ws.once('message', (d) => resolve(d.toString())));
    await c.createProject('feed-token');
    await c.registerFlow(flowInput({ project: 'feed-token' }));
    expect(JSON.parse(await got)).toMatchObject({ type: 'flow', flow: { project: 'feed-token' } });
    ws.close();
    await new Promise((r) => ws.once('close', r));
  });

  it('/metrics: requests by route and status, runs by state', async () => {
    const { flow } = await c.registerFlow(flowInput({ name: 'metered' }));
    await c.createFlowRun({ flowId: flow.id });
    await c.getFlowRun('missing').catch(() => undefined);
    const text = (await call('GET', '/metrics')).body as string;
    expect(text).toMatch(/^# HELP weft_server_http_requests_total/m);
    expect(text).toMatch(/^weft_server_http_requests_total\{method="POST",route="\/api\/flows",status="200"\} \d+$/m);
    expect(text).toMatch(/^weft_server_http_requests_total\{method="GET",route="\/api\/flow-runs\/:id",status="404"\} \d+$/m);
    expect(text).toMatch(/^weft_server_http_requests_total\{method="POST",route="\/api\/logs",status="413"\} \d+$/m);
    expect(text).toMatch(/^weft_server_http_requests_total\{method="GET",route="unmatched",status="404"\} \d+$/m);
    expect(text).toMatch(/^weft_server_flow_runs\{state="Scheduled"\} [1-9]\d*$/m);
    expect(text).toMatch(/^weft_server_flow_runs\{state="Cancelling"\} 0$/m);
    expect(text).toMatch(/^weft_server_auth_refused_total [1-9]\d*$/m);
    const runs = await c.listFlowRuns({ states: ['Scheduled'], limit: 10_000 });
    expect(await metric(/^weft_server_flow_runs\{state="Scheduled"\}/)).toBe(runs.length);
  });
});
