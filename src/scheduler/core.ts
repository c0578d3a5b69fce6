/**
 * The scheduler core: a pure, synchronous state machine over one flow run.
 *
 * Events come in as method calls (start, takeReady, success, failure, retryDue, resume,
 * cancel); instructions go out through `instructions` (retry at a delay, stop running
 * tasks, the run is done). No I/O, no timers, no promises: the runner (`src/runner`)
 * does those and feeds what happens back in as events.
 *
 * Per-task state lives in typed arrays indexed by task id. Static nodes of the graph spec
 * keep their spec index as id; children of mapped nodes are appended as the run expands
 * them. Dependents are singly linked lists in a shared edge pool, so the graph grows
 * without reallocating per node.
 *
 * Dispatch is pulled: the runner asks `takeReady(max)` for as many tasks as its executor
 * has slots, so everything beyond the executor's capacity waits here, in priority order
 * (backpressure lives in the scheduler, as in dask's `_task_slots_available`).
 */
import type { GraphSpec, NodeSpec, TaskOptions, TaskStateName, UpstreamState } from '../flow/spec.ts';
import { ReadyHeap } from './heap.ts';
import { staticOrder } from './order.ts';
import {
  CACHED,
  CANCELLED,
  classOf,
  CLS_FAILED,
  CLS_SKIPPED,
  FAILED,
  isFailedLike,
  isFinished,
  LOOPED,
  MAPPED,
  MAPPING,
  N_STATES,
  PAUSED,
  PENDING,
  READY,
  RETRYING,
  RUNNING,
  SKIPPED,
  STATE_LABELS,
  STATE_NAMES,
  SUCCESS,
  TIMED_OUT,
  TRIGGER_FAILED,
  type StateCode,
} from './states.ts';

export type Instruction =
  /** Call `retryDue(id)` after `delayMs`. */
  | { readonly op: 'retry'; readonly id: number; readonly delayMs: number }
  /** Stop these running tasks (the run is being cancelled); their outcomes come back as 'cancelled'. */
  | { readonly op: 'stop'; readonly ids: readonly number[] }
  /** Every task is finished (or the rest wait on paused tasks): the run's final state. */
  | { readonly op: 'done'; readonly state: RunState; readonly message: string };

export type RunState = 'Success' | 'Failed' | 'Cancelled' | 'Paused';

/** How a dispatched task ended, when not with a plain success. */
export type FailureKind =
  | 'error' // threw (incl. the fail signal): retried per its options, then Failed
  | 'timeout' // passed its timeout: retried per its options, then TimedOut
  | 'skip' // skip signal: Skipped
  | 'pause' // pause signal: Paused until resumed
  | 'loop' // loop signal: runs again at once (loopCount + 1)
  | 'retry' // retry signal: Retrying after delayMs, whatever maxRetries says
  | 'lost' // its worker died: runs again, unless that happened `poisonLimit` times
  | 'cancelled'; // stopped by cancellation

export interface CoreOptions {
  /** Check invariants after every event (slow: tests turn it on). */
  validate?: boolean;
  /** Entries kept in the story ring (default 8 per node, between 1,024 and 65,536). */
  storySize?: number;
  /** At most n running tasks carrying each tag. */
  tagLimits?: Readonly<Record<string, number>>;
  /** A task whose worker died this many times fails as a suspected poison task (default 3). */
  poisonLimit?: number;
  /**
   * Length of the list that argument `arg` of mapped node `id` maps over, or an error
   * message when it is not a list. Called once per mapped/flatten argument whose
   * upstream is not itself a mapped node (the runner holds the values).
   */
  inputLength?: (id: number, arg: number) => number | string;
  /** Called on every state change (leave unset for speed). */
  onTransition?: (id: number, from: StateCode, to: StateCode) => void;
}

/** A mapped parent's bookkeeping (only mapped nodes have one). */
interface MapInfo {
  /** First child id; children are [start, start + width). */
  start: number;
  width: number;
  /** Children not yet finished; the parent becomes MAPPED at 0. */
  open: number;
  /** Finished children by class (success, skipped, failed): what downstream triggers see. */
  counts: [number, number, number];
}

// Legal transitions (STYLE #2): one row per from-state; anything else throws with the task's story.
const LEGAL = new Uint8Array(N_STATES * N_STATES);
const allow = (from: StateCode, ...to: StateCode[]): void => {
  for (const t of to) LEGAL[from * N_STATES + t] = 1;
};
allow(PENDING, READY, SKIPPED, TRIGGER_FAILED, PAUSED, MAPPING, FAILED, CANCELLED);
allow(READY, RUNNING, CANCELLED);
allow(RUNNING, SUCCESS, CACHED, FAILED, TIMED_OUT, SKIPPED, PAUSED, RETRYING, READY, LOOPED, CANCELLED);
allow(LOOPED, READY);
allow(RETRYING, READY, CANCELLED);
allow(PAUSED, READY, CANCELLED);
allow(MAPPING, MAPPED, CANCELLED);

const F_LOOP = 1; // next dispatch is a loop iteration or a re-run after a lost worker: not a new attempt
const F_RESUMED = 2; // resumed from Paused: a manualOnly trigger passes

// Per static node, cached from the spec so the hot path does not chase the node object.
const NF_MAPPED = 1; // a mapped node (its children share its node id but not this meaning)
const NF_FAST = 2; // builtin trigger that runs when no upstream failed or was skipped

/** Builtin triggers whose verdict is RUN whenever no upstream failed or was skipped (see evalTrigger). */
function runsWhenAllSucceeded(o: TaskOptions): boolean {
  const t = o.trigger;
  if (t.kind !== 'builtin') return false;
  const name = t.name;
  return name === 'allSuccessful' || name === 'anySuccessful' || name === 'allFinished' || name === 'alwaysRun' || name === 'notAllSkipped';
}

// Story event codes beyond transitions.
const EV_TRANSITION = 0;
const EV_STALE = 1;
const STORY_W = 5;

export class SchedulerError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'SchedulerError';
  }
}

