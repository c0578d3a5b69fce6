/**
 * The flow-run process's console: what it (and its tasks) print, and who ships it to
 * the run's logs.
 *
 * One owner per line. When an agent reads the process's pipes (LocalAgent sets
 * WEFT_OUTPUT_FORWARDED=1), the agent ships stdout and stderr, and this process only
 * passes its output through. Otherwise (a container whose logs nobody forwards, a run
 * started by hand) this process ships its own console: `process.stdout.write` and
 * `process.stderr.write` are wrapped for the run, and every complete line also goes to
 * `onLine`. Worker threads' output passes through the main thread's streams, so a pool's
 * tasks are covered; an in-process task's `console.log` is too.
 *
 * A forwarding agent that goes away (its end of the pipe closes: EPIPE) hands the
 * shipping over: from then on lines go to `onLine` here, and writes to the dead pipe are
 * dropped instead of crashing the process.
 */

type Write = typeof process.stdout.write;
export type StreamName = 'stdout' | 'stderr';

/** Longest line shipped whole; longer ones are cut. */
const MAX_LINE = 8_192;

export class ConsoleCapture {
  private readonly originals = new Map<StreamName, Write>();
  private readonly partial: Record<StreamName, string> = { stdout: '', stderr: '' };
  /** Lines go to `onLine` (not forwarded by an agent, or the agent went away). */
  private shipping: boolean;
  private active = false;

  constructor(
    private readonly onLine: (stream: StreamName, line: string) => void,
    forwarded: boolean,
  ) {
    this.shipping = !forwarded;
  }

  /** Whether this process ships its console lines itself (rather than an agent). */
  get ships(): boolean {
    return this.shipping;
  }

  start(): void {
    if (this.active) return;
    this.active = true;
    for (const name of ['stdout', 'stderr'] as const) {
      const stream = process[name];
      const original = stream.write;
      this.originals.set(name, original);
      const take = (chunk: unknown): void => this.take(name, chunk);
      stream.write = function write(this: NodeJS.WriteStream, chunk: unknown, ...rest: unknown[]): boolean {
        take(chunk);
        return (original as (...a: unknown[]) => boolean).call(this, chunk, ...rest);
      } as Write;
      const onError = (err: NodeJS.ErrnoException): void => {
        // The reader went away: take the shipping over, and keep running.
        if (err.code === 'EPIPE' || err.code === 'ERR_STREAM_DESTROYED') this.shipping = true;
      };
      stream.on('error', onError);
    }
  }

  /** Write past the capture (the process's own lines, already shipped as structured entries). */
  writeRaw(stream: StreamName, text: string): void {
    const w = this.originals.get(stream) ?? process[stream].write;
    try {
      (w as (s: string) => boolean).call(process[stream], text);
    } catch {
      // a closed stream: the line is in the logs already
    }
  }

  /** Restore the streams; a last partial line is shipped. */
  stop(): void {
    if (!this.active) return;
    this.active = false;
    for (const [name, original] of this.originals) {
      process[name].write = original;
      // The error handler stays: a write after the agent left must not crash the exit.
      const rest = this.partial[name];
      this.partial[name] = '';
      if (rest !== '' && this.shipping) this.emit(name, rest);
    }
    this.originals.clear();
  }

  private take(name: StreamName, chunk: unknown): void {
    if (!this.shipping) return;
    const text = typeof chunk === 'string' ? chunk : chunk instanceof Uint8Array ? Buffer.from(chunk).toString('utf8') : String(chunk);
    const all = this.partial[name] + text;
    const lines = all.split('\n');
    this.partial[name] = lines.pop() ?? '';
    if (this.partial[name].length > MAX_LINE) {
      this.emit(name, this.partial[name]);
      this.partial[name] = '';
    }
    for (const l of lines) this.emit(name, l.endsWith('\r') ? l.slice(0, -1) : l);
  }

  private emit(name: StreamName, line: string): void {
    this.onLine(name, line.length > MAX_LINE ? `${line.slice(0, MAX_LINE)}… (${line.length - MAX_LINE} more characters)` : line);
  }
}
