/**
 * The connection layer over real sockets on 127.0.0.1: backpressure (no writes past
 * the high-water mark until the socket drains), the handshake (messages that ride in the
 * welcome's frame reach the owner), and the heartbeat interval's growth with the cluster.
 */
import type { AddressInfo } from 'node:net';
import type { Socket } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import { acceptHandshake, Connection, heartbeatInterval, openHandshake } from '../src/cluster/connection.ts';
import { waitFor } from './helpers/cluster-procs.ts';

let servers: WebSocketServer[] = [];
let sockets: WebSocket[] = [];

afterEach(async () => {
  for (const ws of sockets) ws.terminate();
  sockets = [];
  await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
  servers = [];
});

/** A ws server on 127.0.0.1:0 and a connected client socket; `server` is the accepted side. */
async function pair(): Promise<{ server: WebSocket; client: WebSocket }> {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0 });
  servers.push(wss);
  await new Promise<void>((r) => wss.once('listening', () => r()));
  const port = (wss.address() as AddressInfo).port;
  const accepted = new Promise<WebSocket>((r) => wss.once('connection', (ws) => r(ws)));
  const client = new WebSocket(`ws://127.0.0.1:${port}`);
  sockets.push(client);
  await new Promise<void>((r, j) => {
    client.once('open', () => r());
    client.once('error', j);
  });
  const server = await accepted;
  sockets.push(server);
  return { server, client };
}

const hello = { role: 'client' as const, name: 'c', resources: {}, threads: 0, memoryLimit: 0, address: '', pid: 1 };

describe('Connection', () => {
  it('stops writing above the high-water mark until the peer drains, then delivers everything in order', async () => {
    const { server, client } = await pair();
    const got: number[] = [];
    const rx = new Connection(server, { receives: 'w2s', onMessages: (ms) => ms.forEach((m) => m.op === 'log' && got.push(m.records[0]!.at)) });
    const HWM = 256 * 1024;
    const tx = new Connection(client, { highWaterBytes: HWM });
    // The receiving process stops reading: the kernel buffers fill, then ws's.
    const raw = (server as unknown as { _socket: Socket })._socket;
    raw.pause();
    const big = 'x'.repeat(64 * 1024);
    let sent = 0;
    let maxBuffered = 0;
    for (; sent < 2_000 && !tx.isPaused; sent++) {
      expect(tx.send({ op: 'log', records: [{ level: 'info', msg: big, at: sent }] })).toBe(true);
      tx.flush();
      maxBuffered = Math.max(maxBuffered, client.bufferedAmount);
      if (sent % 8 === 0) await new Promise((r) => setImmediate(r));
    }
    expect(tx.isPaused).toBe(true);
    // While paused nothing more is written: messages queue in the batcher.
    const before = client.bufferedAmount;
    for (let i = 0; i < 20; i++) tx.send({ op: 'log', records: [{ level: 'info', msg: big, at: sent + i }] });
    tx.flush();
    expect(client.bufferedAmount).toBe(before);
    expect(tx.batcher.queuedBytes).toBeGreaterThan(20 * 64 * 1024);
    // ws holds at most the mark plus the frame that crossed it.
    expect(maxBuffered).toBeLessThanOrEqual(HWM + 70 * 1024);
    raw.resume();
    const total = sent + 20;
    await waitFor('every message delivered', () => got.length === total, 10_000);
    expect(got).toEqual(Array.from({ length: total }, (_, i) => i));
    await waitFor('the sender to resume', () => !tx.isPaused, 10_000);
    void rx;
  });

  it('hands messages that came in the same frame as the welcome to the owner', async () => {
    const { server, client } = await pair();
    const rx = new Connection(server);
    const tx = new Connection(client, { receives: 's2c' });
    const accepted = acceptHandshake(rx, { roles: ['client'], admit: () => ({ id: 'c1', heartbeatMs: 500 }) }).then((a) => {
      // The accepting side sends right behind its welcome (same tick, so the same frame).
      rx.send({ op: 'runState', graph: 7, state: 'accepted' });
      return a;
    });
    const seen: string[] = [];
    const welcome = await openHandshake(tx, { hello });
    tx.onMessages = (ms) => ms.forEach((m) => seen.push(m.op));
    await accepted;
    expect(welcome.id).toBe('c1');
    await waitFor('the message after the welcome', () => seen.includes('runState'), 5_000);
  });

  it('refuses a wrong role and closes with the reason counted', async () => {
    const { server, client } = await pair();
    const rx = new Connection(server);
    const tx = new Connection(client, { receives: 's2c' });
    const accepted = acceptHandshake(rx, { roles: ['worker'], admit: () => ({ id: 'w1', heartbeatMs: 500 }) }).catch((e: Error) => e);
    const refused = await openHandshake(tx, { hello }).catch((e: Error & { code?: string }) => e);
    expect((refused as { code?: string }).code).toBe('BAD_ROLE');
    expect(await accepted).toBeInstanceOf(Error);
    await waitFor('both ends closed', () => rx.closed && tx.closed, 5_000);
  });
});

describe('heartbeatInterval', () => {
  it('stays at the base up to 50 workers, then grows with the cluster', () => {
    expect(heartbeatInterval(1)).toBe(500);
    expect(heartbeatInterval(50)).toBe(500);
    expect(heartbeatInterval(100)).toBe(1000);
    expect(heartbeatInterval(500)).toBe(5000);
    expect(heartbeatInterval(500, 100)).toBe(1000);
  });
});