/** Graphs up to this many nodes take their arrays from one `Arena`. */
const ARENA_MAX_NODES = 4096;

/**
 * Typed arrays carved out of one ArrayBuffer of `bytes` (each 8-byte aligned), zeroed;
 * once it is used up (or with 0 bytes), plain allocations.
 */
class Arena {
  private readonly buf: ArrayBuffer;
  private off = 0;

  constructor(bytes: number) {
    this.buf = new ArrayBuffer(bytes);
  }

  private take(bytes: number): number {
    const at = this.off;
    const end = at + ((bytes + 7) & ~7);
    if (end > this.buf.byteLength) return -1;
    this.off = end;
    return at;
  }

  u8(n: number): Uint8Array {
    const at = this.take(n);
    return at < 0 ? new Uint8Array(n) : new Uint8Array(this.buf, at, n);
  }

  u16(n: number): Uint16Array {
    const at = this.take(2 * n);
    return at < 0 ? new Uint16Array(n) : new Uint16Array(this.buf, at, n);
  }

  i32(n: number): Int32Array {
    const at = this.take(4 * n);
    return at < 0 ? new Int32Array(n) : new Int32Array(this.buf, at, n);
  }

  f64(n: number): Float64Array {
    const at = this.take(8 * n);
    return at < 0 ? new Float64Array(n) : new Float64Array(this.buf, at, n);
  }
}

export class SchedulerCore {
  readonly spec: GraphSpec;
  /** Static nodes (ids 0..nStatic-1 are the spec's nodes). */
  readonly nStatic: number;
  /** Tasks so far (static nodes + mapped children). */
  size: number;

  // --- per-task arrays (capacity `cap`; invariants in comments) -------------------
  private cap: number;
  /** State code; changed only in `setState`. */
  state: Uint8Array;
  /** Upstream edges not yet fired; a PENDING task with 0 is resolved at once. */
  remaining: Int32Array;
  /** Finished upstream by class, 3 per task (success, skipped, failed); mapped upstreams count their children. */
  private upCounts: Int32Array;
  /** Dispatches that were attempts (loop iterations and lost-worker re-runs excluded). */
  attempts: Uint16Array;
  /** Times the task's worker died under it (allocated at the first lost worker). */
  private lost: Uint8Array;
  /** Run id of the current dispatch; outcomes carrying another are stale and dropped. */
  runId: Int32Array;
  /** Loop iterations so far. */
  loopCount: Int32Array;
  /** Spec node of the task (a mapped child shares its parent's). */
  node: Int32Array;
  /** Map index of a mapped child, else -1. */
  mapIndex: Int32Array;
  /** Mapped parent of a child, else -1. */
  parent: Int32Array;
  private flags: Uint8Array;
  /**
   * Negated user priority, then static order: the ready heap's keys. `rank` is empty
   * while every task has the same priority (the heap then compares `order` alone).
   */
  private rank: Float64Array;
  private order: Float64Array;
  /** Heads of the dependents lists, fired on finish. -1 = none. */
  private outHead: Int32Array;
  /**
   * Heads of the lists fired on expansion of a mapped node, per static node (only static
   * mapped nodes expand); empty when the spec has no mapped node.
   */
  private readonly expHead: Int32Array;
  /** Some node is mapped: children may exist (else `parent` is all -1 and never read on the hot path). */
  private readonly hasMapped: boolean;

  private edgeTo: Int32Array;
  private edgeNext: Int32Array;
  private nEdges = 0;
  /** Per static node: NF_* bits. */
  private readonly nodeFlags: Uint8Array;

  private readonly maps = new Map<number, MapInfo>();
  private readonly heap: ReadyHeap;
  /** Tasks per state code. */
  readonly counts = new Int32Array(N_STATES);
  /** State changes so far (what the micro-benchmarks count). */
  transitions = 0;
  /** Why the core (not the task) ended a task: trigger, poison, mapping errors. */
  readonly messages = new Map<number, string>();
  /** Instructions for the runner; it drains (and clears) this after each event. */
  instructions: Instruction[] = [];

  // tags
  /** Per static node: the limited tags it carries; null when no tag is limited (the usual case). */
  private readonly tagIds: Int32Array[] | null;
  private readonly tagLimit: Int32Array;
  private readonly tagRunning: Int32Array;
  private readonly tagParked: number[][];
  private parkedCount = 0;

  private runSeq = 0;
  private readonly finishStack: number[] = [];
  private draining = false;
  private started = false;
  private finished = false;
  private cancelling = false;
  private readonly poisonLimit: number;
  private readonly validate: boolean;
  private readonly inputLength: (id: number, arg: number) => number | string;
  private readonly onTransition: ((id: number, from: StateCode, to: StateCode) => void) | undefined;

  // story ring: STORY_W ints per entry (seq, id, event, attempt<<16|from<<8|to, run id at the time)
  private readonly storyBuf: Int32Array;
  private readonly storyLen: number;
  private storyPos = 0;
  private seq = 0;

  /** Which nodes are mapped / their arguments (cached from the spec for the hot path). */
  private readonly nodeSpecs: readonly NodeSpec[];

