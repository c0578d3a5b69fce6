/**
 * Results a cluster worker holds for the scheduler, and how results travel as bytes.
 *
 * - A result is packed once, by the worker that made it (`packValue`), and those bytes
 *   are what moves: peers, the scheduler's relay and acquiring workers receive them as
 *   they are, never re-encoded in transit. The maker also keeps the unpacked value, so
 *   that a consumer on the same worker pays nothing.
 * - Spilling (Dask's "spill to disk" at the memory target): `spill()` writes the least
 *   recently used entries to files in a private directory and drops both the bytes and
 *   the value from memory; `bytes()` / `value()` read them back on demand without
 *   keeping them in memory again.
 */
import { mkdir, mkdtemp, readFile, rm, rmdir, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Packr, Unpackr } from 'msgpackr';

// Results use their own pair. The bytes are read by other processes long after, outside
// any connection, so they must not depend on per-connection state: record structures
// (which tell a plain object from a Map) are written inline and forgotten after each
// value (`structures = []` on both sides). moreTypes keeps typed arrays, ArrayBuffers,
// Sets, Dates and Errors what they were; mapsAsObjects: false keeps a Map a Map.
const RESULT_OPTIONS = { useRecords: true, sequential: true, moreTypes: true, copyBuffers: true } as const;
const resultPackr = new Packr({
  ...RESULT_OPTIONS,
  // msgpackr would write a function as `undefined` without a word; a result that holds
  // one must fail as it does on a thread pool (structured clone refuses it).
  writeFunction: (): never => {
    throw new TypeError('a function cannot be sent');
  },
});
const resultUnpackr = new Unpackr({ ...RESULT_OPTIONS, mapsAsObjects: false });

type WithStructures = { structures: unknown[] };

/**
 * A result as msgpack bytes of its own. Throws what msgpackr throws for a value it
 * cannot pack. The bytes are copied out of msgpackr's shared slab (a view would pin it).
 */
export function packValue(value: unknown): Uint8Array {
  (resultPackr as unknown as WithStructures).structures = [];
  const view = resultPackr.pack(value);
  const out = new Uint8Array(view.byteLength);
  out.set(view);
  return out;
}

/** A result back from its bytes (`packValue`'s inverse). */
export function unpackValue(bytes: Uint8Array): unknown {
  (resultUnpackr as unknown as WithStructures).structures = [];
  return resultUnpackr.unpack(bytes);
}

/** `Entry.bytes` of a result held unpacked (a string: see `putString`). */
const UNPACKED = new Uint8Array(0);

/** Exact msgpack size of a string: its UTF-8 bytes plus the str header. */
export function packedStringBytes(v: string): number {
  const n = Buffer.byteLength(v, 'utf8');
  return n + (n < 32 ? 1 : n < 256 ? 2 : n < 65536 ? 3 : 5);
}

/** One held result. Invariant: `bytes !== null || file !== null`; `hasValue` only while `bytes !== null`. */
interface Entry {
  /** Packed result while in memory (`UNPACKED` until first needed); null once spilled. */
  bytes: Uint8Array | null;
  /** The unpacked value, when known (the maker's own object, or unpacked on first use). */
  value: unknown;
  hasValue: boolean;
  /** Packed size (constant). */
  readonly nbytes: number;
  /** Spill file, once written. */
  file: string | null;
  /** A spill write is in flight for it. */
  spilling: boolean;
}

export interface WorkerStoreOptions {
  /** Directory under which a private spill directory is created on first spill. */
  readonly spillDir: string;
  /** Remove `spillDir` itself on close too, when it ends up empty (it was made for this process). */
  readonly removeSpillDir?: boolean;
}

export type Lookup = { readonly found: true; readonly value: unknown } | { readonly found: false };

export class WorkerStore {
  /** Key → entry, least recently used first (touching re-inserts). */
  private readonly entries = new Map<string, Entry>();
  /** Bytes of results in memory. Invariant: sum of `nbytes` of entries with `bytes !== null`. */
  private memBytes = 0;
  /** Entries in memory. */
  private memCount = 0;
  /** Bytes of results only on disk. Invariant: sum of `nbytes` of entries with `bytes === null`. */
  private diskBytes = 0;
  /** The private spill directory, once made. */
  private dir: Promise<string> | null = null;
  private seq = 0;
  private closed = false;

  constructor(private readonly options: WorkerStoreOptions) {}

  /** Bytes held in memory. */
  get heldBytes(): number {
    return this.memBytes;
  }

  /** Results held in memory. */
  get heldCount(): number {
    return this.memCount;
  }

  /** Bytes held on disk only. */
  get spilledBytes(): number {
    return this.diskBytes;
  }

