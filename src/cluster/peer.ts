/**
 * Worker ↔ worker data transfer (Dask's worker-to-worker `get_data`): every worker runs a
 * small WebSocket server that answers `getData` with the packed bytes of results it
 * holds, and keeps one client connection per peer it fetches from.
 *
 * - Both ends speak the cluster protocol (`Connection`, direction 'w2w'); the connecting
 *   side opens with role 'peer' and the cluster token, the server accepts only 'peer'.
 * - Requests are matched to replies by id. Keys wanted from one peer during one tick go
 *   in one `getData` (cut at `batchBytes` of expected data), so a burst of consumers of
 *   one holder costs one round trip.
 * - A peer that cannot be reached, closes, refuses the handshake or does not answer in
 *   time fails its pending requests: the keys come back as missing (`undefined`), and
 *   the caller tries elsewhere. A failed link is forgotten, so the next fetch redials.
 * - A reply never exceeds the frame limit: keys whose bytes would not fit are reported
 *   missing rather than breaking the connection.
 */
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { networkInterfaces } from 'node:os';
import { WebSocket, WebSocketServer } from 'ws';
import { CLIENT_SOCKET_OPTIONS, Connection, acceptHandshake, openHandshake } from './connection.ts';
import { dispatch, ProtocolError, type DataMsg, type Handlers, type Message } from './protocol.ts';

/** PEM material: `cert` + `key` make the server https/wss; `ca` verifies the other side (and makes the server ask for client certificates). */
export interface PeerTls {
  readonly ca?: string | Buffer;
  readonly cert?: string | Buffer;
  readonly key?: string | Buffer;
}

/** What `serve` returns: found keys with their bytes (aligned), and the rest. */
export interface DataReply {
  readonly keys: string[];
  readonly values: Uint8Array[];
  readonly missing: string[];
}

/** Answers `getData` for the keys a peer asks for; `budget` is the most bytes the reply may carry. */
export type ServeData = (keys: readonly string[], budget: number) => Promise<DataReply>;

/** Frames on peer links may be much larger than on the scheduler's: they carry results. */
export const PEER_MAX_FRAME_BYTES = 512 * 1024 * 1024;
/** Room left in a frame for everything but the values. */
const FRAME_SLACK = 64 * 1024;

export interface PeerServerOptions {
  /** Bind address (default 127.0.0.1). */
  readonly host?: string;
  readonly token?: string;
  readonly tls?: PeerTls;
  readonly maxFrameBytes?: number;
  readonly serve: ServeData;
  readonly log: (line: string) => void;
}

/** The handlers of one peer connection (either side): answer `getData`, hand `data` replies to `onData`. */
function peerHandlers(conn: Connection, serve: ServeData, onData: (m: DataMsg) => void, log: (line: string) => void): Handlers<'w2w'> {
  const late = (m: Message): void => {
    throw new ProtocolError('BAD_MESSAGE', `unexpected "${m.op}" after the handshake`, { op: m.op });
  };
  const budget = conn.codec.maxFrameBytes - FRAME_SLACK;
  return {
    hello: late,
    challenge: late,
    proof: late,
    welcome: late,
    refuse: late,
    getData: (m) => {
      serve(m.keys, budget).then(
        (r) => conn.send({ op: 'data', id: m.id, keys: r.keys, values: r.values, missing: r.missing }),
        (err: unknown) => {
          log(`${conn.label}: getData ${m.id} failed: ${(err as Error).message}`);
          conn.send({ op: 'data', id: m.id, keys: [], values: [], missing: [...m.keys] });
        },
      );
    },
    data: onData,
    heartbeat: () => undefined,
    error: (m) => log(`${conn.label}: error from peer (ref ${m.ref}): ${m.error.name}: ${m.error.message}`),
  };
}

/** The address others should dial for a server bound to `host`. */
export function advertisedHost(host: string): string {
  if (host !== '0.0.0.0' && host !== '::' && host !== '') return host.includes(':') ? `[${host}]` : host;
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) if (a.family === 'IPv4' && !a.internal) return a.address;
  }
  return '127.0.0.1';
}

/** A worker's data server. */
export class PeerServer {
  /** `ws://host:port` or `wss://host:port`. */
  readonly address: string;
  private readonly conns = new Set<Connection>();
  private serial = 0;
  private closing: Promise<void> | null = null;

  private constructor(
    private readonly server: Server,
    private readonly wss: WebSocketServer,
    private readonly o: PeerServerOptions,
    secure: boolean,
  ) {
    const port = (server.address() as AddressInfo).port;
    this.address = `${secure ? 'wss' : 'ws'}://${advertisedHost(o.host ?? '127.0.0.1')}:${port}`;
    wss.on('connection', (ws) => this.accept(ws));
  }

