/**
 * The cluster wire protocol: every message between clients, the scheduler and workers,
 * in one typed module (after vscode-jsonrpc's `messages.ts`).
 *
 * - Each message is a member of the `Message` union, tagged by `op`. Its direction(s)
 *   and its validator live together in `SPEC` (one row per op); `MessageTo<D>` derives
 *   the union of what may travel in direction D from that table.
 * - One binary frame per tick carries an *array* of messages (dask's `BatchedSend`),
 *   encoded with msgpackr. A `FrameCodec` per connection owns one Packr/Unpackr pair with
 *   record structures negotiated in-band (`sequential: true`): the first frame that uses
 *   a shape defines its record, later frames refer to it by a one-byte id. Structures
 *   are therefore connection state: frames must be decoded in the order they were
 *   encoded, every encoded frame must be sent, and both ends `reset()` on reconnect.
 * - Every decoding failure is a `ProtocolError` with a stable code; the caller closes
 *   that connection with the error's message as the logged reason.
 * - Requests are matched to replies by a per-connection `id` chosen by the requester.
 * - Errors travel as `SerializedError` (`{name, message, stack, code, data}`) and are
 *   rebuilt with `deserializeError` (see `wireError` / `errorFromWire`).
 */
import { Packr, Unpackr } from 'msgpackr';
import { deserializeError, registerErrorClass, serializeError, WeftError } from '../errors.ts';
import type { SerializedError } from '../errors.ts';
import { inlineFn, inlineOpOf } from '../flow/inline.ts';
import { STATE_NAMES } from '../scheduler/states.ts';
import type { InlineOp } from '../flow/inline.ts';
import type {
  ArgBinding,
  CacheValidatorName,
  BindMode,
  NodeKind,
  NodeSpec,
  TaskOptions,
  TaskStateName,
  TriggerName,
} from '../flow/spec.ts';
import type { OutcomeStatus, TaskCall } from '../executor/types.ts';

/** Bumped on any incompatible change of a message or of the framing. Checked in `hello`. */
export const PROTOCOL_VERSION = 2;

/** Default and hard ceiling of one frame's size, checked before decoding. */
export const DEFAULT_MAX_FRAME_BYTES = 64 * 1024 * 1024;

/**
 * Who sends to whom. `w2w` is a direct peer connection between two workers (the one
 * that connects plays the client side of the handshake, the one that accepts the server side).
 */
export type Direction =
  /** client → scheduler */
  | 'c2s'
  /** worker → scheduler */
  | 'w2s'
  /** scheduler → worker */
  | 's2w'
  /** scheduler → client */
  | 's2c'
  /** worker → worker (either way, on a peer connection) */
  | 'w2w';

/** What the connecting side is. A worker connecting to another worker for data says 'peer'. */
export type Role = 'client' | 'worker' | 'peer';

// ---- errors ---------------------------------------------------------------------

export type ProtocolErrorCode =
  | 'FRAME_TOO_LARGE'
  | 'MALFORMED_FRAME'
  | 'UNKNOWN_OP'
  | 'BAD_MESSAGE'
  | 'VERSION_MISMATCH'
  /** The codec threw while encoding or decoding earlier: its record structures may no longer match the peer's. */
  | 'CODEC_BROKEN';

/** A frame or message that breaks the protocol. The connection it came from must be closed. */
export class ProtocolError extends WeftError {
  declare readonly code: ProtocolErrorCode;
  constructor(
    code: ProtocolErrorCode,
    message: string,
    readonly detail: { op?: string; field?: string; expected?: string; bytes?: number } = {},
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
    this.name = 'ProtocolError';
  }
}
registerErrorClass('ProtocolError', ProtocolError);

// ---- the graph, as data ---------------------------------------------------------

/**
 * Task options without functions. Custom triggers and custom cache validators cannot
 * travel (the scheduler runs the core that would call them): `toWireNode` refuses them.
 * State handlers run on the client from the task state events, so they stay there;
 * `stateHandlers` says how many the client holds (for reporting only).
 */
export interface WireTaskOptions extends Omit<TaskOptions, 'trigger' | 'cacheValidator' | 'stateHandlers' | 'onFailure'> {
  readonly trigger: { readonly kind: 'builtin'; readonly name: TriggerName; readonly atLeast?: number; readonly atMost?: number };
  readonly cacheValidator: CacheValidatorName;
  readonly stateHandlers: number;
  readonly onFailure: boolean;
}

/** A `NodeSpec` as data: the inline function travels as its `InlineOp` descriptor. */
export interface WireNode extends Omit<NodeSpec, 'inline' | 'options' | 'args'> {
  readonly args: readonly ArgBinding[];
  readonly options: WireTaskOptions;
  readonly inlineOp?: InlineOp;
}

// ---- messages: handshake ---------------------------------------------------------

/** First message of every connection, from the connecting side. */
export interface HelloMsg {
  readonly op: 'hello';
  readonly version: number;
  readonly role: Role;
  /** Stable, human-readable; unique per cluster for workers (the scheduler refuses duplicates). */
  readonly name: string;
  /** Advertised abstract resources, e.g. `{ GPU: 1 }` (`{}` for clients). */
  readonly resources: Readonly<Record<string, number>>;
  /** Task slots (0 for clients). */
  readonly threads: number;
  /** Bytes; 0 = no limit. */
  readonly memoryLimit: number;
  /** Where peers reach this worker for data (`ws://host:port`); '' when it does not listen. */
  readonly address: string;
  readonly pid: number;
}

/** The accepting side asks for a proof of the token (sent only when a token is configured). */
export interface ChallengeMsg {
  readonly op: 'challenge';
  /** 32 random bytes (`newNonce()`). */
  readonly nonce: Uint8Array;
}

/** HMAC-SHA256(token, nonce ‖ role ‖ name): see `auth.ts`. */
export interface ProofMsg {
  readonly op: 'proof';
  readonly proof: Uint8Array;
}

/** The handshake succeeded. */
export interface WelcomeMsg {
  readonly op: 'welcome';
  readonly version: number;
  /** The id the accepting side knows this connection by (worker id, client id). */
  readonly id: string;
  /** Send a heartbeat at least this often (it grows with cluster size). */
  readonly heartbeatMs: number;
  /** The largest frame the accepting side will decode. */
  readonly maxFrameBytes: number;
}

/** The handshake failed; the accepting side closes after sending it. */
export interface RefuseMsg {
  readonly op: 'refuse';
  /** A stable code: 'VERSION_MISMATCH', 'AUTH_FAILED', 'DUPLICATE_NAME', ... */
  readonly code: string;
  readonly reason: string;
}

// ---- messages: graphs, runs, events (client ↔ scheduler) --------------------------

/** Opens a graph submission. `graph` is the client's id for it, unique per connection. */
export interface GraphBeginMsg {
  readonly op: 'graphBegin';
  readonly graph: number;
  readonly name: string;
  /** Total nodes that `graphNodes` chunks will carry. */
  readonly nodeCount: number;
  readonly referenceTasks: readonly number[];
  readonly modules: readonly string[];
  readonly parameters: Readonly<Record<string, unknown>>;
  /** Content hash of the code bundle workers should fetch; '' when workers import `modules` from disk. */
  readonly bundle: string;
  /** How the scheduler runs it. */
  readonly options: WireRunOptions;
}

/** The run options that travel with a graph (the rest stay on the client). */
export interface WireRunOptions {
  readonly tagLimits: Readonly<Record<string, number>>;
  readonly validate: boolean;
  /** Stream one `taskEvents` entry per state change (for `onTaskState` and state handlers). */
  readonly events: boolean;
  /** Send `eventSummary` counts at most this often (ms; 0 = never): progress without per-task events. */
  readonly summaryMs: number;
  /** Checkpoint directory on the scheduler's machine ('' = its default). */
  readonly resultDir: string;
  /** The client keeps results: send every task run's value with 'finished' when the run is small enough. */
  readonly results?: boolean;
  /** The run's id (`RunOptions.runId`: `{runId}` in result locations); absent: the scheduler makes one. */
  readonly runId?: string;
}

/**
 * A code bundle (`cluster/bundle.ts`), sent before the `graphBegin` / `openSession` that
 * names it, once per hash per connection. The scheduler checks `hash` (sha256 hex of
 * `code`) and keeps bundles in memory by hash (bounded) for workers to fetch.
 */
export interface PutBundleMsg {
  readonly op: 'putBundle';
  readonly hash: string;
  readonly code: Uint8Array;
}

/** A worker asks for a bundle it does not have. Replied to by `bundle` with the same id. */
export interface GetBundleMsg {
  readonly op: 'getBundle';
  readonly id: number;
  readonly hash: string;
}

/** A bundle's code, or why it cannot be had (unknown hash). */
export interface BundleMsg {
  readonly op: 'bundle';
  readonly id: number;
  readonly hash: string;
  readonly code?: Uint8Array;
  readonly error?: SerializedError;
}

/** Per-task outcome of a finished run, in columns (aligned by core task id). */
export interface RunRecords {
  readonly runId: string;
  readonly state: TaskStateName;
  readonly message: string;
  readonly startMs: number;
  readonly endMs: number;
  readonly parameters: Readonly<Record<string, unknown>>;
  /** Spec node of each task run. The scheduler sends these numeric columns as typed arrays (one copy each on the wire). */
  readonly node: ArrayLike<number>;
  readonly mapIndex: ArrayLike<number>;
  /** Index into `STATE_NAMES` order of `TaskStateName` (see `STATE_ORDER`). */
  readonly state_: ArrayLike<number>;
  readonly attempts: ArrayLike<number>;
  readonly start: ArrayLike<number>;
  readonly end: ArrayLike<number>;
  /** Index into `workerNames`, -1 when none. */
  readonly worker: ArrayLike<number>;
  readonly workerNames: readonly string[];
  /** `[task id, error]` for task runs that carry one. */
  readonly errors: readonly (readonly [number, SerializedError])[];
  /** `[task id, story lines]` for task runs that did not succeed (capped). */
  readonly stories: readonly (readonly [number, readonly string[]])[];
}

/** Task state names in the order `RunRecords.state_` indexes them: the core's names, each once. */
export const STATE_ORDER: readonly TaskStateName[] = [...new Set(STATE_NAMES)];

