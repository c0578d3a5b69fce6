/**
 * LogBatcher: log entries on their way to the backend, sent in batches.
 *
 * Agents (the output of the processes they started) and flow-run processes (their own
 * lines and their tasks' failures) write many small entries; each `push` only appends
 * to a buffer, and one `writeLogs` call per interval carries everything buffered (at
 * most `maxBatch` entries per call). One write is in flight at a time, so entries reach
 * the server in the order they were pushed.
 *
 * Bounded: while the server is unreachable the buffer keeps the newest `maxBuffered`
 * entries; what it drops is counted per flow run and reported by one warning entry in
 * the next batch that goes out. A batch the server refuses as malformed (a 4xx answer)
 * is dropped rather than retried forever; other failures are retried at the next tick.
 */
import { BackendError, type LogEntry } from '../server/model.ts';

export interface LogBatcherOptions {
  /** Time between writes while entries are buffered (default 200 ms). */
  intervalMs?: number;
  /** Entries per `writeLogs` call (default 500). */
  maxBatch?: number;
  /** Entries kept while the server does not take them (default 10,000); older ones are dropped. */
  maxBuffered?: number;
  /** A write failed (the batch is kept and retried, or dropped when the server refused it). */
  onError?: (err: unknown, dropped: boolean) => void;
}

export class LogBatcher {
  private readonly intervalMs: number;
  private readonly maxBatch: number;
  private readonly maxBuffered: number;
  /** Entries not yet accepted by the server, oldest first. */
  private buf: LogEntry[] = [];
  /** Entries dropped (buffer full) per flow run, reported with the next write. */
  private readonly dropped = new Map<string, number>();
  private timer: NodeJS.Timeout | null = null;
  /** The write in flight (one at a time). */
  private writing: Promise<void> | null = null;
  private closed = false;

  constructor(
    private readonly write: (entries: readonly LogEntry[]) => Promise<void>,
    private readonly opts: LogBatcherOptions = {},
  ) {
    this.intervalMs = opts.intervalMs ?? 200;
    this.maxBatch = opts.maxBatch ?? 500;
    this.maxBuffered = opts.maxBuffered ?? 10_000;
  }

  /** Entries waiting to be written. */
  get pending(): number {
    return this.buf.length;
  }

  push(entry: LogEntry): void {
    if (this.closed) return;
    this.buf.push(entry);
    if (this.buf.length > this.maxBuffered) {
      const over = this.buf.length - this.maxBuffered;
      for (const e of this.buf.splice(0, over)) this.dropped.set(e.flowRunId, (this.dropped.get(e.flowRunId) ?? 0) + 1);
    }
    this.arm();
  }

  /** Write everything buffered now (waits for a write in flight first). Never rejects. */
  async flush(): Promise<void> {
    while (this.writing !== null) await this.writing;
    // Stop after a failed write: the entries stay buffered for the next tick (or close).
    while (this.buf.length > 0 || this.dropped.size > 0) {
      let ok = false;
      this.writing = this.writeOnce().then((r) => {
        ok = r;
      });
      await this.writing;
      this.writing = null;
      if (!ok) break;
    }
  }

  /** Flush, then stop taking entries and release the timer. */
  async close(): Promise<void> {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    await this.flush();
    this.closed = true;
    this.buf = [];
  }

  private arm(): void {
    if (this.timer !== null || this.closed) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.flush().then(() => {
        if (this.buf.length > 0) this.arm();
      });
    }, this.intervalMs);
    // Writers close the batcher explicitly; a pending tick must not keep a process alive.
    this.timer.unref();
  }

  /** One batch; true when the server took it (or refused it for good). */
  private async writeOnce(): Promise<boolean> {
    const counts = [...this.dropped];
    this.dropped.clear();
    const notes = counts.map(([flowRunId, n]): LogEntry => ({
      flowRunId,
      level: 'warn',
      source: 'agent',
      at: Date.now(),
      message: `${n} log lines were dropped: the server did not take them in time`,
    }));
    // Taken out of the buffer while in flight, so that pushes (and drops) meanwhile do not shift it.
    const taken = this.buf.splice(0, Math.max(1, this.maxBatch - notes.length));
    const batch = notes.length === 0 ? taken : [...notes, ...taken];
    if (batch.length === 0) return true;
    try {
      await this.write(batch);
      return true;
    } catch (err) {
      const refused = err instanceof BackendError && err.status >= 400 && err.status < 500 && err.status !== 408 && err.status !== 429;
      if (!refused) {
        // Back to the front, newest kept when over the bound.
        this.buf = taken.concat(this.buf);
        for (const [id, n] of counts) this.dropped.set(id, (this.dropped.get(id) ?? 0) + n);
        const over = this.buf.length - this.maxBuffered;
        if (over > 0) for (const e of this.buf.splice(0, over)) this.dropped.set(e.flowRunId, (this.dropped.get(e.flowRunId) ?? 0) + 1);
      }
      this.opts.onError?.(err, refused);
      return refused;
    }
  }
}