  constructor(spec: GraphSpec, opts: CoreOptions = {}) {
    this.spec = spec;
    this.nodeSpecs = spec.nodes;
    const n = spec.nodes.length;
    this.nStatic = n;
    this.size = n;
    this.cap = Math.max(16, n);
    this.validate = opts.validate ?? false;
    this.poisonLimit = opts.poisonLimit ?? 3;
    this.inputLength = opts.inputLength ?? (() => 'no input lengths available');
    this.onTransition = opts.onTransition;
    // Bounded, and in proportion to the graph: a fresh ring is zero-filled per run.
    this.storyLen = opts.storySize ?? Math.min(65536, Math.max(128, 8 * spec.nodes.length));
    const cap = this.cap;
    // A small graph's arrays come from one buffer (a run of a tiny graph would otherwise
    // allocate and collect some twenty backing stores); a big graph's stay separate, so
    // that growing one frees the old one.
    const a = new Arena(n <= ARENA_MAX_NODES ? cap * 52 + 2 * n + 4 * (2 * n + 17) + 4 * STORY_W * this.storyLen + 16 * 8 : 0);
    this.storyBuf = a.i32(STORY_W * this.storyLen);
    this.state = a.u8(cap);
    this.remaining = a.i32(cap);
    this.upCounts = a.i32(cap * 3);
    this.attempts = a.u16(cap);
    this.lost = new Uint8Array(0);
    this.runId = a.i32(cap);
    this.loopCount = a.i32(cap);
    this.node = a.i32(cap);
    this.mapIndex = a.i32(cap).fill(-1);
    this.parent = a.i32(cap).fill(-1);
    this.flags = a.u8(cap);
    this.rank = new Float64Array(0);
    this.order = a.f64(cap);
    this.outHead = a.i32(cap).fill(-1);

    // Tags with limits.
    const limits = opts.tagLimits ?? {};
    const tagNames = Object.keys(limits);
    this.tagLimit = new Int32Array(tagNames.length);
    this.tagRunning = new Int32Array(tagNames.length);
    this.tagParked = tagNames.map(() => []);
    tagNames.forEach((t, i) => {
      const lim = limits[t]!;
      if (!Number.isInteger(lim) || lim < 1) throw new SchedulerError(`tag limit for "${t}" must be a positive integer, got ${String(lim)}`);
      this.tagLimit[i] = lim;
    });
    const tagIds: Int32Array[] | null = tagNames.length === 0 ? null : new Array<Int32Array>(n);
    const noTags = new Int32Array(0);

    // Pass 1, the only one over the spec's objects (1M nodes do not fit in a cache, so each
    // pass over them costs a miss per node): the dependency CSR for the static order,
    // ranks, node flags, tags, and the exact number of static edges.
    const nodes = spec.nodes;
    const depPtr = a.i32(n + 1);
    let depIdx = a.i32(n + 16);
    let nDeps = 0;
    let nEdges = 0;
    const hasDependents = a.u8(n);
    const nodeFlags = a.u8(n);
    let rank: Float64Array | null = null;
    const node = this.node;
    // Nodes mostly share one options object: decode it once per distinct object.
    let lastOpts: TaskOptions | null = null;
    let lastRank = 0;
    let lastFast = 0;
    let hasMapped = false;
    for (let i = 0; i < n; i++) {
      const s = nodes[i]!;
      const o = s.options;
      if (o !== lastOpts) {
        lastOpts = o;
        const r = -o.priority;
        if (i > 0 && r !== lastRank && rank === null) {
          // The first differing priority: from here on the heap needs ranks.
          rank = new Float64Array(cap);
          rank.fill(lastRank, 0, i);
        }
        lastRank = r;
        lastFast = runsWhenAllSucceeded(o) ? NF_FAST : 0;
      }
      node[i] = i;
      if (rank !== null) rank[i] = lastRank;
      const mapped = s.mapped;
      hasMapped ||= mapped;
      nodeFlags[i] = mapped ? lastFast | NF_MAPPED : lastFast;
      const args = s.args;
      const up = s.upstream;
      if (nDeps + args.length + up.length > depIdx.length) {
        const next = new Int32Array(Math.max(depIdx.length * 2, nDeps + args.length + up.length));
        next.set(depIdx);
        depIdx = next;
      }
      for (let k = 0; k < args.length; k++) {
        const a = args[k]!;
        if (a.kind !== 'ref') continue;
        const u = a.node;
        if (u < 0 || u >= n) throw new SchedulerError(`node "${s.key}" depends on node ${u}, which is not in the flow`);
        depIdx[nDeps++] = u;
        hasDependents[u] = 1;
        // A mapped node waits only for the inputs that give its width; its plain inputs
        // are wired to its children when it expands.
        if (!mapped || a.mode === 'mapped' || a.mode === 'flatten') nEdges++;
      }
      for (let k = 0; k < up.length; k++) {
        const u = up[k]!;
        if (u < 0 || u >= n) throw new SchedulerError(`node "${s.key}" has upstream node ${u}, which is not in the flow`);
        depIdx[nDeps++] = u;
        hasDependents[u] = 1;
        if (!mapped) nEdges++;
      }
      depPtr[i + 1] = nDeps;
      if (tagIds !== null) {
        const tags = o.tags;
        const ids = tags.length === 0 ? [] : tags.map((t) => tagNames.indexOf(t)).filter((x) => x >= 0);
        tagIds[i] = ids.length === 0 ? noTags : Int32Array.from(ids);
      }
    }
    this.nodeFlags = nodeFlags;
    this.tagIds = tagIds;
    if (rank !== null) this.rank = rank;
    this.hasMapped = hasMapped;
    this.expHead = new Int32Array(hasMapped ? n : 0).fill(-1);
    this.heap = new ReadyHeap(this.rank, this.order, Math.min(n, 1 << 16));
    this.heap.setUniformRank(rank === null);

    // Pass 2, over typed arrays only: the dependents lists, in an edge pool of the exact size.
    this.edgeTo = new Int32Array(Math.max(16, nEdges));
    this.edgeNext = new Int32Array(Math.max(16, nEdges));
    const edgeTo = this.edgeTo;
    const edgeNext = this.edgeNext;
    const outHead = this.outHead;
    const remaining = this.remaining;
    let e = 0;
    for (let i = 0; i < n; i++) {
      const end = depPtr[i + 1]!;
      if ((nodeFlags[i]! & NF_MAPPED) !== 0) {
        // Rare: back to the spec for the argument modes (same edge order as the plain case).
        this.nEdges = e;
        for (const a of nodes[i]!.args) {
          if (a.kind === 'ref' && (a.mode === 'mapped' || a.mode === 'flatten')) {
            // Blocking for a mapped node: its width comes from this input.
            this.addEdge(a.node, i, a.mode === 'mapped' && nodes[a.node]!.mapped);
          }
        }
        e = this.nEdges;
        continue;
      }
      remaining[i] = end - depPtr[i]!;
      for (let p = depPtr[i]!; p < end; p++) {
        const u = depIdx[p]!;
        edgeTo[e] = i;
        edgeNext[e] = outHead[u]!;
        outHead[u] = e++;
      }
    }
    this.nEdges = e;

    staticOrder(n, depPtr, depIdx, hasDependents, this.order);
    this.counts[PENDING] = n;
  }

