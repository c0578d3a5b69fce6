/**
 * `weft server` as a library: `startServer` opens the database, applies migrations,
 * serves the HTTP API and the live feed, and runs the background services (schedules,
 * zombie killer, lazarus). Several servers may share one PostgreSQL database: every
 * consistency rule lives in the database's transactions, not in a server's memory, and
 * each server's live feed carries the changes made through any of them (LISTEN/NOTIFY,
 * `notices.ts`). On SQLite a server's feed carries the changes made through it.
 */
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { DEFAULT_DB, openDb, type Db } from './db.ts';
import { createApi, type ApiOptions } from './http.ts';
import { migrate } from './migrations.ts';
import { startRelay, type Relay } from './notices.ts';
import { startServices, type ServiceOptions, type Services } from './services.ts';
import { Store } from './store.ts';

export { BackendClient, type BackendClientOptions, type SubscribeOptions } from './client.ts';
export { DEFAULT_DB, openDb, redact, type Db, type Sql } from './db.ts';
export { migrate, MIGRATIONS } from './migrations.ts';
export { Store, flowFingerprint, hashToken, DEFAULT_AGENT_TIMEOUT_MS } from './store.ts';
export { FEED_CHANNEL } from './notices.ts';
export { nextCron, nextTicks, parseCron, CronError } from './schedule.ts';
export { SERVICE_DEFAULTS, type ServiceOptions } from './services.ts';
export * from './model.ts';

export interface ServerOptions extends ServiceOptions, Omit<ApiOptions, 'log'> {
  /** `sqlite:PATH` or `postgres://…` (default `sqlite:.weft/server.db`), or an open Db (left open on close). */
  readonly db?: string | Db;
  /** Relative SQLite paths resolve here. Default process.cwd(). */
  readonly cwd?: string;
  /** Default 127.0.0.1. */
  readonly host?: string;
  /** Default 4200; 0 picks a free port. */
  readonly port?: number;
  /** Run schedules, zombie killer and lazarus (default true). */
  readonly services?: boolean;
  /** The clock (tests). Default Date.now. */
  readonly now?: () => number;
  /** An agent not seen for this long is listed `unhealthy`. Default 60 s. */
  readonly agentTimeoutMs?: number;
  readonly log?: (line: string) => void;
}

export interface RunningServer {
  /** `http://HOST:PORT` */
  readonly url: string;
  readonly port: number;
  readonly store: Store;
  readonly db: Db;
  close(): Promise<void>;
}

export async function startServer(opts: ServerOptions = {}): Promise<RunningServer> {
  const ownDb = typeof opts.db !== 'object';
  const db = typeof opts.db === 'object' ? opts.db : await openDb(opts.db ?? DEFAULT_DB, opts.cwd !== undefined ? { cwd: opts.cwd } : {});
  let server: Server | null = null;
  let services: Services | null = null;
  let relay: Relay | null = null;
  try {
    await migrate(db);
    const store = new Store(db, {
      ...(opts.now !== undefined ? { now: opts.now } : {}),
      ...(opts.agentTimeoutMs !== undefined ? { agentTimeoutMs: opts.agentTimeoutMs } : {}),
    });
    const log = opts.log ?? (() => undefined);
    const api = createApi(store, { ...opts, log });
    // Other servers' changes (PostgreSQL); after a gap, feed clients reconnect and re-read.
    relay = await startRelay(store, db, { log, onGap: (why) => api.resetFeed(why) });
    const srv = createServer({ requestTimeout: 5 * 60_000, headersTimeout: 30_000 }, (req, res) => api.handle(req, res));
    server = srv;
    srv.on('upgrade', (req, socket, head) => api.upgrade(req, socket, head));
    srv.on('clientError', (_err, socket) => {
      if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n');
      else socket.destroy();
    });
    const host = opts.host ?? '127.0.0.1';
    await new Promise<void>((resolve, reject) => {
      srv.once('error', reject);
      srv.listen(opts.port ?? 4200, host, () => {
        srv.off('error', reject);
        resolve();
      });
    });
    if (opts.services !== false) services = startServices(store, { ...opts, log });
    const port = (srv.address() as AddressInfo).port;
    const shownHost = host.includes(':') ? `[${host}]` : host;
    let closing: Promise<void> | null = null;
    return {
      url: `http://${shownHost}:${port}`,
      port,
      store,
      db,
      close(): Promise<void> {
        closing ??= (async () => {
          await services?.stop();
          await relay?.close();
          api.close();
          await new Promise<void>((resolve) => {
            srv.close(() => resolve());
            srv.closeAllConnections();
          });
          if (ownDb) await db.close();
        })();
        return closing;
      },
    };
  } catch (err) {
    await services?.stop();
    await relay?.close();
    server?.close();
    if (ownDb) await db.close();
    throw err;
  }
}
