/**
 * The cluster worker against a small, faithful scheduler double (a `ws` server speaking
 * the protocol through `Connection` + `acceptHandshake`), over real sockets on
 * 127.0.0.1, with real task modules (`fixtures/exec-tasks.ts`) and a few tasks this file
 * registers in-process (inline mode runs them in this thread).
 */
import { execFileSync } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { createServer as createHttpsServer } from 'node:https';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { WebSocketServer, type WebSocket } from 'ws';
import { acceptHandshake, Connection } from '../src/cluster/connection.ts';
import type { DataMsg, HelloMsg, Message, MessageOf, Op, WireCall, WireDep, WireOutcome } from '../src/cluster/protocol.ts';
import { outcomesOf } from '../src/cluster/protocol.ts';
import { startWorker, type ClusterWorker, type WorkerOptions } from '../src/cluster/worker.ts';
import { parseMemoryLimit, parseResources, workerCommand } from '../src/cli/worker.ts';
import { packValue, unpackValue, WorkerStore } from '../src/cluster/worker-store.ts';
import { PeerClients } from '../src/cluster/peer.ts';
import { taskOptions } from '../src/flow/defaults.ts';
import { registerTask } from '../src/flow/registry.ts';
import { MODULE, key } from './fixtures/exec-tasks.ts';

// ---- tasks of this file (inline mode finds them in this thread's registry) ----------

const T = 'test-cluster-worker#';
function def(name: string, fn: (...args: any[]) => unknown): void {
  registerTask({ key: T + name, name, module: '', fn, options: taskOptions({ name }), closure: false });
}
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
def('sum', (xs: number[]) => xs.reduce((a, b) => a + b, 0));
def('range', (n: number) => Array.from({ length: n }, (_, i) => i));
def('pair', (a: unknown, b: unknown) => [a, b]);
def('say', (msg: string) => {
  console.log('said', msg, 42);
  console.error('oops %d', 7);
  return msg.length;
});
def('sayLater', async (msg: string) => {
  await sleep(5);
  console.warn(`later ${msg}`);
  return 1;
});

// ---- the scheduler double -----------------------------------------------------------

/** One worker as the double sees it. */
class Link {
  readonly msgs: Message[] = [];
  closedWith: { reason: string; code: string } | null = null;
  private readonly listeners = new Set<() => void>();
  private nextId = 1;

  constructor(
    readonly conn: Connection,
    readonly hello: HelloMsg,
    readonly id: string,
  ) {
    conn.onMessages = (msgs) => {
      this.msgs.push(...msgs);
      for (const l of this.listeners) l();
    };
    const prev = conn.onClose;
    conn.onClose = (reason, code) => {
      this.closedWith = { reason, code };
      prev(reason, code);
      for (const l of this.listeners) l();
    };
  }

  send(m: Message): void {
    this.conn.send(m);
  }

  id_(): number {
    return this.nextId++;
  }

  all<K extends Op>(op: K): MessageOf<K>[] {
    return this.msgs.filter((m): m is MessageOf<K> => m.op === op);
  }

  outcomes(): WireOutcome[] {
    return this.all('outcomes').flatMap((m) => outcomesOf(m));
  }

  outcome(id: number): WireOutcome | undefined {
    return this.outcomes().find((o) => o.id === id);
  }

  /** Resolves when `check` returns something other than undefined (checked on every message). */
  when<R>(check: () => R | undefined, what = 'condition', ms = 10_000): Promise<R> {
    return new Promise<R>((resolve, reject) => {
      const attempt = (): boolean => {
        const r = check();
        if (r === undefined) return false;
        this.listeners.delete(attempt as () => void);
        clearTimeout(timer);
        resolve(r);
        return true;
      };
      const timer = setTimeout(() => {
        this.listeners.delete(attempt as () => void);
        reject(new Error(`timed out waiting for ${what}; got ${JSON.stringify(this.msgs.map((m) => m.op))}`));
      }, ms);
      if (!attempt()) this.listeners.add(attempt as () => void);
    });
  }

  first<K extends Op>(op: K, pred: (m: MessageOf<K>) => boolean = () => true): Promise<MessageOf<K>> {
    return this.when(() => this.all(op).find(pred), `"${op}"`);
  }

  waitOutcomes(ids: readonly number[]): Promise<WireOutcome[]> {
    return this.when(() => {
      const got = ids.map((id) => this.outcome(id));
      return got.every((o) => o !== undefined) ? (got as WireOutcome[]) : undefined;
    }, `outcomes of ${ids.join(', ')}`);
  }

  waitClosed(): Promise<{ reason: string; code: string }> {
    return this.when(() => this.closedWith ?? undefined, 'close');
  }

  compute(run: number, calls: WireCall[], peers?: Record<string, string>, bundle = ''): void {
    this.send({ op: 'compute', run, modules: [MODULE], bundle, calls, ...(peers !== undefined ? { peers } : {}) });
  }
}

class FakeScheduler {
  readonly links: Link[] = [];
  /** Handshakes that did not complete (refused, closed). */
  failedHandshakes = 0;
  private readonly waiting: ((l: Link) => void)[] = [];
  private serial = 0;

  private constructor(
    readonly wss: WebSocketServer,
    readonly port: number,
    readonly o: { token?: string; heartbeatMs: number },
  ) {
    wss.on('connection', (ws: WebSocket) => this.accept(ws));
  }

  static async start(o: DoubleOptions = {}): Promise<FakeScheduler> {
    let wss: WebSocketServer;
    let close: (() => void) | null = null;
    if (o.tls !== undefined) {
      const server = createHttpsServer({ ...o.tls, requestCert: true, rejectUnauthorized: true });
      wss = new WebSocketServer({ server });
      await new Promise<void>((resolve) => server.listen(o.port ?? 0, '127.0.0.1', resolve));
      close = () => {
        server.closeAllConnections();
        server.close();
      };
    } else {
      wss = new WebSocketServer({ host: '127.0.0.1', port: o.port ?? 0 });
      await new Promise<void>((resolve, reject) => {
        wss.once('listening', resolve);
        wss.once('error', reject);
      });
    }
    const port = ((o.tls !== undefined ? (wss.options.server?.address() as AddressInfo) : (wss.address() as AddressInfo))).port;
    const s = new FakeScheduler(wss, port, { heartbeatMs: o.heartbeatMs ?? 1000, ...(o.token !== undefined ? { token: o.token } : {}) });
    s.secure = o.tls !== undefined;
    s.closeServer = close;
    return s;
  }

