/**
 * One cluster connection over a `ws` WebSocket: framing, batching, backpressure,
 * handshake and liveness, shared by the scheduler, workers, peers and clients.
 *
 * - Outgoing messages go through a `Batcher` (one frame per tick). A frame is written
 *   with `ws.send`; when the socket's `bufferedAmount` passes `highWaterBytes` the batcher
 *   is paused until the send callback of the frame that crossed it fires and the buffer
 *   is back under half the mark.
 * - Incoming frames are decoded by the connection's own `FrameCodec`. Any protocol error
 *   (text frame, malformed msgpack, unknown op, wrong direction, oversized frame) closes
 *   this connection — with the reason logged and counted — and nothing else.
 * - Handshake (`acceptHandshake` on the accepting side, `openHandshake` on the
 *   connecting side): hello → [challenge → proof] → welcome | refuse. Until it completes,
 *   only handshake ops are accepted, and a handshake that takes longer than
 *   `handshakeMs` closes the connection.
 * - Liveness: `lastSeen` is updated by every frame received; the owner decides what
 *   "missed heartbeats" means (it knows the cluster size).
 */
import { performance } from 'node:perf_hooks';
import type { WebSocket, RawData } from 'ws';
import { newNonce, proveToken, verifyProof } from './auth.ts';
import {
  Batcher,
  checkVersion,
  DEFAULT_MAX_FRAME_BYTES,
  directionsOf,
  FrameCodec,
  PROTOCOL_VERSION,
  ProtocolError,
  type Direction,
  type HelloMsg,
  type Message,
  type Role,
  type WelcomeMsg,
} from './protocol.ts';

export interface ConnectionOptions {
  /** Direction of the frames this end receives once the handshake is done (e.g. 'w2s' on the scheduler's side of a worker). */
  readonly receives?: Direction;
  readonly maxFrameBytes?: number;
  /** Pause sending above this many buffered bytes. Default 8 MiB. */
  readonly highWaterBytes?: number;
  /** Messages of one received frame, in order. Throwing a ProtocolError closes the connection. */
  onMessages?: (msgs: Message[]) => void;
  /** Called once, when the connection is gone for any reason. */
  onClose?: (reason: string, code: string) => void;
  /** The batcher drained after a refused push: try again. */
  onDrain?: () => void;
  /** For logs. */
  readonly label?: string;
}

/**
 * Options for the connecting end of every cluster socket (worker, peer, client).
 * WebSocket clients mask their frames so that a script in a browser cannot put chosen
 * bytes on the wire for a caching proxy to misread. Cluster peers are programs, not
 * browser scripts, so they use an all-zero mask, which `ws` skips on both ends: no XOR
 * pass over every frame sent and received. No compression either: frames are msgpack of
 * small numbers and ids, and the cost per frame matters more than its size on a LAN.
 */
export const CLIENT_SOCKET_OPTIONS = {
  perMessageDeflate: false,
  generateMask(mask: Buffer): void {
    mask.fill(0);
  },
} as const;

/** Counters by close reason code (`/metrics`). */
export const closeCounts = new Map<string, number>();

const now = (): number => performance.timeOrigin + performance.now();

export class Connection {
  readonly codec: FrameCodec;
  readonly batcher: Batcher;
  label: string;
  receives: Direction | undefined;
  lastSeen = now();
  bytesIn = 0;
  bytesOut = 0;
  framesIn = 0;
  framesOut = 0;
  closed = false;
  closeReason = '';
  onMessages: (msgs: Message[]) => void;
  onClose: (reason: string, code: string) => void;
  onDrain: () => void;
  private readonly highWater: number;
  private waitingDrain = false;