/** A chunk of nodes, in id order: `nodes[i].id === offset + i`. */
export interface GraphNodesMsg {
  readonly op: 'graphNodes';
  readonly graph: number;
  readonly offset: number;
  /** Full nodes (`toWireNode`) or compact ones; empty when they travel in `cols` (what `GraphEncoder` sends). */
  readonly nodes: readonly (WireNode | CompactNode)[];
  /** Compact nodes in columns. */
  readonly cols?: NodeColumns;
  /** Compact form: task options first used in this chunk, appended to the graph's table (indexes continue). */
  readonly options?: readonly WireTaskOptions[];
  /** Compact form: strings (task keys, module URLs) first used in this chunk, appended likewise. */
  readonly strings?: readonly string[];
}

/**
 * A node in the compact form of `graphNodes`: options, task key and module are indexes
 * into per-graph tables that chunks extend (big graphs share a handful of option
 * objects and task keys, so a node costs a few bytes plus its key and arguments).
 * Its id is its position (`offset + i`).
 */
export interface CompactNode {
  readonly key: string;
  readonly kind: NodeKind;
  /** Index of the task key in the string table (-1 for none). */
  readonly t: number;
  /** Index of the module URL in the string table (-1 for none). */
  readonly m: number;
  readonly o: number;
  readonly args: readonly ArgBinding[];
  readonly upstream: readonly number[];
  readonly mapped: boolean;
  readonly parameter?: NodeSpec['parameter'];
  readonly inlineOp?: InlineOp;
}

/**
 * Numeric columns (nodes, calls, outcomes, run records) of at least this many entries
 * travel as typed arrays, shorter ones as plain arrays. msgpackr packs a typed array as
 * one copy, but unpacks it into an ArrayBuffer of its own: about 1.3 µs per column
 * whatever its length, against ~30 ns per number in a plain array. Small batches (a
 * one-task run, a chain's few ahead calls) stay cheap; big ones get the copies.
 */
export const TYPED_COLUMN_MIN = 64;

type NumberColumnType = { from(a: ArrayLike<number>): ArrayLike<number>; readonly name: string };

/** `a` as it travels: a typed array of kind `T` when long, else itself (`a` must not change after). */
export function numberColumn(a: number[], T: NumberColumnType): ArrayLike<number> {
  return a.length >= TYPED_COLUMN_MIN ? T.from(a) : a;
}

/** A column of `n` numbers: a typed array (not of bigints) or a plain array of numbers. */
function isNumberColumn(v: unknown, n: number): v is ArrayLike<number> {
  if (ArrayBuffer.isView(v)) {
    return !(v instanceof DataView) && !(v instanceof BigInt64Array) && !(v instanceof BigUint64Array) && (v as unknown as ArrayLike<number>).length === n;
  }
  if (!Array.isArray(v) || v.length !== n) return false;
  for (let i = 0; i < n; i++) if (typeof v[i] !== 'number') return false;
  return true;
}

/** The length of a number column (typed or plain array), or -1 for anything else. */
export function numberColumnLength(v: unknown): number {
  if (ArrayBuffer.isView(v)) return v instanceof DataView || v instanceof BigInt64Array || v instanceof BigUint64Array ? -1 : (v as unknown as ArrayLike<number>).length;
  return Array.isArray(v) && isNumberColumn(v, v.length) ? v.length : -1;
}

/** Binding modes and node kinds by their number in `NodeColumns` (kinds: `NODE_KINDS` order). */
const BIND_MODES: readonly BindMode[] = ['plain', 'mapped', 'unmapped', 'flatten'];
const NODE_KIND_NUMBER: Readonly<Record<NodeKind, number>> = { task: 0, parameter: 1, inline: 2 };
const BIND_MODE_NUMBER: Readonly<Record<BindMode, number>> = { plain: 0, mapped: 1, unmapped: 2, flatten: 3 };

/**
 * A chunk of compact nodes in columns (`graphNodes.cols`, what `GraphEncoder` sends).
 * Numbers travel as number columns (typed arrays when long: see `TYPED_COLUMN_MIN`) and
 * each node's arguments and upstream ids as slices of flat columns, so a chunk of
 * thousands of nodes packs as a few copies and one list of keys instead of a record, an
 * argument list and an upstream list per node.
 */
export interface NodeColumns {
  readonly key: readonly string[];
  /** Index into task, parameter, inline. */
  readonly kind: ArrayLike<number>;
  /** Task key and module URL (string table indexes, -1 for none) and options (options table index). */
  readonly t: ArrayLike<number>;
  readonly m: ArrayLike<number>;
  readonly o: ArrayLike<number>;
  readonly mapped: ArrayLike<number>;
  /** Arguments per node; their bindings follow one another in node order. */
  readonly nargs: ArrayLike<number>;
  /** Per binding: the upstream node of a ref, -1 for a constant (its value is next in `consts`). */
  readonly argNode: ArrayLike<number>;
  /** Per binding: index into plain, mapped, unmapped, flatten. */
  readonly argMode: ArrayLike<number>;
  readonly consts: readonly unknown[];
  /** Upstream ids per node, and all of them in node order. */
  readonly nup: ArrayLike<number>;
  readonly up: ArrayLike<number>;
  /** The rarer fields, by node index in the chunk. */
  readonly extra: readonly NodeExtra[];
}

export interface NodeExtra {
  readonly i: number;
  readonly parameter?: NodeSpec['parameter'];
  readonly inlineOp?: InlineOp;
}

function badNodeColumn(field: string, expected: string): never {
  throw new ProtocolError('BAD_MESSAGE', `graphNodes: column "${field}" must be ${expected}`, { op: 'graphNodes', field, expected });
}

/** Node columns → compact nodes (what `GraphDecoder` checks and resolves). Throws ProtocolError BAD_MESSAGE for columns that do not fit together. */
export function compactFromColumns(c: NodeColumns): CompactNode[] {
  const bad = badNodeColumn;
  if (typeof c !== 'object' || c === null) bad('cols', 'an object');
  if (!Array.isArray(c.key)) bad('key', 'an array');
  const n = c.key.length;
  for (const f of ['kind', 't', 'm', 'o', 'mapped', 'nargs', 'nup'] as const) if (!isNumberColumn(c[f], n)) bad(f, `${n} numbers (as many as "key")`);
  const nb = numberColumnLength(c.argNode);
  if (nb < 0) bad('argNode', 'numbers');
  if (!isNumberColumn(c.argMode, nb)) bad('argMode', `${nb} numbers (as many as "argNode")`);
  if (numberColumnLength(c.up) < 0) bad('up', 'numbers');
  if (!Array.isArray(c.consts)) bad('consts', 'an array');
  if (!Array.isArray(c.extra)) bad('extra', 'an array');
  const out = new Array<CompactNode>(n);
  let a = 0;
  let u = 0;
  let k = 0;
  for (let i = 0; i < n; i++) {
    const kind = NODE_KINDS[c.kind[i]!];
    if (kind === undefined) bad(`kind[${i}]`, `a number below ${NODE_KINDS.length}`);
    const na = c.nargs[i]!;
    if (na < 0 || a + na > c.argNode.length) bad(`nargs[${i}]`, 'a count within "argNode"');
    const args = new Array<ArgBinding>(na);
    for (let j = 0; j < na; j++, a++) {
      const mode = BIND_MODES[c.argMode[a]!];
      if (mode === undefined) bad(`argMode[${a}]`, `a number below ${BIND_MODES.length}`);
      const ref = c.argNode[a]!;
      if (ref >= 0) args[j] = { kind: 'ref', node: ref, mode: mode as BindMode };
      else {
        if (k >= c.consts.length) bad('consts', 'one value for each constant binding');
        args[j] = { kind: 'const', value: c.consts[k++], mode: mode as BindMode };
      }
    }
    const nu = c.nup[i]!;
    if (nu < 0 || u + nu > c.up.length) bad(`nup[${i}]`, 'a count within "up"');
    const upstream = new Array<number>(nu);
    for (let j = 0; j < nu; j++) upstream[j] = c.up[u++]!;
    out[i] = { key: c.key[i]!, kind: kind as NodeKind, t: c.t[i]!, m: c.m[i]!, o: c.o[i]!, args, upstream, mapped: c.mapped[i] === 1 };
  }
  if (a !== c.argNode.length) bad('nargs', 'counts that add up to the length of "argNode"');
  if (u !== c.up.length) bad('nup', 'counts that add up to the length of "up"');
  if (k !== c.consts.length) bad('consts', 'one value for each constant binding');
  for (const x of c.extra) {
    if (typeof x !== 'object' || x === null || !Number.isInteger(x.i) || x.i < 0 || x.i >= n) bad('extra[].i', `a node index below ${n}`);
    const node = out[x.i] as { -readonly [K in keyof CompactNode]: CompactNode[K] };
    if (x.parameter !== undefined) node.parameter = x.parameter;
    if (x.inlineOp !== undefined) node.inlineOp = x.inlineOp;
  }
  return out;
}

/** The last chunk was sent: the scheduler validates the graph and starts the run. */
export interface GraphEndMsg {
  readonly op: 'graphEnd';
  readonly graph: number;
}

/** Client asks to cancel a run. */
export interface CancelRunMsg {
  readonly op: 'cancelRun';
  readonly graph: number;
}

/** Run-level state of a submitted graph. */
export interface RunStateMsg {
  readonly op: 'runState';
  readonly graph: number;
  readonly state: 'accepted' | 'running' | 'finished' | 'rejected';
  /** The flow's state when finished. */
  readonly flowState?: TaskStateName;
  readonly error?: SerializedError;
  /** With 'finished': every task run's record. */
  readonly records?: RunRecords;
  /** With 'finished', when the client asked for results and the run is small: every task run's value (aligned with records). */
  readonly values?: readonly unknown[];
  /** Result keys whose values were lost with their workers (their `values` slots are undefined). */
  readonly lost?: readonly string[];
}

// ---- messages: call sessions (client ↔ scheduler) ----------------------------------

/**
 * A call-level session (the Executor interface over a cluster, like dask's
 * `client.submit`): the client sends resolved task calls, the scheduler places them on
 * workers and returns every outcome with its value. Replied to by `sessionReady`.
 */
