/**
 * Run progress for the terminal.
 *
 * The renderers are pure (a `RunProgress` in, one line out) so tests can check them
 * directly. `ProgressReporter` is the thin shell: on a TTY it redraws one line in place
 * (carriage return + erase-to-end-of-line); elsewhere (CI logs, pipes) it prints plain
 * lines at most once per `plainIntervalMs`, plus one at the start and one at the end, so
 * a log never fills with redraw noise.
 */
import type { RunProgress } from '../runner/types.ts';

/** `850ms`, `1.24s`, `2m05s`, `1h02m`. */
export function formatDuration(ms: number): string {
  if (!Number.isFinite(ms) || ms < 0) ms = 0;
  if (ms < 1000) return `${Math.round(ms)}ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(2)}s`;
  const totalS = Math.floor(ms / 1000);
  if (totalS < 3600) return `${Math.floor(totalS / 60)}m${String(totalS % 60).padStart(2, '0')}s`;
  return `${Math.floor(totalS / 3600)}h${String(Math.floor((totalS % 3600) / 60)).padStart(2, '0')}m`;
}

/** Tasks per second: one decimal below 100, whole numbers above. */
export function formatRate(rate: number): string {
  if (!Number.isFinite(rate) || rate < 0) rate = 0;
  return rate < 100 ? rate.toFixed(1) : String(Math.round(rate));
}

function counters(p: RunProgress): string {
  const parts = [`${p.running} running`, `${p.failed} failed`];
  if (p.skipped > 0) parts.push(`${p.skipped} skipped`);
  parts.push(`${formatRate(p.rate)} tasks/s`, formatDuration(p.elapsedMs));
  return parts.join(' · ');
}

/**
 * The TTY line: `[██████░░░░░░]  12/40  3 running · 0 failed · 25.3 tasks/s · 1.20s`.
 * `width` is the terminal width; the bar shrinks to fit (and disappears when there is no room).
 */
export function renderProgressBar(p: RunProgress, width = 80): string {
  const count = `${p.done}/${p.total}`;
  const tail = `  ${count}  ${counters(p)}`;
  const barWidth = Math.min(30, width - tail.length - 3);
  if (barWidth < 5) return tail.trimStart().slice(0, Math.max(0, width - 1));
  const frac = p.total > 0 ? Math.min(1, p.done / p.total) : 0;
  const filled = Math.round(frac * barWidth);
  return `[${'█'.repeat(filled)}${'░'.repeat(barWidth - filled)}]${tail}`;
}

/** The plain (non-TTY) line: `progress: 12/40 done · 3 running · 0 failed · 25.3 tasks/s · 1.20s`. */
export function renderProgressLine(p: RunProgress): string {
  return `progress: ${p.done}/${p.total} done · ${counters(p)}`;
}

/** What the reporter writes to: a stream, or a fake in tests. */
export interface ProgressSink {
  write(chunk: string): unknown;
  readonly isTTY?: boolean;
  readonly columns?: number;
}

export interface ProgressReporterOptions {
  /** Force TTY or plain mode (default: `sink.isTTY`). */
  tty?: boolean;
  /** Minimum gap between plain lines. Default 1000. */
  plainIntervalMs?: number;
  /** Minimum gap between TTY redraws. Default 80 (onProgress itself is throttled by the runner). */
  ttyIntervalMs?: number;
  now?: () => number;
}

export class ProgressReporter {
  private readonly tty: boolean;
  private readonly plainIntervalMs: number;
  private readonly ttyIntervalMs: number;
  private readonly now: () => number;
  /** Time of the last line/redraw written; -Infinity before the first. */
  private lastWriteAt = -Infinity;
  /** Latest progress seen (the end line uses it when no final update arrives). */
  private last: RunProgress | null = null;
  /** True while a TTY line is on screen without its newline. */
  private lineOpen = false;
  private finished = false;

  constructor(
    private readonly sink: ProgressSink,
    opts: ProgressReporterOptions = {},
  ) {
    this.tty = opts.tty ?? sink.isTTY === true;
    this.plainIntervalMs = opts.plainIntervalMs ?? 1000;
    this.ttyIntervalMs = opts.ttyIntervalMs ?? 80;
    this.now = opts.now ?? Date.now;
  }

  /** The start line (both modes). */
  start(message: string): void {
    this.sink.write(`${message}\n`);
    // Plain mode counts the start line as a line: the next one comes an interval later.
    if (!this.tty) this.lastWriteAt = this.now();
  }

  /** Feed a progress snapshot (from `RunOptions.onProgress`). */
  update(p: RunProgress): void {
    if (this.finished) return;
    this.last = p;
    const t = this.now();
    if (this.tty) {
      if (t - this.lastWriteAt < this.ttyIntervalMs) return;
      this.redraw(p);
    } else {
      if (t - this.lastWriteAt < this.plainIntervalMs) return;
      this.sink.write(`${renderProgressLine(p)}\n`);
    }
    this.lastWriteAt = t;
  }

  /** Print a message without tearing the TTY bar (it is redrawn after). */
  log(message: string): void {
    if (this.tty && this.lineOpen) {
      this.sink.write(`\r\x1b[K${message}\n`);
      this.lineOpen = false;
      if (this.last !== null && !this.finished) this.redraw(this.last);
    } else {
      this.sink.write(`${message}\n`);
    }
  }

  /** The end: final bar (TTY, closed with a newline) or final plain line. Idempotent. */
  finish(p?: RunProgress): void {
    if (this.finished) return;
    this.finished = true;
    const final = p ?? this.last;
    if (this.tty) {
      if (final !== null) this.redraw(final);
      if (this.lineOpen) this.sink.write('\n');
      this.lineOpen = false;
    } else if (final !== null) {
      this.sink.write(`${renderProgressLine(final)}\n`);
    }
  }

  private redraw(p: RunProgress): void {
    // A pty without a window size (CI's `script`, some IDE terminals) reports 0 columns.
    const cols = this.sink.columns ?? 0;
    const width = cols > 0 ? cols : 80;
    this.sink.write(`\r${renderProgressBar(p, width)}\x1b[K`);
    this.lineOpen = true;
  }
}
