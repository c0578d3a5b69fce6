/**
 * The runner: the thin shell around the scheduler core for one flow run.
 *
 * It carries out the core's instructions with an executor and timers and feeds what
 * happens back in as events: ready tasks become batches of calls, batches of outcomes
 * become success/failure events, retry delays become timers, cancellation stops running
 * calls. Parameters and the built-in inline nodes (case/merge comparisons) never go to
 * the executor: the runner settles them on the spot.
 */
import { randomUUID } from 'node:crypto';
import { performance } from 'node:perf_hooks';
import { FlowValidationError, serializeError, TaskResolutionError, type SerializedError } from '../errors.ts';
import type { Executor, Outcome, TaskCall } from '../executor/types.ts';
import { LocalExecutor } from '../executor/local.ts';
import type { GraphSpec, NodeSpec, TaskStateName } from '../flow/spec.ts';
import { getTask } from '../flow/registry.ts';
import { SchedulerCore, type FailureKind, type Instruction, type RunState } from '../scheduler/core.ts';
import * as S from '../scheduler/states.ts';
import {
  cacheKeyOf,
  cacheLookup,
  cacheStore,
  DEFAULT_LOCATION,
  readResult,
  renderLocation,
  resolvePath,
  wantsCheckpoint,
  writeResult,
} from './results.ts';
import type { FlowRunResult, NodeRef, RestartRecord, RunOptions, RunProgress, TaskColumns, TaskRunRecord } from './types.ts';

const now = (): number => performance.timeOrigin + performance.now();

/** Links of a chain sent ahead past the one dispatched. */
const AHEAD_DEPTH = 256;

/** What the runner needs from a whole-spec pass, computed once per spec (specs are immutable). */
interface SpecInfo {
  /** Parameter nodes. */
  readonly parameters: readonly NodeSpec[];
  /** One task node per distinct task key. */
  readonly distinctTasks: readonly NodeSpec[];
  readonly taskKeys: readonly string[];
  /** Some node has state handlers or an onFailure hook. */
  readonly hasHandlers: boolean;
}

const specInfos = new WeakMap<GraphSpec, SpecInfo>();

function specInfo(spec: GraphSpec): SpecInfo {
  let info = specInfos.get(spec);
  if (info !== undefined) return info;
  const parameters: NodeSpec[] = [];
  const distinct = new Map<string, NodeSpec>();
  let hasHandlers = false;
  let lastOptions: NodeSpec['options'] | null = null;
  // Indexed loops in these once-per-run passes: a for-of that runs before it is optimized allocates per node.
  const nodes = spec.nodes;
  for (let i = 0; i < nodes.length; i++) {
    const n = nodes[i]!;
    if (n.kind === 'parameter') parameters.push(n);
    else if (n.kind === 'task' && !distinct.has(n.taskKey)) distinct.set(n.taskKey, n);
    const o = n.options;
    if (o !== lastOptions) {
      lastOptions = o; // big generated graphs share option objects
      if (o.stateHandlers.length > 0 || o.onFailure !== null) hasHandlers = true;
    }
  }
  info = { parameters, distinctTasks: [...distinct.values()], taskKeys: [...distinct.keys()], hasHandlers };
  specInfos.set(spec, info);
  return info;
}

/** Run a flow's graph spec to completion. Rejects only for problems found before any task runs. */
export async function runFlow(spec: GraphSpec, opts: RunOptions = {}): Promise<FlowRunResult> {
  const parameters = resolveParameters(spec, opts);
  checkRunId(spec, opts.runId);
  const executor: Executor = opts.executor ?? new LocalExecutor();
  if (opts.remote !== true) checkResolvable(spec, executor);
  if (executor.runGraph !== undefined) return executor.runGraph(spec, parameters, opts);
  const run = new FlowRun(spec, opts, parameters, executor);
  return run.execute();
}

/** A given run id becomes part of checkpoint paths: no separators, no `.`/`..`. */
function checkRunId(spec: GraphSpec, runId: string | undefined): void {
  if (runId === undefined) return;
  if (typeof runId !== 'string' || !/^[A-Za-z0-9._=-]+$/.test(runId) || /^\.+$/.test(runId)) {
    throw new FlowValidationError(
      `flow "${spec.name}": runId must be letters, digits and ._=- only (it is part of result paths), got ${preview(runId)}`,
    );
  }
}

/** Required parameters present, types right, no unknown names: before any task runs. */
export function resolveParameters(spec: GraphSpec, opts: RunOptions): Record<string, unknown> {
  const given = { ...(opts.restartFrom?.parameters ?? {}), ...(opts.parameters ?? {}) };
  const out: Record<string, unknown> = {};
  const known = new Set<string>();
  for (const n of specInfo(spec).parameters) {
    const p = n.parameter;
    if (p === undefined) continue;
    known.add(p.name);
    if (p.name in given) out[p.name] = given[p.name];
    else if (p.required) throw new FlowValidationError(`flow "${spec.name}": required parameter "${p.name}" was not given`, p.name);
    else out[p.name] = p.default;
    if (p.type !== undefined && out[p.name] !== undefined && !hasType(out[p.name], p.type)) {
      throw new FlowValidationError(
        `flow "${spec.name}": parameter "${p.name}" must be of type ${p.type}, got ${describeType(out[p.name])} (${preview(out[p.name])})`,
        p.name,
      );
    }
  }
  for (const name of Object.keys(opts.parameters ?? {})) {
    if (!known.has(name)) {
      throw new FlowValidationError(
        `flow "${spec.name}" has no parameter "${name}"${known.size > 0 ? ` (it has: ${[...known].join(', ')})` : ''}`,
        name,
      );
    }
  }
  return out;
}