export interface OpenSessionMsg {
  readonly op: 'openSession';
  readonly session: number;
  readonly flowName: string;
  readonly modules: readonly string[];
  readonly taskKeys: readonly string[];
  readonly parameters: Readonly<Record<string, unknown>>;
  readonly bundle: string;
}

export interface SessionReadyMsg {
  readonly op: 'sessionReady';
  readonly session: number;
  /** Task slots across the cluster's workers now. */
  readonly slots: number;
  readonly error?: SerializedError;
}

/** Calls for a session (ids unique within it). */
export interface SubmitMsg {
  readonly op: 'submit';
  readonly session: number;
  readonly calls: readonly TaskCall[];
}

export interface CancelCallsMsg {
  readonly op: 'cancelCalls';
  readonly session: number;
  readonly ids: readonly number[];
}

/** Outcomes of a session's calls, values included. */
export interface CallOutcomesMsg {
  readonly op: 'callOutcomes';
  readonly session: number;
  readonly outcomes: readonly WireOutcome[];
  /** Worker name per outcome (aligned). */
  readonly workers: readonly string[];
}

export interface CloseSessionMsg {
  readonly op: 'closeSession';
  readonly session: number;
}

/** The client is done with a finished run: the scheduler drops it and its results. */
export interface ReleaseRunMsg {
  readonly op: 'releaseRun';
  readonly graph: number;
}

/** One task state change. */
export interface TaskEvent {
  /** Core task id. */
  readonly task: number;
  readonly key: string;
  readonly mapIndex: number;
  readonly state: TaskStateName;
  /** Wall-clock ms. */
  readonly at: number;
  readonly attempt: number;
  readonly worker?: string;
  readonly error?: SerializedError;
}

/** A batch of task state events for one run. */
export interface TaskEventsMsg {
  readonly op: 'taskEvents';
  readonly graph: number;
  readonly events: readonly TaskEvent[];
}

/** Sent instead of events to a client that cannot keep up: counts by state, and how many events it was spared. */
export interface EventSummaryMsg {
  readonly op: 'eventSummary';
  readonly graph: number;
  readonly counts: Readonly<Partial<Record<TaskStateName, number>>>;
  readonly dropped: number;
}

/** Client asks for task results (core task ids). Replied to by `results` with the same id. */
export interface GetResultsMsg {
  readonly op: 'getResults';
  readonly id: number;
  readonly graph: number;
  readonly tasks: readonly number[];
}

export interface ResultsMsg {
  readonly op: 'results';
  /** The `getResults` id this answers. */
  readonly id: number;
  /** Aligned with the request's `tasks`. */
  readonly values: readonly unknown[];
  /** Set when the request failed as a whole (unknown graph, results lost...). */
  readonly error?: SerializedError;
}

// ---- messages: work (scheduler ↔ worker) ------------------------------------------

/** An input of a call that is a result held on some worker(s). */
export interface WireDep {
  /** Result key (`dataKey(run, task)`). */
  readonly key: string;
  /** Worker ids known to hold it (may include the receiver). */
  readonly holders: readonly string[];
  readonly nbytes: number;
  /** Positional argument it fills. */
  readonly arg: number;
  /** -1: the whole argument; i ≥ 0: element i of a list argument (a mapped upstream's children). */
  readonly index: number;
  /** Take this element path inside the held value (a mapped child of an upstream that returned a list). */
  readonly path?: readonly number[];
}

/** A `TaskCall` plus the inputs the worker must hold before starting it. */
export interface WireCall extends TaskCall {
  /** Inputs held on workers; their slots in `args` hold null until the worker fills them. */
  readonly deps?: readonly WireDep[];
  /** Return the value with the outcome whatever its size (the scheduler needs it: inline consumers, checkpoints). */
  readonly ret?: boolean;
}

/**
 * A batch of calls in columns: each task key once, the numbers as number columns
 * (typed arrays when long: see `TYPED_COLUMN_MIN`), and the inputs of every call as
 * slices of flat columns, so a batch of thousands encodes as a few arrays and copies instead of a
 * record per call and per input.
 */
export interface CallColumns {
  readonly taskKeys: readonly string[];
  readonly id: ArrayLike<number>;
  readonly runId: ArrayLike<number>;
  /** Index into `taskKeys`. */
  readonly taskKey: ArrayLike<number>;
  readonly key: readonly string[];
  readonly args: readonly (readonly unknown[])[];
  readonly timeoutMs: ArrayLike<number>;
  readonly mapIndex: ArrayLike<number>;
  readonly attempt: ArrayLike<number>;
  readonly loopCount: ArrayLike<number>;
  /** Inputs (`WireCall.deps`) per call; their fields follow, call after call. */
  readonly ndeps: ArrayLike<number>;
  readonly depKey: readonly string[];
  readonly depNbytes: ArrayLike<number>;
  readonly depArg: ArrayLike<number>;
  readonly depIndex: ArrayLike<number>;
  /** Holders per input, and all of them in input order. */
  readonly nholders: ArrayLike<number>;
  readonly holders: readonly string[];
  /** Element paths, for the inputs that have one (by input index). */
  readonly depPaths: readonly { readonly d: number; readonly path: readonly number[] }[];
  /** The fields only some calls carry, by call index. */
  readonly extra: readonly CallExtras[];
}

export interface CallExtras {
  readonly i: number;
  readonly loopResult?: unknown;
  readonly ret?: boolean;
  readonly resources?: Readonly<Record<string, number>>;
}

const NO_HOLDERS: readonly string[] = Object.freeze([]);

/** Calls → columns (`ComputeMsg.cols`). */
export function toColumns(calls: readonly WireCall[]): CallColumns {
  const n = calls.length;
  const taskKeys: string[] = [];
  const keyIndex = new Map<string, number>();
  const id = new Array<number>(n);
  const runId = new Array<number>(n);
  const taskKey = new Array<number>(n);
  const key = new Array<string>(n);
  const args = new Array<readonly unknown[]>(n);
  const timeoutMs = new Array<number>(n);
  const mapIndex = new Array<number>(n);
  const attempt = new Array<number>(n);
  const loopCount = new Array<number>(n);
  const ndeps = new Array<number>(n);
  const depKey: string[] = [];
  const depNbytes: number[] = [];
  const depArg: number[] = [];
  const depIndex: number[] = [];
  const nholders: number[] = [];
  const holders: string[] = [];
  const depPaths: { d: number; path: readonly number[] }[] = [];
  const extra: CallExtras[] = [];
  let lastTaskKey = '';
  let lastIndex = -1;
  for (let i = 0; i < n; i++) {
    const c = calls[i]!;
    let k = lastIndex;
    if (c.taskKey !== lastTaskKey || k < 0) {
      k = keyIndex.get(c.taskKey) ?? -1;
      if (k < 0) {
        k = taskKeys.length;
        taskKeys.push(c.taskKey);
        keyIndex.set(c.taskKey, k);
      }
      lastTaskKey = c.taskKey;
      lastIndex = k;
    }
    id[i] = c.id;
    runId[i] = c.runId;
    taskKey[i] = k;
    key[i] = c.key;
    args[i] = c.args;
    timeoutMs[i] = c.timeoutMs;
    mapIndex[i] = c.mapIndex;
    attempt[i] = c.attempt;
    loopCount[i] = c.loopCount;
    const deps = c.deps;
    ndeps[i] = deps === undefined ? 0 : deps.length;
    if (deps !== undefined) {
      for (let j = 0; j < deps.length; j++) {
        const d = deps[j]!;
        if (d.path !== undefined) depPaths.push({ d: depKey.length, path: d.path });
        depKey.push(d.key);
        depNbytes.push(d.nbytes);
        depArg.push(d.arg);
        depIndex.push(d.index);
        const hs = d.holders;
        nholders.push(hs.length);
        for (let h = 0; h < hs.length; h++) holders.push(hs[h]!);
      }
    }
    if (c.loopResult !== undefined || c.ret !== undefined || c.resources !== undefined) {
      const x: { -readonly [K in keyof CallExtras]: CallExtras[K] } = { i };
      if (c.loopResult !== undefined) x.loopResult = c.loopResult;
      if (c.ret !== undefined) x.ret = c.ret;
      if (c.resources !== undefined) x.resources = c.resources;
      extra.push(x);
    }
  }
  return {
    taskKeys,
    id: numberColumn(id, Float64Array),
    runId: numberColumn(runId, Float64Array),
    taskKey: numberColumn(taskKey, Int32Array),
    key,
    args,
    timeoutMs: numberColumn(timeoutMs, Float64Array),
    mapIndex: numberColumn(mapIndex, Float64Array),
    attempt: numberColumn(attempt, Float64Array),
    loopCount: numberColumn(loopCount, Float64Array),
    ndeps: numberColumn(ndeps, Int32Array),
    depKey,
    depNbytes: numberColumn(depNbytes, Float64Array),
    depArg: numberColumn(depArg, Int32Array),
    depIndex: numberColumn(depIndex, Int32Array),
    nholders: numberColumn(nholders, Int32Array),
    holders,
    depPaths,
    extra,
  };
}

function badCallColumn(field: string, expected: string): never {
  throw new ProtocolError('BAD_MESSAGE', `compute: column "${field}" must be ${expected}`, { op: 'compute', field, expected });
}

