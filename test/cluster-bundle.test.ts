/**
 * Code shipping on a real cluster: a scheduler in this process, `weft worker` child
 * processes (each with a TMPDIR of its own, so each has its own bundle cache), and a
 * flow whose modules live in a temporary directory outside the repository. With
 * `bundle: true` the workers run the code from the bundle they fetched (a task reports
 * its `import.meta.url`: the cached bundle file), once per worker for any number of runs,
 * and every task keeps the key it has on the client (its original module URL).
 */
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildBundle, bundleHash, BundleStore, linkBundle } from '../src/cluster/bundle.ts';
import { ClusterClient } from '../src/cluster/client.ts';
import { startScheduler, type SchedulerServer } from '../src/cluster/scheduler.ts';
import { ClusterExecutor } from '../src/executor/cluster.ts';
import type { Outcome } from '../src/executor/types.ts';
import type { Flow } from '../src/flow/flow.ts';
import type { Ref } from '../src/flow/ref.ts';
import { spawnWorker, stopProcess, waitFor, type Spawned } from './helpers/cluster-procs.ts';

const WEFT = pathToFileURL(fileURLToPath(new URL('../src/index.ts', import.meta.url))).href;

let dir = '';
let flowUrl = '';
let helperUrl = '';
let scheduler: SchedulerServer;
let procs: Spawned[] = [];
const workerTmp: string[] = [];
type Outputs = { total: Ref<number>; at: Ref<string>; inc: Ref<number> };
let bundled: Flow<Outputs>;

/** Bundle files in a worker's cache. */
function cached(workerDir: string): string[] {
  const root = join(workerDir, 'weft-bundles');
  try {
    return readdirSync(root).flatMap((inst) => readdirSync(join(root, inst)).filter((f) => f.endsWith('.mjs')));
  } catch {
    return [];
  }
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'weft-bundle-test-'));
  mkdirSync(join(dir, 'flows'));
  writeFileSync(
    join(dir, 'flows', 'helper.ts'),
    `import { task } from ${JSON.stringify(WEFT)};
export const OFFSET: number = 100;
/** A task made by a factory: its key names this module, wherever the factory is called. */
export function adder(name: string, k: number) {
  return task({ name }, (x: number): number => x + k);
}
`,
  );
  writeFileSync(
    join(dir, 'flows', 'flow.ts'),
    `import { flow, parameter, task } from ${JSON.stringify(WEFT)};
import { adder, OFFSET } from './helper.ts';
export const double = task(function double(x: number): number { return 2 * x + OFFSET; });
export const sum = task(function sum(...xs: number[]): number { return xs.reduce((a, b) => a + b, 0); });
export const where = task(function where(): string { return import.meta.url; });
export const inc = adder('inc', 1);
export const bundled = flow('bundled', () => {
  const n = parameter('n', 8);
  const xs = Array.from({ length: 8 }, (_, i) => double(i));
  return { total: sum(...xs), at: where(), inc: inc(n) };
});
`,
  );
  flowUrl = pathToFileURL(join(dir, 'flows', 'flow.ts')).href;
  helperUrl = pathToFileURL(join(dir, 'flows', 'helper.ts')).href;
  ({ bundled } = (await import(flowUrl)) as { bundled: Flow<Outputs> });
  scheduler = await startScheduler({ port: 0, log: () => undefined });
  for (const [name, threads] of [
    ['b-one', '1'],
    ['b-two', '2'],
  ] as const) {
    const t = join(dir, name);
    mkdirSync(t);
    workerTmp.push(t);
    procs.push(spawnWorker(scheduler.address, name, ['--threads', threads], { TMPDIR: t }));
  }
  await waitFor('2 workers', () => scheduler.status().workers.length >= 2, 30_000).catch((err: Error) => {
    throw new Error(`${err.message}; worker output: ${procs.map((p) => p.output).join(' | ')}`);
  });
}, 60_000);

afterAll(async () => {
  await Promise.all(procs.map((p) => stopProcess(p)));
  procs = [];
  await scheduler?.close();
  if (dir !== '') rmSync(dir, { recursive: true, force: true });
});

describe('buildBundle', () => {
  it('is deterministic, keeps weft external as a placeholder, and carries the original URLs in its source map', async () => {
    const a = await buildBundle([flowUrl]);
    const b = await buildBundle([flowUrl]);
    expect(a.hash).toMatch(/^[0-9a-f]{64}$/);
    expect(b.hash).toBe(a.hash);
    expect(Buffer.from(b.code).equals(Buffer.from(a.code))).toBe(true);
    expect(bundleHash(a.code)).toBe(a.hash);
    const text = new TextDecoder().decode(a.code);
    expect(text).toContain('"weft-runtime:/src/index.ts"');
    expect(text).not.toContain('function task('); // weft itself is not bundled
    const map = JSON.parse(Buffer.from(text.slice(text.lastIndexOf('base64,') + 7).trim(), 'base64').toString('utf8')) as { sources: string[] };
    expect(map.sources).toEqual(expect.arrayContaining([flowUrl, helperUrl]));
    // Linked: the placeholder points at this installation.
    expect(linkBundle(a.code)).toContain(JSON.stringify(WEFT));
    await expect(buildBundle([pathToFileURL(join(dir, 'missing.ts')).href])).rejects.toMatchObject({ code: 'BUNDLE_BUILD' });
  });

  it('BundleStore refuses a wrong hash and drops the least recently used past its budget', async () => {
    const s = new BundleStore(25);
    const code = (t: string): Uint8Array => new TextEncoder().encode(t);
    expect(s.put('0'.repeat(64), code('x'))).toMatch(/hashes to/);
    expect(s.missing('0'.repeat(64)).message).toMatch(/refused by the scheduler: its code hashes to/);
    const [a, b, c] = ['a'.repeat(10), 'b'.repeat(10), 'c'.repeat(10)].map(code) as [Uint8Array, Uint8Array, Uint8Array];
    expect(s.put(bundleHash(a), a)).toBeNull();
    expect(s.put(bundleHash(b), b)).toBeNull();
    s.fetch(bundleHash(a));
    expect(s.put(bundleHash(c), c)).toBeNull();
    expect([s.has(bundleHash(a)), s.has(bundleHash(b)), s.has(bundleHash(c))]).toEqual([true, false, true]);
    expect(s.missing(bundleHash(b)).message).toMatch(/unknown to the scheduler/);
  });
});