function hasType(v: unknown, t: NonNullable<NodeSpec['parameter']>['type']): boolean {
  switch (t) {
    case 'array':
      return Array.isArray(v);
    case 'object':
      return typeof v === 'object' && v !== null && !Array.isArray(v);
    default:
      return typeof v === t;
  }
}

const describeType = (v: unknown): string => (v === null ? 'null' : Array.isArray(v) ? 'array' : typeof v);
const preview = (v: unknown): string => {
  try {
    const s = JSON.stringify(v);
    return s.length > 40 ? `${s.slice(0, 37)}...` : s;
  } catch {
    return String(v);
  }
};

/** A task defined in a closure cannot be found by a worker thread or process: say so before running. */
function checkResolvable(spec: GraphSpec, executor: Executor): void {
  for (const n of specInfo(spec).distinctTasks) {
    const def = getTask(n.taskKey);
    if (def === undefined) {
      throw new TaskResolutionError(`task "${n.key}" (${n.taskKey}) is not registered in this process`, n.key);
    }
    if (def.closure && executor.kind !== 'local') {
      throw new TaskResolutionError(
        `task "${n.key}" is defined inside a function (a closure), so a ${executor.kind} worker cannot import it; define it at the top level of its module`,
        n.key,
      );
    }
  }
}

/** Links of chains sent ahead (see `FlowRun.sendAhead`): the last one sent, and how many were sent. */
interface AheadChain {
  tail: number;
  tailPos: number;
  /** A link left the chain before its turn (cancelled, lost): positions no longer count links in flight. */
  broken: boolean;
}

/** A call sent ahead, by task id. */
interface AheadEntry {
  /** The negative run id it was sent with. */
  readonly token: number;
  /** Its task was dispatched (the call on the worker stands for it). */
  taken: boolean;
  /** It ran before its task was dispatched: applied then. */
  outcome: Outcome | null;
  chain: AheadChain;
  /** Position in its chain (the tail has `chain.tailPos`). */
  pos: number;
}

/** Ready tasks taken from the core per batch, at most. */
const OUT_MAX = 4096;

class FlowRun {
  private readonly core: SchedulerCore;
  private readonly nodes: readonly NodeSpec[];
  /** Results by task id; pre-sized (stores arrive out of order, which would make a growing array slow). */
  private results: unknown[];
  private startMs: Float64Array;
  private endMs: Float64Array;
  private readonly errors = new Map<number, SerializedError & { code?: string }>();
  /** Who ran each task's last attempt (pre-sized like `results`). */
  private readonly workers: (string | undefined)[];
  private readonly loopValues = new Map<number, unknown>();
  /** Workers that died while running each task (rare: poison detection names them). */
  private readonly lostOn = new Map<number, string[]>();
  /** For mapped parents: their children's results as a list, once they all finished. */
  private readonly lists = new Map<number, unknown[]>();
  private readonly flattened = new Map<number, unknown[]>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private out: Int32Array;
  /** `{runId}` of this run's locations and its result's runId. */
  private readonly runUuid: string;
  private readonly resultDir: string;
  private readonly restart: Restart | null;
  private readonly hasHandlers: boolean;
  /**
   * Per spec node: 1 when its calls need the slow path (a result may already exist —
   * restart, target, cache — or must be persisted after success: checkpoint, target, cache).
   */
  private readonly special: Uint8Array;
  private readonly t0 = now();
  /**
   * Calls sent ahead to a producer's worker, by task id (see `sendAhead`; only static
   * tasks are sent ahead). Sized to the spec at the first one: a Map's set and delete per
   * link showed in chains' profiles.
   */
  private ahead: (AheadEntry | undefined)[] = [];
  private aheadCount = 0;
  private aheadSeq = 0;
  private readonly canAhead: boolean;
  private pumping = false;
  private pumpAgain = false;
  private done: { state: RunState; message: string } | null = null;
  private resolveDone!: () => void;
  private failure: unknown = null;

