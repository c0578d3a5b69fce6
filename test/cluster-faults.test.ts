/**
 * Fault injection on a real cluster: a scheduler in this process, `weft worker` child
 * processes, a ClusterExecutor client, real sockets on 127.0.0.1.
 *
 * - kill -9 of one of 3 workers in the middle of a 10,000-task run;
 * - SIGSTOP of a worker (found by missed heartbeats), SIGCONT later;
 * - garbage frames, a wrong token, an oversized frame and a truncated msgpack body
 *   while another client's run goes on;
 * - graceful retirement (SIGTERM) moving a worker's results before it leaves;
 * - work stealing from a saturated worker to one that joins later;
 * - task resources placed only on a worker that advertises them.
 *
 * Every run checks its answer and that no task entered a final state twice.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { Connection, HandshakeError, openHandshake } from '../src/cluster/connection.ts';
import { FrameCodec, GraphEncoder, PROTOCOL_VERSION } from '../src/cluster/protocol.ts';
import { startScheduler, type SchedulerOptions, type SchedulerServer } from '../src/cluster/scheduler.ts';
import { startWorker, type ClusterWorker } from '../src/cluster/worker.ts';
import { ClusterExecutor } from '../src/executor/cluster.ts';
import type { TaskStateEvent } from '../src/runner/types.ts';
import { gpuFlow, napFlow, reduceFlow } from './fixtures/cluster-fault-tasks.ts';
import { makePki, type TestPki } from './helpers/tls.ts';
import { spawnWorker, stopProcess, waitFor, type Spawned } from './helpers/cluster-procs.ts';

let scheduler: SchedulerServer | null = null;
let procs: Spawned[] = [];
let inProcess: ClusterWorker[] = [];
let executors: ClusterExecutor[] = [];
let tmp: string | null = null;
let sockets: WebSocket[] = [];
let pki: TestPki | null = null;
const logs: string[] = [];

async function cluster(o: SchedulerOptions = {}): Promise<SchedulerServer> {
  scheduler = await startScheduler({ port: 0, log: (l) => logs.push(l), ...o });
  return scheduler;
}

function workers(s: SchedulerServer, names: readonly string[], args: readonly string[] = [], env: Record<string, string> = {}): Spawned[] {
  const out = names.map((n) => spawnWorker(s.address, n, args, env));
  procs.push(...out);
  return out;
}

async function joined(s: SchedulerServer, n: number, timeoutMs = 30_000): Promise<void> {
  await waitFor(`${n} workers`, () => s.status().workers.length >= n, timeoutMs).catch((err: Error) => {
    throw new Error(`${err.message}; worker output: ${procs.map((p) => p.output).join(' | ')}`);
  });
}

function executor(s: SchedulerServer, extra: Partial<ConstructorParameters<typeof ClusterExecutor>[0]> = {}): ClusterExecutor {
  const ex = new ClusterExecutor({ address: s.address, onLog: () => undefined, ...extra });
  executors.push(ex);
  return ex;
}

/** Counts final-state entries per task run: each must be entered exactly once. */
function finalCounter(): { onTaskState: (e: TaskStateEvent) => void; twice: () => string[]; finals: () => number } {
  const seen = new Map<string, number>();
  const FINAL = new Set(['Success', 'Failed', 'TimedOut', 'TriggerFailed', 'Cancelled', 'Skipped', 'Cached', 'Mapped']);
  return {
    onTaskState: (e) => {
      if (!FINAL.has(e.to)) return;
      const k = `${e.key}#${e.mapIndex}`;
      seen.set(k, (seen.get(k) ?? 0) + 1);
    },
    twice: () => [...seen].filter(([, n]) => n > 1).map(([k]) => k),
    finals: () => seen.size,
  };
}