  /** Results held, in memory or on disk. */
  get size(): number {
    return this.entries.size;
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  keys(): IterableIterator<string> {
    return this.entries.keys();
  }

  /**
   * Hold a string result without packing it yet: its packed size is known exactly, and
   * most held results are consumed on this worker and never packed at all. It is packed
   * the first time its bytes are needed (a peer asks, or it is spilled).
   */
  putString(key: string, value: string): void {
    this.delete(key);
    const nbytes = packedStringBytes(value);
    this.entries.set(key, { bytes: UNPACKED, value, hasValue: true, nbytes, file: null, spilling: false });
    this.memBytes += nbytes;
    this.memCount++;
  }

  /** Hold a result (replacing any earlier one under the key). `hasValue` false: the value is unpacked on first use. */
  put(key: string, bytes: Uint8Array, value: unknown, hasValue = true): void {
    this.delete(key);
    this.entries.set(key, { bytes, value: hasValue ? value : undefined, hasValue, nbytes: bytes.byteLength, file: null, spilling: false });
    this.memBytes += bytes.byteLength;
    this.memCount++;
  }

  /**
   * The value when it is in memory (unpacking it once if only its bytes are): no I/O.
   * `undefined` when the key is not held or only on disk (then use `value()`).
   * Throws what unpacking throws.
   */
  valueNow(key: string): Lookup | undefined {
    const e = this.entries.get(key);
    if (e === undefined || e.bytes === null) return undefined;
    this.touch(key, e);
    if (!e.hasValue) {
      e.value = unpackValue(e.bytes);
      e.hasValue = true;
    }
    return { found: true, value: e.value };
  }

  /** Whether the key is held on disk only (reading it takes I/O). */
  isSpilled(key: string): boolean {
    const e = this.entries.get(key);
    return e !== undefined && e.bytes === null;
  }

  /** The value, reading it back from disk when spilled (not kept in memory again). */
  async value(key: string): Promise<Lookup> {
    const now = this.valueNow(key);
    if (now !== undefined) return now;
    const bytes = await this.bytes(key);
    return bytes === undefined ? { found: false } : { found: true, value: unpackValue(bytes) };
  }

  /** The packed bytes, from memory or disk; undefined when not held (or the file is gone). */
  async bytes(key: string): Promise<Uint8Array | undefined> {
    const e = this.entries.get(key);
    if (e === undefined) return undefined;
    if (e.bytes !== null) {
      this.touch(key, e);
      if (e.bytes === UNPACKED) e.bytes = packValue(e.value);
      return e.bytes;
    }
    const file = e.file as string;
    try {
      const buf = await readFile(file);
      return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
    } catch {
      return undefined;
    }
  }

  /** Drop one result (its spill file too). */
  delete(key: string): boolean {
    const e = this.entries.get(key);
    if (e === undefined) return false;
    this.entries.delete(key);
    this.forget(e);
    return true;
  }

  /** Drop every result whose key starts with `prefix` (e.g. `"3:"`: all of run 3). Returns how many. */
  deletePrefix(prefix: string): number {
    let n = 0;
    for (const [key, e] of this.entries) {
      if (!key.startsWith(prefix)) continue;
      this.entries.delete(key);
      this.forget(e);
      n++;
    }
    return n;
  }

  /** Drop everything. */
  clear(): void {
    for (const e of this.entries.values()) this.forget(e);
    this.entries.clear();
  }

  /**
   * Spill least recently used in-memory results until at most `targetBytes` stay in
   * memory. Resolves with the bytes moved to disk. Entries deleted meanwhile are not
   * written (or their files are removed).
   */
  async spill(targetBytes: number): Promise<number> {
    if (this.closed) return 0;
    const victims: [string, Entry][] = [];
    let over = this.memBytes - targetBytes;
    for (const [key, e] of this.entries) {
      if (over <= 0) break;
      if (e.bytes === null || e.spilling) continue;
      victims.push([key, e]);
      over -= e.nbytes;
    }
    if (victims.length === 0) return 0;
    const dir = await this.spillDirectory();
    let moved = 0;
    for (const [key, e] of victims) {
      if (this.closed) break;
      if (this.entries.get(key) !== e || e.bytes === null) continue;
      const file = join(dir, `${++this.seq}.bin`);
      e.spilling = true;
      if (e.bytes === UNPACKED) e.bytes = packValue(e.value);
      try {
        await writeFile(file, e.bytes);
      } catch (err) {
        e.spilling = false;
        throw err;
      }
      e.spilling = false;
      if (this.entries.get(key) !== e || this.closed) {
        await unlink(file).catch(() => undefined);
        continue;
      }
      e.file = file;
      e.bytes = null;
      e.value = undefined;
      e.hasValue = false;
      this.memBytes -= e.nbytes;
      this.memCount--;
      this.diskBytes += e.nbytes;
      moved += e.nbytes;
    }
    return moved;
  }

  /** Drop everything and remove the spill directory. */
  async close(): Promise<void> {
    this.closed = true;
    this.clear();
    const dir = this.dir;
    this.dir = null;
    if (dir === null) return;
    const path = await dir.catch(() => null);
    if (path === null) return;
    await rm(path, { recursive: true, force: true }).catch(() => undefined);
    if (this.options.removeSpillDir === true) await rmdir(this.options.spillDir).catch(() => undefined);
  }

  private touch(key: string, e: Entry): void {
    // Map order is insertion order: re-inserting moves the entry to the most recent end.
    this.entries.delete(key);
    this.entries.set(key, e);
  }

  private forget(e: Entry): void {
    if (e.bytes !== null) {
      this.memBytes -= e.nbytes;
      this.memCount--;
    } else {
      this.diskBytes -= e.nbytes;
    }
    if (e.file !== null) {
      const file = e.file;
      e.file = null;
      unlink(file).catch(() => undefined);
    }
    e.bytes = null;
    e.value = undefined;
    e.hasValue = false;
  }

  private spillDirectory(): Promise<string> {
    if (this.dir === null) {
      const base = this.options.spillDir;
      this.dir = (async () => {
        await mkdir(base, { recursive: true });
        return mkdtemp(join(base, 'w-'));
      })();
    }
    return this.dir;
  }
}
