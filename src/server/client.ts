/**
 * `BackendClient`: the `Backend` over HTTP, for agents, flow-run processes and the CLI.
 *
 * Each method is one request to the route `http.ts` serves for it. An error answer
 * (`{ error: { code, message } }`) becomes a `BackendError` with the HTTP status; a
 * request that never got an answer rejects with fetch's own error (a TypeError whose
 * `cause.code` says why, e.g. ECONNREFUSED). GETs change nothing, so a GET refused at
 * the connection (the server restarting) or answered 503 is retried a few times with
 * a short backoff; writes are not (the caller knows whether a write may repeat).
 *
 * `subscribe` opens the live feed (`/api/events`) and hands each `ServerEvent` to a
 * callback until the returned function closes it.
 */
import {
  BackendError,
  type AgentRecord,
  type ConcurrencyLimit,
  type Backend,
  type ClaimedRun,
  type ClaimInput,
  type CreateFlowRunInput,
  type FlowRecord,
  type FlowRun,
  type FlowRunState,
  type FlowRunStateChange,
  type FlowVersion,
  type ListRunsQuery,
  type LogEntry,
  type Project,
  type RegisterFlowInput,
  type ServerEvent,
  type StoredLogEntry,
  type TaskRun,
  type TaskRunUpdate,
  type TaskRunWriteResult,
} from './model.ts';

export interface BackendClientOptions {
  /** Sent as `Authorization: Bearer <token>`. */
  readonly token?: string;
  /** Retries of a GET refused at the connection or answered 503. Default 4 (≈1.5 s in all). */
  readonly retries?: number;
  /** Per request. Default 60 s. */
  readonly timeoutMs?: number;
}

export interface SubscribeOptions {
  /** Only the events of this flow run (its state, task runs and logs). */
  readonly flowRun?: string;
  /** The feed closed (by `close()`, the server, or the network). */
  readonly onClose?: (code: number, reason: string) => void;
}

