/**
 * The backend's HTTP API (node:http, no framework): JSON routes under `/api/` for every
 * `Backend` operation, a WebSocket live feed at `/api/events`, and `/metrics`.
 *
 * Every request is checked before it reaches the store: the route (404 unknown, 405
 * wrong method with `Allow`), the token (401), the body size (413, counted while
 * reading, so a lying Content-Length cannot get past it), the JSON, and a zod schema
 * for the body and the query (400 naming the first wrong field, e.g.
 * `body.parameters: expected object, received string`). Errors are
 * `{ "error": { "code", "message" } }`; a store `BackendError` keeps its status and
 * code; anything else is 500 and logged. A request can fail, the server does not.
 *
 * Auth: with a token (`--token-file`) or API tokens stored (hashed) in the database,
 * every request except `GET /api/health` needs `Authorization: Bearer <token>` (the
 * feed also takes `?token=`, which browsers' WebSockets need). A refused request gets
 * 401, one line in the log and a count in `/metrics`.
 *
 * The feed sends each `ServerEvent` as one JSON text message, after its write
 * committed: the writes made through this server, and on PostgreSQL those of every other
 * server on the database (`notices.ts`). `?flowRun=ID` keeps the events of one run (its
 * run, task runs and logs). A client that falls `feedHighWaterBytes` behind is closed
 * (1013), and every client is closed (1012) when the server may have missed other
 * servers' changes (its listener connection dropped): a client should reconnect and
 * re-read what it shows, rather than get an unbounded queue or silent gaps.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';
import { z, type ZodType, type ZodTypeDef } from 'zod';
import { checkRunConfig } from '../run-config/index.ts';
import { TASK_STATE_NAMES } from '../scheduler/states.ts';
import { handleDashboard } from './dashboard.ts';
import { BackendError, FLOW_RUN_STATES, type ServerEvent } from './model.ts';
import { parseCron } from './schedule.ts';
import type { Store } from './store.ts';

export interface ApiOptions {
  /** The one token of `--token-file`; API tokens in the database also count. */
  readonly token?: string;
  /** JSON bodies. Default 16 MiB. */
  readonly maxBodyBytes?: number;
  /** Bundle uploads. Default 256 MiB. */
  readonly maxBundleBytes?: number;
  /** A feed client buffering more than this is closed. Default 8 MiB. */
  readonly feedHighWaterBytes?: number;
  /** Ping feed clients this often; one that misses a pong is dropped. Default 30 s. */
  readonly feedPingMs?: number;
  readonly log?: (line: string) => void;
}

/** The task state names the API accepts: the scheduler's own list. */
export const TASK_STATES = TASK_STATE_NAMES;

// ---------------------------------------------------------------------------------
// Schemas

const name = z.string().min(1).max(1000);
const labels = z.array(z.string().min(1).max(1000)).max(1000);
const jsonObject = z.record(z.unknown());
const time = z.number().int().nonnegative();
const HASH = /^[0-9a-f]{64}$/;

const storageRef = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('local'), path: z.string().min(1), host: z.string().min(1), flow: z.string() }).passthrough(),
  z.object({ kind: z.literal('module'), specifier: z.string().min(1), cwd: z.string().optional(), flow: z.string() }).passthrough(),
  z.object({ kind: z.literal('bundle'), hash: z.string().regex(HASH, 'expected a sha256 hex digest'), flow: z.string() }).passthrough(),
  z
    .object({
      kind: z.literal('s3'),
      bucket: z.string().min(1),
      key: z.string().min(1),
      hash: z.string(),
      endpoint: z.string().optional(),
      region: z.string().optional(),
      flow: z.string(),
    })
    .passthrough(),
  z
    .object({ kind: z.literal('git'), url: z.string().min(1), ref: z.string().min(1), path: z.string().min(1), commit: z.string().optional(), flow: z.string() })
    .passthrough(),
  z.object({ kind: z.literal('docker'), image: z.string().min(1), path: z.string().min(1), flow: z.string() }).passthrough(),
]);