describe('code shipping on a cluster', () => {
  it('runs a flow from a bundle: right results, original task keys, fetched once per worker across runs', async () => {
    const ex = new ClusterExecutor({ address: scheduler.address, bundle: true, keepAlive: true, onLog: () => undefined });
    try {
      const r1 = await bundled.run({ executor: ex });
      expect(r1.state).toBe('Success');
      // 2 × (0 + … + 7) + 8 × 100
      expect(r1.result(bundled.outputs.total)).toBe(856);
      expect(r1.result(bundled.outputs.inc)).toBe(9);
      // The task ran from a linked bundle file in a worker's cache, not from the flow file.
      const at = r1.result(bundled.outputs.at);
      expect(at).toMatch(/\/weft-bundles\/[0-9a-f]+\/[0-9a-f]{64}\.mjs$/);
      expect(workerTmp.some((t) => fileURLToPath(at).startsWith(t))).toBe(true);
      // Task keys are the client's: the original module URLs (the factory's module for `inc`).
      const keys = new Set(bundled.spec().nodes.map((n) => n.taskKey).filter((k) => k !== ''));
      expect([...keys].sort()).toEqual([`${flowUrl}#double`, `${flowUrl}#sum`, `${flowUrl}#where`, `${helperUrl}#inc`].sort());
      const ran = new Set(r1.tasks.flatMap((t) => (t.worker !== undefined ? [t.worker] : [])));
      expect([...ran].every((w) => w === 'b-one' || w === 'b-two')).toBe(true);

      // Each worker that ran calls fetched the bundle once (the one-thread worker and the pool alike).
      const fetched = scheduler.bundles.stats.fetched;
      expect(fetched).toBe(ran.size);
      const r2 = await bundled.run({ executor: ex, parameters: { n: 41 } });
      expect(r2.state).toBe('Success');
      expect(r2.result(bundled.outputs.inc)).toBe(42);
      // Sent once on this connection, fetched at most once per worker.
      expect(scheduler.bundles.stats.stored).toBe(1);
      expect(scheduler.bundles.stats.fetched).toBe(fetched);
      for (const t of workerTmp) expect(cached(t).length).toBeLessThanOrEqual(1);
      expect(workerTmp.reduce((n, t) => n + cached(t).length, 0)).toBe(fetched);
    } finally {
      await ex.close();
    }
  }, 60_000);

  it('runs call sessions from a bundle too', async () => {
    const ex = new ClusterExecutor({ address: scheduler.address, bundle: true, onLog: () => undefined });
    const outcomes: Outcome[] = [];
    try {
      await ex.start({ flowName: 'calls', modules: [flowUrl], taskKeys: [`${helperUrl}#inc`, `${flowUrl}#double`], parameters: {}, onOutcomes: (o) => outcomes.push(...o) });
      ex.submit([
        { id: 1, runId: 1, taskKey: `${helperUrl}#inc`, key: 'inc', args: [1], timeoutMs: 0, mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined },
        { id: 2, runId: 2, taskKey: `${flowUrl}#double`, key: 'double', args: [5], timeoutMs: 0, mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined },
      ]);
      await waitFor('2 outcomes', () => outcomes.length >= 2, 20_000);
      expect(outcomes.map((o) => [o.id, o.status, o.value]).sort()).toEqual([
        [1, 'ok', 2],
        [2, 'ok', 110],
      ]);
    } finally {
      await ex.shutdown();
      await ex.close();
    }
  }, 60_000);

  it('a bundle with a wrong hash, or none sent, fails the run with a clear error', async () => {
    const c = await ClusterClient.connect({ address: scheduler.address, onLog: () => undefined });
    try {
      const b = await buildBundle([flowUrl]);
      const bad = b.code.slice();
      bad[0] = bad[0]! ^ 1;
      c.putBundle({ hash: b.hash.replace(/^./, (x) => (x === '0' ? '1' : '0')), code: bad });
      const wrong = b.hash.replace(/^./, (x) => (x === '0' ? '1' : '0'));
      await expect(c.runGraph(bundled.spec(), { n: 1 }, {}, wrong)).rejects.toMatchObject({
        code: 'BUNDLE_UNAVAILABLE',
        message: expect.stringMatching(new RegExp(`code bundle ${wrong} was refused by the scheduler: its code hashes to [0-9a-f]{64}`)),
      });
      const missing = 'e'.repeat(64);
      await expect(c.runGraph(bundled.spec(), { n: 1 }, {}, missing)).rejects.toMatchObject({
        code: 'BUNDLE_UNAVAILABLE',
        message: expect.stringContaining(`code bundle ${missing} is unknown to the scheduler`),
      });
      // The connection still works: the right bundle runs.
      const r = await c.runGraph(bundled.spec(), { n: 1 }, {}, await c.shipBundle([flowUrl]));
      expect(r.state).toBe('Success');
      expect(r.result(bundled.outputs.inc)).toBe(2);
    } finally {
      await c.close();
    }
  }, 60_000);
});