/** Columns → calls. Throws ProtocolError BAD_MESSAGE for columns of different lengths or wrong types. */
export function fromColumns(c: CallColumns): WireCall[] {
  const bad = badCallColumn;
  if (typeof c !== 'object' || c === null) bad('cols', 'an object');
  for (const f of ['taskKeys', 'key', 'args', 'depKey', 'holders', 'depPaths', 'extra'] as const) if (!Array.isArray(c[f])) bad(f, 'an array');
  const n = c.key.length;
  for (const f of ['id', 'runId', 'taskKey', 'timeoutMs', 'mapIndex', 'attempt', 'loopCount', 'ndeps'] as const) {
    if (!isNumberColumn(c[f], n)) bad(f, `${n} numbers (as many as "key")`);
  }
  if (c.args.length !== n) bad('args', `an array of ${n} (as long as "key")`);
  const nd = c.depKey.length;
  for (const f of ['depNbytes', 'depArg', 'depIndex', 'nholders'] as const) if (!isNumberColumn(c[f], nd)) bad(f, `${nd} numbers (as many as "depKey")`);
  let paths: Map<number, readonly number[]> | null = null;
  for (const p of c.depPaths) {
    if (typeof p !== 'object' || p === null || !Number.isInteger(p.d) || p.d < 0 || p.d >= nd) bad('depPaths[].d', `an input index below ${nd}`);
    (paths ??= new Map()).set(p.d, p.path);
  }
  const out = new Array<WireCall>(n);
  let d = 0;
  let h = 0;
  for (let i = 0; i < n; i++) {
    const tk = c.taskKeys[c.taskKey[i]!];
    if (typeof tk !== 'string') bad(`taskKey[${i}]`, 'an index into "taskKeys"');
    const args = c.args[i];
    if (!Array.isArray(args)) bad(`args[${i}]`, 'an array');
    const call: { -readonly [K in keyof WireCall]: WireCall[K] } = {
      id: c.id[i]!,
      runId: c.runId[i]!,
      taskKey: tk as string,
      key: c.key[i]!,
      args: args as unknown[],
      timeoutMs: c.timeoutMs[i]!,
      mapIndex: c.mapIndex[i]!,
      attempt: c.attempt[i]!,
      loopCount: c.loopCount[i]!,
      loopResult: undefined,
    };
    const k = c.ndeps[i]!;
    if (k > 0) {
      if (d + k > nd) bad(`ndeps[${i}]`, 'a count within "depKey"');
      const deps = new Array<WireDep>(k);
      for (let j = 0; j < k; j++, d++) {
        const nh = c.nholders[d]!;
        if (nh < 0 || h + nh > c.holders.length) bad(`nholders[${d}]`, 'a count within "holders"');
        let hs = NO_HOLDERS;
        if (nh > 0) {
          const list = new Array<string>(nh);
          for (let x = 0; x < nh; x++) list[x] = c.holders[h++]!;
          hs = list;
        }
        const path = paths?.get(d);
        deps[j] =
          path === undefined
            ? { key: c.depKey[d]!, holders: hs, nbytes: c.depNbytes[d]!, arg: c.depArg[d]!, index: c.depIndex[d]! }
            : { key: c.depKey[d]!, holders: hs, nbytes: c.depNbytes[d]!, arg: c.depArg[d]!, index: c.depIndex[d]!, path };
      }
      call.deps = deps;
    } else if (k < 0) bad(`ndeps[${i}]`, 'a count >= 0');
    out[i] = call;
  }
  if (d !== nd) bad('ndeps', 'counts that add up to the length of "depKey"');
  if (h !== c.holders.length) bad('nholders', 'counts that add up to the length of "holders"');
  for (const x of c.extra) {
    if (typeof x !== 'object' || x === null || !Number.isInteger(x.i) || x.i < 0 || x.i >= n) bad('extra[].i', `a call index below ${n}`);
    const call = out[x.i] as { -readonly [K in keyof WireCall]: WireCall[K] };
    if (x.loopResult !== undefined) call.loopResult = x.loopResult;
    if (x.ret !== undefined) call.ret = x.ret;
    if (x.resources !== undefined) call.resources = x.resources;
  }
  return out;
}

/** A batch of calls for one run. Never more than the worker's credits. */
export interface ComputeMsg {
  readonly op: 'compute';
  /** Scheduler-wide run id (namespaces task ids and result keys). */
  readonly run: number;
  readonly modules: readonly string[];
  readonly bundle: string;
  /** The calls as records; empty when they travel in `cols`. */
  readonly calls: readonly WireCall[];
  /** The calls in columns (what the scheduler sends). */
  readonly cols?: CallColumns;
  /** Peer addresses (worker id → ws://host:port) of holders named in this batch's deps. */
  readonly peers?: Readonly<Record<string, string>>;
  /** With the first compute of a run on a worker: what `context()` reports in its tasks. */
  readonly flowName?: string;
  readonly parameters?: Readonly<Record<string, unknown>>;
}

/** An `Outcome` as data. The value stays on the worker unless it is small (`value` present). */
export interface WireOutcome {
  readonly id: number;
  readonly runId: number;
  readonly status: OutcomeStatus;
  readonly startMs: number;
  readonly endMs: number;
  /** Present only for small results the worker inlines (so the scheduler can answer clients without a fetch). */
  readonly value?: unknown;
  readonly error?: SerializedError;
  /** Serialized size of the result held (0 when none). */
  readonly nbytes: number;
  /** Length of an array result (-1 otherwise): lets the scheduler expand a mapped dependent without the data. */
  readonly len: number;
  /** For an array of arrays held on the worker: each element's length (so a dependent can flatten it). */
  readonly inner?: readonly number[];
}

/** A batch of outcomes for one run. Each outcome returns one credit. */
export interface OutcomesMsg {
  readonly op: 'outcomes';
  readonly run: number;
  /** The outcomes as records; empty when they travel in `cols` (see `outcomesOf`). */
  readonly outcomes: readonly WireOutcome[];
  readonly cols?: OutcomeColumns;
}

/** Outcome statuses by their number in `OutcomeColumns.status`. */
const OUTCOME_STATUSES: readonly OutcomeStatus[] = ['ok', 'error', 'timeout', 'lost', 'cancelled'];
const STATUS_NUMBER: Readonly<Record<OutcomeStatus, number>> = { ok: 0, error: 1, timeout: 2, lost: 3, cancelled: 4 };

/**
 * A batch of outcomes in columns. The numbers travel as number columns (typed arrays
 * when long, one copy each: see `TYPED_COLUMN_MIN`), and what only some outcomes carry
 * travels in short lists: packing a batch of thousands costs a few array copies instead
 * of thousands of records.
 */
export interface OutcomeColumns {
  readonly id: ArrayLike<number>;
  readonly runId: ArrayLike<number>;
  /** Index into the statuses ok, error, timeout, lost, cancelled. */
  readonly status: ArrayLike<number>;
  readonly startMs: ArrayLike<number>;
  readonly endMs: ArrayLike<number>;
  readonly nbytes: ArrayLike<number>;
  readonly len: ArrayLike<number>;
  /** 1 where the outcome carries an inline value: those values, in order, are `values`. */
  readonly hasValue: ArrayLike<number>;
  readonly values: readonly unknown[];
  /** The rarer fields, by outcome index. */
  readonly extra: readonly OutcomeExtra[];
}

export interface OutcomeExtra {
  readonly i: number;
  readonly error?: SerializedError;
  readonly inner?: readonly number[];
}

/** Builds the `OutcomeColumns` of one batch an outcome at a time (a worker's outbox for one run). */
export class OutcomeColumnsBuilder {
  private readonly id: number[] = [];
  private readonly runId: number[] = [];
  private readonly status: number[] = [];
  private readonly startMs: number[] = [];
  private readonly endMs: number[] = [];
  private readonly nbytes: number[] = [];
  private readonly len: number[] = [];
  private readonly hasValue: number[] = [];
  private readonly values: unknown[] = [];
  private readonly extra: OutcomeExtra[] = [];

  get size(): number {
    return this.id.length;
  }

  /** Add one outcome (`hasValue`: the value travels inline, even when it is undefined). */
  add(
    id: number,
    runId: number,
    status: OutcomeStatus,
    startMs: number,
    endMs: number,
    nbytes: number,
    len: number,
    hasValue: boolean,
    value: unknown,
    error: SerializedError | undefined,
    inner: readonly number[] | undefined,
  ): void {
    const i = this.id.length;
    this.id.push(id);
    this.runId.push(runId);
    this.status.push(STATUS_NUMBER[status]);
    this.startMs.push(startMs);
    this.endMs.push(endMs);
    this.nbytes.push(nbytes);
    this.len.push(len);
    this.hasValue.push(hasValue ? 1 : 0);
    if (hasValue) this.values.push(value);
    if (error !== undefined || inner !== undefined) {
      const x: { i: number; error?: SerializedError; inner?: readonly number[] } = { i };
      if (error !== undefined) x.error = error;
      if (inner !== undefined) x.inner = inner;
      this.extra.push(x);
    }
  }

  addOutcome(o: WireOutcome): void {
    this.add(o.id, o.runId, o.status, o.startMs, o.endMs, o.nbytes, o.len, 'value' in o, o.value, o.error, o.inner);
  }

  /** The columns of what was added. */
  build(): OutcomeColumns {
    return {
      id: numberColumn(this.id, Float64Array),
      runId: numberColumn(this.runId, Float64Array),
      status: numberColumn(this.status, Uint8Array),
      startMs: numberColumn(this.startMs, Float64Array),
      endMs: numberColumn(this.endMs, Float64Array),
      nbytes: numberColumn(this.nbytes, Float64Array),
      len: numberColumn(this.len, Float64Array),
      hasValue: numberColumn(this.hasValue, Uint8Array),
      values: this.values,
      extra: this.extra,
    };
  }
}

/** Outcome records → columns. */
export function outcomesToColumns(outs: readonly WireOutcome[]): OutcomeColumns {
  const b = new OutcomeColumnsBuilder();
  for (const o of outs) b.addOutcome(o);
  return b.build();
}

function badOutcomeColumn(field: string, expected: string): never {
  throw new ProtocolError('BAD_MESSAGE', `outcomes: column "${field}" must be ${expected}`, { op: 'outcomes', field, expected });
}

type MutableOutcome = { -readonly [K in keyof WireOutcome]: WireOutcome[K] };