  constructor(
    private readonly spec: GraphSpec,
    private readonly opts: RunOptions,
    private readonly parameters: Record<string, unknown>,
    private readonly executor: Executor,
  ) {
    this.nodes = spec.nodes;
    this.canAhead = executor.submitAhead !== undefined && executor.future !== undefined;
    this.hasHandlers = specInfo(spec).hasHandlers;
    const onTransition = this.hasHandlers || opts.onTaskState !== undefined ? this.onTransition.bind(this) : undefined;
    this.core = new SchedulerCore(spec, {
      validate: opts.validate ?? false,
      tagLimits: opts.tagLimits ?? {},
      inputLength: (id, arg) => this.inputLength(id, arg),
      ...(onTransition ? { onTransition } : {}),
    });
    const n = Math.max(16, spec.nodes.length);
    this.results = new Array<unknown>(spec.nodes.length).fill(undefined);
    this.workers = new Array<string | undefined>(spec.nodes.length).fill(undefined);
    this.startMs = new Float64Array(n);
    this.endMs = new Float64Array(n);
    // Grown to OUT_MAX when a batch fills it (a tiny graph's run does not zero 16 KiB).
    this.out = new Int32Array(Math.min(OUT_MAX, Math.max(64, spec.nodes.length)));
    this.resultDir = opts.resultDir ?? '.weft/results';
    this.runUuid = opts.runId ?? randomUUID();
    this.restart = opts.restartFrom ? restartOf(opts.restartFrom) : null;
    this.special = new Uint8Array(spec.nodes.length);
    for (let i = 0; i < spec.nodes.length; i++) {
      const o = spec.nodes[i]!.options;
      if (this.restart !== null || o.checkpoint || o.cacheForMs > 0 || o.result !== null) this.special[i] = 1;
    }
  }

  async execute(): Promise<FlowRunResult> {
    const finished = new Promise<void>((resolve) => {
      this.resolveDone = resolve;
    });
    await this.executor.start({
      flowName: this.spec.name,
      modules: this.spec.modules,
      taskKeys: specInfo(this.spec).taskKeys,
      parameters: this.parameters,
      onOutcomes: (o) => this.onOutcomes(o),
      resume: () => {
        if (this.done === null) this.pump();
      },
    });
    const signal = this.opts.signal;
    const onAbort = (): void => {
      this.core.cancel();
      this.pump();
    };
    if (signal?.aborted) onAbort();
    else signal?.addEventListener('abort', onAbort, { once: true });
    let progressTimer: NodeJS.Timeout | undefined;
    if (this.opts.onProgress) {
      const every = this.opts.progressIntervalMs ?? 100;
      progressTimer = setInterval(() => this.opts.onProgress?.(this.progress()), every);
    }
    try {
      this.core.start();
      this.pump();
      await finished;
    } finally {
      signal?.removeEventListener('abort', onAbort);
      if (progressTimer) clearInterval(progressTimer);
      for (const t of this.timers) clearTimeout(t);
      this.timers.clear();
      await this.executor.shutdown();
    }
    if (this.failure !== null) throw this.failure;
    this.opts.onProgress?.(this.progress());
    return this.result();
  }

  // --- the loop -----------------------------------------------------------------

  /** Move ready tasks to the executor and carry out instructions, until nothing changes. */
  private pump(): void {
    if (this.pumping) {
      this.pumpAgain = true;
      return;
    }
    this.pumping = true;
    try {
      do {
        this.pumpAgain = false;
        this.drainInstructions();
        if (this.done !== null) break;
        this.dispatch();
        this.drainInstructions();
      } while (this.pumpAgain && this.done === null);
    } catch (err) {
      // A bug in the core or the runner: end the run rather than hang.
      this.failure = err;
      this.done = { state: 'Failed', message: String(err) };
      this.resolveDone();
    } finally {
      this.pumping = false;
    }
  }

  private dispatch(): void {
    const core = this.core;
    while (core.readyCount > 0 && this.done === null) {
      const out = this.out;
      const slots = this.executor.freeSlots();
      if (slots <= 0) return; // outcomes free slots and pump again
      const k = core.takeReady(Math.min(slots, out.length), out);
      if (k === 0) return; // everything ready is waiting for a tag slot
      if (k === out.length && out.length < OUT_MAX) this.out = new Int32Array(OUT_MAX); // for the next batch
      this.ensureTimes(core.size);
      // One clock read per batch: the dispatch time stands in for a start time that the
      // executor cannot report (a call that timed out, was cancelled or lost its worker).
      const t = now();
      let batch: TaskCall[] | null = null;
      for (let j = 0; j < k; j++) {
        const id = out[j]!;
        this.startMs[id] = t;
        const call = this.prepare(id);
        if (call !== null) (batch ??= []).push(call);
      }
      if (batch !== null) {
        this.executor.submit(batch);
        if (this.canAhead) for (let j = 0; j < batch.length; j++) this.sendAhead(batch[j]!.id);
      }
      this.drainInstructions();
    }
  }

  /** A TaskCall for the executor, or null when the runner settled the task itself. */
  private prepare(id: number): TaskCall | null {
    const core = this.core;
    if (this.aheadCount > 0) {
      const e = this.ahead[id];
      if (e !== undefined) {
        // Already on a worker (sent ahead): no new call.
        if (e.outcome !== null) {
          this.dropAhead(id);
          this.apply(e.outcome, core.runId[id]!);
        } else {
          e.taken = true;
          if (this.canAhead) this.sendAhead(id);
        }
        return null;
      }
    }
    const node = this.nodes[core.node[id]!]!;
    const runId = core.runId[id]!;
    const mapIndex = core.mapIndex[id]!;
    if (node.kind !== 'task' || this.special[core.node[id]!] === 1) return this.settle(id, node, runId, mapIndex);
    let args: unknown[];
    try {
      args = this.argsFor(node, mapIndex);
    } catch (err) {
      this.startMs[id] = now();
      this.settleError(id, runId, err);
      return null;
    }
    return this.call(id, node, runId, mapIndex, args);
  }