const RETRYABLE = new Set(['ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'UND_ERR_SOCKET']);
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const enc = encodeURIComponent;

export class BackendClient implements Backend {
  readonly url: string;
  private readonly token: string | undefined;
  private readonly retries: number;
  private readonly timeoutMs: number;

  constructor(url: string, opts: BackendClientOptions = {}) {
    this.url = url.replace(/\/+$/, '');
    this.token = opts.token;
    this.retries = opts.retries ?? 4;
    this.timeoutMs = opts.timeoutMs ?? 60_000;
  }

  private headers(extra: Record<string, string> = {}): Record<string, string> {
    return this.token !== undefined ? { authorization: `Bearer ${this.token}`, ...extra } : extra;
  }

  /** One request; answers the response when it is a success, else throws its BackendError. */
  private async send(method: string, path: string, body?: { json: unknown } | { bytes: Uint8Array }): Promise<Response> {
    const init: RequestInit = { method, headers: this.headers() };
    if (body !== undefined && 'json' in body) {
      init.body = JSON.stringify(body.json);
      init.headers = this.headers({ 'content-type': 'application/json' });
    } else if (body !== undefined) {
      init.body = body.bytes;
      init.headers = this.headers({ 'content-type': 'application/octet-stream' });
    }
    const idempotent = method === 'GET';
    for (let attempt = 0; ; attempt++) {
      let res: Response;
      try {
        res = await fetch(`${this.url}${path}`, { ...init, signal: AbortSignal.timeout(this.timeoutMs) });
      } catch (err) {
        const code = (err as { cause?: { code?: unknown } }).cause?.code;
        if (idempotent && attempt < this.retries && typeof code === 'string' && RETRYABLE.has(code)) {
          await sleep(100 * 2 ** attempt);
          continue;
        }
        throw err;
      }
      if (res.ok) return res;
      if (idempotent && res.status === 503 && attempt < this.retries) {
        await res.arrayBuffer().catch(() => undefined);
        await sleep(100 * 2 ** attempt);
        continue;
      }
      throw await toBackendError(res);
    }
  }

  private async json<T>(method: string, path: string, body?: unknown): Promise<T> {
    const res = await this.send(method, path, body === undefined ? undefined : { json: body });
    return (await res.json()) as T;
  }

  // ---- Backend ----

  createProject(name: string): Promise<Project> {
    return this.json('POST', '/api/projects', { name });
  }

  listProjects(): Promise<Project[]> {
    return this.json('GET', '/api/projects');
  }

  registerFlow(input: RegisterFlowInput): Promise<{ flow: FlowRecord; version: FlowVersion; created: boolean }> {
    return this.json('POST', '/api/flows', input);
  }

  listFlows(q: { project?: string } = {}): Promise<FlowRecord[]> {
    return this.json('GET', `/api/flows${query({ project: q.project })}`);
  }

  getFlow(ref: string | { project: string; name: string }): Promise<FlowRecord> {
    return typeof ref === 'string'
      ? this.json('GET', `/api/flows/${enc(ref)}`)
      : this.json('GET', `/api/projects/${enc(ref.project)}/flows/${enc(ref.name)}`);
  }

  getFlowVersion(versionId: string): Promise<FlowVersion> {
    return this.json('GET', `/api/flow-versions/${enc(versionId)}`);
  }

  /** A flow's versions, newest first (not part of `Backend`). */
  listFlowVersions(flowId: string): Promise<FlowVersion[]> {
    return this.json('GET', `/api/flows/${enc(flowId)}/versions`);
  }

  setSchedulePaused(flowId: string, paused: boolean): Promise<FlowRecord> {
    return this.json('POST', `/api/flows/${enc(flowId)}/schedule`, { paused });
  }

  createFlowRun(input: CreateFlowRunInput): Promise<FlowRun> {
    return this.json('POST', '/api/flow-runs', input);
  }

  getFlowRun(id: string): Promise<FlowRun> {
    return this.json('GET', `/api/flow-runs/${enc(id)}`);
  }

  listFlowRuns(q: ListRunsQuery = {}): Promise<FlowRun[]> {
    return this.json(
      'GET',
      `/api/flow-runs${query({ flowId: q.flowId, project: q.project, state: q.states !== undefined && q.states.length > 0 ? q.states.join(',') : undefined, limit: q.limit })}`,
    );
  }

  getFlowRunHistory(id: string): Promise<FlowRunStateChange[]> {
    return this.json('GET', `/api/flow-runs/${enc(id)}/history`);
  }

  setFlowRunState(id: string, state: FlowRunState, opts: { message?: string; expectVersion?: number } = {}): Promise<FlowRun> {
    return this.json('POST', `/api/flow-runs/${enc(id)}/state`, { state, ...opts });
  }

  cancelFlowRun(id: string): Promise<FlowRun> {
    return this.json('POST', `/api/flow-runs/${enc(id)}/cancel`, {});
  }

  heartbeatFlowRun(id: string): Promise<FlowRun> {
    return this.json('POST', `/api/flow-runs/${enc(id)}/heartbeat`, {});
  }

  registerAgent(input: { name: string; kind: string; labels: readonly string[] }): Promise<AgentRecord> {
    return this.json('POST', '/api/agents', input);
  }

  /** Agents, most recently seen first (not part of `Backend`). */
  listAgents(): Promise<AgentRecord[]> {
    return this.json('GET', '/api/agents');
  }

  claimFlowRuns(input: ClaimInput): Promise<ClaimedRun[]> {
    const { agentId, ...rest } = input;
    return this.json('POST', `/api/agents/${enc(agentId)}/claim`, rest);
  }

  setTaskRunStates(flowRunId: string, processId: string, updates: readonly TaskRunUpdate[]): Promise<TaskRunWriteResult[]> {
    return this.json('POST', `/api/flow-runs/${enc(flowRunId)}/task-runs`, { processId, updates });
  }

  getTaskRuns(flowRunId: string): Promise<TaskRun[]> {
    return this.json('GET', `/api/flow-runs/${enc(flowRunId)}/task-runs`);
  }

  async writeLogs(entries: readonly LogEntry[]): Promise<void> {
    if (entries.length === 0) return;
    await this.json('POST', '/api/logs', { entries });
  }

  getLogs(flowRunId: string, opts: { after?: number; limit?: number } = {}): Promise<StoredLogEntry[]> {
    return this.json('GET', `/api/flow-runs/${enc(flowRunId)}/logs${query({ after: opts.after, limit: opts.limit })}`);
  }

  async putBundle(hash: string, code: Uint8Array): Promise<void> {
    const res = await this.send('PUT', `/api/bundles/${enc(hash)}`, { bytes: code });
    await res.arrayBuffer();
  }

  async getBundle(hash: string): Promise<Uint8Array> {
    const res = await this.send('GET', `/api/bundles/${enc(hash)}`);
    return new Uint8Array(await res.arrayBuffer());
  }

  async setConcurrencyLimit(kind: 'tag' | 'label', name: string, limit: number | null): Promise<void> {
    await this.json('PUT', `/api/concurrency-limits/${enc(kind)}/${enc(name)}`, { limit });
  }

  /** Every limit with how much of it is in use (not part of `Backend`). */
  listConcurrencyLimits(): Promise<ConcurrencyLimit[]> {
    return this.json('GET', '/api/concurrency-limits');
  }

  async acquireTaskSlots(flowRunId: string, taskRunKey: string, tags: readonly string[]): Promise<boolean> {
    const r = await this.json<{ acquired: boolean }>('POST', `/api/flow-runs/${enc(flowRunId)}/slots/acquire`, { taskRunKey, tags });
    return r.acquired;
  }

  async releaseTaskSlots(flowRunId: string, taskRunKey: string): Promise<void> {
    await this.json('POST', `/api/flow-runs/${enc(flowRunId)}/slots/release`, { taskRunKey });
  }

  // ---- the live feed ----

  /**
   * Open the live feed; resolves once it is connected (events from then on reach
   * `onEvent`) with a function that closes it. Rejects when the server refuses it.
   */
  async subscribe(onEvent: (e: ServerEvent) => void, opts: SubscribeOptions = {}): Promise<() => void> {
    const url = new URL(`${this.url}/api/events`);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    if (opts.flowRun !== undefined) url.searchParams.set('flowRun', opts.flowRun);
    // ws is loaded by the first feed, not by every process that talks to the server.
    const { default: WebSocket } = await import('ws');
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url, { headers: this.headers() });
      let open = false;
      ws.on('unexpected-response', (_req, res) => {
        res.resume();
        ws.terminate();
        reject(new BackendError(res.statusCode ?? 0, res.statusCode === 401 ? 'UNAUTHORIZED' : 'FEED_REFUSED', `the server refused the feed (HTTP ${res.statusCode ?? '?'})`));
      });
      ws.on('error', (err) => {
        if (!open) reject(err);
      });
      ws.on('open', () => {
        open = true;
        resolve(() => ws.close(1000, 'closed by the client'));
      });
      ws.on('message', (data, isBinary) => {
        if (isBinary) return;
        let e: ServerEvent;
        try {
          e = JSON.parse(data.toString()) as ServerEvent;
        } catch {
          return;
        }
        onEvent(e);
      });
      ws.on('close', (code, reason) => {
        if (open) opts.onClose?.(code, reason.toString());
      });
    });
  }
}

function query(q: Record<string, string | number | undefined>): string {
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) if (v !== undefined) p.set(k, String(v));
  const s = p.toString();
  return s === '' ? '' : `?${s}`;
}

async function toBackendError(res: Response): Promise<BackendError> {
  const text = await res.text().catch(() => '');
  try {
    const doc = JSON.parse(text) as { error?: { code?: unknown; message?: unknown } };
    if (typeof doc.error?.code === 'string' && typeof doc.error.message === 'string') return new BackendError(res.status, doc.error.code, doc.error.message);
  } catch {
    // Not JSON: a proxy's page, say.
  }
  return new BackendError(res.status, `HTTP_${res.status}`, text.slice(0, 500) || res.statusText);
}
