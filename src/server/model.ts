/**
 * The deployment layer's records and the backend's API as one typed interface.
 *
 * `Backend` is what agents, the flow-run process and the CLI use. `src/server/client.ts`
 * implements it over HTTP against `weft server`; the server's routes implement the same
 * operations on its database. Every record is plain JSON: ids are strings (UUIDs),
 * times are milliseconds since the epoch, versions are integers that grow by one per
 * write (optimistic concurrency: a write names the version it read).
 */
import type { TaskStateName } from '../flow/spec.ts';
import type { RunConfig } from '../run-config/index.ts';
import type { StorageRef } from '../storage/types.ts';

/** A flow run's life, as Prefect 1 has it. */
export type FlowRunState =
  | 'Scheduled' // created, waiting for its start time and an agent
  | 'Submitted' // claimed by an agent, its process being started
  | 'Running' // its flow-run process runs it (and heartbeats)
  | 'Cancelling' // a cancel was asked for while it ran; the process stops it
  | 'Success'
  | 'Failed'
  | 'Cancelled';

/** Every flow-run state, in the order of a run's life. */
export const FLOW_RUN_STATES = ['Scheduled', 'Submitted', 'Running', 'Cancelling', 'Success', 'Failed', 'Cancelled'] as const satisfies readonly FlowRunState[];
// Every flow-run state must be listed: a state added to the type fails to compile here.
type Missing<All, Listed> = Exclude<All, Listed> extends never ? true : never;
const _allRunStates: Missing<FlowRunState, (typeof FLOW_RUN_STATES)[number]> = true;

export const FINAL_FLOW_RUN_STATES: readonly FlowRunState[] = ['Success', 'Failed', 'Cancelled'];

/** How the flow's tasks execute inside the flow-run process (a Flow's `executor`). */
export type ExecutorSettings =
  | { kind: 'local' }
  | { kind: 'pool'; threads?: number }
  | { kind: 'cluster'; address?: string; workers?: number; threads?: number };

/** An interval or cron clock (UTC). */
export type Clock =
  | { kind: 'interval'; everyMs: number; startAt?: number; parameters?: Record<string, unknown>; labels?: string[] }
  | { kind: 'cron'; cron: string; parameters?: Record<string, unknown>; labels?: string[] };

export interface Schedule {
  readonly clocks: readonly Clock[];
  readonly paused?: boolean;
}

export interface Project {
  readonly id: string;
  readonly name: string;
  readonly createdAt: number;
}

export interface ParameterInfo {
  readonly name: string;
  readonly required: boolean;
  readonly default?: unknown;
}

/** A registered flow (one per project and name); its versions carry the code's reference. */
export interface FlowRecord {
  readonly id: string;
  readonly projectId: string;
  readonly project: string;
  readonly name: string;
  /** The newest version's number. */
  readonly version: number;
  readonly versionId: string;
  readonly schedule: Schedule | null;
  readonly createdAt: number;
  readonly updatedAt: number;
}

export interface FlowVersion {
  readonly id: string;
  readonly flowId: string;
  readonly version: number;
  /** sha256 of what decides the version (graph, storage, run config, executor, parameters, schedule). */
  readonly fingerprint: string;
  /** The flow's graph as JSON (task keys, edges, options): what the dashboard and `weft flows` show. */
  readonly graph: unknown;
  readonly storage: StorageRef;
  readonly runConfig: RunConfig;
  readonly executor: ExecutorSettings;
  readonly parameters: readonly ParameterInfo[];
  readonly labels: readonly string[];
  readonly createdAt: number;
}

export interface RegisterFlowInput {
  readonly project: string;
  /** The flow's name (`flow('name', ...)`). */
  readonly name: string;
  readonly graph: unknown;
  readonly storage: StorageRef;
  readonly runConfig: RunConfig;
  readonly executor: ExecutorSettings;
  readonly parameters: readonly ParameterInfo[];
  /** Labels every run of this version carries (the run config's and the storage's). */
  readonly labels: readonly string[];
  readonly schedule?: Schedule | null;
}