/** Columns → outcome records. Throws ProtocolError BAD_MESSAGE for columns of wrong types or lengths. */
export function outcomesFromColumns(c: OutcomeColumns): WireOutcome[] {
  const bad = badOutcomeColumn;
  if (typeof c !== 'object' || c === null) bad('cols', 'an object');
  const n = numberColumnLength(c.id);
  if (n < 0) bad('id', 'numbers');
  for (const f of ['runId', 'startMs', 'endMs', 'nbytes', 'len', 'status', 'hasValue'] as const) {
    if (!isNumberColumn(c[f], n)) bad(f, `${n} numbers (as many as "id")`);
  }
  if (!Array.isArray(c.values)) bad('values', 'an array');
  if (!Array.isArray(c.extra)) bad('extra', 'an array');
  const out = new Array<WireOutcome>(n);
  let v = 0;
  for (let i = 0; i < n; i++) {
    const status = OUTCOME_STATUSES[c.status[i]!];
    if (status === undefined) bad(`status[${i}]`, `a number below ${OUTCOME_STATUSES.length}`);
    const o: MutableOutcome = {
      id: c.id[i]!,
      runId: c.runId[i]!,
      status: status as OutcomeStatus,
      startMs: c.startMs[i]!,
      endMs: c.endMs[i]!,
      nbytes: c.nbytes[i]!,
      len: c.len[i]!,
    };
    if (c.hasValue[i] === 1) {
      if (v >= c.values.length) bad('values', 'one value for each 1 in "hasValue"');
      o.value = c.values[v++];
    }
    out[i] = o;
  }
  if (v !== c.values.length) bad('values', 'one value for each 1 in "hasValue"');
  for (const x of c.extra) {
    if (typeof x !== 'object' || x === null || !Number.isInteger(x.i) || x.i < 0 || x.i >= n) bad('extra[].i', `an outcome index below ${n}`);
    const o = out[x.i] as MutableOutcome;
    if (x.error !== undefined) {
      if (typeof x.error !== 'object' || x.error === null) bad('extra[].error', 'an error record');
      o.error = x.error;
    }
    if (x.inner !== undefined) {
      if (!Array.isArray(x.inner)) bad('extra[].inner', 'an array');
      o.inner = x.inner;
    }
  }
  return out;
}

/** The outcomes of a message, whichever form they travelled in. */
export function outcomesOf(m: OutcomesMsg): readonly WireOutcome[] {
  return m.cols !== undefined ? outcomesFromColumns(m.cols) : m.outcomes;
}

/** The worker's capacity changed (memory pause: 0; resume: slots × saturation). Absolute, not a delta. */
export interface CreditsMsg {
  readonly op: 'credits';
  readonly credits: number;
}

/** Stop these calls (queued or running); each ends with a 'cancelled' outcome. */
export interface CancelTasksMsg {
  readonly op: 'cancelTasks';
  readonly run: number;
  readonly tasks: readonly number[];
}

/** Drop held results (no dependent needs them any more). */
export interface ReleaseMsg {
  readonly op: 'release';
  readonly keys: readonly string[];
}

/** Which workers hold these results? Replied to by `whoHasReply` with the same id. */
export interface WhoHasMsg {
  readonly op: 'whoHas';
  readonly id: number;
  readonly keys: readonly string[];
}

export interface WhoHasReplyMsg {
  readonly op: 'whoHasReply';
  readonly id: number;
  /** Aligned with the request's keys. */
  readonly holders: readonly (readonly string[])[];
  /** Peer addresses of the workers named in `holders`. */
  readonly addresses: Readonly<Record<string, string>>;
}

/** Send me these results. Replied to by `data` with the same id. */
export interface GetDataMsg {
  readonly op: 'getData';
  readonly id: number;
  readonly keys: readonly string[];
}

export interface DataMsg {
  readonly op: 'data';
  readonly id: number;
  /** The keys found (a subset of the request's, in its order). */
  readonly keys: readonly string[];
  /** Aligned with `keys`: each result as msgpack bytes (packed once by its maker, never re-encoded in transit). */
  readonly values: readonly Uint8Array[];
  /** Requested keys the sender does not hold (any more). */
  readonly missing: readonly string[];
}

/** Fetch these results from their holders and keep them (replication before a worker retires). */
export interface AcquireMsg {
  readonly op: 'acquire';
  readonly id: number;
  /** Key → address of a worker holding it. */
  readonly from: Readonly<Record<string, string>>;
}

export interface AcquiredMsg {
  readonly op: 'acquired';
  readonly id: number;
  readonly keys: readonly string[];
  readonly missing: readonly string[];
}

/** Give these queued (not started) tasks back. Replied to by `stealReply`. */
export interface StealMsg {
  readonly op: 'steal';
  readonly id: number;
  readonly run: number;
  readonly tasks: readonly number[];
}

/** Transactional: `stolen` tasks were removed and will never run here; `kept` already started or finished. */
export interface StealReplyMsg {
  readonly op: 'stealReply';
  readonly id: number;
  readonly run: number;
  readonly stolen: readonly number[];
  readonly kept: readonly number[];
}

export interface HeartbeatMetrics {
  readonly rss: number;
  readonly heapUsed: number;
  readonly executing: number;
  readonly queued: number;
  /** Bytes and count of results held in memory, and bytes spilled to disk. */
  readonly heldBytes: number;
  readonly heldCount: number;
  readonly spilledBytes: number;
  readonly eventLoopDelayMs: number;
  /** Since start: inputs fetched from peer workers (count and bytes), and inputs served to them. */
  readonly peerFetchedKeys?: number;
  readonly peerFetchedBytes?: number;
  readonly peerServedKeys?: number;
}

/** Liveness, every `heartbeatMs`. Workers attach metrics. */
export interface HeartbeatMsg {
  readonly op: 'heartbeat';
  /** Wall-clock ms at the sender. */
  readonly at: number;
  readonly metrics?: HeartbeatMetrics;
}

/** Scheduler → worker: move your unique results away, then close. Worker → scheduler: I am leaving. */
export interface RetireMsg {
  readonly op: 'retire';
  readonly reason: string;
}

export interface LogRecord {
  readonly level: 'debug' | 'info' | 'warn' | 'error';
  readonly msg: string;
  readonly at: number;
  readonly worker?: string;
  readonly run?: number;
  readonly task?: number;
  readonly key?: string;
}

/** Worker logs and task console output; the scheduler forwards them to the client that owns the task. */
export interface LogMsg {
  readonly op: 'log';
  readonly records: readonly LogRecord[];
}

/** An error about the connection or about a request (`ref`: its id, -1 for none). */
export interface ErrorMsg {
  readonly op: 'error';
  readonly ref: number;
  readonly error: SerializedError;
}

export type Message =
  | HelloMsg
  | ChallengeMsg
  | ProofMsg
  | WelcomeMsg
  | RefuseMsg
  | GraphBeginMsg
  | PutBundleMsg
  | GetBundleMsg
  | BundleMsg
  | GraphNodesMsg
  | GraphEndMsg
  | CancelRunMsg
  | ReleaseRunMsg
  | OpenSessionMsg
  | SessionReadyMsg
  | SubmitMsg
  | CancelCallsMsg
  | CallOutcomesMsg
  | CloseSessionMsg
  | AcquireMsg
  | AcquiredMsg
  | RunStateMsg
  | TaskEventsMsg
  | EventSummaryMsg
  | GetResultsMsg
  | ResultsMsg
  | ComputeMsg
  | OutcomesMsg
  | CreditsMsg
  | CancelTasksMsg
  | ReleaseMsg
  | WhoHasMsg
  | WhoHasReplyMsg
  | GetDataMsg
  | DataMsg
  | StealMsg
  | StealReplyMsg
  | HeartbeatMsg
  | RetireMsg
  | LogMsg
  | ErrorMsg;

export type Op = Message['op'];
export type MessageOf<K extends Op> = Extract<Message, { readonly op: K }>;

// ---- the op table: directions + validators ----------------------------------------

/**
 * Field checks, kept to primitive types (the handlers own deeper invariants).
 * A trailing `?` makes the field optional (absent or undefined; when present, checked).
 */
type FieldType = 'string' | 'number' | 'int' | 'boolean' | 'bytes' | 'array' | 'object' | 'error' | 'any';
type FieldCheck = FieldType | `${FieldType}?`;

type OpSpec<K extends Op> = {
  readonly dirs: readonly Direction[];
  readonly fields: { readonly [F in Exclude<keyof MessageOf<K>, 'op'>]?: FieldCheck };
};

const ALL: readonly Direction[] = ['c2s', 'w2s', 's2w', 's2c', 'w2w'];