  /** Listen on `host`, port 0 (any free port). */
  static async listen(o: PeerServerOptions): Promise<PeerServer> {
    const tls = o.tls;
    const secure = tls?.cert !== undefined && tls.key !== undefined;
    const refuseHttp = (_req: IncomingMessage, res: ServerResponse): void => {
      res.writeHead(426, { 'content-type': 'text/plain' });
      res.end('weft worker peer server: WebSocket only\n');
    };
    const server: Server = secure
      ? (createHttpsServer(
          { cert: tls.cert, key: tls.key, ca: tls.ca, requestCert: tls.ca !== undefined, rejectUnauthorized: tls.ca !== undefined },
          refuseHttp,
        ) as unknown as Server)
      : createHttpServer(refuseHttp);
    const max = o.maxFrameBytes ?? PEER_MAX_FRAME_BYTES;
    const wss = new WebSocketServer({ server, maxPayload: max });
    wss.on('error', (err) => o.log(`peer server: ${err.message}`));
    server.on('tlsClientError', (err: Error) => o.log(`peer server: TLS: ${err.message}`));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, o.host ?? '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    server.on('error', (err) => o.log(`peer server: ${err.message}`));
    return new PeerServer(server, wss, o, secure);
  }

  /** Open peer connections. */
  get connections(): number {
    return this.conns.size;
  }

  private accept(ws: WebSocket): void {
    if (this.closing !== null) {
      ws.terminate();
      return;
    }
    const conn = new Connection(ws, {
      receives: 'w2w',
      maxFrameBytes: this.o.maxFrameBytes ?? PEER_MAX_FRAME_BYTES,
      label: `peer server ${this.address} #${++this.serial}`,
    });
    this.conns.add(conn);
    conn.onClose = () => {
      this.conns.delete(conn);
    };
    acceptHandshake(conn, {
      roles: ['peer'],
      ...(this.o.token !== undefined ? { token: this.o.token } : {}),
      admit: (h) => ({ id: `${h.name}#${this.serial}`, heartbeatMs: 0 }),
    }).then(
      (acc) => {
        conn.label = `peer server ${this.address} ← ${acc.hello.name}`;
        const handlers = peerHandlers(conn, this.o.serve, () => undefined, this.o.log);
        conn.onMessages = (msgs) => dispatch(handlers, msgs);
      },
      (err: unknown) => this.o.log(`peer server: handshake failed: ${(err as Error).message}`),
    );
  }

  /** Stop listening and drop every peer connection. Idempotent. */
  close(): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.closing = (async () => {
      for (const c of [...this.conns]) c.terminate('worker closing', 'CLOSED');
      for (const ws of this.wss.clients) ws.terminate();
      await new Promise<void>((resolve) => this.wss.close(() => resolve()));
      this.server.closeAllConnections();
      await new Promise<void>((resolve) => this.server.close(() => resolve()));
    })();
    return this.closing;
  }
}

export interface PeerClientsOptions {
  /** This worker's name (hello of the peer handshake). */
  readonly name: string;
  /** This worker's own peer address (sent in the hello). */
  readonly address: string;
  readonly token?: string;
  readonly tls?: PeerTls;
  readonly maxFrameBytes?: number;
  /** Answers `getData` arriving on a client link (symmetry; peers do not normally ask). */
  readonly serve: ServeData;
  readonly log: (line: string) => void;
  /** A request without a reply for this long fails, and the link is dropped. Default 60 s. */
  readonly requestTimeoutMs?: number;
  /** A peer's batch is sent at once when the expected bytes reach this. Default 8 MiB. */
  readonly batchBytes?: number;
}

type Resolve = (bytes: Uint8Array | undefined) => void;

/** One client connection to a peer. */
interface PeerLink {
  readonly address: string;
  readonly conn: Connection;
  /** Settles true after the welcome, false when the link failed first. */
  readonly ready: Promise<boolean>;
  /** Keys waiting for the next `getData` to this peer, with who waits for each. */
  queued: Map<string, Resolve[]>;
  /** Expected bytes of `queued`. */
  queuedBytes: number;
  flushScheduled: boolean;
  /** getData id → the waiters of its keys. */
  readonly pending: Map<number, { readonly waiters: Map<string, Resolve[]>; readonly timer: NodeJS.Timeout }>;
  dead: boolean;
}

/** Client links to peers, one per address, made on first use. */
export class PeerClients {
  private readonly links = new Map<string, PeerLink>();
  private nextId = 1;
  private closed = false;

  constructor(private readonly o: PeerClientsOptions) {}

  /** Live links (for tests and metrics). */
  get size(): number {
    return this.links.size;
  }

  /**
   * The packed bytes of `key` from the peer at `address`; undefined when the peer does
   * not hold it or cannot be reached. `nbytes` (the expected size) only sizes batches.
   */
  fetch(address: string, key: string, nbytes = 0): Promise<Uint8Array | undefined> {
    if (this.closed) return Promise.resolve(undefined);
    let link: PeerLink;
    try {
      link = this.link(address);
    } catch (err) {
      // A malformed address (from the network): that peer simply cannot deliver.
      this.o.log(`peer ${JSON.stringify(address.slice(0, 200))}: ${(err as Error).message}`);
      return Promise.resolve(undefined);
    }
    return new Promise<Uint8Array | undefined>((resolve) => {
      const waiting = link.queued.get(key);
      if (waiting !== undefined) waiting.push(resolve);
      else {
        link.queued.set(key, [resolve]);
        link.queuedBytes += nbytes;
      }
      if (link.queuedBytes >= (this.o.batchBytes ?? 8 * 1024 * 1024)) this.flush(link);
      else if (!link.flushScheduled) {
        link.flushScheduled = true;
        setImmediate(() => {
          link.flushScheduled = false;
          this.flush(link);
        });
      }
    });
  }