export interface FlowRun {
  readonly id: string;
  readonly flowId: string;
  readonly flowName: string;
  readonly project: string;
  readonly versionId: string;
  readonly version: number;
  readonly state: FlowRunState;
  /** Grows by one per state write. */
  readonly stateVersion: number;
  readonly message: string | null;
  readonly parameters: Record<string, unknown>;
  readonly labels: readonly string[];
  readonly scheduledStart: number;
  readonly startedAt: number | null;
  readonly endedAt: number | null;
  readonly heartbeatAt: number | null;
  /** The agent that claimed it. */
  readonly agentId: string | null;
  /** How many times lazarus put it back to Scheduled. */
  readonly restarts: number;
  /** Set by a schedule's clock; null for runs created by hand. */
  readonly idempotencyKey: string | null;
  readonly createdAt: number;
}

export interface FlowRunStateChange {
  readonly state: FlowRunState;
  readonly message: string | null;
  readonly at: number;
}

export interface CreateFlowRunInput {
  /** A flow by id, or by project and name. */
  readonly flowId?: string;
  readonly project?: string;
  readonly flowName?: string;
  /** Default: the flow's newest version. */
  readonly versionId?: string;
  readonly parameters?: Record<string, unknown>;
  /** Added to the version's labels. */
  readonly labels?: readonly string[];
  /** Default: now. */
  readonly scheduledStart?: number;
  /** A second create with the same key returns the first run. */
  readonly idempotencyKey?: string;
}

/** A run an agent claimed, with what it needs to start it. */
export interface ClaimedRun {
  readonly run: FlowRun;
  readonly version: FlowVersion;
}

export interface ClaimInput {
  readonly agentId: string;
  /** The agent's labels: it gets runs whose labels are all among them. */
  readonly labels: readonly string[];
  /** Runs whose scheduledStart is at or before this (prefetch: now + 10 s). */
  readonly before: number;
  readonly limit: number;
  /**
   * The agent's kind: when given, only runs whose run config that kind of agent starts
   * (its own kind, or universal). Without it, any run config.
   */
  readonly kind?: 'local' | 'docker' | 'kubernetes';
}

export interface TaskRun {
  readonly id: string;
  readonly flowRunId: string;
  readonly key: string;
  readonly mapIndex: number;
  readonly state: TaskStateName;
  readonly version: number;
  readonly attempts: number;
  readonly startedAt: number | null;
  readonly endedAt: number | null;
  readonly message: string | null;
  /** The flow-run process that wrote it last (its `processId`). */
  readonly processId: string | null;
}

/** One task run's new state, from a flow-run process. */
export interface TaskRunUpdate {
  readonly key: string;
  readonly mapIndex: number;
  readonly state: TaskStateName;
  /**
   * The version this process last saw for this task run (0: it has not seen one). A
   * write whose version is stale is refused: another process holds that task run.
   */
  readonly expectVersion: number;
  readonly attempts?: number;
  readonly startedAt?: number;
  readonly endedAt?: number;
  readonly message?: string;
}

export interface TaskRunWriteResult {
  readonly key: string;
  readonly mapIndex: number;
  readonly ok: boolean;
  /** The version now stored (the new one when ok). */
  readonly version: number;
}

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export interface LogEntry {
  readonly flowRunId: string;
  readonly taskKey?: string;
  readonly mapIndex?: number;
  readonly level: LogLevel;
  readonly message: string;
  readonly at: number;
  /** Who wrote it: 'agent', 'flow-run', 'task', 'server'. */
  readonly source: string;
}

export interface StoredLogEntry extends LogEntry {
  /** Increasing: `getLogs(run, { after })` pages on it. */
  readonly seq: number;
}

/** `healthy`: the agent polled (registered or claimed) within the server's agent timeout. */
export type AgentStatus = 'healthy' | 'unhealthy';

/** One record per agent name: a restarted agent registers again and keeps its id. */
/** A concurrency limit (`setConcurrencyLimit`) and how many of its slots are taken now. */
export interface ConcurrencyLimit {
  readonly kind: 'tag' | 'label';
  readonly name: string;
  readonly limit: number;
  readonly used: number;
}

export interface AgentRecord {
  readonly id: string;
  readonly name: string;
  readonly kind: string;
  readonly labels: readonly string[];
  /** Its last registration or claim (every poll claims, so this is its heartbeat). */
  readonly lastSeen: number;
  /** Derived when read, from `lastSeen` and the server's agent timeout. */
  readonly status: AgentStatus;
}