  private call(id: number, node: NodeSpec, runId: number, mapIndex: number, args: unknown[]): TaskCall {
    const resources = node.options.resources;
    for (const _ in resources) {
      return { ...this.plainCall(id, node, runId, mapIndex, args), resources };
    }
    return this.plainCall(id, node, runId, mapIndex, args);
  }

  private plainCall(id: number, node: NodeSpec, runId: number, mapIndex: number, args: unknown[]): TaskCall {
    const core = this.core;
    return {
      id,
      runId,
      taskKey: node.taskKey,
      key: node.key,
      args,
      timeoutMs: node.options.timeoutMs,
      mapIndex,
      attempt: core.attempts[id]!,
      loopCount: core.loopCount[id]!,
      loopResult: this.loopValues.size > 0 ? this.loopValues.get(id) : undefined,
    };
  }

  /**
   * The slow path of `prepare`: parameters, inline nodes, tasks whose result may already
   * exist (restart, target, cache) and arguments that fail to resolve.
   */
  private settle(id: number, node: NodeSpec, runId: number, mapIndex: number): TaskCall | null {
    const core = this.core;
    const t = now();
    this.startMs[id] = t;
    if (node.kind === 'parameter') {
      this.results[id] = this.parameters[node.parameter!.name];
      this.endMs[id] = t;
      core.success(id, runId);
      return null;
    }
    let args: unknown[];
    try {
      args = this.argsFor(node, mapIndex);
    } catch (err) {
      this.settleError(id, runId, err);
      return null;
    }
    if (node.kind === 'inline') {
      try {
        this.results[id] = node.inline!(...args);
        this.endMs[id] = now();
        core.success(id, runId);
      } catch (err) {
        this.settleError(id, runId, err);
      }
      return null;
    }
    // Results that already exist: an earlier run's (restart), a target file, the cache.
    if (this.restart !== null) {
      const r = this.restored(node, mapIndex);
      if (r.found) {
        this.results[id] = r.value;
        this.endMs[id] = now();
        core.cached(id, runId);
        return null;
      }
    }
    const opts = node.options;
    if (opts.result?.target !== undefined) {
      try {
        const path = resolvePath(this.resultDir, renderLocation(opts.result.target, this.vars(node, mapIndex)));
        const r = readResult(path, opts.result);
        if (r.found) {
          this.results[id] = r.value;
          this.endMs[id] = now();
          core.cached(id, runId);
          return null;
        }
      } catch (err) {
        this.settleError(id, runId, err);
        return null;
      }
    }
    if (opts.cacheForMs > 0) {
      const hit = cacheLookup(opts, cacheKeyOf(node, mapIndex), args, this.parameters, Date.now());
      if (hit.hit) {
        this.results[id] = hit.value;
        this.endMs[id] = now();
        core.cached(id, runId);
        return null;
      }
    }
    return this.call(id, node, runId, mapIndex, args);
  }

  private onOutcomes(outcomes: Outcome[]): void {
    for (let i = 0; i < outcomes.length; i++) {
      const o = outcomes[i]!;
      if (o.runId < 0) this.aheadOutcome(o);
      else this.apply(o);
    }
    this.pump();
  }

  /** An outcome for the dispatch `runId` (an ahead call's outcome carries its token instead). */
  private apply(o: Outcome, runId = o.runId): void {
    const core = this.core;
    const id = o.id;
    if (!core.current(id, runId)) return; // stale: rescheduled meanwhile
    if (o.startMs > 0) this.startMs[id] = o.startMs;
    this.endMs[id] = o.endMs > 0 ? o.endMs : now();
    if (o.worker !== undefined) this.workers[id] = o.worker;
    if (o.status === 'ok') {
      this.results[id] = o.value;
      if (this.special[core.node[id]!] === 1) {
        const node = this.nodes[core.node[id]!]!;
        try {
          this.persist(id, node, o.value);
        } catch (err) {
          this.settleError(id, runId, err);
          return;
        }
      }
      core.success(id, runId);
    } else this.settleOutcome(id, o, runId);
  }

  // --- ahead calls (a chain's next link sent to its producer's worker) --------------