  secure = false;
  private closeServer: (() => void) | null = null;

  get url(): string {
    return `${this.secure ? 'wss' : 'ws'}://127.0.0.1:${this.port}`;
  }

  private accept(ws: WebSocket): void {
    const conn = new Connection(ws, { receives: 'w2s', label: 'double' });
    acceptHandshake(conn, {
      roles: ['worker'],
      ...(this.o.token !== undefined ? { token: this.o.token } : {}),
      admit: (h) => ({ id: `w${++this.serial}-${h.name}`, heartbeatMs: this.o.heartbeatMs }),
    }).then(
      (acc) => {
        const link = new Link(conn, acc.hello, acc.id);
        this.links.push(link);
        const ws_ = this.waiting.splice(0);
        for (const r of ws_) r(link);
      },
      () => {
        this.failedHandshakes++;
      },
    );
  }

  /** The next worker to complete a handshake (or the first one not yet taken). */
  nextLink(after = this.links.length): Promise<Link> {
    const have = this.links[after];
    if (have !== undefined) return Promise.resolve(have);
    return new Promise<Link>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no worker connected')), 10_000);
      const take = (): void => {
        const l = this.links[after];
        if (l === undefined) {
          this.waiting.push(take);
          return;
        }
        clearTimeout(timer);
        resolve(l);
      };
      this.waiting.push(take);
    });
  }

  async close(): Promise<void> {
    for (const ws of this.wss.clients) ws.terminate();
    await new Promise<void>((resolve) => this.wss.close(() => resolve()));
    this.closeServer?.();
  }
}

interface DoubleOptions {
  port?: number;
  token?: string;
  heartbeatMs?: number;
  tls?: { cert: Buffer; key: Buffer; ca: Buffer };
}

// ---- helpers ------------------------------------------------------------------------

let nextRunId = 1;
function call(id: number, taskKey: string, args: unknown[], extra: Partial<WireCall> = {}): WireCall {
  return {
    id,
    runId: nextRunId++,
    taskKey,
    key: `${taskKey.slice(taskKey.lastIndexOf('#') + 1)}-${id}`,
    args,
    timeoutMs: 0,
    mapIndex: -1,
    attempt: 1,
    loopCount: 0,
    loopResult: undefined,
    ...extra,
  };
}

function dep(k: string, holders: string[], arg = 0, index = -1, path?: number[]): WireDep {
  return { key: k, holders, nbytes: 100, arg, index, ...(path !== undefined ? { path } : {}) };
}