  constructor(
    readonly ws: WebSocket,
    options: ConnectionOptions = {},
  ) {
    this.label = options.label ?? 'connection';
    this.receives = options.receives;
    this.codec = new FrameCodec({ maxFrameBytes: options.maxFrameBytes ?? DEFAULT_MAX_FRAME_BYTES });
    this.highWater = options.highWaterBytes ?? 8 * 1024 * 1024;
    this.onMessages = options.onMessages ?? (() => undefined);
    this.onClose = options.onClose ?? (() => undefined);
    this.onDrain = options.onDrain ?? (() => undefined);
    this.batcher = new Batcher(this.codec, (frame) => this.write(frame), {
      onError: (err) => this.fail(err),
      onDrain: () => this.onDrain(),
    });
    ws.binaryType = 'nodebuffer';
    ws.on('message', (data: RawData, isBinary: boolean) => this.receive(data, isBinary));
    ws.on('close', (code: number, reason: Buffer) => {
      this.finish(reason.length > 0 ? reason.toString('utf8') : `socket closed (${code})`, code === 1000 || code === 1001 ? 'CLOSED' : 'SOCKET_CLOSED');
    });
    ws.on('error', (err: Error) => this.finish(`socket error: ${err.message}`, 'SOCKET_ERROR'));
  }

  /** Queue a message for the next frame. False when the queue is at its bound (keep it and retry on `onDrain`) or closed. */
  send(msg: Message): boolean {
    return this.batcher.push(msg);
  }

  /** Send what is queued now (e.g. before closing). */
  flush(): void {
    this.batcher.flush();
  }

  get isPaused(): boolean {
    return this.batcher.isPaused;
  }

  /** Close with a logged reason; `code` is counted in `closeCounts`. */
  close(reason: string, code = 'CLOSED', wsCode = 1000): void {
    if (this.closed) return;
    this.batcher.flush();
    this.finish(reason, code);
    try {
      this.ws.close(wsCode, truncateReason(reason));
    } catch {
      this.ws.terminate();
    }
  }

  /** Close at once, without a closing handshake (the peer is gone or misbehaving). */
  terminate(reason: string, code: string): void {
    if (this.closed) return;
    this.finish(reason, code);
    this.ws.terminate();
  }

  private finish(reason: string, code: string): void {
    if (this.closed) return;
    this.closed = true;
    this.closeReason = reason;
    this.batcher.close();
    closeCounts.set(code, (closeCounts.get(code) ?? 0) + 1);
    this.onClose(reason, code);
  }

  private fail(err: unknown): void {
    const code = err instanceof ProtocolError ? err.code : 'SEND_FAILED';
    const msg = err instanceof Error ? err.message : String(err);
    this.close(`${this.label}: ${msg}`, code, err instanceof ProtocolError && err.code === 'FRAME_TOO_LARGE' ? 1009 : 1008);
  }

  private write(frame: Uint8Array): void {
    if (this.closed) return;
    this.bytesOut += frame.byteLength;
    this.framesOut++;
    const over = this.ws.bufferedAmount + frame.byteLength > this.highWater;
    if (!over) {
      this.ws.send(frame, { binary: true });
      return;
    }
    this.batcher.pause();
    if (this.waitingDrain) {
      this.ws.send(frame, { binary: true });
      return;
    }
    this.waitingDrain = true;
    const check = (): void => {
      if (this.closed) return;
      if (this.ws.bufferedAmount <= this.highWater / 2) {
        this.waitingDrain = false;
        this.batcher.resume();
      } else setTimeout(check, 1).unref();
    };
    this.ws.send(frame, { binary: true }, () => check());
  }

  private receive(data: RawData, isBinary: boolean): void {
    if (this.closed) return;
    this.lastSeen = now();
    const buf = Array.isArray(data) ? Buffer.concat(data) : Buffer.isBuffer(data) ? data : Buffer.from(data);
    this.bytesIn += buf.byteLength;
    this.framesIn++;
    if (!isBinary) {
      this.close(`${this.label}: text frame refused (the protocol is binary msgpack)`, 'MALFORMED_FRAME', 1003);
      return;
    }
    let msgs: Message[];
    try {
      msgs = this.codec.decode(buf);
      const dir = this.receives;
      if (dir !== undefined) {
        for (let i = 0; i < msgs.length; i++) {
          const op = msgs[i]!.op;
          if (!directionsOf(op).includes(dir)) {
            throw new ProtocolError('UNKNOWN_OP', `message ${i}: op "${op}" is not accepted in direction ${dir}`, { op });
          }
        }
      }
      this.onMessages(msgs);
    } catch (err) {
      this.fail(err);
    }
  }
}