  /**
   * After dispatching `id`: while the task that becomes ready exactly when the current
   * one succeeds is a plain task, send it ahead (up to AHEAD_DEPTH links) to the worker
   * of its producer, with the producer's future result as its input.
   *
   * O(1) per link in a long chain: the links already in flight past `id` are not walked
   * again; the chain's tail (and each link's position in it) says where to extend and how
   * deep it already is. A chain with a link dropped from its middle is walked once more.
   */
  private sendAhead(id: number): void {
    const ex = this.executor;
    const core = this.core;
    let cur = id;
    let depth = 0;
    const e = this.ahead[id];
    let chain: AheadChain;
    if (e !== undefined && !e.chain.broken) {
      chain = e.chain;
      cur = chain.tail;
      depth = chain.tailPos - e.pos;
    } else {
      chain = { tail: id, tailPos: 0, broken: false };
      if (e !== undefined) {
        e.chain = chain;
        e.pos = 0;
      }
    }
    for (; depth < AHEAD_DEPTH; depth++) {
      const d = core.aheadCandidate(cur);
      if (d < 0) return;
      const known = this.ahead[d];
      if (known !== undefined) {
        // Already sent: extend the chain past it (keeps AHEAD_DEPTH links in flight).
        known.chain = chain;
        known.pos = ++chain.tailPos;
        chain.tail = cur = d;
        continue;
      }
      const nodeId = core.node[d]!;
      const node = this.nodes[nodeId]!;
      if (node.kind !== 'task' || this.special[nodeId] === 1) return;
      const saved = this.results[cur];
      this.results[cur] = ex.future!(cur);
      let args: unknown[];
      try {
        args = this.argsFor(node, -1);
      } catch {
        return;
      } finally {
        this.results[cur] = saved;
      }
      const token = -++this.aheadSeq;
      const call = this.call(d, node, token, -1, args);
      call.attempt = core.attempts[d]! + 1;
      if (!ex.submitAhead!(call, cur)) return;
      if (this.ahead.length === 0) this.ahead = new Array<AheadEntry | undefined>(this.core.nStatic);
      this.ahead[d] = { token, taken: false, outcome: null, chain, pos: ++chain.tailPos };
      this.aheadCount++;
      chain.tail = cur = d;
    }
  }

  private dropAhead(id: number): void {
    this.ahead[id] = undefined;
    this.aheadCount--;
  }

  /** The outcome of an ahead call: applied once its task is dispatched, dropped when it never ran. */
  private aheadOutcome(o: Outcome): void {
    const e = this.ahead[o.id];
    if (e === undefined || e.token !== o.runId) return;
    if (e.taken) {
      this.dropAhead(o.id);
      this.apply(o, this.core.runId[o.id]!);
      return;
    }
    if (o.status === 'cancelled' || o.status === 'lost') {
      // It never ran: dispatch normally. Its chain lost a link in the middle: walk it again.
      this.dropAhead(o.id);
      e.chain.broken = true;
    } else e.outcome = o; // it ran: apply when the task becomes ready (its producer's outcome comes first)
  }

  private settleOutcome(id: number, o: Outcome, runId: number): void {
    switch (o.status) {
      case 'timeout':
        this.recordError(id, o.error);
        this.core.failure(id, runId, 'timeout', this.retryable(id, o.error, 'TaskTimeoutError'));
        return;
      case 'lost': {
        this.recordError(id, o.error);
        const on = this.lostOn.get(id) ?? [];
        on.push(o.worker ?? 'unknown worker');
        this.lostOn.set(id, on);
        this.core.failure(id, runId, 'lost', true, -1, `workers: ${on.join(', ')}`);
        return;
      }
      case 'cancelled':
        this.recordError(id, o.error ?? { name: 'CancelledError', message: 'cancelled' });
        this.core.failure(id, runId, 'cancelled');
        return;
      default:
        this.settleError(id, runId, o.error);
    }
  }

  /** A thrown error or signal: pick the core event. */
  private settleError(id: number, runId: number, err: unknown): void {
    const rec = toRecord(err);
    const kind = signalKind(rec.name);
    if (kind === 'skip') {
      this.results[id] = rec.data ?? null;
      this.core.failure(id, runId, 'skip');
      return;
    }
    if (kind === 'loop') {
      this.loopValues.set(id, rec.data);
      this.core.failure(id, runId, 'loop');
      return;
    }
    this.recordError(id, rec);
    if (kind === 'retry') {
      const d = (rec.data as { delayMs?: unknown } | undefined)?.delayMs;
      this.core.failure(id, runId, 'retry', true, typeof d === 'number' ? d : -1);
    } else if (kind === 'pause') this.core.failure(id, runId, 'pause');
    else this.core.failure(id, runId, 'error', this.retryable(id, err, rec.name));
  }

  private retryable(id: number, err: unknown, name: string): boolean {
    const on = this.nodes[this.core.node[id]!]!.options.retryOn;
    if (on === null) return true;
    if (on.includes(name)) return true;
    // In-process errors: match any class up the prototype chain.
    for (let p = err instanceof Error ? Object.getPrototypeOf(err) : null; p && p !== Object.prototype; p = Object.getPrototypeOf(p)) {
      const n = (p as { constructor?: { name?: string } }).constructor?.name;
      if (n !== undefined && on.includes(n)) return true;
    }
    return false;
  }

  private recordError(id: number, err: unknown): void {
    if (err === undefined) return;
    this.errors.set(id, toRecord(err));
  }

  private drainInstructions(): void {
    const ins = this.core.instructions;
    if (ins.length === 0) return;
    this.core.instructions = [];
    for (const i of ins) this.carryOut(i);
  }