/** The RunConfig checker of src/run-config, its message kept whole. */
const runConfig = z.unknown().transform((v, ctx) => {
  try {
    return checkRunConfig(v, 'runConfig');
  } catch (err) {
    ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message, params: { whole: true } });
    return z.NEVER;
  }
});

const executor = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('local') }),
  z.object({ kind: z.literal('pool'), threads: z.number().int().positive().optional() }),
  z.object({ kind: z.literal('cluster'), address: z.string().optional(), workers: z.number().int().positive().optional(), threads: z.number().int().positive().optional() }),
]);

const clock = z.discriminatedUnion('kind', [
  z.object({
    kind: z.literal('interval'),
    everyMs: z.number().int().min(1000),
    startAt: time.optional(),
    parameters: jsonObject.optional(),
    labels: labels.optional(),
  }),
  z.object({
    kind: z.literal('cron'),
    cron: z.string().superRefine((s, ctx) => {
      try {
        parseCron(s);
      } catch (err) {
        ctx.addIssue({ code: z.ZodIssueCode.custom, message: (err as Error).message });
      }
    }),
    parameters: jsonObject.optional(),
    labels: labels.optional(),
  }),
]);

const schedule = z.object({ clocks: z.array(clock).max(100), paused: z.boolean().optional() });

const registerBody = z.object({
  project: name,
  name,
  graph: z.unknown(),
  storage: storageRef,
  runConfig,
  executor,
  parameters: z.array(z.object({ name, required: z.boolean(), default: z.unknown().optional() })),
  labels,
  schedule: schedule.nullable().optional(),
});

const createRunBody = z.object({
  flowId: z.string().min(1).optional(),
  project: name.optional(),
  flowName: name.optional(),
  versionId: z.string().min(1).optional(),
  parameters: jsonObject.optional(),
  labels: labels.optional(),
  scheduledStart: time.optional(),
  idempotencyKey: z.string().min(1).max(1000).optional(),
});

const setStateBody = z.object({
  state: z.enum(FLOW_RUN_STATES),
  message: z.string().max(100_000).optional(),
  expectVersion: z.number().int().nonnegative().optional(),
});

const taskRunsBody = z.object({
  processId: z.string().min(1).max(1000),
  updates: z
    .array(
      z.object({
        key: z.string().min(1),
        mapIndex: z.number().int().min(-1),
        state: z.enum(TASK_STATES),
        expectVersion: z.number().int().nonnegative(),
        attempts: z.number().int().nonnegative().optional(),
        startedAt: time.optional(),
        endedAt: time.optional(),
        message: z.string().max(100_000).optional(),
      }),
    )
    .max(100_000),
});

const logsBody = z.object({
  entries: z
    .array(
      z.object({
        flowRunId: z.string().min(1),
        taskKey: z.string().optional(),
        mapIndex: z.number().int().optional(),
        level: z.enum(['debug', 'info', 'warn', 'error']),
        message: z.string(),
        at: time,
        source: z.string().min(1).max(100),
      }),
    )
    .max(100_000),
});

const agentBody = z.object({ name, kind: z.string().min(1).max(100), labels });
const claimBody = z.object({
  labels,
  before: time,
  limit: z.number().int().positive().max(1000),
  kind: z.enum(['local', 'docker', 'kubernetes']).optional(),
});
const slotsBody = z.object({ taskRunKey: z.string().min(1), tags: z.array(z.string().min(1)).max(1000) });
const releaseBody = z.object({ taskRunKey: z.string().min(1) });
const limitBody = z.object({ limit: z.number().int().nonnegative().nullable() });
const pausedBody = z.object({ paused: z.boolean() });
const empty = z.object({}).passthrough();

const intParam = z
  .string()
  .regex(/^\d+$/, 'expected a non-negative integer')
  .transform((s) => Number(s));