  // ---------------------------------------------------------------------------
  // Events

  /** Begin the run: tasks with no upstream are resolved (queued, skipped, paused...). */
  start(): void {
    if (this.started) throw new SchedulerError('start() called twice');
    this.started = true;
    for (let i = 0; i < this.nStatic; i++) {
      if (this.state[i] === PENDING && this.remaining[i] === 0) this.depsDone(i);
    }
    this.checkDone();
    this.check();
  }

  /**
   * Dispatch up to `max` ready tasks: writes their ids into `out` and returns how many.
   * Each gets a fresh run id (`runId[id]`) that its outcome must carry.
   */
  takeReady(max: number, out: Int32Array): number {
    let k = 0;
    const heap = this.heap;
    const tagIds = this.tagIds;
    while (k < max && heap.size > 0) {
      const id = heap.pop();
      if (tagIds !== null) {
        const tags = tagIds[this.node[id]!]!;
        if (tags.length > 0 && !this.acquireTags(id, tags)) continue;
      }
      this.runId[id] = ++this.runSeq;
      if ((this.flags[id]! & F_LOOP) !== 0) this.flags[id]! &= ~F_LOOP;
      else this.attempts[id]!++;
      this.setState(id, RUNNING);
      out[k++] = id;
    }
    if (k > 0) this.check();
    return k;
  }

  /**
   * The dependent that becomes ready exactly when `id` succeeds — when `id` is a static,
   * unmapped task whose only dependent is a static, unmapped task with a built-in
   * all-succeeded trigger, no limited tag, and no other upstream still open or failed or
   * skipped. -1 otherwise. A cluster sends such a dependent to the producer's worker
   * ahead of time (a chain then runs there without a scheduler round trip per link).
   */
  aheadCandidate(id: number): number {
    if (id >= this.nStatic || this.cancelling || this.finished) return -1;
    if ((this.nodeFlags[id]! & NF_MAPPED) !== 0) return -1;
    if (this.hasMapped && id < this.expHead.length && this.expHead[id]! >= 0) return -1;
    let d = -1;
    let edges = 0;
    for (let e = this.outHead[id]!; e >= 0; e = this.edgeNext[e]!) {
      const to = this.edgeTo[e]!;
      if (d === -1) d = to;
      else if (to !== d) return -1;
      edges++;
    }
    if (d < 0 || d >= this.nStatic) return -1;
    if (this.state[d] !== PENDING || this.remaining[d] !== edges) return -1;
    const nf = this.nodeFlags[d]!;
    if ((nf & NF_FAST) === 0 || (nf & NF_MAPPED) !== 0) return -1;
    const b = d * 3;
    if (this.upCounts[b + 1] !== 0 || this.upCounts[b + 2] !== 0) return -1;
    if (this.tagIds !== null && this.tagIds[this.node[d]!]!.length > 0) return -1;
    return d;
  }

  /** Ready tasks waiting for a slot. */
  get readyCount(): number {
    return this.heap.size;
  }

  /** The task returned. False when the outcome is stale (and was dropped). */
  success(id: number, runId: number): boolean {
    if (!this.current(id, runId)) return false;
    this.releaseTags(id);
    this.setState(id, SUCCESS);
    this.finish(id);
    this.checkDone();
    this.check();
    return true;
  }

  /** The task's result came from a cache, a target or an earlier run: state Cached. */
  cached(id: number, runId: number): boolean {
    if (!this.current(id, runId)) return false;
    this.releaseTags(id);
    this.setState(id, CACHED);
    this.finish(id);
    this.checkDone();
    this.check();
    return true;
  }

  /**
   * The task ended otherwise. `retryable`: whether its error passes the task's retryOn
   * filter (error and timeout kinds); `delayMs`: the retry signal's delay; `message`:
   * recorded as the reason (for lost workers, names them).
   */
  failure(id: number, runId: number, kind: FailureKind, retryable = true, delayMs = -1, message?: string): boolean {
    if (!this.current(id, runId)) return false;
    this.releaseTags(id);
    const opts = this.nodeSpecs[this.node[id]!]!.options;
    switch (kind) {
      case 'error':
      case 'timeout': {
        if (!this.cancelling && retryable && this.attempts[id]! <= opts.maxRetries) {
          this.setState(id, RETRYING);
          this.instructions.push({ op: 'retry', id, delayMs: opts.retryDelayMs });
        } else {
          this.setState(id, kind === 'error' ? FAILED : TIMED_OUT);
          this.finish(id);
        }
        break;
      }
      case 'skip':
        this.setState(id, SKIPPED);
        this.finish(id);
        break;
      case 'pause':
        if (this.cancelling) {
          this.setState(id, CANCELLED);
          this.finish(id);
        } else this.setState(id, PAUSED);
        break;
      case 'loop':
        if (this.cancelling) {
          this.setState(id, CANCELLED);
          this.finish(id);
          break;
        }
        this.loopCount[id]!++;
        this.flags[id]! |= F_LOOP;
        this.setState(id, LOOPED);
        this.setState(id, READY);
        this.heap.push(id);
        break;
      case 'retry':
        if (this.cancelling) {
          this.setState(id, CANCELLED);
          this.finish(id);
          break;
        }
        this.setState(id, RETRYING);
        this.instructions.push({ op: 'retry', id, delayMs: delayMs >= 0 ? delayMs : opts.retryDelayMs });
        break;
      case 'lost': {
        if (this.lost.length < this.cap) {
          const lost = new Uint8Array(this.cap);
          lost.set(this.lost);
          this.lost = lost;
        }
        const n = ++this.lost[id]!;
        if (n >= this.poisonLimit) {
          this.messages.set(
            id,
            `task ${this.describe(id)} is a suspected poison task: ${n} workers died while running it${message ? ` (${message})` : ''}`,
          );
          this.setState(id, FAILED);
          this.finish(id);
        } else if (this.cancelling) {
          this.setState(id, CANCELLED);
          this.finish(id);
        } else {
          this.flags[id]! |= F_LOOP;
          this.setState(id, READY);
          this.heap.push(id);
        }
        break;
      }
      case 'cancelled':
        this.setState(id, CANCELLED);
        this.finish(id);
        break;
    }
    this.checkDone();
    this.check();
    return true;
  }