  private carryOut(i: Instruction): void {
    switch (i.op) {
      case 'retry': {
        const t = setTimeout(() => {
          this.timers.delete(t);
          this.core.retryDue(i.id);
          this.pump();
        }, i.delayMs);
        this.timers.add(t);
        return;
      }
      case 'stop':
        this.executor.cancel(i.ids);
        return;
      case 'done':
        this.done = { state: i.state, message: i.message };
        this.resolveDone();
        return;
    }
  }

  // --- arguments and mapping ---------------------------------------------------

  private argsFor(node: NodeSpec, mapIndex: number): unknown[] {
    const bindings = node.args;
    const args = new Array<unknown>(bindings.length);
    for (let a = 0; a < bindings.length; a++) {
      const b = bindings[a]!;
      const child = mapIndex >= 0 && (b.mode === 'mapped' || b.mode === 'flatten');
      if (b.kind === 'const') {
        if (!child) args[a] = b.value;
        else args[a] = b.mode === 'flatten' ? (b.value as unknown[][]).flat(1)[mapIndex] : (b.value as unknown[])[mapIndex];
        continue;
      }
      const u = b.node;
      if (!child) args[a] = this.valueOf(u);
      else if (b.mode === 'flatten') args[a] = this.flatOf(u)[mapIndex];
      else {
        const r = this.core.mapRange(u);
        args[a] = r !== undefined ? this.results[r.start + mapIndex] : this.elementOf(this.results[u], mapIndex);
      }
    }
    return args;
  }

  /** A node's value as its consumers see it: for a mapped node, the list of its children's results. */
  private valueOf(u: number): unknown {
    if (!this.nodes[u]!.mapped) return this.results[u];
    const r = this.core.mapRange(u);
    if (r === undefined) return this.results[u];
    let list = this.lists.get(u);
    if (list === undefined || list.length !== r.width) {
      list = this.results.slice(r.start, r.start + r.width);
      if (list.length < r.width) list.length = r.width;
      if (S.isFinished(this.core.state[u]!)) this.lists.set(u, list);
    }
    return list;
  }

  private flatOf(u: number): unknown[] {
    let f = this.flattened.get(u);
    if (f === undefined) {
      const v = this.valueOf(u);
      const refs = this.opts.refs;
      if (refs === undefined) f = Array.isArray(v) ? v.flat(1) : [];
      else {
        // Lists and handles to lists held elsewhere, flattened one level.
        const outer = Array.isArray(v) ? v : refs.isRef(v) ? this.refList(v) : [];
        f = [];
        for (const x of outer) {
          if (Array.isArray(x)) for (const y of x) f.push(y);
          else if (refs.isRef(x)) for (const y of this.refList(x)) f.push(y);
        }
      }
      this.flattened.set(u, f);
    }
    return f;
  }

  /** Element i of a list result, or of a handle to one held elsewhere. */
  private elementOf(v: unknown, i: number): unknown {
    const refs = this.opts.refs;
    if (refs !== undefined && refs.isRef(v)) return refs.element(v, i);
    return (v as unknown[])[i];
  }

  /** A handle to a list held elsewhere, as a list of handles to its elements. */
  private refList(v: unknown): unknown[] {
    const refs = this.opts.refs!;
    const n = refs.length(v);
    const out = new Array<unknown>(Math.max(0, n));
    for (let i = 0; i < n; i++) out[i] = refs.element(v, i);
    return out;
  }

  /** Length of a list argument, or a message saying why it is not one (handles to values held elsewhere included). */
  private listLength(v: unknown, what: string): number | string {
    if (Array.isArray(v)) return v.length;
    const refs = this.opts.refs;
    if (refs !== undefined && refs.isRef(v)) {
      const n = refs.length(v);
      return n >= 0 ? n : `${what} returned something that is not a list`;
    }
    return `${what} returned ${describeType(v)}, not a list`;
  }

  private inputLength(id: number, arg: number): number | string {
    const node = this.nodes[this.core.node[id]!]!;
    const b = node.args[arg]!;
    if (b.kind === 'const') return Array.isArray(b.value) ? b.value.length : `argument ${arg} of "${node.key}" is not a list`;
    const uKey = this.nodes[b.node]!.key;
    const v = this.valueOf(b.node);
    const refs = this.opts.refs;
    if (refs !== undefined && refs.isRef(v)) {
      const n = this.listLength(v, `upstream "${uKey}"`);
      if (typeof n === 'string') return `"${node.key}" maps over argument ${arg}, but ${n}`;
      if (b.mode !== 'flatten') return n;
      if (refs.innerLengths(v) === null) return `"${node.key}" flattens argument ${arg}, but not every element of "${uKey}" is a list`;
      return this.flatOf(b.node).length;
    }
    if (!Array.isArray(v)) {
      return `"${node.key}" maps over argument ${arg}, but upstream "${uKey}" returned ${describeType(v)}, not a list`;
    }
    if (b.mode === 'flatten') {
      const bad = v.findIndex((x) => !Array.isArray(x) && (refs === undefined || !refs.isRef(x) || refs.length(x) < 0));
      if (bad >= 0) return `"${node.key}" flattens argument ${arg}, but element ${bad} of "${uKey}" is ${describeType(v[bad])}, not a list`;
      return this.flatOf(b.node).length;
    }
    return v.length;
  }

