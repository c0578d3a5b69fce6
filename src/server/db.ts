/**
 * The server's database: one small async interface over two drivers, so every query in
 * `store.ts` is written once.
 *
 * - SQLite (better-sqlite3, the default: `sqlite:.weft/server.db`): one connection, WAL,
 *   a busy timeout so several processes can share the file. better-sqlite3 is
 *   synchronous, but a transaction's body is async (it awaits its queries), so every
 *   use of the connection goes through a mutex: a query from another request never
 *   lands inside someone else's open transaction. Transactions are `BEGIN IMMEDIATE`:
 *   they take the write lock at once, so a claim is one write transaction and two
 *   processes on the same file never both read a run as Scheduled.
 * - PostgreSQL (`pg` Pool, `postgres://…`): a transaction holds one pooled client.
 *   Claims lock the rows they take with `FOR UPDATE SKIP LOCKED` (`lockRows`), so
 *   concurrent claimers, even on other servers, skip each other's rows instead of
 *   waiting for them. BIGINT comes back as a JS number (times are ms, far below 2^53).
 *
 * Queries use `$1..$n` placeholders (PostgreSQL's); for SQLite they become `?1..?n`
 * bound by number. Values: `undefined` is NULL, booleans are 0/1 in SQLite, Buffers
 * and Uint8Arrays are BLOB/BYTEA and come back as Buffers.
 */
import { mkdirSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import type { Database as SqliteDatabase, Statement } from 'better-sqlite3';
import type { Client, Pool, PoolClient } from 'pg';

export type Row = Record<string, unknown>;
export type Dialect = 'sqlite' | 'postgres';

/** Queries: on the database, or inside one transaction. */
export interface Sql {
  all<T = Row>(sql: string, params?: readonly unknown[]): Promise<T[]>;
  /** The first row, or undefined. */
  one<T = Row>(sql: string, params?: readonly unknown[]): Promise<T | undefined>;
  /** A statement without rows; answers how many rows it changed. */
  run(sql: string, params?: readonly unknown[]): Promise<number>;
}

export interface Db extends Sql {
  readonly dialect: Dialect;
  /** Where it is, without a password (for logs). */
  readonly description: string;
  /**
   * Run `fn` in a transaction: committed when it resolves, rolled back when it throws.
   * A PostgreSQL deadlock or serialization failure and a SQLite busy error retry the
   * whole function (a few times), so `fn` must not have effects outside the database.
   * Transactions do not nest: inside `fn` use the `Sql` it is given, never the `Db`.
   */
  tx<T>(fn: (q: Sql) => Promise<T>): Promise<T>;
  /**
   * The clause that locks the rows a SELECT returns for this transaction
   * (PostgreSQL: `FOR UPDATE`, with `SKIP LOCKED` when asked). Empty in SQLite, whose
   * `BEGIN IMMEDIATE` already holds the one write lock.
   */
  lockRows(opts?: { skipLocked?: boolean; of?: string }): string;
  /**
   * PostgreSQL only (undefined on SQLite): LISTEN on `channel` on a connection of its
   * own (not the pool's). A dropped connection is reconnected with backoff; notices sent
   * while it was down are lost, so `onReconnect` is called once it listens again.
   */
  readonly listen?: (channel: string, handlers: ListenHandlers) => Promise<Listener>;
  close(): Promise<void>;
}

export interface ListenHandlers {
  /** One NOTIFY's payload, in commit order. */
  onNotice(payload: string): void;
  /** Listening again after the connection dropped (and `onLost`): notices may have been missed. */
  onReconnect?(): void;
  /** The connection dropped; `attempt` counts the reconnects tried since. */
  onLost?(err: Error, attempt: number): void;
}

export interface Listener {
  close(): Promise<void>;
}

/** Waits between reconnects of a listener: doubling from 100 ms up to 5 s. */
export const LISTEN_BACKOFF = { firstMs: 100, maxMs: 5000 } as const;

export interface OpenDbOptions {
  /** Relative SQLite paths resolve against this (default: process.cwd()). */
  readonly cwd?: string;
  /** SQLite: how long a statement waits for another process's lock. Default 5000 ms. */
  readonly busyTimeoutMs?: number;
  /** PostgreSQL: pool size. Default 10. */
  readonly poolSize?: number;
}

export const DEFAULT_DB = 'sqlite:.weft/server.db';

/** `sqlite:PATH` (or `sqlite::memory:`), `postgres://…` / `postgresql://…`. */
export async function openDb(url: string, opts: OpenDbOptions = {}): Promise<Db> {
  if (url.startsWith('postgres://') || url.startsWith('postgresql://')) return openPostgres(url, opts);
  if (url.startsWith('sqlite:')) return openSqlite(url.slice('sqlite:'.length), opts);
  throw new TypeError(`unsupported database ${JSON.stringify(redact(url))}: expected sqlite:PATH or postgres://…`);
}

/** The URL with its password hidden. */
export function redact(url: string): string {
  return url.replace(/^(postgres(?:ql)?:\/\/[^:/@]*):[^@]*@/, '$1:***@');
}

const RETRIES = 5;

// ---------------------------------------------------------------------------------
// SQLite

interface Translated {
  readonly sql: string;
  /** The placeholder numbers the statement uses. */
  readonly used: readonly number[];
}

/** `$n` → `?n`, outside of quoted strings and identifiers. */
export function toSqlitePlaceholders(sql: string): Translated {
  const used = new Set<number>();
  let out = '';
  let quote: string | null = null;
  for (let i = 0; i < sql.length; i++) {
    const c = sql[i] as string;
    if (quote !== null) {
      if (c === quote) quote = null;
      out += c;
      continue;
    }
    if (c === "'" || c === '"') {
      quote = c;
      out += c;
      continue;
    }
    if (c === '$') {
      const m = /^\d+/.exec(sql.slice(i + 1));
      if (m !== null) {
        used.add(Number(m[0]));
        out += `?${m[0]}`;
        i += m[0].length;
        continue;
      }
    }
    out += c;
  }
  return { sql: out, used: [...used] };
}

function sqliteValue(v: unknown): unknown {
  if (v === undefined) return null;
  if (typeof v === 'boolean') return v ? 1 : 0;
  if (v instanceof Uint8Array && !Buffer.isBuffer(v)) return Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  return v;
}

/** A promise-chain mutex: one holder at a time, in arrival order. */
class Mutex {
  private tail: Promise<void> = Promise.resolve();
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    await prev;
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

async function openSqlite(path: string, opts: OpenDbOptions): Promise<Db> {
  const { default: Database } = await import('better-sqlite3');
  const memory = path === ':memory:' || path === '';
  const file = memory ? ':memory:' : resolve(opts.cwd ?? process.cwd(), path);
  if (!memory) mkdirSync(dirname(file), { recursive: true });
  const conn: SqliteDatabase = new Database(file);
  conn.pragma('journal_mode = WAL');
  conn.pragma(`busy_timeout = ${Math.max(0, Math.floor(opts.busyTimeoutMs ?? 5000))}`);
  conn.pragma('foreign_keys = ON');
  conn.pragma('synchronous = NORMAL');
  const cache = new Map<string, { stmt: Statement; used: readonly number[] }>();
  const mutex = new Mutex();
  let closed = false;

  const prepare = (sql: string): { stmt: Statement; used: readonly number[] } => {
    let hit = cache.get(sql);
    if (hit === undefined) {
      const t = toSqlitePlaceholders(sql);
      hit = { stmt: conn.prepare(t.sql), used: t.used };
      cache.set(sql, hit);
    }
    return hit;
  };
  const bind = (used: readonly number[], params: readonly unknown[]): Record<number, unknown> => {
    const o: Record<number, unknown> = {};
    for (const n of used) o[n] = sqliteValue(params[n - 1]);
    return o;
  };
  // Direct (no mutex): only called by a mutex holder.
  const direct: Sql = {
    async all<T>(sql: string, params: readonly unknown[] = []): Promise<T[]> {
      const { stmt, used } = prepare(sql);
      if (!stmt.reader) {
        stmt.run(bind(used, params));
        return [];
      }
      return stmt.all(bind(used, params)) as T[];
    },
    async one<T>(sql: string, params: readonly unknown[] = []): Promise<T | undefined> {
      const { stmt, used } = prepare(sql);
      if (!stmt.reader) {
        stmt.run(bind(used, params));
        return undefined;
      }
      return stmt.get(bind(used, params)) as T | undefined;
    },
    async run(sql: string, params: readonly unknown[] = []): Promise<number> {
      const { stmt, used } = prepare(sql);
      if (stmt.reader) return stmt.all(bind(used, params)).length;
      return stmt.run(bind(used, params)).changes;
    },
  };
  const guard = <T>(fn: () => Promise<T>): Promise<T> =>
    mutex.run(async () => {
      if (closed) throw new Error('database is closed');
      return fn();
    });

  return {
    dialect: 'sqlite',
    description: `sqlite:${file}`,
    all: (sql, params) => guard(() => direct.all(sql, params)),
    one: (sql, params) => guard(() => direct.one(sql, params)),
    run: (sql, params) => guard(() => direct.run(sql, params)),
    tx<T>(fn: (q: Sql) => Promise<T>): Promise<T> {
      return guard(async () => {
        for (let attempt = 1; ; attempt++) {
          try {
            conn.exec('BEGIN IMMEDIATE');
          } catch (err) {
            if (isSqliteBusy(err) && attempt < RETRIES) continue;
            throw err;
          }
          try {
            const out = await fn(direct);
            conn.exec('COMMIT');
            return out;
          } catch (err) {
            if (conn.inTransaction) conn.exec('ROLLBACK');
            if (isSqliteBusy(err) && attempt < RETRIES) continue;
            throw err;
          }
        }
      });
    },
    lockRows: () => '',
    async close(): Promise<void> {
      await mutex.run(async () => {
        if (closed) return;
        closed = true;
        cache.clear();
        conn.close();
      });
    },
  };
}

function isSqliteBusy(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && (code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED'));
}

// ---------------------------------------------------------------------------------
// PostgreSQL

const PG_INT8 = 20;
/** Deadlock, serialization failure: the transaction may simply be run again. */
const PG_RETRYABLE = new Set(['40P01', '40001']);

async function openPostgres(url: string, opts: OpenDbOptions): Promise<Db> {
  const { default: pg } = await import('pg');
  const pool: Pool = new pg.Pool({
    connectionString: url,
    max: opts.poolSize ?? 10,
    types: {
      getTypeParser: ((oid: number, format?: string) =>
        oid === PG_INT8 ? (v: string) => Number(v) : pg.types.getTypeParser(oid, format as 'text')) as typeof pg.types.getTypeParser,
    },
  });
  // An idle client whose connection drops must not crash the process.
  pool.on('error', () => undefined);
  const on = (c: Pool | PoolClient): Sql => ({
    async all<T>(sql: string, params: readonly unknown[] = []): Promise<T[]> {
      return (await c.query(sql, params.map(pgValue))).rows as T[];
    },
    async one<T>(sql: string, params: readonly unknown[] = []): Promise<T | undefined> {
      return (await c.query(sql, params.map(pgValue))).rows[0] as T | undefined;
    },
    async run(sql: string, params: readonly unknown[] = []): Promise<number> {
      return (await c.query(sql, params.map(pgValue))).rowCount ?? 0;
    },
  });
  const direct = on(pool);
  let closed = false;
  return {
    dialect: 'postgres',
    description: redact(url),
    ...direct,
    async tx<T>(fn: (q: Sql) => Promise<T>): Promise<T> {
      for (let attempt = 1; ; attempt++) {
        const client = await pool.connect();
        let broken = false;
        try {
          await client.query('BEGIN');
          const out = await fn(on(client));
          await client.query('COMMIT');
          return out;
        } catch (err) {
          try {
            await client.query('ROLLBACK');
          } catch {
            broken = true;
          }
          const code = (err as { code?: unknown } | null)?.code;
          if (typeof code === 'string' && PG_RETRYABLE.has(code) && attempt < RETRIES) continue;
          throw err;
        } finally {
          client.release(broken);
        }
      }
    },
    lockRows: (o = {}) => ` FOR UPDATE${o.of !== undefined ? ` OF ${o.of}` : ''}${o.skipLocked === true ? ' SKIP LOCKED' : ''}`,
    listen: (channel, handlers) => listenPostgres(() => new pg.Client({ connectionString: url }), channel, handlers),
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      await pool.end();
    },
  };
}

/**
 * A LISTEN that outlives its connection: when the client errors or ends, a new one is
 * connected after a backoff (LISTEN_BACKOFF) and LISTENs again. The first connection
 * must succeed (the promise rejects otherwise); later ones are retried until `close()`.
 */
async function listenPostgres(connect: () => Client, channel: string, h: ListenHandlers): Promise<Listener> {
  if (!/^[a-z_][a-z0-9_]*$/.test(channel)) throw new TypeError(`bad channel name ${JSON.stringify(channel)}`);
  let client: Client | null = null;
  let closed = false;
  let timer: NodeJS.Timeout | null = null;
  let attempt = 0;

  const open = async (): Promise<Client> => {
    const c = connect();
    c.on('notification', (n) => {
      if (n.channel === channel && n.payload !== undefined) h.onNotice(n.payload);
    });
    // Only a connection that listened reconnects when it drops ('error' and 'end' both
    // come then: the first one counts); a failed connect is the caller's to retry.
    let live = false;
    const onDrop = (err: Error): void => {
      if (!live || closed) return;
      live = false;
      client = null;
      c.end().catch(() => undefined);
      retry(err);
    };
    c.on('error', onDrop);
    c.on('end', () => onDrop(new Error('the listener connection ended')));
    try {
      await c.connect();
      await c.query(`LISTEN ${channel}`);
    } catch (err) {
      c.end().catch(() => undefined);
      throw err;
    }
    live = true;
    return c;
  };
  const retry = (err: Error): void => {
    if (closed) return;
    attempt++;
    h.onLost?.(err, attempt);
    const wait = Math.min(LISTEN_BACKOFF.firstMs * 2 ** Math.min(attempt - 1, 16), LISTEN_BACKOFF.maxMs);
    timer = setTimeout(() => {
      timer = null;
      open().then(
        (c) => {
          if (closed) {
            void c.end().catch(() => undefined);
            return;
          }
          client = c;
          attempt = 0;
          h.onReconnect?.();
        },
        (e: unknown) => retry(e instanceof Error ? e : new Error(String(e))),
      );
    }, wait);
    timer.unref();
  };

  client = await open();
  return {
    async close(): Promise<void> {
      closed = true;
      if (timer !== null) clearTimeout(timer);
      timer = null;
      const c = client;
      client = null;
      await c?.end().catch(() => undefined);
    },
  };
}

function pgValue(v: unknown): unknown {
  if (v === undefined) return null;
  if (v instanceof Uint8Array && !Buffer.isBuffer(v)) return Buffer.from(v.buffer, v.byteOffset, v.byteLength);
  return v;
}
