/**
 * A real PostgreSQL for one test file: `initdb` in a fresh temp dir, `pg_ctl start` on a
 * free port of 127.0.0.1 (socket in that dir, fsync off), one database created, and in
 * teardown `pg_ctl -m fast -w stop` (then SIGKILL to the postmaster's PID if it is
 * still there) and the dir removed.
 *
 * initdb refuses to run as root: as root the binaries run as the `postgres` user (`su`)
 * and the dir is handed to it; as anyone else they run directly.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chown, mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir, userInfo } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

export const PG_BIN = process.env.WEFT_PG_BIN ?? '/usr/lib/postgresql/15/bin';

export interface TestPostgres {
  /** `postgres://postgres@127.0.0.1:PORT/weft_test` */
  readonly url: string;
  readonly port: number;
  /** A URL for another database on the same cluster (created on first use). */
  database(name: string): Promise<string>;
  stop(): Promise<void>;
}

export function havePostgres(): boolean {
  return existsSync(join(PG_BIN, 'initdb')) && existsSync(join(PG_BIN, 'pg_ctl'));
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

const shq = (s: string): string => `'${s.replace(/'/g, `'\\''`)}'`;

export async function startPostgres(): Promise<TestPostgres> {
  const root = process.getuid?.() === 0;
  const dir = await mkdtemp(join(tmpdir(), 'weft-pg-'));
  const data = join(dir, 'data');
  const user = root ? 'postgres' : userInfo().username;
  // One command line, run as the cluster's owner.
  const sh = async (cmd: string): Promise<void> => {
    if (root) await run('su', ['postgres', '-s', '/bin/sh', '-c', cmd], { timeout: 60_000 });
    else await run('/bin/sh', ['-c', cmd], { timeout: 60_000 });
  };
  if (root) {
    const { stdout } = await run('id', ['-u', 'postgres']);
    const { stdout: gid } = await run('id', ['-g', 'postgres']);
    await chown(dir, Number(stdout.trim()), Number(gid.trim()));
  }
  let started = false;
  const stop = async (): Promise<void> => {
    if (started) {
      started = false;
      try {
        await sh(`${shq(join(PG_BIN, 'pg_ctl'))} -D ${shq(data)} -m fast -w -t 20 stop`);
      } catch {
        // Stopped some other way, or not answering: the PID file says who to kill.
      }
      try {
        const pid = Number((await readFile(join(data, 'postmaster.pid'), 'utf8')).split('\n')[0]);
        if (Number.isInteger(pid) && pid > 0) process.kill(pid, 'SIGKILL');
      } catch {
        // No PID file (a clean stop removes it) or no such process.
      }
    }
    await rm(dir, { recursive: true, force: true });
  };
  try {
    await sh(`${shq(join(PG_BIN, 'initdb'))} -D ${shq(data)} -U ${shq(user)} --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null`);
    let port = 0;
    for (let attempt = 0; ; attempt++) {
      port = await freePort();
      const o = `-c listen_addresses=127.0.0.1 -p ${port} -k ${dir} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200`;
      try {
        await sh(`${shq(join(PG_BIN, 'pg_ctl'))} -D ${shq(data)} -l ${shq(join(dir, 'log'))} -o ${shq(o)} -w -t 30 start >/dev/null`);
        started = true;
        break;
      } catch (err) {
        // The free port may have been taken in between: try another.
        if (attempt >= 2) throw err;
      }
    }
    const base = `postgres://${encodeURIComponent(user)}@127.0.0.1:${port}`;
    const created = new Set<string>();
    const database = async (name: string): Promise<string> => {
      if (!/^[a-z_][a-z0-9_]*$/.test(name)) throw new Error(`bad database name ${name}`);
      if (!created.has(name)) {
        const { default: pg } = await import('pg');
        const c = new pg.Client({ connectionString: `${base}/postgres` });
        await c.connect();
        try {
          await c.query(`CREATE DATABASE ${name}`);
        } finally {
          await c.end();
        }
        created.add(name);
      }
      return `${base}/${name}`;
    };
    const url = await database('weft_test');
    return { url, port, database, stop };
  } catch (err) {
    let logText = '';
    try {
      logText = await readFile(join(dir, 'log'), 'utf8');
    } catch {
      // No log yet.
    }
    await stop();
    throw new Error(`cannot start PostgreSQL: ${(err as Error).message}${logText !== '' ? `\n${logText.slice(-2000)}` : ''}`);
  }
}