  /** A retry delay has passed. Ignored unless the task is still Retrying (e.g. it was cancelled meanwhile). */
  retryDue(id: number): void {
    if (this.state[id] !== RETRYING) return;
    this.setState(id, READY);
    this.heap.push(id);
    this.check();
  }

  /** Resume a Paused task (a manualOnly trigger then passes). False when it is not paused. */
  resume(id: number): boolean {
    if (this.state[id] !== PAUSED || this.cancelling) return false;
    // A run reported done as Paused is live again: it reports 'done' once more when it settles.
    this.finished = false;
    this.flags[id]! |= F_RESUMED;
    this.setState(id, READY);
    this.heap.push(id);
    this.check();
    return true;
  }

  /** Cancel the run: nothing new starts; running tasks are to be stopped (instruction 'stop'). */
  cancel(): void {
    if (this.cancelling || this.finished) return;
    this.cancelling = true;
    this.heap.clear();
    for (const parked of this.tagParked) parked.length = 0;
    this.parkedCount = 0;
    const running: number[] = [];
    for (let id = 0; id < this.size; id++) {
      const s = this.state[id]!;
      if (s === RUNNING) running.push(id);
      else if (!isFinished(s)) this.setState(id, CANCELLED);
    }
    if (running.length > 0) this.instructions.push({ op: 'stop', ids: running });
    this.checkDone();
    this.check();
  }

  get isCancelling(): boolean {
    return this.cancelling;
  }

  get isDone(): boolean {
    return this.finished;
  }

  // ---------------------------------------------------------------------------
  // Queries

  stateName(id: number): TaskStateName {
    return STATE_NAMES[this.state[id]!]!;
  }

  /** For a mapped node that has expanded: its children's id range. */
  mapRange(id: number): { start: number; width: number } | undefined {
    const m = this.maps.get(id);
    return m === undefined ? undefined : { start: m.start, width: m.width };
  }

  /** Whether the task is the current dispatch `runId` (and still running). */
  current(id: number, runId: number): boolean {
    if (id >= 0 && id < this.size && this.state[id] === RUNNING && this.runId[id] === runId) return true;
    this.log(id, EV_STALE, this.state[id] ?? 0, this.state[id] ?? 0);
    return false;
  }

  /** What happened to a task, oldest first (bounded: older entries are overwritten). */
  story(id: number): string[] {
    const out: string[] = [];
    const buf = this.storyBuf;
    const n = this.storyLen;
    for (let k = 0; k < n; k++) {
      const e = ((this.storyPos + k) % n) * STORY_W;
      if (buf[e + 1] !== id || buf[e] === 0) continue;
      const from = (buf[e + 3]! >> 8) & 0xff;
      const to = buf[e + 3]! & 0xff;
      if (buf[e + 2] === EV_STALE) out.push(`#${buf[e]} stale outcome dropped (state ${STATE_LABELS[from]})`);
      else out.push(`#${buf[e]} ${STATE_LABELS[from]} -> ${STATE_LABELS[to]}${to === RUNNING ? ` (run ${buf[e + 4]}, attempt ${buf[e + 3]! >>> 16})` : ''}`);
    }
    return out;
  }

  /** Heap bytes held by the core's arrays (for the bytes-per-task report). */
  bytes(): number {
    const arrays = [
      this.state, this.remaining, this.upCounts, this.attempts, this.lost, this.runId, this.loopCount, this.node,
      this.mapIndex, this.parent, this.flags, this.rank, this.order, this.outHead, this.expHead, this.edgeTo, this.edgeNext,
      this.nodeFlags,
    ];
    let b = this.heap.bytes() + this.storyBuf.byteLength;
    for (const a of arrays) b += a.byteLength;
    return b;
  }

  /** The trigger's view of a task's upstream edges (mapped upstreams unpacked into children). */
  upstreamStates(id: number): UpstreamState[] {
    const out: UpstreamState[] = [];
    const push = (u: number): void => {
      const m = this.maps.get(u);
      const key = this.nodeSpecs[this.node[u]!]!.key;
      if (m !== undefined && (this.state[u] === MAPPED || this.state[u] === MAPPING)) {
        for (let c = m.start; c < m.start + m.width; c++) out.push({ key, state: this.stateName(c), mapIndex: this.mapIndex[c]! });
      } else out.push({ key, state: this.stateName(u), mapIndex: this.mapIndex[u]! });
    };
    const p = this.parent[id]!;
    const s = this.nodeSpecs[this.node[id]!]!;
    if (p < 0) {
      for (const a of s.args) if (a.kind === 'ref') push(a.node);
      for (const u of s.upstream) push(u);
    } else {
      const i = this.mapIndex[id]!;
      for (const a of s.args) {
        if (a.kind !== 'ref') continue;
        const um = a.mode === 'mapped' ? this.maps.get(a.node) : undefined;
        if (um !== undefined && this.nodeSpecs[a.node]!.mapped) push(um.start + i);
        else push(a.node);
      }
      for (const u of s.upstream) push(u);
    }
    return out;
  }

  /** The run's state decided by its reference tasks (call once done). */
  runState(): { state: RunState; message: string } {
    let failed = 0;
    let cancelled = 0;
    let paused = 0;
    const visit = (id: number): void => {
      const s = this.state[id]!;
      const m = this.maps.get(id);
      if (m !== undefined && s === MAPPED) {
        for (let c = m.start; c < m.start + m.width; c++) visit(c);
        return;
      }
      if (s === CANCELLED) cancelled++;
      else if (isFailedLike(s)) failed++;
      else if (!isFinished(s)) paused++;
    };
    const refs = this.spec.referenceTasks;
    for (let i = 0; i < refs.length; i++) visit(refs[i]!); // indexed: once per run, so unoptimized (a for-of allocates per task)
    if (this.cancelling) return { state: 'Cancelled', message: 'The run was cancelled.' };
    if (failed > 0) return { state: 'Failed', message: `${failed} reference task run(s) failed.` };
    if (cancelled > 0) return { state: 'Cancelled', message: `${cancelled} reference task run(s) were cancelled.` };
    if (paused > 0 || this.counts[PAUSED]! > 0) return { state: 'Paused', message: `${this.counts[PAUSED]} task run(s) are paused.` };
    return { state: 'Success', message: 'All reference tasks succeeded.' };
  }