/** One row per op: who may send it and which fields it must carry. */
const SPEC = {
  hello: {
    dirs: ['c2s', 'w2s', 'w2w'],
    fields: { version: 'int', role: 'string', name: 'string', resources: 'object', threads: 'int', memoryLimit: 'number', address: 'string', pid: 'int' },
  },
  challenge: { dirs: ['s2c', 's2w', 'w2w'], fields: { nonce: 'bytes' } },
  proof: { dirs: ['c2s', 'w2s', 'w2w'], fields: { proof: 'bytes' } },
  welcome: { dirs: ['s2c', 's2w', 'w2w'], fields: { version: 'int', id: 'string', heartbeatMs: 'number', maxFrameBytes: 'number' } },
  refuse: { dirs: ['s2c', 's2w', 'w2w'], fields: { code: 'string', reason: 'string' } },
  graphBegin: {
    dirs: ['c2s'],
    fields: {
      graph: 'int',
      name: 'string',
      nodeCount: 'int',
      referenceTasks: 'array',
      modules: 'array',
      parameters: 'object',
      bundle: 'string',
      options: 'object',
    },
  },
  putBundle: { dirs: ['c2s'], fields: { hash: 'string', code: 'bytes' } },
  getBundle: { dirs: ['w2s'], fields: { id: 'int', hash: 'string' } },
  bundle: { dirs: ['s2w'], fields: { id: 'int', hash: 'string', code: 'bytes?', error: 'error?' } },
  graphNodes: { dirs: ['c2s'], fields: { graph: 'int', offset: 'int', nodes: 'array', cols: 'object?', options: 'array?', strings: 'array?' } },
  graphEnd: { dirs: ['c2s'], fields: { graph: 'int' } },
  cancelRun: { dirs: ['c2s'], fields: { graph: 'int' } },
  releaseRun: { dirs: ['c2s'], fields: { graph: 'int' } },
  openSession: {
    dirs: ['c2s'],
    fields: { session: 'int', flowName: 'string', modules: 'array', taskKeys: 'array', parameters: 'object', bundle: 'string' },
  },
  sessionReady: { dirs: ['s2c'], fields: { session: 'int', slots: 'int', error: 'error?' } },
  submit: { dirs: ['c2s'], fields: { session: 'int', calls: 'array' } },
  cancelCalls: { dirs: ['c2s'], fields: { session: 'int', ids: 'array' } },
  callOutcomes: { dirs: ['s2c'], fields: { session: 'int', outcomes: 'array', workers: 'array' } },
  closeSession: { dirs: ['c2s'], fields: { session: 'int' } },
  runState: {
    dirs: ['s2c'],
    fields: { graph: 'int', state: 'string', flowState: 'string?', error: 'error?', records: 'object?', values: 'array?', lost: 'array?' },
  },
  taskEvents: { dirs: ['s2c'], fields: { graph: 'int', events: 'array' } },
  eventSummary: { dirs: ['s2c'], fields: { graph: 'int', counts: 'object', dropped: 'int' } },
  getResults: { dirs: ['c2s'], fields: { id: 'int', graph: 'int', tasks: 'array' } },
  results: { dirs: ['s2c'], fields: { id: 'int', values: 'array', error: 'error?' } },
  compute: {
    dirs: ['s2w'],
    fields: { run: 'int', modules: 'array', bundle: 'string', calls: 'array', cols: 'object?', peers: 'object?', flowName: 'string?', parameters: 'object?' },
  },
  outcomes: { dirs: ['w2s'], fields: { run: 'int', outcomes: 'array', cols: 'object?' } },
  credits: { dirs: ['w2s'], fields: { credits: 'int' } },
  cancelTasks: { dirs: ['s2w'], fields: { run: 'int', tasks: 'array' } },
  release: { dirs: ['s2w'], fields: { keys: 'array' } },
  whoHas: { dirs: ['w2s'], fields: { id: 'int', keys: 'array' } },
  whoHasReply: { dirs: ['s2w'], fields: { id: 'int', holders: 'array', addresses: 'object' } },
  getData: { dirs: ['w2w', 's2w', 'w2s'], fields: { id: 'int', keys: 'array' } },
  data: { dirs: ['w2w', 'w2s', 's2w'], fields: { id: 'int', keys: 'array', values: 'array', missing: 'array' } },
  acquire: { dirs: ['s2w'], fields: { id: 'int', from: 'object' } },
  acquired: { dirs: ['w2s'], fields: { id: 'int', keys: 'array', missing: 'array' } },
  steal: { dirs: ['s2w'], fields: { id: 'int', run: 'int', tasks: 'array' } },
  stealReply: { dirs: ['w2s'], fields: { id: 'int', run: 'int', stolen: 'array', kept: 'array' } },
  heartbeat: { dirs: ALL, fields: { at: 'number', metrics: 'object?' } },
  retire: { dirs: ['s2w', 'w2s'], fields: { reason: 'string' } },
  log: { dirs: ['w2s', 's2c'], fields: { records: 'array' } },
  error: { dirs: ALL, fields: { ref: 'int', error: 'error' } },
} as const satisfies { readonly [K in Op]: OpSpec<K> };

type DirsOf<K extends Op> = (typeof SPEC)[K]['dirs'][number];

/** The messages that may travel in direction D (derived from the op table). */
export type MessageTo<D extends Direction> = { [K in Op]: D extends DirsOf<K> ? MessageOf<K> : never }[Op];

export type ClientToScheduler = MessageTo<'c2s'>;
export type WorkerToScheduler = MessageTo<'w2s'>;
export type SchedulerToWorker = MessageTo<'s2w'>;
export type SchedulerToClient = MessageTo<'s2c'>;
export type WorkerToWorker = MessageTo<'w2w'>;

/** Every op, for tests and dispatch tables. */
export const OPS: readonly Op[] = Object.keys(SPEC) as Op[];

/** The directions an op may travel in. */
export function directionsOf(op: Op): readonly Direction[] {
  return SPEC[op].dirs;
}

const hasOwn = Object.prototype.hasOwnProperty;

function typeOk(t: FieldType, v: unknown): boolean {
  switch (t) {
    case 'string':
      return typeof v === 'string';
    case 'number':
      return typeof v === 'number';
    case 'int':
      return Number.isInteger(v);
    case 'boolean':
      return typeof v === 'boolean';
    case 'bytes':
      return v instanceof Uint8Array;
    case 'array':
      return Array.isArray(v);
    case 'object':
      return typeof v === 'object' && v !== null && !Array.isArray(v) && !(v instanceof Uint8Array);
    case 'error':
      return (
        typeof v === 'object' &&
        v !== null &&
        typeof (v as { name?: unknown }).name === 'string' &&
        typeof (v as { message?: unknown }).message === 'string'
      );
    case 'any':
      return true;
  }
}

function describe(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (v instanceof Uint8Array) return 'bytes';
  if (typeof v === 'number' && !Number.isInteger(v)) return 'non-integer number';
  return typeof v;
}

/**
 * Check one decoded element: an object with a known op (allowed in `dir` when given) and
 * its required fields of the right types. Returns it typed; throws `ProtocolError`.
 */
export function validateMessage(m: unknown, index: number, dir?: Direction): Message {
  // A generic msgpack encoder writes objects as maps (no records): take its message as an object.
  if (m instanceof Map && [...m.keys()].every((k) => typeof k === 'string')) m = Object.fromEntries(m);
  if (typeof m !== 'object' || m === null || Array.isArray(m) || m instanceof Uint8Array) {
    throw new ProtocolError('BAD_MESSAGE', `message ${index}: expected an object, got ${describe(m)}`, { expected: 'object' });
  }
  const op = (m as { op?: unknown }).op;
  if (typeof op !== 'string') {
    throw new ProtocolError('BAD_MESSAGE', `message ${index}: field "op" must be a string, got ${describe(op)}`, {
      field: 'op',
      expected: 'string',
    });
  }
  if (!hasOwn.call(SPEC, op)) {
    throw new ProtocolError('UNKNOWN_OP', `message ${index}: unknown op ${JSON.stringify(op.slice(0, 64))}`, { op: op.slice(0, 64) });
  }
  const spec: { dirs: readonly Direction[]; fields: Readonly<Record<string, FieldCheck>> } = SPEC[op as Op];
  if (dir !== undefined && !spec.dirs.includes(dir)) {
    throw new ProtocolError('UNKNOWN_OP', `message ${index}: op "${op}" is not accepted in direction ${dir}`, { op });
  }
  const rec = m as Record<string, unknown>;
  for (const field in spec.fields) {
    const check = spec.fields[field] as FieldCheck;
    const optional = check.endsWith('?');
    const type = (optional ? check.slice(0, -1) : check) as FieldType;
    const v = rec[field];
    if (v === undefined) {
      if (optional) continue;
      throw new ProtocolError('BAD_MESSAGE', `message ${index} (op "${op}"): missing field "${field}" (${type})`, {
        op,
        field,
        expected: type,
      });
    }
    if (!typeOk(type, v)) {
      throw new ProtocolError('BAD_MESSAGE', `message ${index} (op "${op}"): field "${field}" must be ${type}, got ${describe(v)}`, {
        op,
        field,
        expected: type,
      });
    }
  }
  return m as Message;
}

/** Throws VERSION_MISMATCH unless the peer speaks our version (call on `hello` and `welcome`). */
export function checkVersion(msg: HelloMsg | WelcomeMsg): void {
  if (msg.version !== PROTOCOL_VERSION) {
    throw new ProtocolError(
      'VERSION_MISMATCH',
      `protocol version ${msg.version} from ${msg.op === 'hello' ? `${msg.role} "${msg.name}"` : 'peer'}; this side speaks ${PROTOCOL_VERSION}`,
      { op: msg.op, field: 'version' },
    );
  }
}

// ---- framing ---------------------------------------------------------------------

export interface FrameCodecOptions {
  /** Largest frame `decode` accepts and `encode` produces. Default 64 MiB. */
  readonly maxFrameBytes?: number;
  /** When set, `decode` rejects ops not allowed in this direction (the direction frames *arrive* from). */
  readonly receives?: Direction;
}

/**
 * One connection's encoder and decoder. Not shareable between connections: the record
 * structures it negotiates are per peer and per connection life.
 */
export class FrameCodec {
  readonly maxFrameBytes: number;
  readonly receives: Direction | undefined;
  private packr!: Packr;
  private unpackr!: Unpackr;
  /** Set when an encode or decode threw: the structures may differ from the peer's, so nothing more is trusted until `reset()`. */
  private broken: ProtocolError | null = null;

  constructor(options: FrameCodecOptions = {}) {
    this.maxFrameBytes = options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES;
    this.receives = options.receives;
    this.reset();
  }

  /**
   * Forget every negotiated record structure (both ways). Call on reconnect, on both
   * ends: a fresh connection starts with a fresh pair.
   */
  reset(): void {
    // sequential: record definitions are written inline the first time a shape is used
    // and referenced by id afterwards, and the Unpackr keeps what it has read — both
    // ends must see every frame, in order (a WebSocket guarantees that). copyBuffers:
    // binary values (results moving worker to worker) must not be views that pin the
    // whole received frame in memory for as long as the result is held.
    // moreTypes + mapsAsObjects: false: task arguments and results keep their types
    // (Map, Set, ArrayBuffer, typed arrays, Date, Error, big integers); messages, being
    // plain objects, travel as records and come back as objects.
    const options = { useRecords: true, sequential: true, copyBuffers: true, moreTypes: true } as const;
    this.packr = new Packr({ ...options });
    this.unpackr = new Unpackr({ ...options, mapsAsObjects: false });
    this.broken = null;
  }

  /**
   * One frame holding `messages`. The bytes are copied out of msgpackr's buffer into an
   * ArrayBuffer of their own: Packr writes successive frames into one shared slab and
   * returns views of it, so a view handed to a caller would pin the whole slab, and
   * transferring it (postMessage) would detach memory that later frames use. (Note
   * `Buffer#slice` is a view too, and `Buffer.from(buf)` may land in Node's own pool.)
   *
   * Throws FRAME_TOO_LARGE over `maxFrameBytes`, and after any failure the codec is
   * broken (CODEC_BROKEN) until `reset()`: a frame that was packed but not sent may have
   * defined records that the peer will never see.
   */
  encode(messages: readonly Message[]): Uint8Array {
    this.assertUsable();
    let view: Uint8Array;
    try {
      view = this.packr.pack(messages);
    } catch (err) {
      throw this.fail(new ProtocolError('MALFORMED_FRAME', `cannot encode frame: ${(err as Error).message}`, {}, { cause: err }));
    }
    if (view.byteLength > this.maxFrameBytes) {
      throw this.fail(
        new ProtocolError('FRAME_TOO_LARGE', `frame of ${view.byteLength} bytes exceeds the limit of ${this.maxFrameBytes} bytes`, {
          bytes: view.byteLength,
        }),
      );
    }
    const out = new Uint8Array(view.byteLength);
    out.set(view);
    return out;
  }