  /** Drop every link; pending fetches resolve undefined. */
  close(): void {
    this.closed = true;
    for (const link of [...this.links.values()]) this.fail(link, 'worker closing');
  }

  private link(address: string): PeerLink {
    const known = this.links.get(address);
    if (known !== undefined) return known;
    const tls = this.o.tls;
    const max = this.o.maxFrameBytes ?? PEER_MAX_FRAME_BYTES;
    const ws = new WebSocket(address, {
      maxPayload: max,
      handshakeTimeout: 10_000,
      ...CLIENT_SOCKET_OPTIONS,
      ...(tls?.ca !== undefined ? { ca: tls.ca } : {}),
      ...(tls?.cert !== undefined ? { cert: tls.cert } : {}),
      ...(tls?.key !== undefined ? { key: tls.key } : {}),
    });
    const conn = new Connection(ws, { receives: 'w2w', maxFrameBytes: max, label: `peer ${address}` });
    let settle!: (ok: boolean) => void;
    const ready = new Promise<boolean>((r) => (settle = r));
    const link: PeerLink = { address, conn, ready, queued: new Map(), queuedBytes: 0, flushScheduled: false, pending: new Map(), dead: false };
    this.links.set(address, link);
    conn.onClose = (reason) => {
      settle(false);
      this.fail(link, reason);
    };
    ws.once('open', () => {
      openHandshake(conn, {
        hello: { role: 'peer', name: this.o.name, resources: {}, threads: 0, memoryLimit: 0, address: this.o.address, pid: process.pid },
        ...(this.o.token !== undefined ? { token: this.o.token } : {}),
      }).then(
        () => {
          const handlers = peerHandlers(conn, this.o.serve, (m) => this.onData(link, m), this.o.log);
          conn.onMessages = (msgs) => dispatch(handlers, msgs);
          settle(true);
        },
        (err: unknown) => {
          this.o.log(`peer ${address}: ${(err as Error).message}`);
          settle(false);
          this.fail(link, (err as Error).message);
        },
      );
    });
    return link;
  }

  /** Send the queued keys of a link as one request (once it is ready). */
  private flush(link: PeerLink): void {
    if (link.queued.size === 0) return;
    const waiters = link.queued;
    link.queued = new Map();
    link.queuedBytes = 0;
    link.ready.then(
      (ok) => {
        if (!ok || link.dead) {
          resolveAll(waiters, undefined);
          return;
        }
        const id = this.nextId++;
        const ms = this.o.requestTimeoutMs ?? 60_000;
        const timer = setTimeout(() => {
          this.o.log(`peer ${link.address}: no reply to getData ${id} within ${ms} ms; dropping the link`);
          link.conn.terminate(`peer ${link.address}: request timed out`, 'TIMEOUT');
          this.fail(link, 'request timed out');
        }, ms);
        timer.unref();
        link.pending.set(id, { waiters, timer });
        if (!link.conn.send({ op: 'getData', id, keys: [...waiters.keys()] })) {
          clearTimeout(timer);
          link.pending.delete(id);
          resolveAll(waiters, undefined);
        }
      },
      () => resolveAll(waiters, undefined),
    );
  }

  private onData(link: PeerLink, m: DataMsg): void {
    const req = link.pending.get(m.id);
    if (req === undefined) return; // timed out meanwhile
    link.pending.delete(m.id);
    clearTimeout(req.timer);
    const n = Math.min(m.keys.length, m.values.length);
    for (let i = 0; i < n; i++) {
      const key = m.keys[i] as string;
      const value = m.values[i];
      const ws = req.waiters.get(key);
      if (ws === undefined || !(value instanceof Uint8Array)) continue;
      req.waiters.delete(key);
      for (const r of ws) r(value);
    }
    resolveAll(req.waiters, undefined);
  }

  /** The link is gone: fail everything it had queued or in flight, and forget it. */
  private fail(link: PeerLink, reason: string): void {
    if (link.dead) return;
    link.dead = true;
    if (this.links.get(link.address) === link) this.links.delete(link.address);
    for (const req of link.pending.values()) {
      clearTimeout(req.timer);
      resolveAll(req.waiters, undefined);
    }
    link.pending.clear();
    resolveAll(link.queued, undefined);
    link.queued = new Map();
    if (!link.conn.closed) link.conn.close(`peer ${link.address}: ${reason}`, 'CLOSED');
  }
}

function resolveAll(waiters: Map<string, Resolve[]>, v: Uint8Array | undefined): void {
  for (const ws of waiters.values()) for (const r of ws) r(v);
  waiters.clear();
}