afterEach(async () => {
  for (const ws of sockets) ws.terminate();
  sockets = [];
  for (const ex of executors) await ex.close?.();
  executors = [];
  await Promise.all(inProcess.map((w) => w.close()));
  inProcess = [];
  await Promise.all(procs.map((p) => stopProcess(p)));
  procs = [];
  await scheduler?.close();
  scheduler = null;
  if (tmp !== null) rmSync(tmp, { recursive: true, force: true });
  tmp = null;
  pki?.remove();
  pki = null;
  logs.length = 0;
});

describe('cluster faults', () => {
  it('kill -9 of one of 3 workers mid-run: the 10,000-task run finishes with every result right, no task counted twice', async () => {
    const s = await cluster();
    const ws = workers(s, ['k-a', 'k-b', 'k-c']);
    await joined(s, 3);
    const leaves = 9_899;
    const f = reduceFlow(leaves, 100, 0.2);
    const counter = finalCounter();
    // (No core validate mode here: it checks every invariant after every transition, quadratic at 10k tasks.)
    const run = f.run({ executor: executor(s), onTaskState: counter.onTaskState });
    await waitFor('a third of the tasks done', () => s.fleet.stats.completed >= 3_300, 60_000, 5);
    const victim = ws[1]!;
    process.kill(victim.pid, 'SIGKILL');
    const r = await run;
    expect(r.state).toBe('Success');
    expect(r.tasks).toHaveLength(10_000);
    expect(r.result(f.outputs)).toBe((leaves * (leaves - 1)) / 2);
    expect(r.tasks.filter((t) => t.state !== 'Success')).toEqual([]);
    expect(counter.twice()).toEqual([]);
    expect(counter.finals()).toBe(10_000);
    // Something it held or ran had to be redone elsewhere.
    expect(s.fleet.stats.lost + s.fleet.stats.recomputed).toBeGreaterThan(0);
    expect(r.tasks.some((t) => t.worker === 'k-b')).toBe(true);
    expect(logs.some((l) => l.includes('worker k-b') && l.includes('removed'))).toBe(true);
  }, 120_000);

  it('SIGSTOP: the silent worker is found by its missed heartbeats, its tasks finish elsewhere; after SIGCONT it rejoins and its stale outcomes are dropped', async () => {
    const s = await cluster({ heartbeatMs: 100, missedHeartbeats: 5 });
    const ws = workers(s, ['s-a', 's-b']);
    await joined(s, 2);
    const n = 200;
    const f = napFlow(n, 15);
    const counter = finalCounter();
    const run = f.run({ executor: executor(s), validate: true, onTaskState: counter.onTaskState });
    await waitFor('some tasks done', () => s.fleet.stats.completed >= 40, 30_000, 5);
    const stopped = ws[1]!;
    process.kill(stopped.pid, 'SIGSTOP');
    const t0 = Date.now();
    await waitFor('the stopped worker removed', () => !s.status().workers.some((w) => w.name === 's-b'), 10_000, 10);
    const detectMs = Date.now() - t0;
    // Heartbeat every 100 ms, lost after 5 missed: 500 ms, plus one check interval and scheduling slack.
    expect(detectMs).toBeLessThan(3_000);
    expect(logs.some((l) => l.includes('s-b') && l.includes('missed heartbeats'))).toBe(true);
    const r = await run;
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs)).toBe((n * (n - 1)) / 2);
    expect(counter.twice()).toEqual([]);
    const completedBefore = s.fleet.stats.completed;
    process.kill(stopped.pid, 'SIGCONT');
    await waitFor('the resumed worker rejoined', () => s.status().workers.some((w) => w.name === 's-b'), 20_000);
    // Its old connection was cut: nothing it finished while stopped is counted.
    expect(s.fleet.stats.completed).toBe(completedBefore);
    // The rejoined worker takes new work.
    const r2 = await napFlow(20, 1).run({ executor: executor(s) });
    expect(r2.state).toBe('Success');
  }, 90_000);

  it('garbage frames, a wrong token, an oversized frame and a truncated msgpack body close only their connections; a concurrent run finishes', async () => {
    tmp = mkdtempSync(join(tmpdir(), 'weft-faults-'));
    const tokenFile = join(tmp, 'token');
    writeFileSync(tokenFile, 'correct horse battery staple\n', { mode: 0o600 });
    const s = await cluster({ token: 'correct horse battery staple', maxFrameBytes: 1024 * 1024 });
    workers(s, ['g-a', 'g-b'], ['--token-file', tokenFile]);
    await joined(s, 2);
    const n = 150;
    const f = napFlow(n, 10);
    const run = f.run({ executor: executor(s, { token: 'correct horse battery staple' }), validate: true });

    const closed = (send: (ws: WebSocket) => void): Promise<number> =>
      new Promise<number>((resolve, reject) => {
        const ws = new WebSocket(s.address);
        const t = setTimeout(() => {
          ws.terminate();
          reject(new Error('the scheduler did not close the connection'));
        }, 10_000);
        ws.on('open', () => send(ws));
        ws.on('error', () => undefined);
        ws.on('close', (code) => {
          clearTimeout(t);
          resolve(code);
        });
      });
    const hello = new FrameCodec().encode([
      { op: 'hello', version: PROTOCOL_VERSION, role: 'worker', name: 'x', resources: {}, threads: 1, memoryLimit: 0, address: '', pid: 1 },
    ]);
    const codes = await Promise.all([
      closed((ws) => ws.send('{"op":"hello"}')), // text frame
      closed((ws) => ws.send(Buffer.from([0xc1, 0xc1, 0xff, 0x00, 0x13]))), // not msgpack
      closed((ws) => ws.send(Buffer.alloc(2 * 1024 * 1024, 7))), // over the 1 MiB limit
      closed((ws) => ws.send(hello.subarray(0, Math.floor(hello.byteLength / 2)))), // truncated body
    ]);
    expect(codes[0]).toBe(1003);
    expect(codes[1]).toBe(1008);
    expect(codes[2]).toBe(1009);
    expect(codes[3]).toBe(1008);
    // A wrong token: the handshake is refused, nothing else happens.
    const ws = new WebSocket(s.address);
    await new Promise((r) => ws.once('open', r));
    const conn = new Connection(ws, { receives: 's2c' });
    const refused = await openHandshake(conn, {
      hello: { role: 'client', name: 'intruder', resources: {}, threads: 0, memoryLimit: 0, address: '', pid: process.pid },
      token: 'wrong',
    }).catch((e: unknown) => e);
    expect(refused).toBeInstanceOf(HandshakeError);
    expect((refused as HandshakeError).code).toBe('AUTH_FAILED');

    const r = await run;
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs)).toBe((n * (n - 1)) / 2);
    const metrics = await (await fetch(`${s.httpUrl}/metrics`)).text();
    for (const reason of ['MALFORMED_FRAME', 'AUTH_FAILED']) expect(metrics).toMatch(new RegExp(`weft_connections_closed_total\\{reason="${reason}"\\} [1-9]`));
    expect(s.status().workers.map((w) => w.name).sort()).toEqual(['g-a', 'g-b']);
  }, 60_000);

  it('a worker that retires (SIGTERM) hands its results over first: nothing is lost or recomputed', async () => {
    const s = await cluster();
    const ws = workers(s, ['r-a', 'r-b', 'r-c']);
    await joined(s, 3);
    const leaves = 3_000;
    const f = reduceFlow(leaves, 10, 0.3);
    const run = f.run({ executor: executor(s) });
    await waitFor('a third of the leaves done', () => s.fleet.stats.completed >= 1_000, 60_000, 5);
    process.kill(ws[2]!.pid, 'SIGTERM');
    const r = await run;
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs)).toBe((leaves * (leaves - 1)) / 2);
    await ws[2]!.exited;
    expect(ws[2]!.child.exitCode).toBe(0);
    expect(s.fleet.stats.lost).toBe(0);
    expect(s.fleet.stats.recomputed).toBe(0);
    expect(logs.some((l) => l.includes('r-c') && l.includes('retiring'))).toBe(true);
  }, 90_000);

  it('an idle worker steals queued calls from a saturated one (each runs once)', async () => {
    const s = await cluster({ stealMs: 20 });
    // A deep queue on the first worker: 16 credits for 1 thread.
    inProcess.push(await startWorker({ scheduler: s.address, name: 'deep', saturation: 16, log: () => undefined }));
    await joined(s, 1);
    const n = 40;
    const f = napFlow(n, 40);
    const counter = finalCounter();
    const run = f.run({ executor: executor(s), validate: true, onTaskState: counter.onTaskState });
    await waitFor('the first worker saturated', () => (s.status().workers[0]?.used ?? 0) >= 10, 20_000, 5);
    workers(s, ['thief']);
    const r = await run;
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs)).toBe((n * (n - 1)) / 2);
    expect(counter.twice()).toEqual([]);
    expect(s.fleet.stats.stolen).toBeGreaterThan(0);
    expect(r.tasks.some((t) => t.worker === 'thief')).toBe(true);
  }, 60_000);

  it('tasks that need a resource run only on the worker that advertises it', async () => {
    const s = await cluster();
    workers(s, ['plain'], [], { WEFT_WORKER_LABEL: 'plain' });
    workers(s, ['gpu'], ['--resources', 'GPU=1'], { WEFT_WORKER_LABEL: 'gpu' });
    await joined(s, 2);
    const f = gpuFlow(8);
    const r = await f.run({ executor: executor(s) });
    expect(r.state).toBe('Success');
    const out = r.result(f.outputs) as string[];
    expect(out).toHaveLength(8);
    for (let i = 0; i < 8; i++) expect(out[i]).toBe(`${i}@gpu`);
  }, 60_000);

  it('TLS with client certificates: a worker with a certificate from the cluster CA joins and runs tasks, one from another CA is refused', async () => {
    pki = makePki();
    const p = pki.paths;
    const s = await cluster({ tls: { cert: pki.serverCert, key: pki.serverKey, ca: pki.caCert, requireClientCert: true } });
    expect(s.address).toMatch(/^wss:\/\/127\.0\.0\.1:\d+$/);
    const [good] = workers(s, ['tls-good'], ['--tls-cert', p.clientCert, '--tls-key', p.clientKey, '--tls-ca', p.caCert]);
    const [rogue] = workers(s, ['tls-rogue'], ['--tls-cert', p.rogueCert, '--tls-key', p.rogueKey, '--tls-ca', p.caCert]);
    await joined(s, 1);
    const f = napFlow(30, 1);
    const r = await f.run({ executor: executor(s, { tls: { ca: pki.caCert, cert: pki.clientCert, key: pki.clientKey } }) });
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs)).toBe((30 * 29) / 2);
    expect(new Set(r.tasks.filter((t) => t.key.startsWith('pause')).map((t) => t.worker))).toEqual(new Set(['tls-good']));
    // The rogue worker keeps retrying and never joins.
    await waitFor('the rogue worker to report a refused connection', () => rogue!.output.length > 0, 10_000);
    expect(s.status().workers.map((w) => w.name)).toEqual(['tls-good']);
    // A client without a certificate cannot connect either.
    const bare = executor(s, { tls: { ca: pki.caCert }, connectTimeoutMs: 3_000 });
    await expect(napFlow(2, 1).run({ executor: bare })).rejects.toThrow();
    expect(good!.output).toContain('connected to wss://');
  }, 60_000);

  it('two clients at once share the workers: both runs progress together and finish right', async () => {
    const s = await cluster();
    workers(s, ['m-a', 'm-b']);
    await joined(s, 2);
    const n = 60;
    const f1 = napFlow(n, 20);
    const f2 = napFlow(n, 20);
    const [r1, r2] = await Promise.all([f1.run({ executor: executor(s) }), f2.run({ executor: executor(s) })]);
    for (const [r, f] of [[r1, f1], [r2, f2]] as const) {
      expect(r.state).toBe('Success');
      expect(r.result(f.outputs)).toBe((n * (n - 1)) / 2);
    }
    // Fair sharing: neither run waited for the other to finish.
    const span = (r: typeof r1): [number, number] => {
      const ts = r.tasks.filter((t) => t.key.startsWith('pause'));
      return [Math.min(...ts.map((t) => t.startMs)), Math.max(...ts.map((t) => t.endMs))];
    };
    const [a0, a1] = span(r1);
    const [b0, b1] = span(r2);
    expect(Math.max(a0, b0)).toBeLessThan(Math.min(a1, b1));
  }, 60_000);

  it('workers reconnect (with backoff) to a scheduler that restarts on the same port, and run again', async () => {
    const first = await cluster();
    const port = first.port;
    const ws = workers(first, ['re-a', 're-b']);
    await joined(first, 2);
    await first.close();
    scheduler = null;
    const second = await cluster({ port });
    await joined(second, 2);
    const f = napFlow(20, 1);
    const r = await f.run({ executor: executor(second) });
    expect(r.state).toBe('Success');
    expect(new Set(r.tasks.filter((t) => t.key.startsWith('pause')).map((t) => t.worker))).toEqual(new Set(['re-a', 're-b']));
    expect(ws.every((w) => (w.output.match(/connected to ws:/g) ?? []).length >= 2)).toBe(true);
  }, 60_000);

  it('a client that does not read its socket gets counts instead of events; the run is unaffected', async () => {
    const s = await cluster({ clientHighWaterBytes: 64 * 1024 });
    workers(s, ['slow-a']);
    await joined(s, 1);
    const ws = new WebSocket(s.address);
    sockets.push(ws);
    await new Promise((r) => ws.once('open', r));
    const seen: { op: string; dropped?: number; state?: string }[] = [];
    const conn = new Connection(ws, { receives: 's2c' });
    await openHandshake(conn, { hello: { role: 'client', name: 'slow-reader', resources: {}, threads: 0, memoryLimit: 0, address: '', pid: process.pid } });
    conn.onMessages = (ms) => {
      for (const m of ms) {
        if (m.op === 'eventSummary') seen.push({ op: m.op, dropped: m.dropped });
        else if (m.op === 'runState') seen.push({ op: m.op, state: m.state });
        else seen.push({ op: m.op });
      }
    };
    // Stop reading: what the scheduler writes piles up in its socket.
    (ws as unknown as { _socket: import('node:net').Socket })._socket.pause();
    // Enough events (~15 MB) to fill the loopback socket's kernel buffers, however they autotune.
    const spec = reduceFlow(100_000, 10, 0).spec();
    const enc = new GraphEncoder();
    conn.send({
      op: 'graphBegin',
      graph: 1,
      name: spec.name,
      nodeCount: spec.nodes.length,
      referenceTasks: spec.referenceTasks,
      modules: spec.modules,
      parameters: {},
      bundle: '',
      options: { tagLimits: {}, validate: false, events: true, summaryMs: 50, resultDir: '' },
    });
    for (let at = 0; at < spec.nodes.length; at += 2_000) conn.send(enc.chunk(1, spec.nodes, at, Math.min(spec.nodes.length, at + 2_000)));
    conn.send({ op: 'graphEnd', graph: 1 });
    // The run finishes on the scheduler whether or not this client reads.
    await waitFor('the run to finish on the scheduler', () => s.fleet.stats.completed >= spec.nodes.length - 1, 60_000);
    (ws as unknown as { _socket: import('node:net').Socket })._socket.resume();
    await waitFor('the finished state', () => seen.some((m) => m.op === 'runState' && m.state === 'finished'), 30_000);
    const summaries = seen.filter((m) => m.op === 'eventSummary');
    expect(summaries.length).toBeGreaterThan(0);
    expect(Math.max(...summaries.map((m) => m.dropped ?? 0))).toBeGreaterThan(0);
    conn.close('done');
  }, 60_000);
});
