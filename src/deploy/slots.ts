/**
 * SlotGate: the server's task tag concurrency limits (Prefect 1's task concurrency
 * limits), across every flow-run process and machine.
 *
 * An executor wrapper, so the runner needs no hook: calls of tasks without tags go
 * straight to the inner executor; a call of a tagged task is held here until
 * `acquireTaskSlots(run, taskRun, tags)` grants a slot of every limited tag (tags without
 * a limit on the server always pass), then submitted. Its outcome gives the slots back
 * (`releaseTaskSlots`), as does a cancel while it waits or runs, and the end of the run.
 * A refused acquire is asked again with backoff (0.5 s doubling to 5 s, Prefect 1 queued
 * such task runs and looked again later), as is one that failed to reach the server;
 * waiting calls also ask at once whenever this process gives slots back.
 *
 * Capacity: held calls count against the inner executor's free slots, so a call that
 * gets its slots always has room; if the inner executor reports none at that moment it
 * waits in `ready` and goes with the next outcome.
 *
 * Scope: executors that take task calls (local, pool, a cluster's `asCalls()`). A cluster
 * executor in graph mode hands the whole graph to its scheduler (`runGraph`), which this
 * gate cannot see into: the flow-run process runs a cluster in call mode, behind this
 * gate, when the server limits a tag of the flow's tasks (flow-run.ts).
 */
import type { Executor, ExecutorSession, Outcome, TaskCall } from '../executor/types.ts';
import type { GraphSpec } from '../flow/spec.ts';
import type { Backend } from '../server/model.ts';

/** Node keys of tagged tasks, with their tags. */
export function taggedKeys(spec: GraphSpec): Map<string, readonly string[]> {
  const out = new Map<string, readonly string[]>();
  for (const n of spec.nodes) if (n.kind === 'task' && n.options.tags.length > 0) out.set(n.key, n.options.tags);
  return out;
}

export interface SlotGateOptions {
  readonly backend: Backend;
  readonly flowRunId: string;
  /** Tags by node key (`taggedKeys`). */
  readonly tags: ReadonlyMap<string, readonly string[]>;
  readonly log?: (line: string) => void;
  /** First retry of a refused acquire (default 500 ms) and the longest wait (default 5,000 ms). */
  readonly retryMinMs?: number;
  readonly retryMaxMs?: number;
}

interface Held {
  readonly call: TaskCall;
  readonly slotKey: string;
  readonly tags: readonly string[];
  tries: number;
  timer: NodeJS.Timeout | null;
  /** Dropped (cancelled or shut down) while an acquire was in flight. */
  dropped: boolean;
}

export class SlotGate implements Executor {
  readonly kind: string;
  readonly workers: number;
  private session: ExecutorSession | null = null;
  /** Calls waiting for their slots, by task id. */
  private readonly held = new Map<number, Held>();
  /** Calls holding their slots, waiting for room in the inner executor. */
  private ready: Held[] = [];
  /** Calls holding slots on the inner executor: task id → slot key. */
  private readonly holding = new Map<number, string>();
  private closed = false;

  constructor(
    private readonly inner: Executor,
    private readonly o: SlotGateOptions,
  ) {
    this.kind = inner.kind;
    this.workers = inner.workers;
  }

  async start(session: ExecutorSession): Promise<void> {
    this.session = session;
    await this.inner.start({
      flowName: session.flowName,
      modules: session.modules,
      taskKeys: session.taskKeys,
      parameters: session.parameters,
      onOutcomes: (outcomes) => this.onOutcomes(outcomes),
      resume: () => session.resume?.(),
    });
  }

  freeSlots(): number {
    return this.inner.freeSlots() - this.held.size - this.ready.length;
  }

  submit(calls: TaskCall[]): void {
    let plain: TaskCall[] | null = null;
    for (const call of calls) {
      const tags = this.o.tags.get(call.key);
      if (tags === undefined) {
        (plain ??= []).push(call);
        continue;
      }
      const h: Held = { call, slotKey: `${call.key}[${call.mapIndex}]`, tags, tries: 0, timer: null, dropped: false };
      this.held.set(call.id, h);
      void this.acquire(h);
    }
    if (plain !== null) this.inner.submit(plain);
  }