  // ---------------------------------------------------------------------------
  // Internals

  private setState(id: number, to: StateCode): void {
    const from = this.state[id]!;
    if (LEGAL[from * N_STATES + to] !== 1) {
      throw new SchedulerError(
        `illegal transition ${STATE_LABELS[from]} -> ${STATE_LABELS[to]} for task ${this.describe(id)}; story:\n  ${this.story(id).join('\n  ')}`,
      );
    }
    this.state[id] = to;
    this.counts[from]!--;
    this.counts[to]!++;
    this.transitions++;
    this.log(id, EV_TRANSITION, from, to);
    if (this.onTransition !== undefined) this.onTransition(id, from, to);
  }

  private log(id: number, ev: number, from: number, to: number): void {
    const b = this.storyBuf;
    const pos = this.storyPos;
    const e = pos * STORY_W;
    // Wrap by comparison: an integer modulo per transition shows in profiles.
    this.storyPos = pos + 1 === this.storyLen ? 0 : pos + 1;
    b[e] = ++this.seq;
    b[e + 1] = id;
    b[e + 2] = ev;
    // The run id and attempt as they are now: a later dispatch must not rewrite earlier entries.
    b[e + 3] = ((this.attempts[id] ?? 0) << 16) | (from << 8) | to;
    b[e + 4] = this.runId[id] ?? 0;
  }

  describe(id: number): string {
    const key = this.nodeSpecs[this.node[id]!]?.key ?? `#${id}`;
    const i = this.mapIndex[id]!;
    return i >= 0 ? `"${key}"[${i}]` : `"${key}"`;
  }

  private addEdge(from: number, to: number, expansion: boolean): void {
    if (this.nEdges === this.edgeTo.length) {
      const cap = this.edgeTo.length * 2;
      const t = new Int32Array(cap);
      t.set(this.edgeTo);
      this.edgeTo = t;
      const nx = new Int32Array(cap);
      nx.set(this.edgeNext);
      this.edgeNext = nx;
    }
    const e = this.nEdges++;
    this.edgeTo[e] = to;
    if (expansion) {
      this.edgeNext[e] = this.expHead[from]!;
      this.expHead[from] = e;
    } else {
      this.edgeNext[e] = this.outHead[from]!;
      this.outHead[from] = e;
    }
    this.remaining[to]!++;
  }

  /** Counts a finished upstream contributes to its dependents' triggers. */
  private addFinishedCounts(u: number, to: number): void {
    const su = this.state[u]!;
    const b = to * 3;
    // Only a MAPPED task has a map to count (test the state first: no Map lookup per edge).
    if (su === MAPPED) {
      const m = this.maps.get(u);
      if (m !== undefined) {
        this.upCounts[b]! += m.counts[0];
        this.upCounts[b + 1]! += m.counts[1];
        this.upCounts[b + 2]! += m.counts[2];
        return;
      }
    }
    this.upCounts[b + classOf(su)]!++;
  }

  /**
   * A task reached a final state: tell its dependents and its mapped parent. Iterative
   * (a worklist, not recursion): a skip can cascade down a million-task chain.
   */
  private finish(id: number): void {
    if (this.draining) {
      this.finishStack.push(id);
      return;
    }
    this.draining = true;
    try {
      this.propagate(id);
      const stack = this.finishStack;
      while (stack.length > 0) this.propagate(stack.pop()!);
    } finally {
      this.draining = false;
    }
  }

  private propagate(id: number): void {
    // Dependents waiting for this one to finish.
    for (let e = this.outHead[id]!; e >= 0; e = this.edgeNext[e]!) {
      const to = this.edgeTo[e]!;
      this.addFinishedCounts(id, to);
      if (--this.remaining[to]! === 0 && this.state[to] === PENDING) this.depsDone(to);
    }
    if (!this.hasMapped) return;
    // A mapped node that finished without expanding: its mapped dependents cannot expand either.
    if (id < this.expHead.length && this.expHead[id]! >= 0) this.fireExpansion(id);
    const p = this.parent[id]!;
    if (p >= 0) {
      const m = this.maps.get(p)!;
      m.counts[classOf(this.state[id]!) as 0 | 1 | 2]++;
      if (--m.open === 0 && this.state[p] === MAPPING) {
        this.setState(p, MAPPED);
        this.finish(p);
      }
    }
  }

  private fireExpansion(id: number): void {
    let e = this.expHead[id]!;
    this.expHead[id] = -1;
    for (; e >= 0; e = this.edgeNext[e]!) {
      const to = this.edgeTo[e]!;
      if (--this.remaining[to]! === 0 && this.state[to] === PENDING) this.depsDone(to);
    }
  }