const runsQuery = z.object({
  flowId: z.string().min(1).optional(),
  project: z.string().min(1).optional(),
  // `state=Running,Submitted` or repeated.
  state: z
    .union([z.string(), z.array(z.string())])
    .transform((v) => (Array.isArray(v) ? v : [v]).flatMap((s) => s.split(',')).filter((s) => s !== ''))
    .pipe(z.array(z.enum(FLOW_RUN_STATES)))
    .optional(),
  limit: intParam.optional(),
});
const logsQuery = z.object({ after: intParam.optional(), limit: intParam.optional() });
const flowsQuery = z.object({ project: z.string().min(1).optional() });
const feedQuery = z.object({ flowRun: z.string().min(1).optional(), token: z.string().optional() });

/** `where.path: message` for the first issue, in words that name the field. */
export function describeZodError(err: z.ZodError, where: string): string {
  const issue = err.issues[0];
  if (issue === undefined) return `${where}: invalid`;
  const path = [where, ...issue.path.map((p) => (typeof p === 'number' ? `[${p}]` : `.${p}`))].join('');
  if (issue.code === 'custom' && (issue.params as { whole?: boolean } | undefined)?.whole === true) return `${where}.${issue.message}`;
  let msg = issue.message;
  if (issue.code === 'invalid_type') {
    msg = issue.received === 'undefined' ? `required (expected ${issue.expected})` : `expected ${issue.expected}, received ${issue.received}`;
  } else {
    msg = msg.charAt(0).toLowerCase() + msg.slice(1);
  }
  return `${path}: ${msg}`;
}

function parseWith<T>(schema: ZodType<T, ZodTypeDef, unknown>, value: unknown, where: string): T {
  const r = schema.safeParse(value);
  if (!r.success) throw new BackendError(400, 'BAD_REQUEST', describeZodError(r.error, where));
  return r.data;
}

// ---------------------------------------------------------------------------------
// Routes

interface Ctx {
  readonly params: Record<string, string>;
  readonly query: Record<string, string | string[]>;
  readonly req: IncomingMessage;
  readonly res: ServerResponse;
  /** The raw body (bundle uploads). */
  bytes(limit: number): Promise<Buffer>;
  /** The JSON body checked against `schema` (an empty body is `{}`). */
  body<T>(schema: ZodType<T, ZodTypeDef, unknown>): Promise<T>;
  queryAs<T>(schema: ZodType<T, ZodTypeDef, unknown>): T;
}

/** What a handler answers: JSON (200), or a response it wrote itself. */
type Answer = unknown;
const WROTE = Symbol('wrote');

interface Route {
  readonly method: string;
  readonly pattern: string;
  readonly parts: readonly string[];
  readonly handler: (ctx: Ctx) => Promise<Answer>;
}

export interface Api {
  handle(req: IncomingMessage, res: ServerResponse): void;
  upgrade(req: IncomingMessage, socket: Duplex, head: Buffer): void;
  /**
   * Close every feed client (1012) so it reconnects and re-reads: the feed missed
   * changes (the relay of other servers' changes lost its connection).
   */
  resetFeed(why: string): void;
  /** Closes feed clients; the HTTP server is its owner's to close. */
  close(): void;
}

const escapeLabel = (s: string): string => s.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');

