/**
 * The two stream formats of the Docker Engine API:
 *
 * - JSON messages, one per line (`POST /build`, `/images/create`, `/images/{name}/push`,
 *   `GET /events`): `jsonMessages` parses them as they arrive.
 * - A container's multiplexed output (`GET /containers/{id}/logs`, `attach`, when the
 *   container has no TTY): each frame is an 8-byte header — stream type (0 stdin,
 *   1 stdout, 2 stderr), three zero bytes, payload size as a big-endian uint32 — then
 *   the payload. `LogDemuxer` cuts a byte stream into frames whatever the chunking.
 */

export type LogStream = 'stdin' | 'stdout' | 'stderr';

export interface LogFrame {
  readonly stream: LogStream;
  readonly data: Buffer;
}

const STREAMS: readonly LogStream[] = ['stdin', 'stdout', 'stderr'];
const HEADER = 8;

/** Frames out of a multiplexed byte stream; feed chunks with `push`, then call `end`. */
export class LogDemuxer {
  /** Bytes received and not yet part of a whole frame (joined only once a frame is complete). */
  private chunks: Buffer[] = [];
  private length = 0;
  /** Bytes needed before the next frame can be cut: its header, then header and payload. */
  private need = HEADER;

  push(chunk: Uint8Array): LogFrame[] {
    if (chunk.byteLength === 0) return [];
    this.chunks.push(Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength));
    this.length += chunk.byteLength;
    if (this.length < this.need) return [];
    const buf = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks, this.length);
    const out: LogFrame[] = [];
    let off = 0;
    while (buf.length - off >= HEADER) {
      const size = buf.readUInt32BE(off + 4);
      if (buf.length - off < HEADER + size) break;
      // Type 3 (the daemon's own error, sent when the stream breaks) is reported as stderr.
      out.push({ stream: STREAMS[buf[off]!] ?? 'stderr', data: buf.subarray(off + HEADER, off + HEADER + size) });
      off += HEADER + size;
    }
    const rest = buf.subarray(off);
    this.chunks = rest.length === 0 ? [] : [rest];
    this.length = rest.length;
    this.need = rest.length >= HEADER ? HEADER + rest.readUInt32BE(4) : HEADER;
    return out;
  }

  /** Throws when the stream ended inside a frame. */
  end(): void {
    if (this.length > 0) throw new Error(`docker log stream ended inside a frame (${this.length} bytes left over)`);
  }
}

/** Frames of a multiplexed stream. */
export async function* demuxLogs(source: AsyncIterable<Uint8Array>): AsyncGenerator<LogFrame> {
  const d = new LogDemuxer();
  for await (const chunk of source) yield* d.push(chunk);
  d.end();
}

/** A TTY container's output is not multiplexed: all of it is stdout. */
export async function* rawLogs(source: AsyncIterable<Uint8Array>): AsyncGenerator<LogFrame> {
  for await (const chunk of source) yield { stream: 'stdout', data: Buffer.from(chunk) };
}

/** JSON values from a stream of newline-separated JSON messages (blank lines skipped). */
export async function* jsonMessages<T = Record<string, unknown>>(source: AsyncIterable<Uint8Array | string>): AsyncGenerator<T> {
  const decoder = new TextDecoder();
  let text = '';
  for await (const chunk of source) {
    text += typeof chunk === 'string' ? chunk : decoder.decode(chunk, { stream: true });
    let nl: number;
    while ((nl = text.indexOf('\n')) !== -1) {
      const line = text.slice(0, nl).trim();
      text = text.slice(nl + 1);
      if (line !== '') yield parse<T>(line);
    }
  }
  text += decoder.decode();
  if (text.trim() !== '') yield parse<T>(text.trim());
}

function parse<T>(line: string): T {
  try {
    return JSON.parse(line) as T;
  } catch {
    throw new Error(`the Docker daemon sent a line that is not JSON: ${line.slice(0, 200)}`);
  }
}