  /**
   * The validated messages of one frame. The size is checked before any decoding. Any
   * failure is a ProtocolError and breaks the codec (the connection must be closed).
   */
  decode(frame: Uint8Array): Message[] {
    this.assertUsable();
    if (frame.byteLength > this.maxFrameBytes) {
      throw this.fail(
        new ProtocolError('FRAME_TOO_LARGE', `frame of ${frame.byteLength} bytes exceeds the limit of ${this.maxFrameBytes} bytes`, {
          bytes: frame.byteLength,
        }),
      );
    }
    if (frame.byteLength === 0) throw this.fail(new ProtocolError('MALFORMED_FRAME', 'empty frame', { bytes: 0 }));
    let value: unknown;
    try {
      value = this.unpackr.unpack(frame);
    } catch (err) {
      throw this.fail(
        new ProtocolError('MALFORMED_FRAME', `malformed msgpack in a frame of ${frame.byteLength} bytes: ${(err as Error).message}`, {
          bytes: frame.byteLength,
        }, { cause: err }),
      );
    }
    if (!Array.isArray(value)) {
      throw this.fail(
        new ProtocolError('MALFORMED_FRAME', `frame must hold an array of messages, got ${describe(value)}`, {
          expected: 'array',
          bytes: frame.byteLength,
        }),
      );
    }
    try {
      for (let i = 0; i < value.length; i++) value[i] = validateMessage(value[i], i, this.receives);
    } catch (err) {
      throw this.fail(err as ProtocolError);
    }
    return value as Message[];
  }

  private assertUsable(): void {
    if (this.broken !== null) {
      throw new ProtocolError('CODEC_BROKEN', `codec unusable after an earlier failure (${this.broken.message}); reset() it on a new connection`);
    }
  }

  private fail(err: ProtocolError): ProtocolError {
    this.broken = err;
    return err;
  }
}

// ---- batching ---------------------------------------------------------------------

export interface BatcherOptions {
  /** Flush at once (not waiting for the tick) when the queued estimate reaches this. Default 1 MiB. */
  readonly flushBytes?: number;
  /** `push` refuses (returns false) a message that would take the queued estimate past this. Default 32 MiB. */
  readonly maxQueuedBytes?: number;
  /** Called once the queue has room again after a refused push (below half of `maxQueuedBytes`). */
  readonly onDrain?: () => void;
  /** Encoding or sending failed: the connection should be closed. Required, so no failure escapes a timer. */
  readonly onError: (err: unknown) => void;
}

/**
 * Queues messages for one connection and sends them as one frame per tick (after
 * dask's `BatchedSend`): a flush is scheduled with `setImmediate` on the first push; it
 * also happens at once when the queued size estimate reaches `flushBytes`.
 *
 * Backpressure: the owner calls `pause()` when the socket's `bufferedAmount` passes its
 * high-water mark and `resume()` when it drains. While paused nothing is sent and the
 * queue grows, but only up to `maxQueuedBytes`: past it `push` returns false and does
 * NOT queue the message — the caller keeps it (e.g. leaves the tasks in the core's
 * queue) and tries again on `onDrain`.
 */
export class Batcher<M extends Message = Message> {
  private queue: M[] = [];
  private sizes: number[] = [];
  /** Estimated bytes of `queue` (sum of `sizes`). */
  private queued = 0;
  private scheduled = false;
  private paused = false;
  private flushing = false;
  private refused = false;
  private closed = false;
  private readonly flushBytes: number;
  private readonly maxQueuedBytes: number;

  constructor(
    private readonly codec: FrameCodec,
    private readonly send: (frame: Uint8Array) => void,
    private readonly options: BatcherOptions,
  ) {
    this.flushBytes = options.flushBytes ?? 1024 * 1024;
    this.maxQueuedBytes = options.maxQueuedBytes ?? 32 * 1024 * 1024;
  }

  /** Estimated bytes waiting. */
  get queuedBytes(): number {
    return this.queued;
  }

  get length(): number {
    return this.queue.length;
  }

  get isPaused(): boolean {
    return this.paused;
  }

  /**
   * Queue one message. Returns false, without queueing it, when the queue is at its
   * bound (a paused socket) — or after `close()`. A message pushed onto an empty queue is
   * always taken, however large, so that one big message cannot be refused forever.
   * May call `send` synchronously (threshold flush).
   */
  push(msg: M, sizeHint?: number): boolean {
    if (this.closed) return false;
    const size = sizeHint ?? estimateBytes(msg);
    if (this.queue.length > 0 && this.queued + size > this.maxQueuedBytes) {
      this.refused = true;
      return false;
    }
    this.queue.push(msg);
    this.sizes.push(size);
    this.queued += size;
    if (this.paused) return true;
    if (this.queued >= this.flushBytes) this.flush();
    else this.schedule();
    return true;
  }

  /** Stop sending (the socket is over its high-water mark). */
  pause(): void {
    this.paused = true;
  }

  /** Send again: flushes what queued up meanwhile. */
  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    if (this.queue.length > 0) this.flush();
  }

  /**
   * Send what is queued now, in frames of about `flushBytes` each (each ends with the
   * message that reaches it), until the queue is empty or `send` paused us.
   */
  flush(): void {
    if (this.flushing || this.closed) return;
    this.flushing = true;
    try {
      while (this.queue.length > 0 && !this.paused && !this.closed) {
        let n = 0;
        let bytes = 0;
        // Messages up to and including the one that reaches flushBytes: a threshold
        // flush sends its whole queue as one frame; a long paused queue goes in pieces.
        while (n < this.queue.length && bytes < this.flushBytes) {
          bytes += this.sizes[n] ?? 0;
          n++;
        }
        const batch = n === this.queue.length ? this.queue : this.queue.slice(0, n);
        const frame = this.codec.encode(batch);
        if (n === this.queue.length) {
          this.queue = [];
          this.sizes = [];
        } else {
          this.queue = this.queue.slice(n);
          this.sizes = this.sizes.slice(n);
        }
        this.queued -= bytes;
        if (this.queue.length === 0) this.queued = 0;
        this.send(frame);
      }
    } catch (err) {
      this.close();
      this.options.onError(err);
      return;
    } finally {
      this.flushing = false;
    }
    if (this.refused && this.queued < this.maxQueuedBytes / 2) {
      this.refused = false;
      this.options.onDrain?.();
    }
  }

  /** Drop the queue and refuse further pushes (the connection is gone). */
  close(): void {
    this.closed = true;
    this.queue = [];
    this.sizes = [];
    this.queued = 0;
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    setImmediate(() => {
      this.scheduled = false;
      if (!this.paused) this.flush();
    });
  }
}

/**
 * A cheap upper-bound-ish guess of a value's msgpack size. Walks at most a few levels
 * and samples long arrays, so that estimating a batch costs far less than encoding it.
 */
export function estimateBytes(v: unknown, depth = 0): number {
  switch (typeof v) {
    case 'string':
      return v.length * 3 + 5;
    case 'number':
      return 9;
    case 'boolean':
    case 'undefined':
      return 1;
    case 'bigint':
      return 9;
    case 'object': {
      if (v === null) return 1;
      if (ArrayBuffer.isView(v)) return v.byteLength + 5;
      if (v instanceof ArrayBuffer) return v.byteLength + 5;
      if (depth >= 4) return 64;
      if (Array.isArray(v)) {
        const n = v.length;
        if (n <= 16) {
          let s = 5;
          for (let i = 0; i < n; i++) s += estimateBytes(v[i], depth + 1);
          return s;
        }
        let sample = 0;
        const step = Math.floor(n / 8);
        for (let i = 0; i < 8; i++) sample += estimateBytes(v[i * step], depth + 1);
        return 5 + Math.ceil((sample / 8) * n);
      }
      let s = 5;
      for (const k in v as Record<string, unknown>) s += k.length + 1 + estimateBytes((v as Record<string, unknown>)[k], depth + 1);
      return s;
    }
    default:
      return 1;
  }
}

// ---- dispatch ----------------------------------------------------------------------

/** One handler per op that may arrive in direction D: the compiler insists on all of them. */
export type Handlers<D extends Direction> = { readonly [K in MessageTo<D>['op']]: (msg: MessageOf<K>) => void };

/**
 * Hand each message of a decoded frame to its op's handler, in order. An op with no
 * handler (a codec built without `receives`) is UNKNOWN_OP, not a TypeError.
 */
export function dispatch<D extends Direction>(handlers: Handlers<D>, messages: readonly Message[]): void {
  const table = handlers as unknown as Readonly<Record<string, ((msg: Message) => void) | undefined>>;
  for (let i = 0; i < messages.length; i++) {
    const m = messages[i] as Message;
    const h = hasOwn.call(table, m.op) ? table[m.op] : undefined;
    if (h === undefined) throw new ProtocolError('UNKNOWN_OP', `message ${i}: no handler for op "${m.op}" here`, { op: m.op });
    h(m);
  }
}

// ---- helpers -----------------------------------------------------------------------

/** The key a result is held under on the cluster. */
export function dataKey(run: number, task: number): string {
  return `${run}:${task}`;
}

/** Anything thrown, as the `{name, message, stack, code, data}` record that travels. */
export function wireError(err: unknown): SerializedError {
  return serializeError(err);
}

/** A travelled error record, rebuilt into its class (`instanceof` works for weft's errors). */
export function errorFromWire(rec: SerializedError): Error {
  return deserializeError(rec);
}

/**
 * Encodes a graph's nodes into compact `graphNodes` chunks (one encoder per graph
 * submission): each distinct options object and string travels once.
 */
export class GraphEncoder {
  private readonly options = new Map<TaskOptions, number>();
  private readonly strings = new Map<string, number>();