  /** Every upstream edge of a PENDING task fired: expand it, queue it, or end it per its trigger. */
  private depsDone(id: number): void {
    const nf = this.nodeFlags[this.node[id]!]!;
    if ((nf & NF_FAST) !== 0 && ((nf & NF_MAPPED) === 0 || this.parent[id]! >= 0)) {
      // Fast path (no spec lookup): a plain trigger, no upstream failed or was skipped.
      const b = id * 3;
      if (this.upCounts[b + 1] === 0 && this.upCounts[b + 2] === 0) {
        this.setState(id, READY);
        this.heap.push(id);
        return;
      }
    }
    const s = this.nodeSpecs[this.node[id]!]!;
    if (s.mapped && this.parent[id]! < 0) {
      this.resolveMapped(id, s);
      return;
    }
    const b = id * 3;
    const ok = this.upCounts[b]!;
    const skipped = this.upCounts[b + 1]!;
    const failed = this.upCounts[b + 2]!;
    if (skipped > 0 && s.options.skipOnUpstreamSkip) {
      this.setState(id, SKIPPED);
      this.finish(id);
      return;
    }
    const verdict = this.evalTrigger(id, s, ok, skipped, failed);
    if (verdict === RUN) {
      this.setState(id, READY);
      this.heap.push(id);
    } else if (verdict === SKIP) {
      this.setState(id, SKIPPED);
      this.finish(id);
    } else if (verdict === PAUSE) {
      this.setState(id, PAUSED);
    } else {
      if (!this.messages.has(id)) this.messages.set(id, `trigger "${triggerName(s)}" failed (upstream: ${ok} successful, ${skipped} skipped, ${failed} failed)`);
      this.setState(id, TRIGGER_FAILED);
      this.finish(id);
    }
  }

  private evalTrigger(id: number, s: NodeSpec, ok: number, skipped: number, failed: number): number {
    const t = s.options.trigger;
    const succ = ok + skipped; // as in Prefect 1, Skipped is a success
    const total = succ + failed;
    if (t.kind === 'custom') {
      try {
        return t.fn(this.upstreamStates(id)) ? RUN : FAIL;
      } catch (err) {
        if ((err as { name?: unknown } | null)?.name === 'SkipSignal') return SKIP;
        this.messages.set(id, `trigger "${t.name}" threw: ${(err as Error)?.message ?? String(err)}`);
        return FAIL;
      }
    }
    switch (t.name) {
      case 'allSuccessful':
        return failed === 0 ? RUN : FAIL;
      case 'allFailed':
        return succ === 0 ? RUN : FAIL;
      case 'anySuccessful':
        return total === 0 || succ > 0 ? RUN : FAIL;
      case 'anyFailed':
        return total === 0 || failed > 0 ? RUN : FAIL;
      case 'allFinished':
      case 'alwaysRun':
        return RUN;
      case 'notAllSkipped':
        if (total > 0 && skipped === total) return SKIP;
        return failed === 0 ? RUN : FAIL;
      case 'manualOnly':
        return (this.flags[id]! & F_RESUMED) !== 0 ? RUN : PAUSE;
      case 'someSuccessful':
        return within(succ, total, t.atLeast, t.atMost) ? RUN : FAIL;
      case 'someFailed':
        return within(failed, total, t.atLeast, t.atMost) ? RUN : FAIL;
      default:
        throw new SchedulerError(`unknown trigger "${String((t as { name: unknown }).name)}" on task ${this.describe(id)}`);
    }
  }

  /** A mapped node's blocking inputs are in: expand it into children, or end it. */
  private resolveMapped(id: number, s: NodeSpec): void {
    let width = Infinity;
    let skippedBy = '';
    let failedBy = '';
    for (let a = 0; a < s.args.length; a++) {
      const arg = s.args[a]!;
      if (arg.mode !== 'mapped' && arg.mode !== 'flatten') continue;
      if (arg.kind === 'const') {
        if (!Array.isArray(arg.value)) {
          failedBy = `argument ${a} is mapped over a constant that is not a list`;
          break;
        }
        width = Math.min(width, arg.value.length);
        continue;
      }
      const u = arg.node;
      const us = this.state[u]!;
      const uKey = this.nodeSpecs[u]!.key;
      if (us === SKIPPED) {
        skippedBy ||= uKey;
        continue;
      }
      if (arg.mode === 'mapped' && this.nodeSpecs[u]!.mapped) {
        const m = this.maps.get(u);
        if (m === undefined) {
          failedBy ||= `upstream "${uKey}" did not map (${STATE_LABELS[us]})`;
          continue;
        }
        width = Math.min(width, m.width);
        continue;
      }
      if (!isFinished(us) || isFailedLike(us)) {
        failedBy ||= `upstream "${uKey}" ${STATE_LABELS[us]}`;
        continue;
      }
      if (this.nodeSpecs[u]!.mapped && arg.mode === 'flatten') {
        const m = this.maps.get(u);
        if (m !== undefined && m.counts[CLS_FAILED] + m.counts[CLS_SKIPPED] > 0) {
          if (m.counts[CLS_FAILED] > 0) failedBy ||= `upstream "${uKey}" has failed children`;
          else skippedBy ||= uKey;
          continue;
        }
      }
      const len = this.inputLength(id, a);
      if (typeof len === 'string') {
        failedBy ||= len;
        continue;
      }
      width = Math.min(width, len);
    }
    if (skippedBy !== '' && s.options.skipOnUpstreamSkip) {
      this.setState(id, SKIPPED);
      this.finish(id);
      return;
    }
    if (failedBy !== '' || skippedBy !== '') {
      this.messages.set(id, failedBy !== '' ? `cannot map: ${failedBy}` : `cannot map: upstream "${skippedBy}" was skipped`);
      this.setState(id, failedBy.startsWith('upstream') || skippedBy !== '' ? TRIGGER_FAILED : FAILED);
      this.finish(id);
      return;
    }
    if (width === Infinity) width = 0; // no mapped argument at all: nothing to map over
    this.expand(id, s, width);
  }