  // --- results -------------------------------------------------------------------

  /** An earlier run's result for this task run, from its memory or its checkpoint file. */
  private restored(node: NodeSpec, mapIndex: number): { found: true; value: unknown } | { found: false } {
    const r = this.restart!;
    const key = `${node.key}\u0000${mapIndex}`;
    if (!r.succeeded.has(key)) return { found: false };
    if (r.values !== null && r.values.has(key)) return { found: true, value: r.values.get(key) };
    if (!wantsCheckpoint(node)) return { found: false };
    const o = node.options;
    const template = o.result?.target ?? o.result?.location ?? DEFAULT_LOCATION;
    const vars = { ...this.vars(node, mapIndex), runId: r.runId ?? this.runUuid };
    try {
      return readResult(resolvePath(this.resultDir, renderLocation(template, vars)), o.result);
    } catch {
      return { found: false }; // unreadable checkpoint: run the task again
    }
  }

  private vars(node: NodeSpec, mapIndex: number): Parameters<typeof renderLocation>[1] {
    return { flow: this.spec.name, task: node.key, mapIndex, runId: this.runUuid, parameters: this.parameters };
  }

  private persist(id: number, node: NodeSpec, value: unknown): void {
    const mapIndex = this.core.mapIndex[id]!;
    const opts = node.options;
    if (wantsCheckpoint(node)) {
      const template = opts.result?.target ?? opts.result?.location ?? DEFAULT_LOCATION;
      writeResult(resolvePath(this.resultDir, renderLocation(template, this.vars(node, mapIndex))), value, opts.result);
    }
    if (opts.cacheForMs > 0) {
      const args = this.argsFor(node, mapIndex);
      cacheStore(opts, cacheKeyOf(node, mapIndex), value, args, this.parameters, Date.now());
    }
  }

  // --- reporting -------------------------------------------------------------------

  /** Timing arrays cover every task id below `size` (typed arrays drop out-of-range writes silently). */
  private ensureTimes(size: number): void {
    if (size <= this.startMs.length) return;
    let n = this.startMs.length;
    while (n < size) n *= 2;
    const s = new Float64Array(n);
    s.set(this.startMs);
    this.startMs = s;
    const e = new Float64Array(n);
    e.set(this.endMs);
    this.endMs = e;
  }

  private onTransition(id: number, from: number, to: number): void {
    const node = this.nodes[this.core.node[id]!]!;
    const fromName = S.STATE_NAMES[from]!;
    const toName = S.STATE_NAMES[to]!;
    this.opts.onTaskState?.({
      id,
      attempt: this.core.attempts[id]!,
      key: node.key,
      mapIndex: this.core.mapIndex[id]!,
      from: fromName,
      to: toName,
      at: now(),
    });
    const o = node.options;
    if (o.stateHandlers.length === 0 && o.onFailure === null) return;
    const task = { key: node.key, mapIndex: this.core.mapIndex[id]! };
    const err = this.errors.get(id);
    const info = { ...(err ? { error: err } : {}), ...(S.isSuccessLike(to) ? { result: this.results[id] } : {}) };
    // Handlers run after the event that caused them has settled the state (their errors are logged, not fatal).
    queueMicrotask(() => {
      for (const h of o.stateHandlers) safeCall(() => h(task, fromName, toName, info), node.key);
      if (o.onFailure !== null && S.isFailedLike(to) && to !== S.CANCELLED) safeCall(() => o.onFailure!(task, fromName, toName, info), node.key);
    });
  }

  private progress(): RunProgress {
    const c = this.core.counts;
    let done = 0;
    for (let s = S.SUCCESS; s < S.N_STATES; s++) done += c[s]!;
    const elapsedMs = now() - this.t0;
    return {
      total: this.core.size,
      done,
      // Dispatched calls beyond the executor's parallelism wait in its queue, not running.
      running: Math.min(c[S.RUNNING]!, Math.max(1, this.executor.workers)),
      failed: c[S.FAILED]! + c[S.TIMED_OUT]! + c[S.TRIGGER_FAILED]!,
      skipped: c[S.SKIPPED]!,
      rate: elapsedMs > 0 ? (done * 1000) / elapsedMs : 0,
      elapsedMs,
    };
  }