/** What changed, on the server's live feed (WebSocket `/api/events`). */
export type ServerEvent =
  | { readonly type: 'flowRun'; readonly run: FlowRun }
  | { readonly type: 'taskRun'; readonly task: TaskRun }
  | { readonly type: 'log'; readonly entry: StoredLogEntry }
  | { readonly type: 'flow'; readonly flow: FlowRecord };

export interface ListRunsQuery {
  readonly flowId?: string;
  readonly project?: string;
  readonly states?: readonly FlowRunState[];
  readonly limit?: number;
}

/** The backend as agents, flow-run processes and the CLI see it. */
export interface Backend {
  createProject(name: string): Promise<Project>;
  listProjects(): Promise<Project[]>;

  /** Records a new version unless the newest has the same fingerprint (`created: false`). */
  registerFlow(input: RegisterFlowInput): Promise<{ flow: FlowRecord; version: FlowVersion; created: boolean }>;
  listFlows(q?: { project?: string }): Promise<FlowRecord[]>;
  getFlow(idOrProjectName: string | { project: string; name: string }): Promise<FlowRecord>;
  getFlowVersion(versionId: string): Promise<FlowVersion>;
  /** Pause or resume a flow's schedule; pausing deletes its runs not yet started. */
  setSchedulePaused(flowId: string, paused: boolean): Promise<FlowRecord>;

  createFlowRun(input: CreateFlowRunInput): Promise<FlowRun>;
  getFlowRun(id: string): Promise<FlowRun>;
  listFlowRuns(q?: ListRunsQuery): Promise<FlowRun[]>;
  getFlowRunHistory(id: string): Promise<FlowRunStateChange[]>;
  /**
   * Move a run to `state` if its stateVersion is still `expectVersion` (when given).
   * Throws a `BackendError` with code CONFLICT when it is not.
   */
  setFlowRunState(id: string, state: FlowRunState, opts?: { message?: string; expectVersion?: number }): Promise<FlowRun>;
  /** Scheduled/Submitted → Cancelled at once; Running → Cancelling (its process stops it). */
  cancelFlowRun(id: string): Promise<FlowRun>;
  /** A flow-run process is alive; answers the run's state (a process stops on Cancelling). */
  heartbeatFlowRun(id: string): Promise<FlowRun>;

  /** Idempotent by name: the same name answers the same id, with kind and labels updated. */
  registerAgent(input: { name: string; kind: string; labels: readonly string[] }): Promise<AgentRecord>;
  /** Claim due runs atomically (Scheduled → Submitted): two agents never get the same run. */
  claimFlowRuns(input: ClaimInput): Promise<ClaimedRun[]>;

  setTaskRunStates(flowRunId: string, processId: string, updates: readonly TaskRunUpdate[]): Promise<TaskRunWriteResult[]>;
  getTaskRuns(flowRunId: string): Promise<TaskRun[]>;

  writeLogs(entries: readonly LogEntry[]): Promise<void>;
  getLogs(flowRunId: string, opts?: { after?: number; limit?: number }): Promise<StoredLogEntry[]>;

  /** Bundles kept by the server (BundleStorage), content-addressed by sha256. */
  putBundle(hash: string, code: Uint8Array): Promise<void>;
  getBundle(hash: string): Promise<Uint8Array>;

  /** Concurrency limits held by the server across machines: by task tag and by flow-run label. */
  setConcurrencyLimit(kind: 'tag' | 'label', name: string, limit: number | null): Promise<void>;
  /** Every limit with the slots in use now. */
  listConcurrencyLimits(): Promise<ConcurrencyLimit[]>;
  /**
   * Take a slot of every limited tag in `tags` for one task run of `flowRunId`, or none
   * (false: try again later). `releaseTaskSlots` gives them back.
   */
  acquireTaskSlots(flowRunId: string, taskRunKey: string, tags: readonly string[]): Promise<boolean>;
  releaseTaskSlots(flowRunId: string, taskRunKey: string): Promise<void>;
}

/** An error answer of the backend: `status` is the HTTP status, `code` a stable name. */
export class BackendError extends Error {
  readonly status: number;
  readonly code: string;
  constructor(status: number, code: string, message: string) {
    super(message);
    this.name = 'BackendError';
    this.status = status;
    this.code = code;
  }
}