  private expand(id: number, s: NodeSpec, width: number): void {
    const start = this.size;
    this.ensure(start + width);
    const info: MapInfo = { start, width, open: width, counts: [0, 0, 0] };
    this.maps.set(id, info);
    this.setState(id, MAPPING);
    const nodeId = this.node[id]!;
    const stride = this.nStatic + 1;
    for (let i = 0; i < width; i++) {
      const c = start + i;
      this.node[c] = nodeId;
      this.parent[c] = id;
      this.mapIndex[c] = i;
      if (this.rank.length > 0) this.rank[c] = this.rank[id]!;
      // (map index, static order): child i of every mapped node before child i+1 — depth first.
      this.order[c] = (i + 1) * stride + this.order[id]!;
      this.state[c] = PENDING;
    }
    this.size = start + width;
    this.counts[PENDING]! += width;
    for (let i = 0; i < width; i++) {
      const c = start + i;
      for (const a of s.args) {
        if (a.kind !== 'ref') continue;
        const u = a.node;
        if (a.mode === 'mapped' && this.nodeSpecs[u]!.mapped) this.depend(this.maps.get(u)!.start + i, c);
        else if (a.mode === 'mapped' || a.mode === 'flatten') this.addFinishedCounts(u, c);
        else this.depend(u, c);
      }
      for (const u of s.upstream) this.depend(u, c);
    }
    // Children wired: resolve those with nothing to wait for, then let mapped dependents expand.
    for (let i = 0; i < width; i++) {
      const c = start + i;
      if (this.state[c] === PENDING && this.remaining[c] === 0) this.depsDone(c);
    }
    this.fireExpansion(id);
    if (width === 0 && this.state[id] === MAPPING) {
      this.setState(id, MAPPED);
      this.finish(id);
    }
  }

  /** Make `c` wait for `u` (or count `u` at once if it already finished). */
  private depend(u: number, c: number): void {
    if (isFinished(this.state[u]!)) this.addFinishedCounts(u, c);
    else this.addEdge(u, c, false);
  }

  private ensure(need: number): void {
    if (need <= this.cap) return;
    let cap = this.cap;
    while (cap < need) cap *= 2;
    const grow = <T extends Uint8Array | Uint16Array | Int32Array | Float64Array>(a: T, fill?: number): T => {
      const b = new (a.constructor as new (n: number) => T)(cap * (a.length / this.cap));
      b.set(a);
      if (fill !== undefined) b.fill(fill, a.length);
      return b;
    };
    // `rank` and `lost` may still be empty (not needed yet): they stay empty.
    this.state = grow(this.state);
    this.remaining = grow(this.remaining);
    this.upCounts = grow(this.upCounts);
    this.attempts = grow(this.attempts);
    this.lost = grow(this.lost);
    this.runId = grow(this.runId);
    this.loopCount = grow(this.loopCount);
    this.node = grow(this.node);
    this.mapIndex = grow(this.mapIndex, -1);
    this.parent = grow(this.parent, -1);
    this.flags = grow(this.flags);
    this.rank = grow(this.rank);
    this.order = grow(this.order);
    this.outHead = grow(this.outHead, -1);
    this.cap = cap;
    this.heap.rebind(this.rank, this.order);
  }

  private acquireTags(id: number, tags: Int32Array): boolean {
    for (let k = 0; k < tags.length; k++) {
      const t = tags[k]!;
      if (this.tagRunning[t]! >= this.tagLimit[t]!) {
        this.tagParked[t]!.push(id);
        this.parkedCount++;
        return false;
      }
    }
    for (let k = 0; k < tags.length; k++) this.tagRunning[tags[k]!]!++;
    return true;
  }

  private releaseTags(id: number): void {
    if (this.tagIds === null) return;
    const tags = this.tagIds[this.node[id]!]!;
    for (let k = 0; k < tags.length; k++) {
      const t = tags[k]!;
      this.tagRunning[t]!--;
      const parked = this.tagParked[t]!;
      if (parked.length > 0) {
        // Back into the heap: it is re-parked if another of its tags is still full.
        this.parkedCount -= parked.length;
        for (const p of parked) this.heap.push(p);
        parked.length = 0;
      }
    }
  }

  private checkDone(): void {
    if (this.finished || !this.started) return;
    const c = this.counts;
    if (c[READY]! + c[RUNNING]! + c[RETRYING]! + this.parkedCount > 0) return;
    if (c[PENDING]! + c[MAPPING]! > 0 && c[PAUSED] === 0) {
      // Nothing can move and nothing is paused: a bug (validation rejects cycles before a run).
      throw new SchedulerError(`the run stalled with ${c[PENDING]} pending task(s) and nothing running`);
    }
    this.finished = true;
    const { state, message } = this.runState();
    this.instructions.push({ op: 'done', state, message });
  }

  /** Validate mode: invariants over every task (STYLE #4). */
  private check(): void {
    if (!this.validate) return;
    const counts = new Int32Array(N_STATES);
    for (let id = 0; id < this.size; id++) {
      const s = this.state[id]!;
      counts[s]!++;
      const fail = (why: string): never => {
        throw new SchedulerError(`invariant broken for ${this.describe(id)} (${STATE_LABELS[s]}): ${why}; story:\n  ${this.story(id).join('\n  ')}`);
      };
      if (s === PENDING && this.remaining[id]! <= 0 && this.started) fail('pending with no upstream left');
      if ((s === READY || s === RUNNING || isFinished(s)) && this.remaining[id]! !== 0 && s !== CANCELLED) fail(`remaining=${this.remaining[id]}`);
      if (s === RUNNING && this.runId[id]! <= 0) fail('running without a run id');
      if (s === MAPPING && !this.maps.has(id)) fail('mapping without children');
      const p = this.parent[id]!;
      if (p >= 0 && !this.cancelling && isFinished(this.state[p]!) && !isFinished(s)) fail('parent finished before its child');
      if (s === READY && !this.heap.has(id) && !this.tagParked.some((q) => q.includes(id))) fail('ready but not queued');
    }
    for (let s = 0; s < N_STATES; s++) {
      if (counts[s] !== this.counts[s]) throw new SchedulerError(`state count mismatch for ${STATE_LABELS[s]}: ${this.counts[s]} recorded, ${counts[s]} found`);
    }
  }
}

const RUN = 0;
const FAIL = 1;
const SKIP = 2;
const PAUSE = 3;

function triggerName(s: NodeSpec): string {
  return s.options.trigger.name;
}

/** `someSuccessful`/`someFailed` bounds: integers are counts, values in (0, 1) fractions of the upstream. */
function within(n: number, total: number, atLeast?: number, atMost?: number): boolean {
  const bound = (x: number): number => (x > 0 && x < 1 ? x * total : x);
  if (atLeast !== undefined && n < bound(atLeast)) return false;
  if (atMost !== undefined && n > bound(atMost)) return false;
  return true;
}