  private result(): FlowRunResult {
    const core = this.core;
    const endMs = now();
    const done = this.done ?? core.runState();
    const keep = this.opts.keepResults ?? true;
    const results = keep ? this.results : [];
    const { nodes, startMs, endMs: ends, errors, workers, spec } = this;
    const idOf = (ref: NodeRef): number => {
      const id = typeof ref === 'number' ? ref : ref.node;
      if (!Number.isInteger(id) || id < 0 || id >= core.nStatic) throw new RangeError(`no node ${String(id)} in flow "${spec.name}"`);
      return id;
    };
    let tasks: TaskRunRecord[] | null = null;
    const record = (id: number): TaskRunRecord => {
      const r: TaskRunRecord = {
        key: nodes[core.node[id]!]!.key,
        node: core.node[id]!,
        mapIndex: core.mapIndex[id]!,
        state: core.stateName(id),
        attempts: core.attempts[id]!,
        startMs: startMs[id] ?? 0,
        endMs: ends[id] ?? 0,
      };
      const err = errors.get(id);
      const msg = core.messages.get(id);
      if (msg !== undefined) {
        r.error = { name: r.state === 'TriggerFailed' ? 'TriggerFailed' : (err?.name ?? 'WeftError'), message: msg };
        if (err?.stack !== undefined) r.error.stack = err.stack;
      } else if (r.state === 'Cancelled') {
        r.error = err?.name === 'CancelledError' ? err : { name: 'CancelledError', message: 'cancelled: the run was cancelled' };
      } else if (err !== undefined && r.state !== 'Success' && r.state !== 'Cached') r.error = err;
      const w = workers[id];
      if (w !== undefined) r.worker = w;
      return r;
    };
    return {
      flowName: this.spec.name,
      runId: this.runUuid,
      state: done.state,
      message: done.message,
      startMs: this.t0,
      endMs,
      durationMs: endMs - this.t0,
      parameters: this.parameters,
      get tasks(): readonly TaskRunRecord[] {
        if (tasks === null) {
          tasks = new Array<TaskRunRecord>(core.size);
          for (let id = 0; id < core.size; id++) tasks[id] = record(id);
        }
        return tasks;
      },
      result<T>(ref: NodeRef): T {
        const id = idOf(ref);
        const r = core.mapRange(id);
        if (r !== undefined) return results.slice(r.start, r.start + r.width) as T;
        return results[id] as T;
      },
      taskResult(id: number): unknown {
        return results[id];
      },
      taskColumns(): TaskColumns {
        // Most runs have no error and no core message at all: then the state alone decides.
        const noNotes = errors.size === 0 && core.messages.size === 0;
        return {
          size: core.size,
          node: core.node,
          mapIndex: core.mapIndex,
          state: core.state,
          stateNames: S.STATE_NAMES,
          attempts: core.attempts,
          startMs,
          endMs: ends,
          worker: workers,
          plain(id: number): boolean {
            const s = core.state[id]!;
            return (s === S.SUCCESS || s === S.CACHED || s === S.MAPPED) && (noNotes || (!errors.has(id) && !core.messages.has(id)));
          },
          record,
        };
      },
      stateOf(ref: NodeRef): TaskStateName {
        return core.stateName(idOf(ref));
      },
      runsOf(ref: NodeRef): readonly TaskRunRecord[] {
        const id = idOf(ref);
        const out = [record(id)];
        const r = core.mapRange(id);
        if (r !== undefined) for (let c = r.start; c < r.start + r.width; c++) out.push(record(c));
        return out;
      },
      story(ref: NodeRef, mapIndex?: number): readonly string[] {
        let id = idOf(ref);
        if (mapIndex !== undefined && mapIndex >= 0) {
          const r = core.mapRange(id);
          if (r === undefined || mapIndex >= r.width) return [];
          id = r.start + mapIndex;
        }
        return core.story(id);
      },
    } as FlowRunResult;
  }
}

function signalKind(name: string): FailureKind | null {
  switch (name) {
    case 'SkipSignal':
      return 'skip';
    case 'LoopSignal':
      return 'loop';
    case 'RetrySignal':
      return 'retry';
    case 'PauseSignal':
      return 'pause';
    default:
      return null;
  }
}

/** An error record: errors from other threads arrive as records already; in-process ones are serialized. */
function toRecord(err: unknown): SerializedError {
  if (!(err instanceof Error) && typeof err === 'object' && err !== null && typeof (err as SerializedError).name === 'string') {
    return err as SerializedError;
  }
  return serializeError(err);
}

function safeCall(fn: () => void, key: string): void {
  try {
    fn();
  } catch (err) {
    process.emitWarning(`state handler of task "${key}" threw: ${(err as Error)?.message ?? String(err)}`);
  }
}

interface Restart {
  /** `key\0mapIndex` of every task run that ended Success or Cached. */
  succeeded: Set<string>;
  /** Their results, when the earlier run kept them in memory. */
  values: Map<string, unknown> | null;
  runId: string | undefined;
}

function restartOf(prev: FlowRunResult | RestartRecord): Restart {
  const succeeded = new Set<string>();
  const inMemory = typeof (prev as FlowRunResult).result === 'function';
  const values = inMemory ? new Map<string, unknown>() : null;
  for (const t of prev.tasks) {
    if (t.state !== 'Success' && t.state !== 'Cached') continue;
    const key = `${t.key}\u0000${t.mapIndex}`;
    succeeded.add(key);
    if (values !== null) {
      const p = prev as FlowRunResult;
      const node = (t as TaskRunRecord).node;
      const all = p.result(node) as unknown;
      const v = t.mapIndex >= 0 ? (Array.isArray(all) ? all[t.mapIndex] : undefined) : all;
      // Nothing in memory (keepResults: false, or a task that returned nothing): use the checkpoint, or run it again.
      if (v !== undefined) values.set(key, v);
    }
  }
  return { succeeded, values, runId: prev.runId };
}
