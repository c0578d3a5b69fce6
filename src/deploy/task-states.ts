/**
 * TaskStateWriter: a flow-run process's task states on their way to the backend.
 *
 * The runner reports every transition (`onTaskState`, synchronous, on its hot path), so
 * `record` only notes the newest state per task run; a timer sends what changed since
 * the last write in one `setTaskRunStates` call (every `intervalMs`, default 150 ms, and
 * once more at `close`). A task run that went Pending → Running → Success between two
 * writes is written once, as Success, with its start and end times.
 *
 * Ownership (optimistic concurrency): each write names the version this process last
 * saw of that task run (0 for one it has not seen; the versions of an earlier attempt's
 * task runs come from `getTaskRuns` at the start). A refused write means another process
 * wrote that task run since: this process no longer holds the run, and `onLost` tells
 * the owner to stop it (fail-safe: two processes never both believe they run a task).
 *
 * One write is in flight at a time. A write that fails for another reason (the server is
 * unreachable) keeps its updates for the next tick, merged under any newer state of the
 * same task run.
 */
import type { TaskStateName } from '../flow/spec.ts';
import type { TaskStateEvent } from '../runner/types.ts';
import { FINISHED_STATE_NAMES } from '../scheduler/states.ts';
import { BackendError, type Backend, type TaskRun, type TaskRunUpdate } from '../server/model.ts';


export interface TaskStateWriterOptions {
  /** Default 150 ms. */
  intervalMs?: number;
  /** Updates per call (default 1,000). */
  maxBatch?: number;
  /** A write was refused: another process holds this task run. Called once. */
  onLost(reason: string): void;
  /** A write failed and will be retried. */
  onError?(err: unknown): void;
}

/** The newest unwritten state of one task run. */
interface Pending {
  key: string;
  mapIndex: number;
  state: TaskStateName;
  attempts?: number;
  startedAt?: number;
  endedAt?: number;
  message?: string;
}

const idOf = (key: string, mapIndex: number): string => `${key}\u0000${mapIndex}`;

export class TaskStateWriter {
  private readonly intervalMs: number;
  private readonly maxBatch: number;
  /** Version of each task run as this process last saw it (absent: never seen, 0). */
  private readonly versions = new Map<string, number>();
  private pending = new Map<string, Pending>();
  private timer: NodeJS.Timeout | null = null;
  private writing: Promise<void> | null = null;
  private lost: string | null = null;
  private closed = false;
  /** Task runs written (accepted by the server), for the process's summary. */
  written = 0;

  constructor(
    private readonly backend: Backend,
    private readonly flowRunId: string,
    private readonly processId: string,
    known: readonly TaskRun[],
    private readonly opts: TaskStateWriterOptions,
  ) {
    this.intervalMs = opts.intervalMs ?? 150;
    this.maxBatch = opts.maxBatch ?? 1_000;
    for (const t of known) this.versions.set(idOf(t.key, t.mapIndex), t.version);
  }

  /** Why this process lost the run (null while it holds it). */
  get lostReason(): string | null {
    return this.lost;
  }

  /** The runner's `onTaskState`. */
  record(e: TaskStateEvent): void {
    if (this.closed || this.lost !== null) return;
    const id = idOf(e.key, e.mapIndex);
    let p = this.pending.get(id);
    if (p === undefined) {
      p = { key: e.key, mapIndex: e.mapIndex, state: e.to };
      this.pending.set(id, p);
    } else p.state = e.to;
    if (e.attempt !== undefined && e.attempt > 0) p.attempts = e.attempt;
    if (e.to === 'Running') p.startedAt = Math.round(e.at);
    if (FINISHED_STATE_NAMES.has(e.to)) p.endedAt = Math.round(e.at);
    this.arm();
  }

  /** A final state with its message (the runner's records carry errors that transitions do not). */
  note(key: string, mapIndex: number, state: TaskStateName, message: string): void {
    if (this.closed || this.lost !== null) return;
    const id = idOf(key, mapIndex);
    const p = this.pending.get(id) ?? { key, mapIndex, state };
    p.state = state;
    p.message = message;
    this.pending.set(id, p);
    this.arm();
  }

  /** Write everything noted so far. Never rejects. */
  async flush(): Promise<void> {
    while (this.writing !== null) await this.writing;
    while (this.pending.size > 0 && this.lost === null) {
      let ok = false;
      this.writing = this.writeOnce().then((r) => {
        ok = r;
      });
      await this.writing;
      this.writing = null;
      if (!ok) return;
    }
  }

  /** Final write, then no more. */
  async close(): Promise<void> {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    await this.flush();
    this.closed = true;
  }

  /** Drop what is not written and write nothing more (the run is not this process's any longer). */
  abandon(): void {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.pending.clear();
    this.closed = true;
  }

  private arm(): void {
    if (this.timer !== null) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.flush().then(() => {
        if (this.pending.size > 0 && !this.closed && this.lost === null) this.arm();
      });
    }, this.intervalMs);
    this.timer.unref();
  }

  /** One call with up to maxBatch updates; false when it failed (they stay pending). */
  private async writeOnce(): Promise<boolean> {
    const batch: [string, Pending][] = [];
    for (const entry of this.pending) {
      batch.push(entry);
      if (batch.length >= this.maxBatch) break;
    }
    for (const [id] of batch) this.pending.delete(id);
    const updates: TaskRunUpdate[] = batch.map(([id, p]) => {
      const u: { -readonly [K in keyof TaskRunUpdate]: TaskRunUpdate[K] } = {
        key: p.key,
        mapIndex: p.mapIndex,
        state: p.state,
        expectVersion: this.versions.get(id) ?? 0,
      };
      if (p.attempts !== undefined) u.attempts = p.attempts;
      if (p.startedAt !== undefined) u.startedAt = p.startedAt;
      if (p.endedAt !== undefined) u.endedAt = p.endedAt;
      if (p.message !== undefined) u.message = p.message;
      return u;
    });
    try {
      const results = await this.backend.setTaskRunStates(this.flowRunId, this.processId, updates);
      for (const r of results) {
        const id = idOf(r.key, r.mapIndex);
        if (r.ok) {
          this.versions.set(id, r.version);
          this.written++;
        } else {
          this.versions.set(id, r.version);
          this.loseRun(`task run ${r.key}${r.mapIndex >= 0 ? `[${r.mapIndex}]` : ''} was written by another process (version ${r.version})`);
        }
      }
      return true;
    } catch (err) {
      if (err instanceof BackendError && (err.code === 'CONFLICT' || err.status === 409)) {
        this.loseRun(`the server refused this process's task states: ${err.message}`);
        return false;
      }
      // Back in, under anything newer noted meanwhile.
      for (const [id, old] of batch) {
        const newer = this.pending.get(id);
        if (newer === undefined) this.pending.set(id, old);
        else {
          newer.startedAt ??= old.startedAt;
          newer.attempts ??= old.attempts;
        }
      }
      this.opts.onError?.(err);
      return false;
    }
  }

  private loseRun(reason: string): void {
    if (this.lost !== null) return;
    this.lost = reason;
    this.pending.clear();
    this.opts.onLost(reason);
  }
}