  cancel(ids: readonly number[]): void {
    const cancelled: Outcome[] = [];
    const rest: number[] = [];
    for (const id of ids) {
      const h = this.held.get(id) ?? this.ready.find((r) => r.call.id === id);
      if (h === undefined) {
        rest.push(id);
        continue;
      }
      this.drop(h);
      cancelled.push({ id, runId: h.call.runId, status: 'cancelled', error: { name: 'CancelledError', message: 'cancelled while waiting for a task tag slot' }, startMs: 0, endMs: 0 });
    }
    if (rest.length > 0) this.inner.cancel(rest);
    // Delivered on a later turn, like an executor's own cancel outcomes (the runner is inside its pump now).
    if (cancelled.length > 0) setImmediate(() => this.session?.onOutcomes(cancelled));
  }

  async shutdown(): Promise<void> {
    this.closed = true;
    for (const h of [...this.held.values(), ...this.ready]) this.drop(h);
    const holding = [...this.holding.values()];
    this.holding.clear();
    await Promise.all([this.inner.shutdown(), ...holding.map((k) => this.release(k))]);
  }

  async close(): Promise<void> {
    await this.inner.close?.();
  }

  private onOutcomes(outcomes: Outcome[]): void {
    for (const o of outcomes) {
      const key = this.holding.get(o.id);
      if (key === undefined) continue;
      this.holding.delete(o.id);
      void this.release(key);
    }
    this.session?.onOutcomes(outcomes);
    this.pumpReady();
  }

  private async acquire(h: Held): Promise<void> {
    let granted = false;
    try {
      granted = await this.o.backend.acquireTaskSlots(this.o.flowRunId, h.slotKey, h.tags);
    } catch (err) {
      if (h.tries === 0) this.o.log?.(`cannot take a tag slot for ${h.slotKey} (retrying): ${(err as Error).message}`);
    }
    if (h.dropped || this.closed) {
      if (granted) void this.release(h.slotKey);
      return;
    }
    if (!granted) {
      if (h.tries === 0) this.o.log?.(`task ${h.slotKey} waits for a slot of its tags [${h.tags.join(', ')}]`);
      const min = this.o.retryMinMs ?? 500;
      const wait = Math.min(min * 2 ** h.tries, this.o.retryMaxMs ?? 5_000);
      h.tries++;
      h.timer = setTimeout(() => {
        h.timer = null;
        void this.acquire(h);
      }, wait);
      return;
    }
    this.held.delete(h.call.id);
    this.ready.push(h);
    this.pumpReady();
  }

  private pumpReady(): void {
    while (this.ready.length > 0 && this.inner.freeSlots() > 0) {
      const h = this.ready.shift()!;
      this.holding.set(h.call.id, h.slotKey);
      this.inner.submit([h.call]);
    }
  }

  private drop(h: Held): void {
    h.dropped = true;
    if (h.timer !== null) clearTimeout(h.timer);
    h.timer = null;
    this.held.delete(h.call.id);
    const i = this.ready.indexOf(h);
    if (i >= 0) {
      this.ready.splice(i, 1);
      void this.release(h.slotKey);
    }
  }

  private async release(slotKey: string): Promise<void> {
    try {
      await this.o.backend.releaseTaskSlots(this.o.flowRunId, slotKey);
    } catch (err) {
      this.o.log?.(`cannot give back the tag slots of ${slotKey}: ${(err as Error).message}`);
      return;
    }
    // A slot this process gave back may be the one its own waiting calls want: ask now, not at their backoff.
    if (this.closed) return;
    for (const h of this.held.values()) {
      if (h.timer === null) continue;
      clearTimeout(h.timer);
      h.timer = null;
      void this.acquire(h);
    }
  }
}