  /** The chunk holding `nodes[start..end)`. Throws `ProtocolError` for what cannot travel. */
  chunk(graph: number, nodes: readonly NodeSpec[], start: number, end: number): GraphNodesMsg {
    const newOptions: WireTaskOptions[] = [];
    const newStrings: string[] = [];
    const n = end - start;
    const str = (v: string): number => {
      if (v === '') return -1;
      let i = this.strings.get(v);
      if (i === undefined) {
        i = this.strings.size;
        this.strings.set(v, i);
        newStrings.push(v);
      }
      return i;
    };
    const key = new Array<string>(n);
    const kind = new Array<number>(n);
    const t = new Array<number>(n);
    const m = new Array<number>(n);
    const o = new Array<number>(n);
    const mapped = new Array<number>(n);
    const nargs = new Array<number>(n);
    const nup = new Array<number>(n);
    const argNode: number[] = [];
    const argMode: number[] = [];
    const consts: unknown[] = [];
    const up: number[] = [];
    const extra: NodeExtra[] = [];
    for (let i = 0; i < n; i++) {
      const node = nodes[start + i]!;
      let oi = this.options.get(node.options);
      if (oi === undefined) {
        oi = this.options.size;
        this.options.set(node.options, oi);
        newOptions.push(toWireNode({ ...node, kind: 'task', inline: undefined }).options);
      }
      const inlineOp = inlineOpOf(node.inline);
      if (node.kind === 'inline' && inlineOp === undefined) {
        throw new ProtocolError('BAD_MESSAGE', `task "${node.key}": inline node without an InlineOp descriptor cannot be sent`, { field: 'inline' });
      }
      key[i] = node.key;
      kind[i] = NODE_KIND_NUMBER[node.kind];
      t[i] = str(node.taskKey);
      m[i] = str(node.module);
      o[i] = oi;
      mapped[i] = node.mapped ? 1 : 0;
      const args = node.args;
      nargs[i] = args.length;
      for (let j = 0; j < args.length; j++) {
        const b = args[j]!;
        argMode.push(BIND_MODE_NUMBER[b.mode]);
        if (b.kind === 'ref') argNode.push(b.node);
        else {
          argNode.push(-1);
          consts.push(b.value);
        }
      }
      const ups = node.upstream;
      nup[i] = ups.length;
      for (let j = 0; j < ups.length; j++) up.push(ups[j]!);
      if (node.parameter !== undefined || inlineOp !== undefined) {
        const x: { -readonly [K in keyof NodeExtra]: NodeExtra[K] } = { i };
        if (node.parameter !== undefined) x.parameter = node.parameter;
        if (inlineOp !== undefined) x.inlineOp = inlineOp;
        extra.push(x);
      }
    }
    const cols: NodeColumns = {
      key,
      kind: numberColumn(kind, Uint8Array),
      t: numberColumn(t, Int32Array),
      m: numberColumn(m, Int32Array),
      o: numberColumn(o, Int32Array),
      mapped: numberColumn(mapped, Uint8Array),
      nargs: numberColumn(nargs, Int32Array),
      argNode: numberColumn(argNode, Float64Array),
      argMode: numberColumn(argMode, Uint8Array),
      consts,
      nup: numberColumn(nup, Int32Array),
      up: numberColumn(up, Float64Array),
      extra,
    };
    return {
      op: 'graphNodes',
      graph,
      offset: start,
      nodes: [],
      cols,
      ...(newOptions.length > 0 ? { options: newOptions } : {}),
      ...(newStrings.length > 0 ? { strings: newStrings } : {}),
    };
  }
}

/** Decodes `graphNodes` chunks (either form) back into NodeSpecs, in order (one decoder per graph). */
export class GraphDecoder {
  private readonly options: TaskOptions[] = [];
  private readonly strings: string[] = [];

  nodes(msg: GraphNodesMsg): NodeSpec[] {
    if (msg.options !== undefined) {
      if (!Array.isArray(msg.options)) throw new ProtocolError('BAD_MESSAGE', 'graphNodes: "options" must be an array', { field: 'options' });
      for (const w of msg.options) {
        if (typeof w !== 'object' || w === null || typeof w.trigger !== 'object' || w.trigger === null) {
          throw new ProtocolError('BAD_MESSAGE', 'graphNodes: malformed task options', { field: 'options' });
        }
        const { stateHandlers: _n, onFailure: _f, ...plain } = w;
        this.options.push({ ...plain, stateHandlers: [], onFailure: null });
      }
    }
    if (msg.strings !== undefined) {
      if (!Array.isArray(msg.strings) || msg.strings.some((x) => typeof x !== 'string')) {
        throw new ProtocolError('BAD_MESSAGE', 'graphNodes: "strings" must be an array of strings', { field: 'strings' });
      }
      for (const x of msg.strings) this.strings.push(x);
    }
    const nodes = msg.cols !== undefined ? compactFromColumns(msg.cols) : msg.nodes;
    const out = new Array<NodeSpec>(nodes.length);
    for (let i = 0; i < nodes.length; i++) {
      const id = msg.offset + i;
      const n = nodes[i] as Partial<CompactNode & WireNode>;
      if (typeof n !== 'object' || n === null || typeof n.key !== 'string' || !Array.isArray(n.args) || !Array.isArray(n.upstream)) {
        throw new ProtocolError('BAD_MESSAGE', `graphNodes: node ${id} is malformed`, { field: 'nodes' });
      }
      if (typeof n.o !== 'number') {
        if (n.id !== id || typeof n.options !== 'object') throw new ProtocolError('BAD_MESSAGE', `graphNodes: node ${id} is malformed`, { field: 'nodes' });
        out[i] = fromWireNode(n as WireNode);
        continue;
      }
      const options = this.options[n.o];
      const t = n.t ?? -1;
      const m = n.m ?? -1;
      if (options === undefined || (t >= 0 && this.strings[t] === undefined) || (m >= 0 && this.strings[m] === undefined)) {
        throw new ProtocolError('BAD_MESSAGE', `graphNodes: node ${id} refers to an unknown table entry`, { field: 'nodes' });
      }
      if (n.kind !== 'task' && n.kind !== 'parameter' && n.kind !== 'inline') {
        throw new ProtocolError('BAD_MESSAGE', `graphNodes: node ${id} has an unknown kind`, { field: 'kind' });
      }
      // The graph lives as long as its run: what every node shares (its kind, the words in
      // its bindings, empty lists) is kept once, not as a decoded copy per node.
      const spec: { -readonly [K in keyof NodeSpec]: NodeSpec[K] } = {
        id,
        key: n.key,
        kind: n.kind === 'task' ? 'task' : n.kind === 'parameter' ? 'parameter' : 'inline',
        taskKey: t >= 0 ? this.strings[t]! : '',
        module: m >= 0 ? this.strings[m]! : '',
        args: n.args.length === 0 ? NO_ARGS : internBindings(n.args),
        upstream: n.upstream.length === 0 ? NO_UPSTREAM : n.upstream,
        mapped: n.mapped === true,
        options,
      };
      if (n.parameter !== undefined) spec.parameter = n.parameter;
      if (n.inlineOp !== undefined) spec.inline = inlineFn(n.inlineOp);
      out[i] = spec;
    }
    return out;
  }
}

const NO_ARGS: readonly ArgBinding[] = Object.freeze([]);
const NO_UPSTREAM: readonly number[] = Object.freeze([]);

/** Decoded bindings with their `kind` and `mode` words replaced by the shared literals (decoding made a string per binding). */
function internBindings(args: readonly ArgBinding[]): readonly ArgBinding[] {
  for (let i = 0; i < args.length; i++) {
    const b = args[i] as { kind: unknown; mode: unknown } | null;
    if (typeof b !== 'object' || b === null) continue; // the core reports malformed bindings
    if (b.kind === 'ref') b.kind = 'ref';
    else if (b.kind === 'const') b.kind = 'const';
    if (b.mode === 'plain') b.mode = 'plain';
    else if (b.mode === 'mapped') b.mode = 'mapped';
    else if (b.mode === 'flatten') b.mode = 'flatten';
  }
  return args;
}

/** A graph node as data. Throws `ProtocolError` BAD_MESSAGE for what cannot travel (functions). */
export function toWireNode(node: NodeSpec): WireNode {
  const { inline, options, ...rest } = node;
  const inlineOp = inlineOpOf(inline);
  const o = options;
  if (o.trigger.kind === 'custom') {
    throw new ProtocolError(
      'BAD_MESSAGE',
      `task "${node.key}": custom trigger "${o.trigger.name}" is a function and cannot be sent to a cluster scheduler`,
      { field: 'trigger' },
    );
  }
  if (typeof o.cacheValidator === 'function') {
    throw new ProtocolError('BAD_MESSAGE', `task "${node.key}": a custom cache validator cannot be sent to a cluster scheduler`, {
      field: 'cacheValidator',
    });
  }
  if (node.kind === 'inline' && inlineOp === undefined) {
    throw new ProtocolError('BAD_MESSAGE', `task "${node.key}": inline node without an InlineOp descriptor cannot be sent`, {
      field: 'inline',
    });
  }
  const { trigger, cacheValidator, stateHandlers, onFailure, ...plain } = o;
  const wire: WireNode = {
    ...rest,
    options: { ...plain, trigger, cacheValidator, stateHandlers: stateHandlers.length, onFailure: onFailure !== null },
    ...(inlineOp !== undefined ? { inlineOp } : {}),
  };
  return wire;
}

/**
 * A travelled node, back as a `NodeSpec` (on the scheduler): the inline function is
 * rebuilt from its descriptor; state handlers stay on the client, so none here.
 */
export function fromWireNode(w: WireNode): NodeSpec {
  const { inlineOp, options, ...rest } = w;
  const { stateHandlers: _n, onFailure: _f, ...plain } = options;
  const node: NodeSpec = {
    ...rest,
    options: { ...plain, stateHandlers: [], onFailure: null },
    ...(inlineOp !== undefined ? { inline: inlineFn(inlineOp) } : {}),
  };
  return node;
}

/** The kinds a `WireNode` may have (for handlers that validate nodes deeper). */
export const NODE_KINDS: readonly NodeKind[] = ['task', 'parameter', 'inline'];
