/**
 * Every `Backend` operation as typed queries on a `Db`: the same code serves SQLite and
 * PostgreSQL, in-process (tests, the server's services) and behind the HTTP API.
 *
 * Consistency rules, each enforced inside one transaction:
 * - Registration: a flow is one row per (project, name); a new version is recorded only
 *   when the fingerprint (sha256 of the canonical JSON of graph, storage, run config,
 *   executor, parameters, labels and clocks) differs from the newest one. The flow row
 *   is locked while versions are counted, so concurrent registrations never collide.
 * - Claims (Prefect 1's rule): Scheduled runs due by `before` whose labels are all among
 *   the agent's, oldest `scheduledStart` first, become Submitted with the agent's id. In
 *   PostgreSQL the rows are taken `FOR UPDATE SKIP LOCKED` and the update re-checks
 *   `state = 'Scheduled'`, so two claimers (even on two servers) never get one run;
 *   SQLite's write transaction serialises claimers. Flow-run label limits count runs
 *   Submitted, Running or Cancelling; the limit rows are locked first, so concurrent
 *   claims cannot both take the last slot.
 * - Flow-run states: each write bumps `stateVersion`; with `expectVersion` a stale
 *   writer gets CONFLICT (409). Task runs: a write names the version it last saw (0 =
 *   not created); a stale one is refused (`ok: false` with the stored version), so a
 *   process that lost its run to a restart cannot overwrite the new process's states.
 * - Task-tag slots are all-or-nothing across tags (limit rows locked in name order, so
 *   no deadlock), and are released when the task says so, when its run ends, and when
 *   the run is rescheduled or failed by the zombie killer or lazarus.
 *
 * Events (`onEvent`) are emitted after the transaction commits, never for a write that
 * rolled back; on PostgreSQL the transaction also NOTIFYs them (delivered at commit) for
 * the other servers on the database (`notices.ts`). Errors are `BackendError`s with the
 * HTTP status the API answers.
 */
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { checkRunConfig, type RunConfig } from '../run-config/index.ts';
import type { StorageRef } from '../storage/types.ts';
import type { Db, Row, Sql } from './db.ts';
import {
  BackendError,
  FINAL_FLOW_RUN_STATES,
  type AgentRecord,
  type ConcurrencyLimit,
  type Backend,
  type ClaimedRun,
  type ClaimInput,
  type CreateFlowRunInput,
  type ExecutorSettings,
  type FlowRecord,
  type FlowRun,
  type FlowRunState,
  type FlowRunStateChange,
  type FlowVersion,
  type ListRunsQuery,
  type LogEntry,
  type ParameterInfo,
  type Project,
  type RegisterFlowInput,
  type Schedule,
  type ServerEvent,
  type StoredLogEntry,
  type TaskRun,
  type TaskRunUpdate,
  type TaskRunWriteResult,
} from './model.ts';
import { eventFromRead, encodeNotices, FEED_CHANNEL, type NoticeItem } from './notices.ts';
import { canonicalJson, checkClock, nextTicks } from './schedule.ts';

export interface StoreOptions {
  /** The clock (ms). Default Date.now. */
  readonly now?: () => number;
  /** An agent not seen (registered or claimed) for this long is `unhealthy`. Default 60 s. */
  readonly agentTimeoutMs?: number;
}

export const DEFAULT_AGENT_TIMEOUT_MS = 60_000;

/** States whose runs hold an agent's attention (and count against label limits). */
export const ACTIVE_STATES: readonly FlowRunState[] = ['Submitted', 'Running', 'Cancelling'];
const MAX_LIST = 10_000;

const RUN_COLS =
  'id, flow_id, version_id, flow_name, project, version, state, state_version, state_at, message, parameters, labels, ' +
  'scheduled_start, started_at, ended_at, heartbeat_at, agent_id, restarts, idempotency_key, created_at';
const TASK_COLS = 'id, flow_run_id, key, map_index, state, version, attempts, started_at, ended_at, message, process_id';
const FLOW_COLS = 'f.id, f.project_id, p.name AS project, f.name, f.version, f.version_id, f.schedule, f.created_at, f.updated_at';
const VERSION_COLS = 'id, flow_id, version, fingerprint, graph, storage, run_config, executor, parameters, labels, created_at';
const AGENT_COLS = 'id, name, kind, labels, last_seen';

const notFound = (what: string): BackendError => new BackendError(404, 'NOT_FOUND', `${what} not found`);
const badRequest = (message: string): BackendError => new BackendError(400, 'BAD_REQUEST', message);

/** `$from, $from+1, …` for `n` values. */
function placeholders(from: number, n: number): string {
  return Array.from({ length: n }, (_, i) => `$${from + i}`).join(', ');
}

const num = (v: unknown): number => Number(v);
const numOrNull = (v: unknown): number | null => (v === null || v === undefined ? null : Number(v));
const strOrNull = (v: unknown): string | null => (v === null || v === undefined ? null : String(v));
const json = <T>(v: unknown): T => JSON.parse(String(v)) as T;

/** How each field of a record is read from its column: the field's name in snake_case. */
type Fields<T> = { readonly [K in keyof T]-?: (v: unknown) => T[K] };