function truncateReason(reason: string): string {
  // A close frame's reason is at most 123 bytes.
  const b = Buffer.from(reason, 'utf8');
  return b.length <= 120 ? reason : `${b.subarray(0, 117).toString('utf8')}...`;
}

// ---- handshake --------------------------------------------------------------------

export interface AcceptOptions {
  /** When set, the peer must prove knowledge of it. */
  readonly token?: string;
  readonly handshakeMs?: number;
  /** Roles accepted here (e.g. a worker's peer server accepts only 'peer'). */
  readonly roles: readonly Role[];
  /** Decide on a proven hello: a welcome's id and heartbeat, or a refusal. */
  admit(hello: HelloMsg): { id: string; heartbeatMs: number } | { refuse: string; reason: string };
}

export interface Accepted {
  readonly hello: HelloMsg;
  readonly id: string;
}

/**
 * The accepting side of the handshake. Resolves once the welcome is queued; rejects
 * (after refusing and closing the connection) on a failed one.
 */
export function acceptHandshake(conn: Connection, o: AcceptOptions): Promise<Accepted> {
  return new Promise<Accepted>((resolve, reject) => {
    let hello: HelloMsg | null = null;
    let nonce: Uint8Array | null = null;
    let settled = false;
    const timer = setTimeout(() => refuse('HANDSHAKE_TIMEOUT', `no completed handshake within ${o.handshakeMs ?? 10_000} ms`), o.handshakeMs ?? 10_000);
    timer.unref();
    const done = (err: Error | null, value?: Accepted): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      if (err !== null) reject(err);
      else resolve(value!);
    };
    const refuse = (code: string, reason: string): void => {
      if (!conn.closed) {
        conn.send({ op: 'refuse', code, reason });
        conn.close(`${conn.label}: handshake refused: ${reason}`, code, 1008);
      }
      done(new ProtocolError('BAD_MESSAGE', `handshake refused (${code}): ${reason}`));
    };
    const prevClose = conn.onClose;
    conn.onClose = (reason, code) => {
      done(new Error(`connection closed during the handshake: ${reason}`));
      prevClose(reason, code);
    };
    const welcome = (h: HelloMsg): void => {
      const verdict = o.admit(h);
      if ('refuse' in verdict) {
        refuse(verdict.refuse, verdict.reason);
        return;
      }
      const w: WelcomeMsg = {
        op: 'welcome',
        version: PROTOCOL_VERSION,
        id: verdict.id,
        heartbeatMs: verdict.heartbeatMs,
        maxFrameBytes: conn.codec.maxFrameBytes,
      };
      conn.send(w);
      conn.onClose = prevClose;
      done(null, { hello: h, id: verdict.id });
    };
    const late = (msgs: Message[], last: Message): void => {
      const rest = msgs.slice(msgs.indexOf(last) + 1);
      if (rest.length > 0 && settled && !conn.closed) queueMicrotask(() => deliverLate(conn, rest));
    };
    conn.onMessages = (msgs) => {
      if (settled) throw new ProtocolError('BAD_MESSAGE', 'message before the welcome was sent');
      for (const m of msgs) {
        if (hello === null) {
          if (m.op !== 'hello') {
            refuse('HANDSHAKE', `expected "hello" first, got "${m.op}"`);
            return;
          }
          try {
            checkVersion(m);
          } catch (err) {
            refuse('VERSION_MISMATCH', (err as Error).message);
            return;
          }
          if (!o.roles.includes(m.role)) {
            refuse('BAD_ROLE', `role "${m.role}" is not accepted here (expected ${o.roles.join(' or ')})`);
            return;
          }
          hello = m;
          if (o.token !== undefined) {
            nonce = newNonce();
            conn.send({ op: 'challenge', nonce });
            continue;
          }
          welcome(m);
          late(msgs, m);
          return;
        }
        if (nonce !== null && m.op === 'proof') {
          if (!verifyProof(o.token!, nonce, hello.role, hello.name, m.proof)) {
            refuse('AUTH_FAILED', `token proof from "${hello.name}" did not verify`);
            return;
          }
          welcome(hello);
          late(msgs, m);
          return;
        }
        refuse('HANDSHAKE', `unexpected "${m.op}" during the handshake`);
        return;
      }
    };
  });
}

