/**
 * A minimal tar writer (POSIX ustar, with pax headers for long names): the build contexts
 * and root filesystems weft sends to the Docker Engine API (`POST /build`,
 * `POST /images/create?fromSrc=-`).
 *
 * Entries are written as given: no directory walking, no globbing. Owner and group are
 * 0 and the default mtime is 0, so the same entries always give the same bytes (an image
 * tag can then be a hash of the context). Format per POSIX.1-2001 `pax` (ustar header
 * layout, `x` extended headers); a reader such as GNU tar or Docker's archive package
 * reads it.
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { Readable } from 'node:stream';

export type TarEntry =
  /** A file from memory. */
  | { readonly type: 'file'; readonly name: string; readonly data: Uint8Array | string; readonly mode?: number; readonly mtime?: number }
  /** A file read from `source` on this machine while the archive streams (its size is read first). */
  | { readonly type: 'file'; readonly name: string; readonly source: string; readonly mode?: number; readonly mtime?: number }
  | { readonly type: 'dir'; readonly name: string; readonly mode?: number; readonly mtime?: number }
  | { readonly type: 'symlink'; readonly name: string; readonly target: string; readonly mtime?: number };

const BLOCK = 512;
/** The largest size an 11-digit octal field holds (8 GiB - 1). */
const MAX_SIZE = 0o77777777777;
const enc = new TextEncoder();

/** Header blocks (pax + ustar) for one entry of `size` bytes. */
function headers(e: TarEntry, size: number): Uint8Array {
  const typeflag = e.type === 'file' ? '0' : e.type === 'dir' ? '5' : '2';
  let name = e.name.replace(/^\/+/, '');
  if (e.type === 'dir' && !name.endsWith('/')) name += '/';
  if (name === '' || name === '/') name = './';
  if (size > MAX_SIZE) throw new RangeError(`tar: ${e.name} is ${size} bytes, over the ustar limit of 8 GiB`);
  const mode = e.type === 'symlink' ? 0o777 : (e.mode ?? (e.type === 'dir' ? 0o755 : 0o644));
  const mtime = Math.max(0, Math.floor(e.mtime ?? 0));
  const link = e.type === 'symlink' ? e.target : '';

  const pax: string[] = [];
  const split = splitName(name);
  if (split === null) pax.push(paxRecord('path', name));
  if (enc.encode(link).length > 100) pax.push(paxRecord('linkpath', link));

  const main = ustar({
    name: split?.name ?? name.slice(-100),
    prefix: split?.prefix ?? '',
    mode,
    size,
    mtime,
    typeflag,
    linkname: pax.some((r) => r.includes(' linkpath=')) ? '' : link,
  });
  if (pax.length === 0) return main;
  const body = enc.encode(pax.join(''));
  const x = ustar({ name: 'PaxHeaders/' + (split?.name ?? name).slice(-80), prefix: '', mode: 0o644, size: body.length, mtime, typeflag: 'x', linkname: '' });
  const out = new Uint8Array(x.length + padded(body.length) + main.length);
  out.set(x, 0);
  out.set(body, x.length);
  out.set(main, x.length + padded(body.length));
  return out;
}

/** `name` as ustar's prefix (≤ 155 bytes) and name (≤ 100 bytes), split at a slash; null when it does not fit. */
function splitName(name: string): { prefix: string; name: string } | null {
  if (enc.encode(name).length <= 100) return { prefix: '', name };
  for (let i = name.indexOf('/'); i !== -1 && i < name.length - 1; i = name.indexOf('/', i + 1)) {
    const prefix = name.slice(0, i);
    const rest = name.slice(i + 1);
    if (enc.encode(prefix).length <= 155 && enc.encode(rest).length <= 100) return { prefix, name: rest };
  }
  return null;
}

/** One pax record, `"<len> key=value\n"`, where `<len>` counts the whole record including its own digits. */
function paxRecord(key: string, value: string): string {
  const rest = ` ${key}=${value}\n`;
  const restLen = enc.encode(rest).length;
  let len = restLen + 1;
  while (String(len).length + restLen !== len) len = String(len).length + restLen;
  return `${len}${rest}`;
}

function ustar(h: { name: string; prefix: string; mode: number; size: number; mtime: number; typeflag: string; linkname: string }): Uint8Array {
  const b = new Uint8Array(BLOCK);
  const put = (off: number, len: number, s: string): void => {
    const bytes = enc.encode(s);
    b.set(bytes.subarray(0, len), off);
  };
  const octal = (off: number, len: number, n: number): void => put(off, len, n.toString(8).padStart(len - 1, '0') + '\0');
  put(0, 100, h.name);
  octal(100, 8, h.mode);
  octal(108, 8, 0);
  octal(116, 8, 0);
  octal(124, 12, h.size);
  octal(136, 12, h.mtime);
  put(148, 8, '        ');
  put(156, 1, h.typeflag);
  put(157, 100, h.linkname);
  put(257, 6, 'ustar\0');
  put(263, 2, '00');
  put(345, 155, h.prefix);
  let sum = 0;
  for (const byte of b) sum += byte;
  put(148, 8, sum.toString(8).padStart(6, '0') + '\0 ');
  return b;
}

const padded = (n: number): number => Math.ceil(n / BLOCK) * BLOCK;
const padding = (n: number): Uint8Array => new Uint8Array(padded(n) - n);
/** Two zero blocks end an archive. */
const TRAILER = new Uint8Array(BLOCK * 2);

function bytesOf(e: TarEntry & { data: Uint8Array | string }): Uint8Array {
  return typeof e.data === 'string' ? enc.encode(e.data) : e.data;
}

/** An archive of in-memory entries (`source` files are not allowed here: use `tarStream`). */
export function tarBytes(entries: Iterable<TarEntry>): Uint8Array {
  const parts: Uint8Array[] = [];
  for (const e of entries) {
    if (e.type === 'file' && !('data' in e)) throw new TypeError(`tarBytes: ${e.name} names a source file; use tarStream`);
    const data = e.type === 'file' ? bytesOf(e as TarEntry & { data: Uint8Array | string }) : new Uint8Array(0);
    parts.push(headers(e, data.length), data, padding(data.length));
  }
  parts.push(TRAILER);
  return Buffer.concat(parts);
}

/**
 * An archive as a stream: `source` files are read as it is consumed, so a root filesystem
 * of hundreds of megabytes never sits in memory. A source file whose size changes while
 * it is read fails the stream.
 */
export function tarStream(entries: Iterable<TarEntry> | AsyncIterable<TarEntry>): Readable {
  async function* gen(): AsyncGenerator<Uint8Array> {
    for await (const e of entries) {
      if (e.type !== 'file') {
        yield headers(e, 0);
        continue;
      }
      if ('data' in e) {
        const data = bytesOf(e);
        yield headers(e, data.length);
        yield data;
        yield padding(data.length);
        continue;
      }
      const st = await stat(e.source);
      yield headers({ ...e, mode: e.mode ?? st.mode & 0o7777 }, st.size);
      let read = 0;
      for await (const chunk of createReadStream(e.source)) {
        const c = chunk as Buffer;
        read += c.length;
        if (read > st.size) break;
        yield c;
      }
      if (read !== st.size) throw new Error(`tar: ${e.source} changed size while it was read (${st.size} → ${read} bytes)`);
      yield padding(st.size);
    }
    yield TRAILER;
  }
  return Readable.from(gen(), { objectMode: false });
}