async function until(check: () => boolean, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!check()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

const schedulers: FakeScheduler[] = [];
const workers: ClusterWorker[] = [];
const dirs: string[] = [];
let logs: string[] = [];

async function scheduler(o: DoubleOptions = {}): Promise<FakeScheduler> {
  const s = await FakeScheduler.start(o);
  schedulers.push(s);
  return s;
}

async function worker(s: FakeScheduler | string, o: Partial<WorkerOptions> = {}): Promise<ClusterWorker> {
  const w = await startWorker({
    scheduler: typeof s === 'string' ? s : s.url,
    name: `wk${workers.length + 1}`,
    log: (line) => logs.push(line),
    reconnect: { minMs: 20, maxMs: 200 },
    ...o,
  });
  workers.push(w);
  return w;
}

/** A double with one connected worker. */
/** The credit levels a 1-thread worker with saturation 2 moves between (base, <10 ms, <1 ms, <50 µs). */
const CREDIT_LEVELS = [2, 16, 256, 2048];

/** Two workers on a double; the first holds `1:1` (a 100-element list). */
async function twoWorkersOneHeld(): Promise<{ w1: ClusterWorker; l1: Link; l2: Link }> {
  const s = await scheduler();
  const w1 = await worker(s);
  const l1 = await s.nextLink(0);
  await worker(s);
  const l2 = await s.nextLink(1);
  l1.compute(1, [call(1, T + 'range', [100])]);
  await l1.waitOutcomes([1]);
  return { w1, l1, l2 };
}

async function connected(o: Partial<WorkerOptions> = {}, so: { heartbeatMs?: number } = {}): Promise<{ s: FakeScheduler; w: ClusterWorker; link: Link }> {
  const s = await scheduler(so);
  const w = await worker(s, o);
  const link = await s.nextLink(0);
  await w.connectedOnce;
  return { s, w, link };
}

async function getData(link: Link, keys: string[]): Promise<DataMsg> {
  const id = link.id_() + 10_000;
  link.send({ op: 'getData', id, keys });
  return link.first('data', (m) => m.id === id);
}

afterEach(async () => {
  await Promise.all(workers.splice(0).map((w) => w.close()));
  await Promise.all(schedulers.splice(0).map((s) => s.close()));
  await Promise.all(dirs.splice(0).map((d) => rm(d, { recursive: true, force: true })));
  // The workers' diagnostics, for debugging a failing case: WEFT_TEST_LOGS=1.
  if (process.env.WEFT_TEST_LOGS !== undefined) console.info(logs.join('\n'));
  logs = [];
});

// ---- tests ----------------------------------------------------------------------------

describe('cluster worker: connection', () => {
  it('says hello with its peer address, gets a welcome, sends credits and heartbeats with metrics', async () => {
    const { w, link } = await connected({ threads: 1, saturation: 3, resources: { GPU: 1 } }, { heartbeatMs: 30 });
    expect(link.hello).toMatchObject({ role: 'worker', name: 'wk1', threads: 1, resources: { GPU: 1 }, pid: process.pid, memoryLimit: 0 });
    expect(link.hello.address).toBe(w.address);
    expect(w.address).toMatch(/^ws:\/\/127\.0\.0\.1:\d+$/);
    expect(w.connected).toBe(true);
    expect(w.id).toBe(link.id);
    const credits = await link.first('credits');
    expect(credits.credits).toBe(3);
    const hb = await link.first('heartbeat', (m) => m.metrics !== undefined);
    expect(hb.metrics).toMatchObject({ executing: 0, queued: 0, heldBytes: 0, heldCount: 0, spilledBytes: 0, peerFetchedKeys: 0, peerFetchedBytes: 0, peerServedKeys: 0 });
    expect(hb.metrics!.rss).toBeGreaterThan(0);
    expect(typeof hb.metrics!.eventLoopDelayMs).toBe('number');
  });

  it('is refused with a wrong token, retries with backoff (no spinning), and connects once the scheduler accepts it', async () => {
    const s = await scheduler({ token: 'right' });
    const w = await worker(s, { token: 'wrong', reconnect: { minMs: 50, maxMs: 400 } });
    await sleep(1000);
    // 50, 100, 200, 400, 400 ms (halved at worst by jitter): a handful, not hundreds.
    expect(s.failedHandshakes).toBeGreaterThanOrEqual(2);
    expect(s.failedHandshakes).toBeLessThanOrEqual(12);
    expect(s.links).toHaveLength(0);
    expect(w.connected).toBe(false);
    expect(logs.some((l) => l.includes('AUTH_FAILED') || l.includes('did not verify'))).toBe(true);
    // The scheduler restarts on the same port with the worker's token.
    const port = s.port;
    await s.close();
    const s2 = await scheduler({ port, token: 'wrong' });
    const link = await s2.nextLink(0);
    await w.waitConnected();
    expect(link.hello.name).toBe(w.name);
    expect((await link.first('credits')).credits).toBe(2);
  });

  it('drops its state and reconnects with a fresh connection when the scheduler restarts', async () => {
    const { s, w, link } = await connected();
    link.compute(1, [call(1, key('bytes'), [500])]);
    await link.waitOutcomes([1]);
    expect(w.metrics().heldCount).toBe(1);
    const port = s.port;
    await s.close();
    await until(() => !w.connected, 'disconnect');
    expect(w.metrics().heldCount).toBe(0);
    const s2 = await scheduler({ port });
    const link2 = await s2.nextLink(0);
    await w.waitConnected();
    expect(link2.hello.address).toBe(w.address);
    await link2.first('credits');
    expect((await getData(link2, ['1:1'])).missing).toEqual(['1:1']);
    // Works as before on the new connection.
    link2.compute(1, [call(2, key('add'), [2, 3])]);
    expect((await link2.waitOutcomes([2]))[0]).toMatchObject({ status: 'ok', value: 5 });
  });

  it('closes only the connection on a malformed frame, then reconnects', async () => {
    const { s, w, link } = await connected();
    await link.first('credits');
    link.conn.ws.send(Buffer.from([0xc1, 0xc1, 0xff]), { binary: true });
    const closed = await link.waitClosed();
    expect(closed.code).not.toBe('MALFORMED_FRAME'); // the worker closed it: this side only saw the socket go
    const link2 = await s.nextLink(1);
    await w.waitConnected();
    expect(link2.hello.name).toBe(w.name);
    expect(logs.some((l) => /malformed|MALFORMED/i.test(l))).toBe(true);
  });

  it('closes the connection on a message with a bad call, and reconnects', async () => {
    const { s, link } = await connected();
    await link.first('credits');
    link.send({ op: 'compute', run: 1, modules: [MODULE], bundle: '', calls: [{ id: 'x' } as unknown as WireCall] });
    await link.waitClosed();
    const link2 = await s.nextLink(1);
    // (A message in the welcome's own frame would be lost: openHandshake stops at the
    // welcome. The scheduler sends work only after the worker's credits.)
    await link2.first('credits');
    link2.compute(1, [call(1, key('add'), [1, 1])]);
    expect((await link2.waitOutcomes([1]))[0]).toMatchObject({ status: 'ok', value: 2 });
  });
});

describe('cluster worker: compute', () => {
  it('runs calls: small values inline, big ones held with nbytes, len and inner', async () => {
    const { link } = await connected();
    const nested = [Array.from({ length: 100 }, (_, i) => i), [1, 2, 3]];
    link.compute(1, [
      call(1, key('add'), [1, 2]),
      call(2, key('noop'), []),
      call(3, key('bytes'), [1000]),
      call(4, key('echo'), [nested]),
      call(5, key('bytes'), [200], { ret: true }),
      call(6, key('boom'), ['bad input']),
      call(7, key('unsendable'), []),
      call(8, 'file:///nowhere.ts#missing', []),
    ]);
    const [o1, o2, o3, o4, o5, o6, o7, o8] = await link.waitOutcomes([1, 2, 3, 4, 5, 6, 7, 8]);
    expect(o1).toMatchObject({ status: 'ok', value: 3, len: -1 });
    expect(o1!.nbytes).toBeGreaterThan(0);
    expect(o1!.endMs).toBeGreaterThanOrEqual(o1!.startMs);
    expect(o2!.status).toBe('ok');
    expect('value' in o2!).toBe(true); // undefined, inline
    expect(o3!.status).toBe('ok');
    expect('value' in o3!).toBe(false);
    expect(o3!.nbytes).toBeGreaterThan(1000);
    expect(o3!.len).toBe(-1);
    expect(o4).toMatchObject({ status: 'ok', len: 2, inner: [100, 3] });
    expect('value' in o4!).toBe(false);
    expect(o5!.status).toBe('ok');
    expect(o5!.nbytes).toBeGreaterThan(200);
    expect(new Uint8Array(o5!.value as Uint8Array)).toHaveLength(200); // ret: inline whatever its size
    expect(o6).toMatchObject({ status: 'error', error: { name: 'TypeError', message: 'bad input' } });
    expect(o7).toMatchObject({ status: 'error', error: { name: 'TaskSerializationError' } });
    expect(o7!.error!.message).toContain('unsendable-7');
    expect(o8).toMatchObject({ status: 'error', error: { name: 'TaskResolutionError' } });
    // Only the big, non-ret results are held; getData serves their bytes.
    const d = await getData(link, ['1:3', '1:4', '1:1', '1:5']);
    expect(d.keys).toEqual(['1:3', '1:4']);
    expect(d.missing).toEqual(['1:1', '1:5']);
    const b = unpackValue(d.values[0]!) as Uint8Array;
    expect(b).toBeInstanceOf(Uint8Array);
    expect(b.byteLength).toBe(1000);
    expect(b[999]).toBe(999 & 0xff);
    expect(unpackValue(d.values[1]!)).toEqual(nested);
    // Credits come back one per outcome; other credits messages only raise the depth
    // because these tasks are short (2,048 per thread under 50 µs, 256 under 1 ms).
    // (Measured durations drive the level; under load a GC pause can lower it for a while.)
    const levels = link.all('credits').map((m) => m.credits);
    expect(levels[0]).toBe(2);
    expect(levels.length).toBeGreaterThan(1);
    expect(Math.max(...levels)).toBeGreaterThanOrEqual(256);
    for (const c of levels.slice(1)) expect(CREDIT_LEVELS).toContain(c);
  });

  it('fails calls of a malformed bundle hash clearly', async () => {
    const { link } = await connected();
    link.compute(2, [call(1, key('add'), [1, 2])], undefined, 'sha256-abc');
    const [o] = await link.waitOutcomes([1]);
    expect(o).toMatchObject({ status: 'error', error: { code: 'BUNDLE_UNAVAILABLE', message: expect.stringContaining('sha256-abc') } });
  });

  it('runs calls on a thread pool when threads > 1', async () => {
    const { link } = await connected({ threads: 2 });
    expect((await link.first('credits')).credits).toBe(4);
    link.compute(1, [call(1, key('add'), [1, 2]), call(2, key('busy'), [20]), call(3, key('bytes'), [300]), call(4, key('boom'), ['x'])]);
    const [o1, o2, o3, o4] = await link.waitOutcomes([1, 2, 3, 4]);
    expect(o1).toMatchObject({ status: 'ok', value: 3 });
    expect(o2).toMatchObject({ status: 'ok', value: 20 });
    expect(o3!.status).toBe('ok');
    expect('value' in o3!).toBe(false);
    expect(o4).toMatchObject({ status: 'error', error: { name: 'TypeError' } });
    const d = await getData(link, ['1:3']);
    expect((unpackValue(d.values[0]!) as Uint8Array).byteLength).toBe(300);
  });
});

describe('cluster worker: inputs', () => {
  it('fills inputs from results held here: whole, by path, into a list slot', async () => {
    const { link } = await connected();
    link.compute(1, [call(1, T + 'range', [100])]);
    expect('value' in (await link.waitOutcomes([1]))[0]!).toBe(false); // held
    const me = link.id;
    link.compute(1, [
      call(2, T + 'sum', [null], { deps: [dep('1:1', [me])] }),
      call(3, T + 'sum', [[100, null, 1000]], { deps: [dep('1:1', [me], 0, 1, [29])] }),
      call(4, T + 'pair', [null, null], { deps: [dep('1:1', [me], 0, -1, [3]), dep('1:1', [me], 1, -1, [4])] }),
      call(5, T + 'sum', [null], { deps: [dep('1:1', [me], 0, -1, [999])] }),
    ]);
    const [o2, o3, o4, o5] = await link.waitOutcomes([2, 3, 4, 5]);
    expect(o2).toMatchObject({ status: 'ok', value: 4950 });
    expect(o3).toMatchObject({ status: 'ok', value: 1129 });
    expect(o4).toMatchObject({ status: 'ok', value: [3, 4] });
    expect(o5).toMatchObject({ status: 'error', error: { code: 'BAD_DEP' } });
    expect(link.all('getData')).toHaveLength(0);
  });

  it('fetches inputs from another worker over a peer connection', async () => {
    const s = await scheduler();
    const w1 = await worker(s);
    const l1 = await s.nextLink(0);
    const w2 = await worker(s);
    const l2 = await s.nextLink(1);
    await Promise.all([w1.connectedOnce, w2.connectedOnce]);
    l1.compute(1, [call(1, T + 'range', [100]), call(2, T + 'range', [80])]);
    await l1.waitOutcomes([1, 2]);
    // Both keys wanted from w1 in one tick: one request.
    l2.compute(
      1,
      [call(3, T + 'sum', [null], { deps: [dep('1:1', [l1.id])] }), call(4, T + 'pair', [null, null], { deps: [dep('1:1', [l1.id], 0, -1, [7]), dep('1:2', [l1.id], 1, -1, [79])] })],
      { [l1.id]: w1.address },
    );
    const [o3, o4] = await l2.waitOutcomes([3, 4]);
    expect(o3).toMatchObject({ status: 'ok', value: 4950 });
    expect(o4).toMatchObject({ status: 'ok', value: [7, 79] });
    expect(l2.all('getData')).toHaveLength(0); // no relay
    // Peers are remembered from earlier compute messages.
    l2.compute(1, [call(5, T + 'sum', [null], { deps: [dep('1:2', [l1.id])] })]);
    expect((await l2.waitOutcomes([5]))[0]).toMatchObject({ status: 'ok', value: 3160 });
    // The fetched copy is not held (not advertised) on w2.
    expect((await getData(l2, ['1:1'])).missing).toEqual(['1:1']);
    // Counted on both sides (heartbeat metrics).
    const fetched = w2.metrics();
    expect(fetched.peerFetchedKeys).toBeGreaterThanOrEqual(2);
    expect(fetched.peerFetchedBytes).toBeGreaterThan(0);
    expect(w1.metrics().peerServedKeys).toBe(fetched.peerFetchedKeys);
    expect(w1.metrics().peerFetchedKeys).toBe(0);
  });

  it('falls back to the scheduler relay when no peer delivers, and reports INPUT_LOST when nobody has it', async () => {
    const { link } = await connected();
    link.compute(
      1,
      [
        call(1, T + 'sum', [null], { deps: [dep('9:1', ['ghost'])] }),
        call(2, T + 'sum', [null], { deps: [dep('9:2', ['ghost', 'nobody'])] }),
      ],
      { ghost: 'ws://127.0.0.1:1', nobody: 'not an address' },
    );
    const req = await link.first('getData');
    expect([...req.keys].sort()).toEqual(['9:1', '9:2']);
    link.send({ op: 'data', id: req.id, keys: ['9:1'], values: [packValue([1, 2, 3])], missing: ['9:2'] });
    const [o1, o2] = await link.waitOutcomes([1, 2]);
    expect(o1).toMatchObject({ status: 'ok', value: 6 });
    expect(o2).toMatchObject({ status: 'lost', error: { name: 'WorkerLostError', code: 'INPUT_LOST' } });
    expect(o2!.error!.message).toBe('input 9:2 of task "sum-2" could not be fetched from ghost, nobody or the scheduler');
  });

  it('does not let a slow fetch hold up other calls', async () => {
    const { link } = await connected();
    link.compute(1, [call(1, T + 'sum', [null], { deps: [dep('9:1', [])] }), call(2, key('add'), [1, 1])]);
    const [o2] = await link.waitOutcomes([2]);
    expect(o2!.value).toBe(2);
    const req = await link.first('getData');
    expect(link.outcome(1)).toBeUndefined();
    link.send({ op: 'data', id: req.id, keys: ['9:1'], values: [packValue([5])], missing: [] });
    expect((await link.waitOutcomes([1]))[0]).toMatchObject({ status: 'ok', value: 5 });
  });

  it('acquires results from a peer and holds them as its own', async () => {
    const { w1, l2 } = await twoWorkersOneHeld();
    l2.send({ op: 'acquire', id: 5, from: { '1:1': w1.address, '1:77': w1.address, '1:78': '%%' } });
    const acq = await l2.first('acquired');
    expect(acq).toMatchObject({ id: 5, keys: ['1:1'], missing: ['1:77', '1:78'] });
    const d = await getData(l2, ['1:1']);
    expect(unpackValue(d.values[0]!)).toEqual(Array.from({ length: 100 }, (_, i) => i));
    l2.compute(1, [call(2, T + 'sum', [null], { deps: [dep('1:1', [l2.id])] })]);
    expect((await l2.waitOutcomes([2]))[0]).toMatchObject({ status: 'ok', value: 4950 });
  });
});

describe('cluster worker: peer server', () => {
  it('serves peers that prove the cluster token, and nobody else', async () => {
    const s = await scheduler({ token: 'sesame' });
    const w = await worker(s, { token: 'sesame' });
    const link = await s.nextLink(0);
    await link.first('credits');
    link.compute(1, [call(1, T + 'range', [100])]);
    await link.waitOutcomes([1]);
    const serve = (): Promise<never> => Promise.reject(new Error('not asked'));
    const bad = new PeerClients({ name: 'intruder', address: '', token: 'guess', serve, log: () => undefined });
    const none = new PeerClients({ name: 'anonymous', address: '', serve, log: () => undefined });
    const good = new PeerClients({ name: 'friend', address: '', token: 'sesame', serve, log: () => undefined });
    try {
      expect(await bad.fetch(w.address, '1:1')).toBeUndefined();
      expect(await none.fetch(w.address, '1:1')).toBeUndefined();
      const [a, b, missing] = await Promise.all([good.fetch(w.address, '1:1'), good.fetch(w.address, '1:1'), good.fetch(w.address, '1:2')]);
      expect(unpackValue(a!)).toHaveLength(100);
      expect(b).toBe(a); // one key asked once per batch, every waiter served
      expect(missing).toBeUndefined();
      expect(good.size).toBe(1);
    } finally {
      bad.close();
      none.close();
      good.close();
    }
  });
});

describe('cluster worker: ahead calls', () => {
  it('runs an ahead call after its producer, with the producer result, in one batch or later', async () => {
    const { link } = await connected();
    link.compute(1, [
      call(1, key('asyncAdd'), [1, 2, 30]),
      call(2, T + 'pair', [null, 'x'], { deps: [dep('1:1', [])] }),
      call(3, T + 'range', [100]),
    ]);
    link.compute(1, [call(4, T + 'sum', [null], { deps: [dep('1:3', [])] })]);
    const [o1, o2, o3, o4] = await link.waitOutcomes([1, 2, 3, 4]);
    expect(o1).toMatchObject({ status: 'ok', value: 3 });
    expect(o2).toMatchObject({ status: 'ok', value: [3, 'x'] });
    expect('value' in o3!).toBe(false);
    expect(o4).toMatchObject({ status: 'ok', value: 4950 });
    expect(o2!.startMs).toBeGreaterThanOrEqual(o1!.endMs);
    // An ahead call arriving after its (inline) producer ended still gets its value.
    link.compute(1, [call(5, T + 'pair', [null, 'y'], { deps: [dep('1:1', [])] })]);
    expect((await link.waitOutcomes([5]))[0]).toMatchObject({ status: 'ok', value: [3, 'y'] });
    expect(link.all('getData')).toHaveLength(0);
  });

  it('drops ahead calls (cancelled, AHEAD_DROPPED) when their producer fails, before or after they arrive', async () => {
    const { link } = await connected();
    link.compute(1, [call(1, key('asyncBoom'), ['no']), call(2, T + 'sum', [null], { deps: [dep('1:1', [])] })]);
    const [o1, o2] = await link.waitOutcomes([1, 2]);
    expect(o1).toMatchObject({ status: 'error', error: { name: 'RangeError' } });
    expect(o2).toMatchObject({ status: 'cancelled', error: { name: 'CancelledError', code: 'AHEAD_DROPPED' } });
    link.compute(1, [call(3, T + 'sum', [null], { deps: [dep('1:1', [])] })]);
    expect((await link.waitOutcomes([3]))[0]).toMatchObject({ status: 'cancelled', error: { code: 'AHEAD_DROPPED' } });
  });
});

describe('cluster worker: cancel, steal, release', () => {
  it('cancels queued and running calls, each with one cancelled outcome', async () => {
    const { link } = await connected();
    link.compute(1, [call(1, key('sleep'), [5000]), call(2, key('sleep'), [5000]), call(3, T + 'sum', [null], { deps: [dep('9:9', [])] })]);
    await until(() => link.all('getData').length > 0, 'relay request');
    link.send({ op: 'cancelTasks', run: 1, tasks: [1, 2, 3, 42] });
    const outs = await link.waitOutcomes([1, 2, 3]);
    for (const o of outs) expect(o).toMatchObject({ status: 'cancelled', error: { name: 'CancelledError' } });
    await sleep(50);
    expect(link.outcomes()).toHaveLength(3);
  });

  it('steals only calls that never started; stolen calls never produce an outcome', async () => {
    const { w, link } = await connected();
    link.compute(1, [call(1, key('sleep'), [150]), call(2, key('sleep'), [150]), call(3, key('sleep'), [150])]);
    // Call 1 starts; 2 and 3 wait in the worker's queue (a task not measured yet counts as slow; one thread).
    await until(() => w.metrics().executing === 1, 'call 1 running');
    link.send({ op: 'steal', id: 7, run: 1, tasks: [1, 2, 3, 99] });
    const reply = await link.first('stealReply');
    expect(reply).toMatchObject({ id: 7, run: 1, stolen: [2, 3], kept: [1, 99] });
    await link.waitOutcomes([1]);
    await sleep(400);
    expect(link.outcomes().map((o) => o.id)).toEqual([1]);
  });

  it('hands fast tasks to the executor in whole batches, slow ones one per thread (the rest stay stealable)', async () => {
    const { w, link } = await connected({ saturation: 100 });
    // 'add' must be measured short enough that 51 calls fit the executor's hands (the
    // worker hands over about 2 ms of estimated work): on a loaded machine the first
    // calls can take milliseconds, so warm up until the worker's moving average (replayed
    // here from the outcome stamps, same weight) is a few µs.
    let ema: number | undefined;
    for (let round = 0, id = 1000; round < 40 && (ema === undefined || ema > 0.01); round++) {
      const ids = Array.from({ length: 20 }, () => id++);
      link.compute(1, ids.map((i) => call(i, key('add'), [i, 0])));
      for (const o of await link.waitOutcomes(ids)) {
        const d = o.endMs - o.startMs;
        ema = ema === undefined ? d : ema + 0.3 * (d - ema);
      }
    }
    expect(ema).toBeLessThan(0.01);
    const fast = Array.from({ length: 50 }, (_, i) => call(100 + i, key('add'), [i, 1]));
    // Long enough that the first one still runs when the checks below look, on a loaded machine too.
    const slow = Array.from({ length: 5 }, (_, i) => call(200 + i, key('sleep'), [2_000]));
    link.compute(1, [...slow, ...fast]);
    await until(() => w.metrics().executing >= 1, 'work started');
    link.send({ op: 'steal', id: 3, run: 1, tasks: [...slow, ...fast].map((c) => c.id) });
    const reply = await link.first('stealReply');
    // The first slow call runs; the other four wait here (one thread) and are stolen, and
    // the fast calls behind them stay queued in order (FIFO per run), stealable too.
    expect(reply.kept).toEqual([200]);
    expect(reply.stolen).toHaveLength(54);
    // Fast calls alone go to the executor at once: nothing is left to steal.
    const more = Array.from({ length: 50 }, (_, i) => call(300 + i, key('add'), [i, 2]));
    link.compute(1, more);
    // They queue in the executor behind the running sleep: handed over, no longer stealable.
    await until(() => w.metrics().executing === 51 && w.metrics().queued === 0, 'fast calls handed over');
    link.send({ op: 'steal', id: 4, run: 1, tasks: more.map((c) => c.id) });
    const r2 = await link.first('stealReply', (m) => m.id === 4);
    expect(r2.stolen.length).toBe(0);
    await link.waitOutcomes([200, ...more.map((c) => c.id)]);
  });

  it('drops ahead calls whose producer was stolen', async () => {
    const { w, link } = await connected();
    link.compute(1, [call(1, key('sleep'), [150]), call(2, key('sleep'), [10]), call(3, T + 'sum', [null], { deps: [dep('1:2', [])] })]);
    await until(() => w.metrics().executing === 1, 'call 1 running');
    link.send({ op: 'steal', id: 8, run: 1, tasks: [2] });
    expect((await link.first('stealReply')).stolen).toEqual([2]);
    const [o3] = await link.waitOutcomes([3]);
    expect(o3).toMatchObject({ status: 'cancelled', error: { code: 'AHEAD_DROPPED' } });
    await link.waitOutcomes([1]);
    expect(link.outcome(2)).toBeUndefined();
  });

  it('releases results by key and whole runs with "<run>:*"', async () => {
    const { w, link } = await connected();
    link.compute(1, [call(1, key('bytes'), [500]), call(2, key('bytes'), [600])]);
    link.compute(2, [call(1, key('bytes'), [700])]);
    await link.waitOutcomes([1, 2]);
    await until(() => link.outcomes().length === 3, 'three outcomes');
    expect(w.metrics().heldCount).toBe(3);
    link.send({ op: 'release', keys: ['1:1'] });
    let d = await getData(link, ['1:1', '1:2', '2:1']);
    expect(d.keys).toEqual(['1:2', '2:1']);
    link.send({ op: 'release', keys: ['1:*'] });
    d = await getData(link, ['1:2', '2:1']);
    expect(d.keys).toEqual(['2:1']);
    expect(w.metrics().heldCount).toBe(1);
    // The run can come back: a fresh executor.
    link.compute(1, [call(3, key('add'), [4, 4])]);
    await until(() => link.outcomes().some((o) => o.id === 3), 'outcome of 3');
    expect(link.outcomes().find((o) => o.id === 3)).toMatchObject({ status: 'ok', value: 8 });
  });

  it('ends the calls of a released run with cancelled outcomes', async () => {
    const { w, link } = await connected();
    link.compute(3, [call(1, key('sleep'), [5000]), call(2, key('sleep'), [5000])]);
    await until(() => w.metrics().executing === 1, 'call 1 running');
    link.send({ op: 'release', keys: ['3:*'] });
    const outs = await link.waitOutcomes([1, 2]);
    for (const o of outs) expect(o.status).toBe('cancelled');
  });
});

describe('cluster worker: logs, memory, retirement', () => {
  it('sends console output of a running task as log records, sync and after an await', async () => {
    const { link } = await connected();
    link.compute(4, [call(1, T + 'say', ['hi']), call(2, T + 'sayLater', ['there'])]);
    await link.waitOutcomes([1, 2]);
    const recs = await link.when(() => {
      const r = link.all('log').flatMap((m) => m.records);
      return r.length >= 3 ? r : undefined;
    }, 'three log records');
    expect(recs).toEqual([
      expect.objectContaining({ level: 'info', msg: 'said hi 42', worker: 'wk1', run: 4, task: 1, key: 'say-1' }),
      expect.objectContaining({ level: 'error', msg: 'oops 7', run: 4, task: 1 }),
      expect.objectContaining({ level: 'warn', msg: 'later there', run: 4, task: 2, key: 'sayLater-2' }),
    ]);
    expect(typeof recs[0]!.at).toBe('number');
  });

  it('spills held results to disk under memory pressure, serves them back, pauses and resumes credits', async () => {
    const spillDir = await mkdtemp(join(tmpdir(), 'weft-worker-test-'));
    dirs.push(spillDir);
    let rss = 10;
    const { w, link } = await connected({ memoryLimit: 100, spillDir, rss: () => rss });
    expect((await link.first('credits')).credits).toBe(2);
    link.compute(1, [call(1, key('bytes'), [5000])]);
    await link.waitOutcomes([1]);
    expect(w.metrics().heldBytes).toBeGreaterThan(5000);
    rss = 90; // above 80%: spill and pause
    await link.first('credits', (m) => m.credits === 0);
    await until(() => w.metrics().spilledBytes > 5000, 'spill');
    expect(w.metrics().heldBytes).toBe(0);
    const files = (await readdir(spillDir, { recursive: true })).filter((f) => String(f).endsWith('.bin'));
    expect(files).toHaveLength(1);
    const d = await getData(link, ['1:1']);
    expect((unpackValue(d.values[0]!) as Uint8Array).byteLength).toBe(5000);
    // A local consumer reads it back from disk too.
    link.compute(1, [call(2, key('echo'), [null], { deps: [dep('1:1', [link.id])], ret: true })]);
    expect(((await link.waitOutcomes([2]))[0]!.value as Uint8Array).byteLength).toBe(5000);
    rss = 50; // under 70%: resume, at the level short tasks earned
    const paused = link.all('credits').findIndex((m) => m.credits === 0);
    await until(() => link.all('credits').length > paused + 1, 'resume');
    const levels = link.all('credits').map((m) => m.credits);
    expect(levels[0]).toBe(2);
    expect(levels.slice(1, paused).every((c) => CREDIT_LEVELS.includes(c))).toBe(true);
    expect(levels[paused + 1]).toBe(levels[paused - 1]);
    await w.close();
    expect(await readdir(spillDir)).toEqual([]);
  });

  it('retires when the scheduler says so: running calls finish, queued ones end lost, then it closes with 1000', async () => {
    const { w, link } = await connected();
    link.compute(1, [call(1, key('sleep'), [100]), call(2, key('sleep'), [100])]);
    await until(() => w.metrics().executing === 1, 'call 1 running');
    link.send({ op: 'retire', reason: 'scale down' });
    const [o1, o2] = await link.waitOutcomes([1, 2]);
    expect(o1).toMatchObject({ status: 'ok', value: 100 });
    expect(o2).toMatchObject({ status: 'lost', error: { name: 'WorkerLostError' } });
    await w.closed;
    await link.waitClosed();
    expect(link.closedWith!.code).toBe('CLOSED');
    expect(w.connected).toBe(false);
  });

  it('retire(): asks the scheduler, keeps serving peers meanwhile, and closes on its answer', async () => {
    const { w1, l1, l2 } = await twoWorkersOneHeld();
    const leaving = w1.retire('SIGTERM');
    const msg = await l1.first('retire');
    expect(msg.reason).toBe('SIGTERM');
    // The scheduler moves w1's unique result to w2, which fetches it from w1's peer server.
    l2.send({ op: 'acquire', id: 1, from: { '1:1': w1.address } });
    expect((await l2.first('acquired')).keys).toEqual(['1:1']);
    l1.send({ op: 'retire', reason: 'results moved' });
    await leaving;
    await w1.closed;
    await l1.waitClosed();
  });
});

describe('cluster worker: TLS', () => {
  /** A CA and one certificate for 127.0.0.1 good for both ends (a worker is a server to its peers and a client to the rest). */
  async function pki(): Promise<{ ca: Buffer; cert: Buffer; key: Buffer; other: { cert: Buffer; key: Buffer } }> {
    const dir = await mkdtemp(join(tmpdir(), 'weft-worker-pki-'));
    dirs.push(dir);
    const ssl = (...args: string[]): void => {
      execFileSync('openssl', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
    };
    const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
    ssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.crt', '-days', '2', '-subj', '/CN=weft-worker-test-ca');
    ssl('req', '-x509', ...ec, '-keyout', 'other-ca.key', '-out', 'other-ca.crt', '-days', '2', '-subj', '/CN=weft-other-ca');
    await writeFile(join(dir, 'leaf.ext'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n');
    for (const [name, ca] of [['node', 'ca'], ['rogue', 'other-ca']] as const) {
      ssl('req', ...ec, '-keyout', `${name}.key`, '-out', `${name}.csr`, '-subj', `/CN=${name}`);
      ssl('x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}.crt`, '-CAkey', `${ca}.key`, '-CAcreateserial', '-out', `${name}.crt`, '-days', '2', '-extfile', 'leaf.ext');
    }
    const r = (f: string): Promise<Buffer> => readFile(join(dir, f));
    return { ca: await r('ca.crt'), cert: await r('node.crt'), key: await r('node.key'), other: { cert: await r('rogue.crt'), key: await r('rogue.key') } };
  }

  it('connects over wss with client certificates and moves data between wss peer servers', async () => {
    const p = await pki();
    const tls = { ca: p.ca, cert: p.cert, key: p.key };
    const s = await scheduler({ tls });
    const w1 = await worker(s, { tls });
    const l1 = await s.nextLink(0);
    const w2 = await worker(s, { tls });
    const l2 = await s.nextLink(1);
    expect(w1.address).toMatch(/^wss:\/\/127\.0\.0\.1:\d+$/);
    expect(w2.address).toMatch(/^wss:/);
    await Promise.all([l1.first('credits'), l2.first('credits')]);
    l1.compute(1, [call(1, T + 'range', [100])]);
    await l1.waitOutcomes([1]);
    l2.compute(1, [call(2, T + 'sum', [null], { deps: [dep('1:1', [l1.id])] })], { [l1.id]: w1.address });
    expect((await l2.waitOutcomes([2]))[0]).toMatchObject({ status: 'ok', value: 4950 });
    expect(l2.all('getData')).toHaveLength(0);
    // A peer whose certificate another CA signed gets nothing; one with the right one does.
    const serve = (): Promise<never> => Promise.reject(new Error('not asked'));
    const rogue = new PeerClients({ name: 'rogue', address: '', tls: { ca: p.ca, ...p.other }, serve, log: () => undefined });
    const good = new PeerClients({ name: 'good', address: '', tls, serve, log: () => undefined });
    try {
      expect(await rogue.fetch(w1.address, '1:1')).toBeUndefined();
      expect(unpackValue((await good.fetch(w1.address, '1:1'))!)).toHaveLength(100);
    } finally {
      rogue.close();
      good.close();
    }
    // The scheduler double refuses it as well: a worker with it never joins.
    await worker(s, { tls: { ca: p.ca, ...p.other } });
    await sleep(100);
    expect(s.links).toHaveLength(2);
  });
});

describe('WorkerStore', () => {
  it('holds, spills least recently used first, reads back, deletes by key and prefix, cleans up', async () => {
    const base = await mkdtemp(join(tmpdir(), 'weft-store-test-'));
    dirs.push(base);
    const st = new WorkerStore({ spillDir: base });
    st.put('1:1', packValue('a'.repeat(100)), 'a'.repeat(100));
    st.put('1:2', packValue([1, 2, 3]), undefined, false);
    st.put('2:1', packValue({ x: 1 }), { x: 1 });
    expect(st.valueNow('1:2')).toEqual({ found: true, value: [1, 2, 3] }); // unpacked on demand; now most recent
    const total = st.heldBytes;
    const moved = await st.spill(total - 100);
    expect(moved).toBeGreaterThanOrEqual(100); // '1:1' was least recently used
    expect(st.isSpilled('1:1')).toBe(true);
    expect(st.valueNow('1:1')).toBeUndefined();
    expect(await st.value('1:1')).toEqual({ found: true, value: 'a'.repeat(100) });
    expect(st.spilledBytes + st.heldBytes).toBe(total);
    expect(st.deletePrefix('1:')).toBe(2);
    expect(st.spilledBytes).toBe(0);
    expect(st.size).toBe(1);
    expect(await st.bytes('1:1')).toBeUndefined();
    await st.close();
    expect(await readdir(base)).toEqual([]);
  });

  it('refuses to pack functions (msgpackr would write undefined)', () => {
    expect(() => packValue({ f: () => 1 })).toThrow(/function/);
  });
});

describe('weft worker (command)', () => {
  const io = (): { out: string[]; err: string[]; signal: (s: string) => void; io: Parameters<typeof workerCommand>[1] } => {
    const out: string[] = [];
    const err: string[] = [];
    let handler: ((s: string) => void) | null = null;
    return {
      out,
      err,
      signal: (s) => handler?.(s),
      io: {
        stdout: { write: (t: string) => out.push(t) },
        stderr: { write: (t: string) => err.push(t) },
        onSignal: (h) => {
          handler = h;
          return () => {
            handler = null;
          };
        },
      },
    };
  };

  it('parses memory sizes and resources', () => {
    expect(parseMemoryLimit('2GiB')).toBe(2 * 1024 ** 3);
    expect(parseMemoryLimit('500MB')).toBe(500e6);
    expect(parseMemoryLimit('1.5g')).toBe(1.5e9);
    expect(parseMemoryLimit('1048576')).toBe(1048576);
    expect(parseMemoryLimit('64 KiB')).toBe(65536);
    expect(() => parseMemoryLimit('lots')).toThrow(/--memory-limit .*'lots'/);
    expect(() => parseMemoryLimit('2XB')).toThrow(/--memory-limit/);
    expect(parseResources('GPU=1,MEM=2.5')).toEqual({ GPU: 1, MEM: 2.5 });
    expect(() => parseResources('GPU')).toThrow(/--resources/);
    expect(() => parseResources('GPU=x')).toThrow(/--resources: GPU/);
    expect(() => parseResources('GPU=1,GPU=2')).toThrow(/given twice/);
  });

  it('refuses bad command lines with exit code 2, naming the flag', async () => {
    const cases: [string[], RegExp][] = [
      [[], /missing the scheduler address/],
      [['http://x:1'], /ws:\/\/HOST:PORT/],
      [['ws://127.0.0.1:1', '--threads', '0'], /--threads must be a positive integer/],
      [['ws://127.0.0.1:1', '--memory-limit', 'huge'], /--memory-limit/],
      [['ws://127.0.0.1:1', '--resources', 'GPU'], /--resources/],
      [['ws://127.0.0.1:1', '--tls-cert', 'a.pem'], /--tls-cert and --tls-key go together/],
      [['ws://127.0.0.1:1', '--tls-ca', '/nonexistent/ca.pem'], /--tls-ca: cannot read/],
      [['ws://127.0.0.1:1', '--token-file', '/nonexistent/token'], /cannot read token file/],
      [['ws://127.0.0.1:1', '--bogus'], /unknown flag --bogus/],
    ];
    for (const [argv, re] of cases) {
      const t = io();
      expect(await workerCommand(argv, t.io)).toBe(2);
      expect(t.err.join('')).toMatch(re);
    }
    const t = io();
    expect(await workerCommand(['--help'], t.io)).toBe(0);
    expect(t.out.join('')).toContain('Usage: weft worker');
  });

  it('connects, prints the connected line, and retires on SIGTERM', async () => {
    const s = await scheduler();
    const t = io();
    const exit = workerCommand([s.url, '--name', 'cli-w', '--threads', '1', '--resources', 'GPU=1', '--memory-limit', '1TiB'], t.io);
    try {
      const link = await s.nextLink(0);
      expect(link.hello).toMatchObject({ name: 'cli-w', resources: { GPU: 1 }, memoryLimit: 2 ** 40 });
      await until(() => t.out.length > 0, 'connected line');
      expect(t.out[0]).toBe(`weft worker cli-w connected to ${s.url} (peer ${link.hello.address})\n`);
      t.signal('SIGTERM');
      expect((await link.first('retire')).reason).toBe('SIGTERM');
      link.send({ op: 'retire', reason: 'ok' });
      expect(await exit).toBe(0);
      await link.waitClosed();
    } finally {
      t.signal('SIGINT');
      t.signal('SIGINT');
      await exit;
    }
  });
});