/** A row → record function from one reader per field (one table says which column is what). */
function reader<T>(fields: Fields<T>): (r: Row) => T {
  const cols = Object.entries(fields as Record<string, (v: unknown) => unknown>).map(
    ([k, read]) => [k, k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`), read] as const,
  );
  return (r) => {
    const out: Record<string, unknown> = {};
    for (const [k, col, read] of cols) out[k] = read(r[col]);
    return out as T;
  };
}

const str = (v: unknown): string => String(v);
const cast = <T>(v: unknown): T => v as T;
const jsonOrNull = <T>(v: unknown): T | null => (v === null || v === undefined ? null : json<T>(v));

const toRun = reader<FlowRun>({
  id: str,
  flowId: str,
  flowName: str,
  project: str,
  versionId: str,
  version: num,
  state: cast<FlowRunState>,
  stateVersion: num,
  message: strOrNull,
  parameters: json<Record<string, unknown>>,
  labels: json<string[]>,
  scheduledStart: num,
  startedAt: numOrNull,
  endedAt: numOrNull,
  heartbeatAt: numOrNull,
  agentId: strOrNull,
  restarts: num,
  idempotencyKey: strOrNull,
  createdAt: num,
});

const toFlow = reader<FlowRecord>({
  id: str,
  projectId: str,
  project: str,
  name: str,
  version: num,
  versionId: str,
  schedule: jsonOrNull<Schedule>,
  createdAt: num,
  updatedAt: num,
});

const toVersion = reader<FlowVersion>({
  id: str,
  flowId: str,
  version: num,
  fingerprint: str,
  graph: json<unknown>,
  storage: json<StorageRef>,
  runConfig: json<RunConfig>,
  executor: json<ExecutorSettings>,
  parameters: json<ParameterInfo[]>,
  labels: json<string[]>,
  createdAt: num,
});

const toTask = reader<TaskRun>({
  id: str,
  flowRunId: str,
  key: str,
  mapIndex: num,
  state: cast<TaskRun['state']>,
  version: num,
  attempts: num,
  startedAt: numOrNull,
  endedAt: numOrNull,
  message: strOrNull,
  processId: strOrNull,
});

function toLog(r: Row): StoredLogEntry {
  const e: StoredLogEntry = {
    seq: num(r.seq),
    flowRunId: String(r.flow_run_id),
    level: r.level as StoredLogEntry['level'],
    message: String(r.message),
    at: num(r.at),
    source: String(r.source),
  };
  const extra: { taskKey?: string; mapIndex?: number } = {};
  if (r.task_key !== null && r.task_key !== undefined) extra.taskKey = String(r.task_key);
  if (r.map_index !== null && r.map_index !== undefined) extra.mapIndex = num(r.map_index);
  return { ...e, ...extra };
}

const uniqSorted = (xs: Iterable<string>): string[] => [...new Set(xs)].sort();
const isFinal = (s: FlowRunState): boolean => FINAL_FLOW_RUN_STATES.includes(s);

/** sha256 of what decides a flow's version. `paused` is not part of it: pausing is not a new version. */
export function flowFingerprint(input: RegisterFlowInput): string {
  const doc = {
    graph: input.graph,
    storage: input.storage,
    runConfig: input.runConfig,
    executor: input.executor,
    parameters: input.parameters,
    labels: uniqSorted(input.labels),
    clocks: input.schedule?.clocks ?? null,
  };
  return createHash('sha256').update(canonicalJson(doc)).digest('hex');
}

export function hashToken(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

/** What the zombie killer and lazarus did to one run. */
export interface ReapedRun {
  readonly run: FlowRun;
  /** 'rescheduled': back to Scheduled (restarts + 1); 'failed'; 'cancelled': lost while Cancelling. */
  readonly outcome: 'rescheduled' | 'failed' | 'cancelled';
}

type Events = ServerEvent[];

export class Store implements Backend {
  readonly db: Db;
  /** Names this store's notices, so its own relay skips them (it emitted them already). */
  readonly origin: string = randomUUID();
  private readonly now: () => number;
  private readonly agentTimeoutMs: number;
  private readonly listeners = new Set<(e: ServerEvent) => void>();

  constructor(db: Db, opts: StoreOptions = {}) {
    this.db = db;
    this.now = opts.now ?? Date.now;
    this.agentTimeoutMs = opts.agentTimeoutMs ?? DEFAULT_AGENT_TIMEOUT_MS;
  }

  /**
   * Hear every change after it commits; answers the unsubscribe function. On PostgreSQL
   * with a relay (`startRelay`, which `startServer` runs) this includes the changes other
   * servers on the database commit.
   */
  onEvent(fn: (e: ServerEvent) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Hand events committed elsewhere (another server's, through the relay) to the listeners. */
  publish(events: readonly ServerEvent[]): void {
    this.emit(events);
  }

  private emit(events: readonly ServerEvent[]): void {
    for (const e of events) {
      for (const fn of this.listeners) {
        try {
          fn(e);
        } catch {
          // A listener's failure is its own; the write has committed.
        }
      }
    }
  }

  /**
   * A write transaction whose events go out after the commit: to this store's listeners,
   * and on PostgreSQL as NOTIFYs (sent on commit) to the other servers' relays.
   */
  private async write<T>(fn: (q: Sql, events: Events) => Promise<T>): Promise<T> {
    const { out, events } = await this.db.tx(async (q) => {
      const ev: Events = [];
      const result = await fn(q, ev);
      if (this.db.dialect === 'postgres') {
        for (const payload of encodeNotices(this.origin, ev)) await q.one('SELECT pg_notify($1, $2)', [FEED_CHANNEL, payload]);
      }
      return { out: result, events: ev };
    });
    this.emit(events);
    return out;
  }

  // -------------------------------------------------------------------------------
  // Projects and flows

  async createProject(name: string): Promise<Project> {
    if (typeof name !== 'string' || name.trim() === '') throw badRequest('project name must be a non-empty string');
    return this.db.tx((q) => this.ensureProject(q, name));
  }

  private async ensureProject(q: Sql, name: string): Promise<Project> {
    await q.run('INSERT INTO projects (id, name, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING', [randomUUID(), name, this.now()]);
    const r = (await q.one('SELECT id, name, created_at FROM projects WHERE name = $1', [name])) as Row;
    return { id: String(r.id), name: String(r.name), createdAt: num(r.created_at) };
  }

  async listProjects(): Promise<Project[]> {
    const rows = await this.db.all('SELECT id, name, created_at FROM projects ORDER BY name');
    return rows.map((r) => ({ id: String(r.id), name: String(r.name), createdAt: num(r.created_at) }));
  }

  async registerFlow(input: RegisterFlowInput): Promise<{ flow: FlowRecord; version: FlowVersion; created: boolean }> {
    if (typeof input.project !== 'string' || input.project === '') throw badRequest('project must be a non-empty string');
    if (typeof input.name !== 'string' || input.name === '') throw badRequest('name must be a non-empty string');
    try {
      checkRunConfig(input.runConfig);
      input.schedule?.clocks.forEach((c, i) => checkClock(c, `schedule.clocks[${i}]`));
    } catch (err) {
      throw badRequest((err as Error).message);
    }
    const fingerprint = flowFingerprint(input);
    const labels = uniqSorted(input.labels);
    return this.write(async (q, events) => {
      const project = await this.ensureProject(q, input.project);
      const now = this.now();
      await q.run(
        'INSERT INTO flows (id, project_id, name, version, version_id, schedule, created_at, updated_at) VALUES ($1, $2, $3, 0, $4, NULL, $5, $5) ON CONFLICT (project_id, name) DO NOTHING',
        [randomUUID(), project.id, input.name, '', now],
      );
      const flowRow = (await q.one(`SELECT id, version, version_id, schedule FROM flows WHERE project_id = $1 AND name = $2${this.db.lockRows()}`, [
        project.id,
        input.name,
      ])) as Row;
      const flowId = String(flowRow.id);
      const oldSchedule = flowRow.schedule === null ? null : json<Schedule>(flowRow.schedule);
      const newest = num(flowRow.version) > 0 ? await q.one(`SELECT ${VERSION_COLS} FROM flow_versions WHERE id = $1`, [flowRow.version_id]) : undefined;

      let version: FlowVersion;
      let created: boolean;
      if (newest !== undefined && String(newest.fingerprint) === fingerprint) {
        version = toVersion(newest);
        created = false;
        // Same version; an explicit `paused` still applies.
        const paused = input.schedule?.paused;
        if (oldSchedule !== null && paused !== undefined && paused !== (oldSchedule.paused ?? false)) {
          await this.writeSchedule(q, flowId, { ...oldSchedule, paused }, now);
        }
      } else {
        const v = num(flowRow.version) + 1;
        version = {
          id: randomUUID(),
          flowId,
          version: v,
          fingerprint,
          graph: input.graph ?? null,
          storage: input.storage,
          runConfig: input.runConfig,
          executor: input.executor,
          parameters: input.parameters,
          labels,
          createdAt: now,
        };
        await q.run(
          'INSERT INTO flow_versions (id, flow_id, version, fingerprint, graph, storage, run_config, executor, parameters, labels, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)',
          [
            version.id,
            flowId,
            v,
            fingerprint,
            JSON.stringify(version.graph),
            JSON.stringify(input.storage),
            JSON.stringify(input.runConfig),
            JSON.stringify(input.executor),
            JSON.stringify(input.parameters),
            JSON.stringify(labels),
            now,
          ],
        );
        const schedule =
          input.schedule === undefined || input.schedule === null
            ? null
            : { clocks: input.schedule.clocks, paused: input.schedule.paused ?? oldSchedule?.paused ?? false };
        await q.run('UPDATE flows SET version = $1, version_id = $2, schedule = $3, updated_at = $4 WHERE id = $5', [
          v,
          version.id,
          schedule === null ? null : JSON.stringify(schedule),
          now,
          flowId,
        ]);
        // Runs the schedule made for the old version go; the scheduler makes them anew.
        await q.run("DELETE FROM flow_runs WHERE flow_id = $1 AND state = 'Scheduled' AND auto_scheduled = 1", [flowId]);
        created = true;
      }
      const flow = await this.flowById(q, flowId);
      events.push({ type: 'flow', flow });
      return { flow, version, created };
    });
  }

  private async writeSchedule(q: Sql, flowId: string, schedule: Schedule, now: number): Promise<void> {
    await q.run('UPDATE flows SET schedule = $1, updated_at = $2 WHERE id = $3', [JSON.stringify(schedule), now, flowId]);
    if (schedule.paused === true) {
      await q.run("DELETE FROM flow_runs WHERE flow_id = $1 AND state = 'Scheduled' AND auto_scheduled = 1", [flowId]);
    }
  }

  private async flowById(q: Sql, id: string): Promise<FlowRecord> {
    const r = await q.one(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE f.id = $1`, [id]);
    if (r === undefined) throw notFound(`flow ${id}`);
    return toFlow(r);
  }

  async listFlows(query: { project?: string } = {}): Promise<FlowRecord[]> {
    const rows =
      query.project !== undefined
        ? await this.db.all(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE p.name = $1 ORDER BY p.name, f.name`, [
            query.project,
          ])
        : await this.db.all(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id ORDER BY p.name, f.name`);
    return rows.map(toFlow);
  }

  /** By id, by `{ project, name }`, or by the string `project/name`. */
  async getFlow(ref: string | { project: string; name: string }): Promise<FlowRecord> {
    if (typeof ref === 'string') {
      const r = await this.db.one(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE f.id = $1`, [ref]);
      if (r !== undefined) return toFlow(r);
      const slash = ref.indexOf('/');
      if (slash <= 0) throw notFound(`flow ${ref}`);
      ref = { project: ref.slice(0, slash), name: ref.slice(slash + 1) };
    }
    const r = await this.db.one(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE p.name = $1 AND f.name = $2`, [
      ref.project,
      ref.name,
    ]);
    if (r === undefined) throw notFound(`flow '${ref.name}' in project '${ref.project}'`);
    return toFlow(r);
  }

  async getFlowVersion(versionId: string): Promise<FlowVersion> {
    const r = await this.db.one(`SELECT ${VERSION_COLS} FROM flow_versions WHERE id = $1`, [versionId]);
    if (r === undefined) throw notFound(`flow version ${versionId}`);
    return toVersion(r);
  }

  /** A flow's versions, newest first. */
  async listFlowVersions(flowId: string): Promise<FlowVersion[]> {
    return (await this.db.all(`SELECT ${VERSION_COLS} FROM flow_versions WHERE flow_id = $1 ORDER BY version DESC`, [flowId])).map(toVersion);
  }

  async setSchedulePaused(flowId: string, paused: boolean): Promise<FlowRecord> {
    return this.write(async (q, events) => {
      const r = await q.one(`SELECT schedule FROM flows WHERE id = $1${this.db.lockRows()}`, [flowId]);
      if (r === undefined) throw notFound(`flow ${flowId}`);
      if (r.schedule === null) throw new BackendError(409, 'NO_SCHEDULE', `flow ${flowId} has no schedule`);
      await this.writeSchedule(q, flowId, { ...json<Schedule>(r.schedule), paused }, this.now());
      const flow = await this.flowById(q, flowId);
      events.push({ type: 'flow', flow });
      return flow;
    });
  }

  // -------------------------------------------------------------------------------
  // Flow runs

  async createFlowRun(input: CreateFlowRunInput): Promise<FlowRun> {
    return this.write(async (q, events) => {
      let flowRow: Row | undefined;
      if (input.flowId !== undefined) {
        flowRow = await q.one(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE f.id = $1`, [input.flowId]);
        if (flowRow === undefined) throw notFound(`flow ${input.flowId}`);
      } else if (input.project !== undefined && input.flowName !== undefined) {
        flowRow = await q.one(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE p.name = $1 AND f.name = $2`, [
          input.project,
          input.flowName,
        ]);
        if (flowRow === undefined) throw notFound(`flow '${input.flowName}' in project '${input.project}'`);
      } else {
        throw badRequest('a flow run needs flowId, or project and flowName');
      }
      const flow = toFlow(flowRow);
      const versionRow = await q.one(`SELECT ${VERSION_COLS} FROM flow_versions WHERE id = $1`, [input.versionId ?? flow.versionId]);
      if (versionRow === undefined || String(versionRow.flow_id) !== flow.id) {
        throw notFound(`version ${input.versionId ?? flow.versionId} of flow ${flow.id}`);
      }
      const version = toVersion(versionRow);
      const parameters = input.parameters ?? {};
      checkParameters(version.parameters, parameters);
      const { run, created } = await this.insertRun(q, flow, version, {
        parameters,
        labels: input.labels ?? [],
        scheduledStart: input.scheduledStart ?? this.now(),
        idempotencyKey: input.idempotencyKey ?? null,
        auto: false,
      });
      if (created) events.push({ type: 'flowRun', run });
      return run;
    });
  }

  private async insertRun(
    q: Sql,
    flow: FlowRecord,
    version: FlowVersion,
    o: { parameters: Record<string, unknown>; labels: readonly string[]; scheduledStart: number; idempotencyKey: string | null; auto: boolean },
  ): Promise<{ run: FlowRun; created: boolean }> {
    const id = randomUUID();
    const now = this.now();
    const labels = uniqSorted([...version.labels, ...o.labels]);
    const inserted = await q.run(
      `INSERT INTO flow_runs (id, flow_id, version_id, flow_name, project, version, state, state_version, state_at, message, parameters, labels,
         scheduled_start, restarts, idempotency_key, auto_scheduled, run_kind, created_at)
       VALUES ($1, $2, $3, $4, $5, $6, 'Scheduled', 1, $7, NULL, $8, $9, $10, 0, $11, $12, $13, $7)
       ON CONFLICT (idempotency_key) DO NOTHING`,
      [
        id,
        flow.id,
        version.id,
        flow.name,
        flow.project,
        version.version,
        now,
        JSON.stringify(o.parameters),
        JSON.stringify(labels),
        o.scheduledStart,
        o.idempotencyKey,
        o.auto ? 1 : 0,
        version.runConfig.kind,
      ],
    );
    if (inserted === 0) {
      const existing = (await q.one(`SELECT ${RUN_COLS} FROM flow_runs WHERE idempotency_key = $1`, [o.idempotencyKey])) as Row;
      return { run: toRun(existing), created: false };
    }
    for (const l of labels) await q.run('INSERT INTO flow_run_labels (flow_run_id, label) VALUES ($1, $2)', [id, l]);
    await q.run("INSERT INTO flow_run_states (flow_run_id, state, message, at) VALUES ($1, 'Scheduled', NULL, $2)", [id, now]);
    return { run: toRun((await q.one(`SELECT ${RUN_COLS} FROM flow_runs WHERE id = $1`, [id])) as Row), created: true };
  }

  async getFlowRun(id: string): Promise<FlowRun> {
    const r = await this.db.one(`SELECT ${RUN_COLS} FROM flow_runs WHERE id = $1`, [id]);
    if (r === undefined) throw notFound(`flow run ${id}`);
    return toRun(r);
  }

  /** Newest scheduled start first. */
  async listFlowRuns(query: ListRunsQuery = {}): Promise<FlowRun[]> {
    const where: string[] = [];
    const params: unknown[] = [];
    if (query.flowId !== undefined) {
      params.push(query.flowId);
      where.push(`flow_id = $${params.length}`);
    }
    if (query.project !== undefined) {
      params.push(query.project);
      where.push(`project = $${params.length}`);
    }
    if (query.states !== undefined && query.states.length > 0) {
      where.push(`state IN (${placeholders(params.length + 1, query.states.length)})`);
      params.push(...query.states);
    }
    params.push(Math.min(Math.max(1, query.limit ?? 100), MAX_LIST));
    const sql = `SELECT ${RUN_COLS} FROM flow_runs${where.length > 0 ? ` WHERE ${where.join(' AND ')}` : ''} ORDER BY scheduled_start DESC, id LIMIT $${params.length}`;
    return (await this.db.all(sql, params)).map(toRun);
  }

  async getFlowRunHistory(id: string): Promise<FlowRunStateChange[]> {
    return this.db.tx(async (q) => {
      if ((await q.one('SELECT id FROM flow_runs WHERE id = $1', [id])) === undefined) throw notFound(`flow run ${id}`);
      const rows = await q.all('SELECT state, message, at FROM flow_run_states WHERE flow_run_id = $1 ORDER BY id', [id]);
      return rows.map((r) => ({ state: r.state as FlowRunState, message: strOrNull(r.message), at: num(r.at) }));
    });
  }

  /**
   * Move a locked run row to `state`: bumps the state version, stamps the times, writes
   * history, and gives back the slots of a run that ended or went back to Scheduled.
   */
  private async transition(
    q: Sql,
    row: Row,
    state: FlowRunState,
    message: string | null,
    events: Events,
    extra: { restarts?: number } = {},
  ): Promise<FlowRun> {
    const now = this.now();
    const startedAt = state === 'Running' && row.started_at === null ? now : row.started_at;
    const endedAt = isFinal(state) ? now : state === 'Scheduled' ? null : row.ended_at;
    const heartbeatAt = state === 'Running' ? now : row.heartbeat_at;
    const agentId = state === 'Scheduled' ? null : row.agent_id;
    const restarts = extra.restarts ?? row.restarts;
    const changed = await q.run(
      `UPDATE flow_runs SET state = $1, state_version = state_version + 1, state_at = $2, message = $3, started_at = $4, ended_at = $5,
         heartbeat_at = $6, agent_id = $7, restarts = $8 WHERE id = $9 AND state_version = $10`,
      [state, now, message, startedAt, endedAt, heartbeatAt, agentId, restarts, row.id, row.state_version],
    );
    if (changed !== 1) throw new BackendError(409, 'CONFLICT', `flow run ${String(row.id)} changed while it was being written`);
    await q.run('INSERT INTO flow_run_states (flow_run_id, state, message, at) VALUES ($1, $2, $3, $4)', [row.id, state, message, now]);
    if (isFinal(state) || state === 'Scheduled') await q.run('DELETE FROM task_slots WHERE flow_run_id = $1', [row.id]);
    const run = toRun((await q.one(`SELECT ${RUN_COLS} FROM flow_runs WHERE id = $1`, [row.id])) as Row);
    events.push({ type: 'flowRun', run });
    return run;
  }

  private async lockRun(q: Sql, id: string): Promise<Row> {
    const r = await q.one(`SELECT ${RUN_COLS} FROM flow_runs WHERE id = $1${this.db.lockRows()}`, [id]);
    if (r === undefined) throw notFound(`flow run ${id}`);
    return r;
  }

  async setFlowRunState(id: string, state: FlowRunState, opts: { message?: string; expectVersion?: number } = {}): Promise<FlowRun> {
    return this.write(async (q, events) => {
      const row = await this.lockRun(q, id);
      if (opts.expectVersion !== undefined && num(row.state_version) !== opts.expectVersion) {
        throw new BackendError(
          409,
          'CONFLICT',
          `flow run ${id} is at state version ${num(row.state_version)} (${String(row.state)}), not ${opts.expectVersion}`,
        );
      }
      return this.transition(q, row, state, opts.message ?? null, events);
    });
  }

  async cancelFlowRun(id: string): Promise<FlowRun> {
    return this.write(async (q, events) => {
      const row = await this.lockRun(q, id);
      const state = row.state as FlowRunState;
      if (state === 'Scheduled' || state === 'Submitted') return this.transition(q, row, 'Cancelled', 'cancelled before it started', events);
      if (state === 'Running') return this.transition(q, row, 'Cancelling', 'cancel requested', events);
      return toRun(row);
    });
  }

  async heartbeatFlowRun(id: string): Promise<FlowRun> {
    return this.db.tx(async (q) => {
      await q.run('UPDATE flow_runs SET heartbeat_at = $1 WHERE id = $2', [this.now(), id]);
      const r = await q.one(`SELECT ${RUN_COLS} FROM flow_runs WHERE id = $1`, [id]);
      if (r === undefined) throw notFound(`flow run ${id}`);
      return toRun(r);
    });
  }

  // -------------------------------------------------------------------------------
  // Agents and claims

  /**
   * One record per name (a restarted agent keeps its id): a registration of a known name
   * updates its kind and labels and counts as being seen.
   */
  async registerAgent(input: { name: string; kind: string; labels: readonly string[] }): Promise<AgentRecord> {
    const now = this.now();
    const r = (await this.db.one(
      `INSERT INTO agents (id, name, kind, labels, created_at, last_seen) VALUES ($1, $2, $3, $4, $5, $5)
       ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, labels = excluded.labels, last_seen = excluded.last_seen
       RETURNING ${AGENT_COLS}`,
      [randomUUID(), input.name, input.kind, JSON.stringify(uniqSorted(input.labels)), now],
    )) as Row;
    return this.toAgent(r, now);
  }

  /** Agents, most recently seen first, each with its status as of now. */
  async listAgents(): Promise<AgentRecord[]> {
    const now = this.now();
    return (await this.db.all(`SELECT ${AGENT_COLS} FROM agents ORDER BY last_seen DESC, id`)).map((r) => this.toAgent(r, now));
  }

  private toAgent(r: Row, now: number): AgentRecord {
    const lastSeen = num(r.last_seen);
    return {
      id: String(r.id),
      name: String(r.name),
      kind: String(r.kind),
      labels: json<string[]>(r.labels),
      lastSeen,
      status: now - lastSeen <= this.agentTimeoutMs ? 'healthy' : 'unhealthy',
    };
  }

  async claimFlowRuns(input: ClaimInput): Promise<ClaimedRun[]> {
    const limit = Math.min(Math.max(1, Math.floor(input.limit)), 1000);
    const agentLabels = uniqSorted(input.labels);
    return this.write(async (q, events) => {
      // Label limits first (locked in name order): the counts below stay true until commit.
      const limits = new Map<string, number>();
      for (const r of await q.all(`SELECT name, lim FROM concurrency_limits WHERE kind = 'label' ORDER BY name${this.db.lockRows()}`)) {
        limits.set(String(r.name), num(r.lim));
      }
      const params: unknown[] = [input.before];
      let labelTest = '';
      if (agentLabels.length > 0) {
        labelTest = ` AND l.label NOT IN (${placeholders(2, agentLabels.length)})`;
        params.push(...agentLabels);
      }
      let kindTest = '';
      if (input.kind !== undefined) {
        params.push(input.kind);
        kindTest = ` AND r.run_kind IN ('universal', $${params.length})`;
      }
      // Fetch spare candidates when some may be held back by a label limit.
      params.push(limits.size > 0 ? limit * 4 + 20 : limit);
      const candidates = await q.all(
        `SELECT ${RUN_COLS.split(', ')
          .map((c) => `r.${c}`)
          .join(', ')} FROM flow_runs r
         WHERE r.state = 'Scheduled' AND r.scheduled_start <= $1${kindTest}
           AND NOT EXISTS (SELECT 1 FROM flow_run_labels l WHERE l.flow_run_id = r.id${labelTest})
         ORDER BY r.scheduled_start, r.id LIMIT $${params.length}${this.db.lockRows({ skipLocked: true, of: 'r' })}`,
        params,
      );
      const used = new Map<string, number>();
      if (limits.size > 0) {
        const names = [...limits.keys()];
        const rows = await q.all(
          `SELECT l.label, COUNT(*) AS n FROM flow_run_labels l JOIN flow_runs r ON r.id = l.flow_run_id
           WHERE r.state IN ('Submitted', 'Running', 'Cancelling') AND l.label IN (${placeholders(1, names.length)}) GROUP BY l.label`,
          names,
        );
        for (const r of rows) used.set(String(r.label), num(r.n));
      }
      const claimed: FlowRun[] = [];
      const now = this.now();
      for (const row of candidates) {
        if (claimed.length >= limit) break;
        const labels = json<string[]>(row.labels);
        const limited = labels.filter((l) => limits.has(l));
        if (limited.some((l) => (used.get(l) ?? 0) >= (limits.get(l) as number))) continue;
        const n = await q.run(
          "UPDATE flow_runs SET state = 'Submitted', state_version = state_version + 1, state_at = $1, agent_id = $2, message = NULL WHERE id = $3 AND state = 'Scheduled'",
          [now, input.agentId, row.id],
        );
        if (n !== 1) continue;
        for (const l of limited) used.set(l, (used.get(l) ?? 0) + 1);
        await q.run("INSERT INTO flow_run_states (flow_run_id, state, message, at) VALUES ($1, 'Submitted', $2, $3)", [
          row.id,
          `claimed by agent ${input.agentId}`,
          now,
        ]);
        const run = toRun({ ...row, state: 'Submitted', state_version: num(row.state_version) + 1, state_at: now, agent_id: input.agentId, message: null });
        claimed.push(run);
        events.push({ type: 'flowRun', run });
      }
      await q.run('UPDATE agents SET last_seen = $1 WHERE id = $2', [now, input.agentId]);
      const versionIds = uniqSorted(claimed.map((r) => r.versionId));
      const versions = new Map<string, FlowVersion>();
      if (versionIds.length > 0) {
        for (const r of await q.all(`SELECT ${VERSION_COLS} FROM flow_versions WHERE id IN (${placeholders(1, versionIds.length)})`, versionIds)) {
          versions.set(String(r.id), toVersion(r));
        }
      }
      return claimed.map((run) => ({ run, version: versions.get(run.versionId) as FlowVersion }));
    });
  }

  // -------------------------------------------------------------------------------
  // Task runs

  async setTaskRunStates(flowRunId: string, processId: string, updates: readonly TaskRunUpdate[]): Promise<TaskRunWriteResult[]> {
    return this.write(async (q, events) => {
      if ((await q.one('SELECT id FROM flow_runs WHERE id = $1', [flowRunId])) === undefined) throw notFound(`flow run ${flowRunId}`);
      const now = this.now();
      const out: TaskRunWriteResult[] = [];
      for (const u of updates) {
        let row: Row | undefined;
        if (u.expectVersion === 0) {
          row = await q.one(
            `INSERT INTO task_runs (id, flow_run_id, key, map_index, state, version, attempts, started_at, ended_at, message, process_id, updated_at)
             VALUES ($1, $2, $3, $4, $5, 1, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (flow_run_id, key, map_index) DO NOTHING RETURNING ${TASK_COLS}`,
            [randomUUID(), flowRunId, u.key, u.mapIndex, u.state, u.attempts ?? 0, u.startedAt ?? null, u.endedAt ?? null, u.message ?? null, processId, now],
          );
        } else {
          row = await q.one(
            `UPDATE task_runs SET state = $1, version = version + 1, attempts = COALESCE($2, attempts), started_at = COALESCE($3, started_at),
               ended_at = COALESCE($4, ended_at), message = $5, process_id = $6, updated_at = $7
             WHERE flow_run_id = $8 AND key = $9 AND map_index = $10 AND version = $11 RETURNING ${TASK_COLS}`,
            [u.state, u.attempts ?? null, u.startedAt ?? null, u.endedAt ?? null, u.message ?? null, processId, now, flowRunId, u.key, u.mapIndex, u.expectVersion],
          );
        }
        if (row === undefined) {
          const stored = await q.one('SELECT version FROM task_runs WHERE flow_run_id = $1 AND key = $2 AND map_index = $3', [flowRunId, u.key, u.mapIndex]);
          out.push({ key: u.key, mapIndex: u.mapIndex, ok: false, version: stored === undefined ? 0 : num(stored.version) });
          continue;
        }
        const task = toTask(row);
        await q.run('INSERT INTO task_run_states (task_run_id, version, state, message, process_id, at) VALUES ($1, $2, $3, $4, $5, $6)', [
          task.id,
          task.version,
          task.state,
          task.message,
          processId,
          now,
        ]);
        out.push({ key: u.key, mapIndex: u.mapIndex, ok: true, version: task.version });
        events.push({ type: 'taskRun', task });
      }
      return out;
    });
  }

  async getTaskRuns(flowRunId: string): Promise<TaskRun[]> {
    return this.db.tx(async (q) => {
      if ((await q.one('SELECT id FROM flow_runs WHERE id = $1', [flowRunId])) === undefined) throw notFound(`flow run ${flowRunId}`);
      return (await q.all(`SELECT ${TASK_COLS} FROM task_runs WHERE flow_run_id = $1 ORDER BY key, map_index`, [flowRunId])).map(toTask);
    });
  }

  // -------------------------------------------------------------------------------
  // Logs

  async writeLogs(entries: readonly LogEntry[]): Promise<void> {
    if (entries.length === 0) return;
    await this.write(async (q, events) => {
      const ids = uniqSorted(entries.map((e) => e.flowRunId));
      const found = new Set((await q.all(`SELECT id FROM flow_runs WHERE id IN (${placeholders(1, ids.length)})`, ids)).map((r) => String(r.id)));
      const missing = ids.find((id) => !found.has(id));
      if (missing !== undefined) throw notFound(`flow run ${missing}`);
      for (const e of entries) {
        const r = (await q.one(
          'INSERT INTO logs (flow_run_id, task_key, map_index, level, message, at, source) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING seq',
          [e.flowRunId, e.taskKey ?? null, e.mapIndex ?? null, e.level, e.message, e.at, e.source],
        )) as Row;
        const entry: StoredLogEntry = { ...e, seq: num(r.seq) };
        events.push({ type: 'log', entry });
      }
    });
  }

  /**
   * A run's logs after `seq` (default 0), oldest first, at most `limit` (default 1000).
   * Sequence numbers are assigned at insert: on PostgreSQL a batch still committing may
   * land below a seq already read, so readers of a run's live logs should expect its
   * writer (one flow-run process) to write in order, as it does.
   */
  async getLogs(flowRunId: string, opts: { after?: number; limit?: number } = {}): Promise<StoredLogEntry[]> {
    return this.db.tx(async (q) => {
      if ((await q.one('SELECT id FROM flow_runs WHERE id = $1', [flowRunId])) === undefined) throw notFound(`flow run ${flowRunId}`);
      const rows = await q.all(
        'SELECT seq, flow_run_id, task_key, map_index, level, message, at, source FROM logs WHERE flow_run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3',
        [flowRunId, opts.after ?? 0, Math.min(Math.max(1, opts.limit ?? 1000), MAX_LIST)],
      );
      return rows.map(toLog);
    });
  }

  // -------------------------------------------------------------------------------
  // Bundles

  async putBundle(hash: string, code: Uint8Array): Promise<void> {
    const actual = createHash('sha256').update(code).digest('hex');
    if (actual !== hash) throw new BackendError(400, 'HASH_MISMATCH', `bundle bytes hash to ${actual}, not ${hash}`);
    await this.db.run('INSERT INTO bundles (hash, bytes, size, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (hash) DO NOTHING', [
      hash,
      code,
      code.byteLength,
      this.now(),
    ]);
  }

  async getBundle(hash: string): Promise<Uint8Array> {
    const r = await this.db.one('SELECT bytes FROM bundles WHERE hash = $1', [hash]);
    if (r === undefined) throw notFound(`bundle ${hash}`);
    const b = r.bytes as Buffer;
    return new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  }

  // -------------------------------------------------------------------------------
  // Concurrency limits

  async setConcurrencyLimit(kind: 'tag' | 'label', name: string, limit: number | null): Promise<void> {
    if (kind !== 'tag' && kind !== 'label') throw badRequest(`kind must be tag or label, got ${JSON.stringify(kind)}`);
    if (limit === null) {
      await this.db.run('DELETE FROM concurrency_limits WHERE kind = $1 AND name = $2', [kind, name]);
      return;
    }
    if (!Number.isInteger(limit) || limit < 0) throw badRequest(`limit must be an integer >= 0 or null, got ${limit}`);
    await this.db.run(
      'INSERT INTO concurrency_limits (kind, name, lim) VALUES ($1, $2, $3) ON CONFLICT (kind, name) DO UPDATE SET lim = excluded.lim',
      [kind, name, limit],
    );
  }

  async listConcurrencyLimits(): Promise<ConcurrencyLimit[]> {
    return this.db.tx(async (q) => {
      const tagUse = new Map((await q.all('SELECT tag, COUNT(*) AS n FROM task_slots GROUP BY tag')).map((r) => [String(r.tag), num(r.n)]));
      const labelUse = new Map(
        (
          await q.all(
            "SELECT l.label, COUNT(*) AS n FROM flow_run_labels l JOIN flow_runs r ON r.id = l.flow_run_id WHERE r.state IN ('Submitted', 'Running', 'Cancelling') GROUP BY l.label",
          )
        ).map((r) => [String(r.label), num(r.n)]),
      );
      return (await q.all('SELECT kind, name, lim FROM concurrency_limits ORDER BY kind, name')).map((r) => {
        const kind = r.kind as 'tag' | 'label';
        const name = String(r.name);
        return { kind, name, limit: num(r.lim), used: (kind === 'tag' ? tagUse : labelUse).get(name) ?? 0 };
      });
    });
  }

  async acquireTaskSlots(flowRunId: string, taskRunKey: string, tags: readonly string[]): Promise<boolean> {
    const wanted = uniqSorted(tags);
    if (wanted.length === 0) return true;
    return this.db.tx(async (q) => {
      const run = await q.one('SELECT state FROM flow_runs WHERE id = $1', [flowRunId]);
      if (run === undefined) throw notFound(`flow run ${flowRunId}`);
      const limits = await q.all(
        `SELECT name, lim FROM concurrency_limits WHERE kind = 'tag' AND name IN (${placeholders(1, wanted.length)}) ORDER BY name${this.db.lockRows()}`,
        wanted,
      );
      if (limits.length === 0) return true;
      const names = limits.map((r) => String(r.name));
      const held = new Set(
        (await q.all('SELECT tag FROM task_slots WHERE flow_run_id = $1 AND task_key = $2', [flowRunId, taskRunKey])).map((r) => String(r.tag)),
      );
      const used = new Map(
        (await q.all(`SELECT tag, COUNT(*) AS n FROM task_slots WHERE tag IN (${placeholders(1, names.length)}) GROUP BY tag`, names)).map((r) => [
          String(r.tag),
          num(r.n),
        ]),
      );
      const toTake = limits.filter((r) => !held.has(String(r.name)));
      if (toTake.some((r) => (used.get(String(r.name)) ?? 0) >= num(r.lim))) return false;
      const now = this.now();
      for (const r of toTake) {
        await q.run('INSERT INTO task_slots (flow_run_id, task_key, tag, acquired_at) VALUES ($1, $2, $3, $4)', [flowRunId, taskRunKey, r.name, now]);
      }
      return true;
    });
  }

  async releaseTaskSlots(flowRunId: string, taskRunKey: string): Promise<void> {
    await this.db.run('DELETE FROM task_slots WHERE flow_run_id = $1 AND task_key = $2', [flowRunId, taskRunKey]);
  }

  // -------------------------------------------------------------------------------
  // Services: schedules, zombies, lazarus

  /**
   * Make sure each active schedule's next `count` runs after `now` exist. A run's
   * idempotency key names the flow, the clock and the time, so calling this again (or
   * from a second server) creates nothing twice. Answers the runs created.
   */
  async materializeSchedules(count = 10): Promise<FlowRun[]> {
    const flows = (
      await this.db.all(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE f.schedule IS NOT NULL AND f.version > 0`)
    ).map(toFlow);
    const created: FlowRun[] = [];
    for (const flow of flows) {
      const schedule = flow.schedule;
      if (schedule === null || schedule.paused === true || schedule.clocks.length === 0) continue;
      const ticks = nextTicks(schedule, this.now(), count);
      if (ticks.length === 0) continue;
      const keys = ticks.map((t) => `schedule:${flow.id}:${t.clockId}:${t.time}`);
      const existing = new Set(
        (await this.db.all(`SELECT idempotency_key FROM flow_runs WHERE idempotency_key IN (${placeholders(1, keys.length)})`, keys)).map((r) =>
          String(r.idempotency_key),
        ),
      );
      if (existing.size === keys.length) continue;
      const runs = await this.write(async (q, events) => {
        // Re-read under the transaction: the flow may have been paused or re-versioned.
        const fr = await q.one(`SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE f.id = $1${this.db.lockRows({ of: 'f' })}`, [
          flow.id,
        ]);
        if (fr === undefined) return [];
        const current = toFlow(fr);
        if (current.versionId !== flow.versionId || current.schedule?.paused === true) return [];
        const version = toVersion((await q.one(`SELECT ${VERSION_COLS} FROM flow_versions WHERE id = $1`, [current.versionId])) as Row);
        const out: FlowRun[] = [];
        for (const [i, t] of ticks.entries()) {
          const key = keys[i] as string;
          if (existing.has(key)) continue;
          const { run, created: made } = await this.insertRun(q, current, version, {
            parameters: t.clock.parameters ?? {},
            labels: t.clock.labels ?? [],
            scheduledStart: t.time,
            idempotencyKey: key,
            auto: true,
          });
          if (made) {
            out.push(run);
            events.push({ type: 'flowRun', run });
          }
        }
        return out;
      });
      created.push(...runs);
    }
    return created;
  }

  /**
   * The zombie killer: a Running or Cancelling run whose last heartbeat (or start) is
   * older than `timeoutMs` has lost its process. A Cancelling one is Cancelled. A
   * Running one goes back to Scheduled (restarts + 1, lazarus's rule) while it has been
   * restarted fewer than `maxRestarts` times, else it is Failed. Either way its Running
   * task runs are Failed (task runs that succeeded keep their state: the next process
   * restarts from them) and its task slots are released.
   */
  async reapZombies(timeoutMs: number, maxRestarts: number): Promise<ReapedRun[]> {
    const cutoff = this.now() - timeoutMs;
    const rows = await this.db.all(
      "SELECT id, state_version FROM flow_runs WHERE state IN ('Running', 'Cancelling') AND COALESCE(heartbeat_at, state_at) < $1 ORDER BY id",
      [cutoff],
    );
    const out: ReapedRun[] = [];
    for (const cand of rows) {
      const r = await this.write(async (q, events): Promise<ReapedRun | null> => {
        const row = await q.one(`SELECT ${RUN_COLS} FROM flow_runs WHERE id = $1${this.db.lockRows()}`, [cand.id]);
        // Re-checked under the lock: a heartbeat or a state write since wins.
        if (row === undefined || num(row.state_version) !== num(cand.state_version)) return null;
        if (num(row.heartbeat_at ?? row.state_at) >= cutoff) return null;
        const silent = Math.round((this.now() - num(row.heartbeat_at ?? row.state_at)) / 1000);
        await this.failRunningTasks(q, String(row.id), 'the flow-run process was lost (no heartbeat)', events);
        if (row.state === 'Cancelling') {
          return { run: await this.transition(q, row, 'Cancelled', `no heartbeat for ${silent} s while cancelling`, events), outcome: 'cancelled' };
        }
        const restarts = num(row.restarts);
        if (restarts < maxRestarts) {
          const msg = `heartbeat lost (none for ${silent} s); rescheduled by lazarus (restart ${restarts + 1} of ${maxRestarts})`;
          return { run: await this.transition(q, row, 'Scheduled', msg, events, { restarts: restarts + 1 }), outcome: 'rescheduled' };
        }
        const msg = `heartbeat lost (none for ${silent} s) after ${restarts} restart${restarts === 1 ? '' : 's'}: marked Failed by the zombie killer`;
        return { run: await this.transition(q, row, 'Failed', msg, events), outcome: 'failed' };
      });
      if (r !== null) out.push(r);
    }
    return out;
  }

  /**
   * Lazarus: a run Submitted longer than `timeoutMs` never started (its agent or
   * process died before it ran): back to Scheduled with restarts + 1 while restarts <
   * `maxRestarts`, else Failed.
   */
  async reviveSubmitted(timeoutMs: number, maxRestarts: number): Promise<ReapedRun[]> {
    const cutoff = this.now() - timeoutMs;
    const rows = await this.db.all("SELECT id, state_version FROM flow_runs WHERE state = 'Submitted' AND state_at < $1 ORDER BY id", [cutoff]);
    const out: ReapedRun[] = [];
    for (const cand of rows) {
      const r = await this.write(async (q, events): Promise<ReapedRun | null> => {
        const row = await q.one(`SELECT ${RUN_COLS} FROM flow_runs WHERE id = $1${this.db.lockRows()}`, [cand.id]);
        if (row === undefined || num(row.state_version) !== num(cand.state_version)) return null;
        const restarts = num(row.restarts);
        const secs = Math.round((this.now() - num(row.state_at)) / 1000);
        if (restarts < maxRestarts) {
          const msg = `not started within ${secs} s of its submission; rescheduled by lazarus (restart ${restarts + 1} of ${maxRestarts})`;
          return { run: await this.transition(q, row, 'Scheduled', msg, events, { restarts: restarts + 1 }), outcome: 'rescheduled' };
        }
        const msg = `not started within ${secs} s of its submission after ${restarts} restart${restarts === 1 ? '' : 's'}: marked Failed by lazarus`;
        return { run: await this.transition(q, row, 'Failed', msg, events), outcome: 'failed' };
      });
      if (r !== null) out.push(r);
    }
    return out;
  }

  private async failRunningTasks(q: Sql, flowRunId: string, message: string, events: Events): Promise<void> {
    const now = this.now();
    const rows = await q.all(
      `UPDATE task_runs SET state = 'Failed', version = version + 1, message = $1, ended_at = $2, updated_at = $2
       WHERE flow_run_id = $3 AND state = 'Running' RETURNING ${TASK_COLS}`,
      [message, now, flowRunId],
    );
    for (const r of rows) {
      const task = toTask(r);
      await q.run("INSERT INTO task_run_states (task_run_id, version, state, message, process_id, at) VALUES ($1, $2, 'Failed', $3, NULL, $4)", [
        task.id,
        task.version,
        message,
        now,
      ]);
      events.push({ type: 'taskRun', task });
    }
  }

  // -------------------------------------------------------------------------------
  // Another server's changes

  /** The events a notice stands for, read back as `notices.ts` describes. */
  async readNotice(items: readonly NoticeItem[]): Promise<ServerEvent[]> {
    const ids = { flowRun: [] as string[], taskRun: [] as string[], flow: [] as string[], log: [] as number[] };
    for (const it of items) {
      if (it.type === 'log') ids.log.push(it.seq);
      else ids[it.type].push(it.id);
    }
    const read = async <K, V>(keys: readonly K[], sql: (ph: string) => string, key: (v: V) => K, map: (r: Row) => V): Promise<Map<K, V>> => {
      if (keys.length === 0) return new Map();
      const rows = await this.db.all(sql(placeholders(1, keys.length)), keys);
      return new Map(rows.map((r) => map(r)).map((v) => [key(v), v]));
    };
    const runs = await read(ids.flowRun, (ph) => `SELECT ${RUN_COLS} FROM flow_runs WHERE id IN (${ph})`, (r) => r.id, toRun);
    const tasks = await read(ids.taskRun, (ph) => `SELECT ${TASK_COLS} FROM task_runs WHERE id IN (${ph})`, (t) => t.id, toTask);
    const flows = await read(ids.flow, (ph) => `SELECT ${FLOW_COLS} FROM flows f JOIN projects p ON p.id = f.project_id WHERE f.id IN (${ph})`, (f) => f.id, toFlow);
    const logs = await read(
      ids.log,
      (ph) => `SELECT seq, flow_run_id, task_key, map_index, level, message, at, source FROM logs WHERE seq IN (${ph})`,
      (l) => l.seq,
      toLog,
    );
    const out: ServerEvent[] = [];
    for (const it of items) {
      if (it.type === 'log') {
        const entry = logs.get(it.seq);
        if (entry !== undefined) out.push({ type: 'log', entry });
      } else if (it.type === 'flow') {
        const flow = flows.get(it.id);
        if (flow !== undefined) out.push({ type: 'flow', flow });
      } else if (it.type === 'flowRun') {
        const current = runs.get(it.id);
        const run = current === undefined ? null : eventFromRead(it, current);
        if (run !== null) out.push({ type: 'flowRun', run });
      } else {
        const current = tasks.get(it.id);
        const task = current === undefined ? null : eventFromRead(it, current);
        if (task !== null) out.push({ type: 'taskRun', task });
      }
    }
    return out;
  }

  // -------------------------------------------------------------------------------
  // API tokens and metrics

  /** A new API token: answers the token itself (shown once); only its sha256 is stored. */
  async createApiToken(name: string): Promise<{ id: string; token: string }> {
    const id = randomUUID();
    const token = `weft_${randomBytes(24).toString('base64url')}`;
    await this.db.run('INSERT INTO api_tokens (id, name, hash, created_at) VALUES ($1, $2, $3, $4)', [id, name, hashToken(token), this.now()]);
    return { id, token };
  }

  async deleteApiToken(id: string): Promise<void> {
    await this.db.run('DELETE FROM api_tokens WHERE id = $1', [id]);
  }

  async hasApiTokens(): Promise<boolean> {
    return (await this.db.one('SELECT id FROM api_tokens LIMIT 1')) !== undefined;
  }

  async isApiToken(token: string): Promise<boolean> {
    return (await this.db.one('SELECT id FROM api_tokens WHERE hash = $1', [hashToken(token)])) !== undefined;
  }

  async countRunsByState(): Promise<Map<FlowRunState, number>> {
    const rows = await this.db.all('SELECT state, COUNT(*) AS n FROM flow_runs GROUP BY state');
    return new Map(rows.map((r) => [r.state as FlowRunState, num(r.n)]));
  }
}

/** Missing required parameters and unknown names are refused (400), as Prefect 1 does. */
function checkParameters(declared: readonly ParameterInfo[], given: Record<string, unknown>): void {
  const names = new Set(declared.map((p) => p.name));
  const unknown = Object.keys(given).filter((k) => !names.has(k));
  if (unknown.length > 0) {
    throw badRequest(
      `unknown parameter${unknown.length > 1 ? 's' : ''} ${unknown.map((u) => `'${u}'`).join(', ')} (${names.size === 0 ? 'the flow takes none' : `the flow's: ${[...names].join(', ')}`})`,
    );
  }
  const missing = declared.filter((p) => p.required && !Object.prototype.hasOwnProperty.call(given, p.name)).map((p) => p.name);
  if (missing.length > 0) throw badRequest(`missing required parameter${missing.length > 1 ? 's' : ''} ${missing.map((m) => `'${m}'`).join(', ')}`);
}