export function createApi(store: Store, opts: ApiOptions = {}): Api {
  const log = opts.log ?? (() => undefined);
  const maxBody = opts.maxBodyBytes ?? 16 * 1024 * 1024;
  const maxBundle = opts.maxBundleBytes ?? 256 * 1024 * 1024;
  const highWater = opts.feedHighWaterBytes ?? 8 * 1024 * 1024;
  const staticToken = opts.token !== undefined ? createHash('sha256').update(opts.token).digest() : null;

  const counters = {
    requests: new Map<string, number>(),
    refused: 0,
    events: 0,
    feedDropped: 0,
  };

  // ---- auth ----
  let tokensInDb: { value: boolean; at: number } | null = null;
  const known = new Map<string, number>();
  const TOKEN_CACHE_MS = 5000;
  const authRequired = async (): Promise<boolean> => {
    if (staticToken !== null) return true;
    if (tokensInDb === null || Date.now() - tokensInDb.at > TOKEN_CACHE_MS) tokensInDb = { value: await store.hasApiTokens(), at: Date.now() };
    return tokensInDb.value;
  };
  /** null when allowed, else why not. */
  const checkAuth = async (presented: string | undefined): Promise<string | null> => {
    if (!(await authRequired())) return null;
    if (presented === undefined || presented === '') return 'no token';
    if (staticToken !== null) {
      const h = createHash('sha256').update(presented).digest();
      if (timingSafeEqual(h, staticToken)) return null;
    }
    const seen = known.get(presented);
    if (seen !== undefined && Date.now() - seen < TOKEN_CACHE_MS) return null;
    if (await store.isApiToken(presented)) {
      if (known.size > 1000) known.clear();
      known.set(presented, Date.now());
      return null;
    }
    return 'wrong token';
  };
  const bearer = (req: IncomingMessage): string | undefined => {
    const h = req.headers.authorization;
    if (h === undefined) return undefined;
    const m = /^Bearer\s+(.+)$/i.exec(h.trim());
    return m === null ? '' : (m[1] as string).trim();
  };
  const refuse = (req: IncomingMessage, path: string, why: string): void => {
    counters.refused++;
    log(`refused ${req.method ?? '?'} ${path} from ${req.socket.remoteAddress ?? '?'}: ${why}`);
  };

  // ---- routes ----
  const routes: Route[] = [];
  const def = (method: string, pattern: string, handler: (ctx: Ctx) => Promise<Answer>): void => {
    routes.push({ method, pattern, parts: pattern.split('/').slice(1), handler });
  };

  def('GET', '/api/health', async () => ({ ok: true, db: store.db.dialect }));

  def('GET', '/api/projects', async () => store.listProjects());
  def('POST', '/api/projects', async (c) => store.createProject((await c.body(z.object({ name }))).name));
  def('GET', '/api/projects/:project/flows/:name', async (c) => store.getFlow({ project: c.params.project as string, name: c.params.name as string }));

  def('GET', '/api/flows', async (c) => store.listFlows(stripUndefined(c.queryAs(flowsQuery))));
  def('POST', '/api/flows', async (c) => {
    const b = await c.body(registerBody);
    // A graph left out is recorded as null.
    return store.registerFlow(stripUndefined({ ...b, graph: b.graph ?? null }));
  });
  def('GET', '/api/flows/:id', async (c) => store.getFlow(c.params.id as string));
  def('GET', '/api/flows/:id/versions', async (c) => {
    await store.getFlow(c.params.id as string);
    return store.listFlowVersions(c.params.id as string);
  });
  def('POST', '/api/flows/:id/schedule', async (c) => store.setSchedulePaused(c.params.id as string, (await c.body(pausedBody)).paused));
  def('GET', '/api/flow-versions/:id', async (c) => store.getFlowVersion(c.params.id as string));

  def('POST', '/api/flow-runs', async (c) => store.createFlowRun(stripUndefined(await c.body(createRunBody))));
  def('GET', '/api/flow-runs', async (c) => {
    const { state, ...q } = c.queryAs(runsQuery);
    return store.listFlowRuns(stripUndefined({ ...q, states: state }));
  });
  def('GET', '/api/flow-runs/:id', async (c) => store.getFlowRun(c.params.id as string));
  def('GET', '/api/flow-runs/:id/history', async (c) => store.getFlowRunHistory(c.params.id as string));
  def('POST', '/api/flow-runs/:id/state', async (c) => {
    const b = await c.body(setStateBody);
    return store.setFlowRunState(c.params.id as string, b.state, stripUndefined({ message: b.message, expectVersion: b.expectVersion }));
  });
  def('POST', '/api/flow-runs/:id/cancel', async (c) => {
    await c.body(empty);
    return store.cancelFlowRun(c.params.id as string);
  });
  def('POST', '/api/flow-runs/:id/heartbeat', async (c) => {
    await c.body(empty);
    return store.heartbeatFlowRun(c.params.id as string);
  });
  def('GET', '/api/flow-runs/:id/task-runs', async (c) => store.getTaskRuns(c.params.id as string));
  def('POST', '/api/flow-runs/:id/task-runs', async (c) => {
    const b = await c.body(taskRunsBody);
    return store.setTaskRunStates(c.params.id as string, b.processId, b.updates.map(stripUndefined));
  });
  def('GET', '/api/flow-runs/:id/logs', async (c) => store.getLogs(c.params.id as string, stripUndefined(c.queryAs(logsQuery))));
  def('POST', '/api/flow-runs/:id/slots/acquire', async (c) => {
    const b = await c.body(slotsBody);
    return { acquired: await store.acquireTaskSlots(c.params.id as string, b.taskRunKey, b.tags) };
  });
  def('POST', '/api/flow-runs/:id/slots/release', async (c) => {
    await store.releaseTaskSlots(c.params.id as string, (await c.body(releaseBody)).taskRunKey);
    return { ok: true };
  });

  def('POST', '/api/logs', async (c) => {
    await store.writeLogs((await c.body(logsBody)).entries.map(stripUndefined));
    return { ok: true };
  });

  def('GET', '/api/agents', async () => store.listAgents());
  def('POST', '/api/agents', async (c) => store.registerAgent(await c.body(agentBody)));
  def('POST', '/api/agents/:id/claim', async (c) => store.claimFlowRuns({ agentId: c.params.id as string, ...stripUndefined(await c.body(claimBody)) }));

  def('PUT', '/api/bundles/:hash', async (c) => {
    const hash = c.params.hash as string;
    if (!HASH.test(hash)) throw new BackendError(400, 'BAD_REQUEST', `path.hash: expected a sha256 hex digest, got ${JSON.stringify(hash)}`);
    await store.putBundle(hash, await c.bytes(maxBundle));
    return { ok: true };
  });
  def('GET', '/api/bundles/:hash', async (c) => {
    const hash = c.params.hash as string;
    if (!HASH.test(hash)) throw new BackendError(400, 'BAD_REQUEST', `path.hash: expected a sha256 hex digest, got ${JSON.stringify(hash)}`);
    const bytes = await store.getBundle(hash);
    c.res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': bytes.byteLength });
    c.res.end(bytes);
    return WROTE;
  });

  def('GET', '/api/concurrency-limits', async () => store.listConcurrencyLimits());
  def('PUT', '/api/concurrency-limits/:kind/:name', async (c) => {
    const kind = c.params.kind;
    if (kind !== 'tag' && kind !== 'label') throw new BackendError(400, 'BAD_REQUEST', `path.kind: expected tag or label, got ${JSON.stringify(kind)}`);
    await store.setConcurrencyLimit(kind, c.params.name as string, (await c.body(limitBody)).limit);
    return { ok: true };
  });

  def('GET', '/api/events', async () => {
    throw new BackendError(426, 'UPGRADE_REQUIRED', '/api/events is a WebSocket feed: connect with an Upgrade: websocket request');
  });

  def('GET', '/metrics', async (c) => {
    const text = await metrics();
    c.res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4; charset=utf-8' });
    c.res.end(text);
    return WROTE;
  });

  const match = (path: string): { route: Route; params: Record<string, string> }[] | 'bad-path' => {
    const parts = path.split('/').slice(1);
    const out: { route: Route; params: Record<string, string> }[] = [];
    for (const route of routes) {
      if (route.parts.length !== parts.length) continue;
      const params: Record<string, string> = {};
      let ok = true;
      for (let i = 0; i < parts.length && ok; i++) {
        const want = route.parts[i] as string;
        const got = parts[i] as string;
        if (want.startsWith(':')) {
          if (got === '') ok = false;
          else {
            try {
              params[want.slice(1)] = decodeURIComponent(got);
            } catch {
              return 'bad-path';
            }
          }
        } else if (want !== got) ok = false;
      }
      if (ok) out.push({ route, params });
    }
    return out;
  };

  const count = (method: string, route: string, status: number): void => {
    const k = `${method}\u0000${route}\u0000${status}`;
    counters.requests.set(k, (counters.requests.get(k) ?? 0) + 1);
  };

  const sendJson = (res: ServerResponse, status: number, value: unknown, headers: Record<string, string> = {}): void => {
    if (res.headersSent) {
      res.end();
      return;
    }
    const text = JSON.stringify(value);
    res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(text), ...headers });
    res.end(text);
  };
  const sendError = (res: ServerResponse, status: number, code: string, message: string, headers: Record<string, string> = {}): void =>
    sendJson(res, status, { error: { code, message } }, headers);

  /** The body, refused past `limit` bytes (declared or counted). */
  const readBody = (req: IncomingMessage, limit: number): Promise<Buffer> =>
    new Promise((resolve, reject) => {
      const declared = Number(req.headers['content-length'] ?? NaN);
      const tooBig = (): BackendError => new BackendError(413, 'PAYLOAD_TOO_LARGE', `request body over the limit of ${limit} bytes`);
      if (Number.isFinite(declared) && declared > limit) {
        reject(tooBig());
        return;
      }
      const chunks: Buffer[] = [];
      let size = 0;
      let done = false;
      const onData = (c: Buffer): void => {
        size += c.length;
        if (size > limit) {
          done = true;
          req.off('data', onData);
          chunks.length = 0;
          reject(tooBig());
          return;
        }
        chunks.push(c);
      };
      req.on('data', onData);
      req.once('end', () => {
        if (!done) resolve(Buffer.concat(chunks));
      });
      req.once('error', (err) => {
        if (!done) reject(err);
        done = true;
      });
    });

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const method = req.method ?? 'GET';
    let url: URL;
    try {
      url = new URL(req.url ?? '/', 'http://weft');
    } catch {
      count(method, 'unmatched', 400);
      sendError(res, 400, 'BAD_REQUEST', 'malformed request URL');
      return;
    }
    const path = url.pathname.length > 1 ? url.pathname.replace(/\/+$/, '') : url.pathname;
    const found = match(path);
    const exact = found === 'bad-path' ? [] : found.filter((m) => m.route.method === method || (method === 'HEAD' && m.route.method === 'GET'));
    const routeName = exact[0]?.route.pattern ?? (found !== 'bad-path' && found.length > 0 ? (found[0] as { route: Route }).route.pattern : 'unmatched');
    let status = 500;
    try {
      if (!(method === 'GET' && path === '/api/health')) {
        const why = await checkAuth(bearer(req));
        if (why !== null) {
          refuse(req, path, why);
          status = 401;
          sendError(res, 401, 'UNAUTHORIZED', `${why}: send Authorization: Bearer <token>`, { 'www-authenticate': 'Bearer' });
          return;
        }
      }
      if (found === 'bad-path') throw new BackendError(400, 'BAD_REQUEST', 'malformed percent-encoding in the path');
      if (exact.length === 0) {
        if (found.length > 0) {
          const allow = [...new Set(found.map((m) => m.route.method))].join(', ');
          status = 405;
          sendError(res, 405, 'METHOD_NOT_ALLOWED', `${method} is not allowed on ${path} (allowed: ${allow})`, { allow });
          return;
        }
        status = 404;
        sendError(res, 404, 'NOT_FOUND', `no route ${method} ${path}`);
        return;
      }
      const { route, params } = exact[0] as { route: Route; params: Record<string, string> };
      const query: Record<string, string | string[]> = {};
      for (const [k, v] of url.searchParams) {
        const prev = query[k];
        query[k] = prev === undefined ? v : Array.isArray(prev) ? [...prev, v] : [prev, v];
      }
      const ctx: Ctx = {
        params,
        query,
        req,
        res,
        bytes: (limit) => readBody(req, limit),
        async body<T>(schema: ZodType<T, ZodTypeDef, unknown>): Promise<T> {
          const raw = await readBody(req, maxBody);
          let value: unknown = {};
          if (raw.length > 0) {
            try {
              value = JSON.parse(raw.toString('utf8'));
            } catch (err) {
              throw new BackendError(400, 'BAD_REQUEST', `body: invalid JSON (${(err as Error).message})`);
            }
          }
          return parseWith(schema, value, 'body');
        },
        queryAs: <T>(schema: ZodType<T, ZodTypeDef, unknown>): T => parseWith(schema, query, 'query'),
      };
      const out = await route.handler(ctx);
      status = 200;
      if (out !== WROTE) sendJson(res, 200, out);
    } catch (err) {
      if (err instanceof BackendError) {
        status = err.status;
        // After a refused body the rest of it is not read: close rather than reuse the connection.
        sendError(res, err.status, err.code, err.message, err.status === 413 ? { connection: 'close' } : {});
        if (err.status === 413) drainOrDrop(req);
      } else if (isUnavailable(err)) {
        status = 503;
        log(`${method} ${path}: database unavailable: ${(err as Error).message}`);
        sendError(res, 503, 'UNAVAILABLE', `the database is unavailable: ${(err as Error).message}`);
      } else {
        status = 500;
        log(`${method} ${path}: internal error: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
        sendError(res, 500, 'INTERNAL', err instanceof Error ? err.message : String(err));
      }
    } finally {
      count(method, routeName, status);
    }
  };

  // ---- the feed ----
  const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 });
  const feed = new Map<WebSocket, { flowRun: string | undefined; alive: boolean }>();
  const unsubscribe = store.onEvent((e) => {
    counters.events++;
    if (feed.size === 0) return;
    const run = eventRun(e);
    let text: string | null = null;
    for (const [ws, sub] of feed) {
      if (sub.flowRun !== undefined && sub.flowRun !== run) continue;
      if (ws.readyState !== ws.OPEN) continue;
      if (ws.bufferedAmount > highWater) {
        counters.feedDropped++;
        feed.delete(ws);
        ws.close(1013, 'too slow: reconnect and re-read');
        continue;
      }
      text ??= JSON.stringify(e);
      ws.send(text);
    }
  });
  const pinger = setInterval(() => {
    for (const [ws, sub] of feed) {
      if (!sub.alive) {
        feed.delete(ws);
        ws.terminate();
        continue;
      }
      sub.alive = false;
      ws.ping();
    }
  }, opts.feedPingMs ?? 30_000);
  pinger.unref();

  const upgrade = (req: IncomingMessage, socket: Duplex, head: Buffer): void => {
    const refuseUpgrade = (status: number, text: string): void => {
      socket.end(`HTTP/1.1 ${status} ${text}\r\nconnection: close\r\ncontent-length: 0\r\n\r\n`);
    };
    socket.on('error', () => socket.destroy());
    let url: URL;
    try {
      url = new URL(req.url ?? '/', 'http://weft');
    } catch {
      refuseUpgrade(400, 'Bad Request');
      return;
    }
    if (url.pathname !== '/api/events') {
      count('GET', 'unmatched', 404);
      refuseUpgrade(404, 'Not Found');
      return;
    }
    const q = feedQuery.safeParse(Object.fromEntries(url.searchParams));
    if (!q.success) {
      count('GET', '/api/events', 400);
      refuseUpgrade(400, 'Bad Request');
      return;
    }
    checkAuth(bearer(req) ?? q.data.token)
      .then((why) => {
        if (why !== null) {
          refuse(req, url.pathname, why);
          count('GET', '/api/events', 401);
          refuseUpgrade(401, 'Unauthorized');
          return;
        }
        wss.handleUpgrade(req, socket, head, (ws) => {
          count('GET', '/api/events', 101);
          const sub = { flowRun: q.data.flowRun, alive: true };
          feed.set(ws, sub);
          ws.on('pong', () => (sub.alive = true));
          ws.on('close', () => feed.delete(ws));
          ws.on('error', () => feed.delete(ws));
          // The feed is one-way: what a client sends is ignored.
        });
      })
      .catch((err: unknown) => {
        log(`feed upgrade: ${err instanceof Error ? err.message : String(err)}`);
        refuseUpgrade(503, 'Service Unavailable');
      });
  };

  const metrics = async (): Promise<string> => {
    const lines: string[] = [];
    lines.push('# HELP weft_server_http_requests_total HTTP requests by method, route and status.');
    lines.push('# TYPE weft_server_http_requests_total counter');
    for (const [k, n] of [...counters.requests].sort()) {
      const [m, route, status] = k.split('\u0000') as [string, string, string];
      lines.push(`weft_server_http_requests_total{method="${escapeLabel(m)}",route="${escapeLabel(route)}",status="${status}"} ${n}`);
    }
    lines.push('# HELP weft_server_auth_refused_total Requests refused for a missing or wrong token.');
    lines.push('# TYPE weft_server_auth_refused_total counter');
    lines.push(`weft_server_auth_refused_total ${counters.refused}`);
    lines.push('# HELP weft_server_flow_runs Flow runs by state.');
    lines.push('# TYPE weft_server_flow_runs gauge');
    const byState = await store.countRunsByState();
    for (const s of FLOW_RUN_STATES) lines.push(`weft_server_flow_runs{state="${s}"} ${byState.get(s) ?? 0}`);
    lines.push('# HELP weft_server_events_total Events published to the live feed.');
    lines.push('# TYPE weft_server_events_total counter');
    lines.push(`weft_server_events_total ${counters.events}`);
    lines.push('# HELP weft_server_feed_clients Live feed connections.');
    lines.push('# TYPE weft_server_feed_clients gauge');
    lines.push(`weft_server_feed_clients ${feed.size}`);
    lines.push('# HELP weft_server_feed_dropped_total Feed clients closed for falling behind.');
    lines.push('# TYPE weft_server_feed_dropped_total counter');
    lines.push(`weft_server_feed_dropped_total ${counters.feedDropped}`);
    return `${lines.join('\n')}\n`;
  };

  return {
    handle(req, res): void {
      // `/` and `/ui/*`: the dashboard's static files, served without a token (they hold no data).
      if (handleDashboard(req, res)) return;
      handle(req, res).catch((err: unknown) => {
        log(`request handling failed: ${err instanceof Error ? err.message : String(err)}`);
        if (!res.headersSent) sendError(res, 500, 'INTERNAL', 'internal error');
        else res.destroy();
      });
    },
    upgrade,
    resetFeed(why: string): void {
      if (feed.size > 0) log(`closing ${feed.size} feed client${feed.size === 1 ? '' : 's'}: ${why}`);
      for (const ws of feed.keys()) ws.close(1012, 'missed changes: reconnect and re-read');
      feed.clear();
    },
    close(): void {
      unsubscribe();
      clearInterval(pinger);
      for (const ws of feed.keys()) ws.close(1001, 'server shutting down');
      feed.clear();
      wss.close();
    },
  };
}

/** The run an event belongs to (undefined for flow events). */
function eventRun(e: ServerEvent): string | undefined {
  switch (e.type) {
    case 'flowRun':
      return e.run.id;
    case 'taskRun':
      return e.task.flowRunId;
    case 'log':
      return e.entry.flowRunId;
    default:
      return undefined;
  }
}

/**
 * After a 413 the rest of the body is read and thrown away (so the client gets to read
 * the answer instead of a reset), up to a bound past which the connection is dropped.
 */
function drainOrDrop(req: IncomingMessage): void {
  let left = 64 * 1024 * 1024;
  req.on('data', (c: Buffer) => {
    left -= c.length;
    if (left < 0) req.socket.destroy();
  });
  req.resume();
}

const UNAVAILABLE_CODES = new Set(['ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', '57P01', '57P03', '08000', '08003', '08006', '08001']);
function isUnavailable(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && UNAVAILABLE_CODES.has(code);
}

/** Drop keys whose value is undefined (the store's inputs are exact optional properties). */
function stripUndefined<T extends object>(o: T): T {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) if (v !== undefined) out[k] = v;
  return out as T;
}