export interface OpenOptions {
  readonly hello: Omit<HelloMsg, 'op' | 'version'>;
  readonly token?: string;
  readonly handshakeMs?: number;
}

/** The refusal an accepting side sent (or a failed handshake). */
export class HandshakeError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'HandshakeError';
  }
}

/**
 * The connecting side: sends hello, answers a challenge, resolves with the welcome.
 * Rejects with a HandshakeError on a refusal, a challenge without a token, or a timeout.
 */
export function openHandshake(conn: Connection, o: OpenOptions): Promise<WelcomeMsg> {
  return new Promise<WelcomeMsg>((resolve, reject) => {
    let settled = false;
    const ms = o.handshakeMs ?? 10_000;
    const timer = setTimeout(() => fail('HANDSHAKE_TIMEOUT', `no welcome within ${ms} ms`), ms);
    timer.unref();
    const prevClose = conn.onClose;
    const fail = (code: string, reason: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      conn.onClose = prevClose;
      conn.close(`${conn.label}: ${reason}`, code, 1008);
      reject(new HandshakeError(code, reason));
    };
    conn.onClose = (reason, code) => {
      if (!settled) {
        settled = true;
        clearTimeout(timer);
        reject(new HandshakeError('CLOSED', `connection closed during the handshake: ${reason}`));
      }
      prevClose(reason, code);
    };
    conn.onMessages = (msgs) => {
      for (const m of msgs) {
        if (settled) throw new ProtocolError('BAD_MESSAGE', `unexpected "${m.op}" before the handshake's owner took over`);
        switch (m.op) {
          case 'challenge':
            if (o.token === undefined) {
              fail('AUTH_REQUIRED', 'the server asks for a token and none is configured (--token-file)');
              return;
            }
            conn.send({ op: 'proof', proof: proveToken(o.token, m.nonce, o.hello.role, o.hello.name) });
            break;
          case 'welcome': {
            try {
              checkVersion(m);
            } catch (err) {
              fail('VERSION_MISMATCH', (err as Error).message);
              return;
            }
            settled = true;
            clearTimeout(timer);
            conn.onClose = prevClose;
            resolve(m);
            // Messages after the welcome in the same frame go to the owner's handler, which
            // it sets when this promise resolves (before this microtask runs).
            const rest = msgs.slice(msgs.indexOf(m) + 1);
            if (rest.length > 0) queueMicrotask(() => deliverLate(conn, rest));
            return;
          }
          case 'refuse':
            fail(m.code, `refused: ${m.reason}`);
            return;
          default:
            fail('HANDSHAKE', `unexpected "${m.op}" during the handshake`);
            return;
        }
      }
    };
    conn.send({ op: 'hello', version: PROTOCOL_VERSION, ...o.hello });
  });
}

/** Hand messages that arrived with the handshake's last one to the owner's handler; a protocol error closes. */
function deliverLate(conn: Connection, msgs: Message[]): void {
  if (conn.closed) return;
  try {
    conn.onMessages(msgs);
  } catch (err) {
    const code = err instanceof ProtocolError ? err.code : 'BAD_MESSAGE';
    conn.close(`${conn.label}: ${(err as Error).message}`, code, 1008);
  }
}

/**
 * Heartbeat interval for a cluster of `n` workers: 500 ms up to 50 workers, then
 * growing linearly (the scheduler's cost of heartbeats stays flat as the cluster grows).
 */
export function heartbeatInterval(n: number, baseMs = 500): number {
  return Math.round(baseMs * Math.max(1, n / 50));
}
