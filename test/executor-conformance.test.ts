/**
 * One conformance suite for every Executor: each case drives an executor directly with
 * TaskCalls against the fixture module `fixtures/exec-tasks.ts`, the way the runner
 * does (submit at most `freeSlots()`, refill from `onOutcomes`).
 *
 * Cases that need a capability some executor lacks (a worker that can crash, a wire a
 * value can fail to cross, ...) are registered only for the executors that have it, from
 * the capability table below: nothing is reported as skipped.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { sharedCluster } from './helpers/shared-cluster.ts';
import { ClusterExecutor, LocalExecutor, PoolExecutor, type Executor, type Outcome, type TaskCall } from '../src/executor/index.ts';
import { SkipSignal, TaskResolutionError, deserializeError, type SerializedError } from '../src/errors.ts';
import { MODULE, key } from './fixtures/exec-tasks.ts';

type Mode = 'local' | 'threads' | 'processes';

/**
 * What an executor can do beyond the common contract:
 * - `wire`: arguments and results cross a serialization boundary (so some cannot).
 * - `crash`: a task can kill its worker, which is replaced.
 * - `sharedMemory`: tasks share a SharedArrayBuffer with the caller.
 * - `warm`: `makeWarm()` builds one that keeps its workers across runs (`close()`).
 */
type Capability = 'wire' | 'crash' | 'sharedMemory' | 'warm';

interface Factory {
  name: string;
  mode: Mode;
  caps: readonly Capability[];
  make: () => Executor;
  makeWarm?: () => Executor;
  /** How this executor names the worker of an outcome (default: a thread or process). */
  workerName?: RegExp;
  /** Once per executor (beforeAll/afterAll): e.g. the cluster its executors connect to. */
  setup?: () => Promise<void>;
  teardown?: () => Promise<void>;
}

/**
 * One cluster for the whole file: a scheduler and two worker processes of two threads
 * each. Unref'd, so the handle checks below see only what an executor leaves behind.
 */
const cluster = sharedCluster();

const factories: Factory[] = [
  { name: 'LocalExecutor', mode: 'local', caps: ['sharedMemory'], make: () => new LocalExecutor() },
  {
    name: 'PoolExecutor threads 2',
    mode: 'threads',
    caps: ['wire', 'crash', 'sharedMemory', 'warm'],
    make: () => new PoolExecutor({ threads: 2 }),
    makeWarm: () => new PoolExecutor({ threads: 2, keepAlive: true }),
  },
  {
    name: 'PoolExecutor processes 2',
    mode: 'processes',
    caps: ['wire', 'crash', 'warm'],
    make: () => new PoolExecutor({ processes: 2 }),
    makeWarm: () => new PoolExecutor({ processes: 2, keepAlive: true }),
  },
  {
    name: 'ClusterExecutor 2 workers × 2 threads',
    // Worker processes whose tasks run on thread pools: a synchronous task can be
    // stopped (its thread is replaced), as on a pool.
    mode: 'processes',
    // crash: a task that kills its thread is reported lost by its worker (a worker
    // process that dies is restarted by the cluster's nanny). Not 'warm' here: that case
    // loads a second instance of the fixture module under a `?session=2` URL, which the
    // client checks by importing it in this (vitest) process, and vitest's module runner
    // drops query strings. Warm reuse of a cluster (keepAlive: two graph runs and a call
    // session on the same workers) is covered in test/cluster-client.test.ts.
    caps: ['wire', 'crash'],
    workerName: /^local-\d+$/,
    make: () => new ClusterExecutor({ address: cluster.address() }),
    makeWarm: () => new ClusterExecutor({ address: cluster.address(), keepAlive: true }),
    setup: cluster.setup,
    teardown: cluster.teardown,
  },
];

/** A second module for warm-pool sessions: the fixture under another URL (a fresh module instance, its own task keys). */
const MODULE2 = `${MODULE}?session=2`;
const key2 = (name: string): string => `${MODULE2}#${name}`;

const ALL_TASKS = [
  'noop', 'add', 'echo', 'ctx', 'asyncAdd', 'sleep', 'busy', 'boom', 'asyncBoom', 'skipWith',
  'unsendable', 'exit', 'bytes', 'arrayBuffer', 'subview', 'concurrency',
].map(key);

let nextId = 1;
function call(task: string, args: unknown[], over: Partial<TaskCall> = {}): TaskCall {
  return {
    id: nextId++,
    runId: 7,
    taskKey: key(task),
    key: task,
    args,
    timeoutMs: 0,
    mapIndex: -1,
    attempt: 1,
    loopCount: 0,
    loopResult: undefined,
    ...over,
  };
}

/** A tiny runner: feeds calls within freeSlots(), collects outcomes, checks the limit. */
class Driver {
  readonly outcomes = new Map<number, Outcome>();
  private backlog: TaskCall[] = [];
  private waiters: { ids: number[]; resolve: () => void }[] = [];
  inFlight = 0;
  maxInFlight = 0;
  limit = 0;
  batches = 0;

  constructor(readonly ex: Executor) {}

  async start(
    taskKeys = ALL_TASKS,
    modules = [MODULE],
    parameters: Record<string, unknown> = { p: 1 },
    flowName = 'conformance',
  ): Promise<void> {
    await this.ex.start({
      flowName,
      modules,
      taskKeys,
      parameters,
      onOutcomes: (outs) => {
        this.batches++;
        for (const o of outs) {
          expect(this.outcomes.has(o.id), `second outcome for call ${o.id}`).toBe(false);
          this.outcomes.set(o.id, o);
        }
        this.inFlight -= outs.length;
        this.feed();
        this.wake();
      },
    });
    this.limit = this.ex.freeSlots();
    expect(this.limit).toBeGreaterThan(0);
  }

  /** Submit (through the backlog, within freeSlots) and wait for all their outcomes. */
  run(calls: TaskCall[], timeoutMs = 20_000): Promise<Outcome[]> {
    const p = this.wait(calls.map((c) => c.id), timeoutMs);
    this.backlog.push(...calls);
    this.feed();
    return p;
  }

  wait(ids: number[], timeoutMs = 20_000): Promise<Outcome[]> {
    return new Promise<Outcome[]>((resolve, reject) => {
      const t = setTimeout(() => {
        const missing = ids.filter((id) => !this.outcomes.has(id));
        reject(new Error(`no outcome for ${missing.length} calls (e.g. ${missing.slice(0, 5).join(',')})`));
      }, timeoutMs);
      this.waiters.push({
        ids,
        resolve: () => {
          clearTimeout(t);
          resolve(ids.map((id) => this.outcomes.get(id)!));
        },
      });
      this.wake();
    });
  }

  private feed(): void {
    const free = this.ex.freeSlots();
    if (free <= 0 || this.backlog.length === 0) return;
    const batch = this.backlog.splice(0, free);
    this.inFlight += batch.length;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    this.ex.submit(batch);
  }

  private wake(): void {
    this.waiters = this.waiters.filter((w) => {
      if (w.ids.every((id) => this.outcomes.has(id))) {
        w.resolve();
        return false;
      }
      return true;
    });
  }
}

function errOf(o: Outcome): SerializedError & { data?: unknown } {
  expect(o.error, `outcome ${o.id} (${o.status}) has no error`).toBeDefined();
  return o.error as SerializedError;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

const handleKinds = (): string[] => process.getActiveResourcesInfo().filter((r) => r !== 'Timeout' && r !== 'Immediate');

describe.each(factories)('Executor conformance: $name', ({ mode, caps, make, makeWarm, workerName, setup, teardown }) => {
  if (setup !== undefined) beforeAll(setup);
  if (teardown !== undefined) afterAll(teardown);
  let ex: Executor | null = null;
  const open = async (...args: Parameters<Driver['start']>): Promise<Driver> => {
    ex = make();
    const d = new Driver(ex);
    await d.start(...args);
    return d;
  };
  afterEach(async () => {
    await ex?.shutdown();
    await ex?.close?.();
    ex = null;
  });
  /** Registers the case only for executors with the capability. */
  const itWith = (cap: Capability, name: string, fn: () => Promise<void>): void => {
    if (caps.includes(cap)) it(name, fn);
  };

  it('returns results for many calls, in any order, each with its id and runId', async () => {
    const d = await open();
    const calls = Array.from({ length: 5000 }, (_, i) => call('add', [i, 1]));
    const outs = await d.run(calls);
    for (let i = 0; i < calls.length; i++) {
      const o = outs[i]!;
      expect(o.status).toBe('ok');
      expect(o.value).toBe(i + 1);
      expect(o.runId).toBe(7);
      expect(o.endMs).toBeGreaterThanOrEqual(o.startMs);
      expect(typeof o.worker).toBe('string');
    }
    const [echo] = await d.run([call('echo', [{ a: [1, 'two', { three: 3 }], d: new Date(5), m: new Map([[1, 2]]) }])]);
    expect(echo!.value).toEqual({ a: [1, 'two', { three: 3 }], d: new Date(5), m: new Map([[1, 2]]) });
    expect(d.batches).toBeLessThan(calls.length / 4); // batched, not one delivery per call
  });

  it('sets the task context for each call', async () => {
    const d = await open();
    const [o] = await d.run([call('ctx', [], { key: 'ctx-node', mapIndex: 3, attempt: 2, loopCount: 4, loopResult: { n: 9 } })]);
    expect(o!.status).toBe('ok');
    expect(o!.value).toEqual({
      flowName: 'conformance', key: 'ctx-node', mapIndex: 3, attempt: 2, loopCount: 4, loopResult: { n: 9 }, parameters: { p: 1 },
    });
  });

  it('runs async tasks', async () => {
    const d = await open();
    const outs = await d.run(Array.from({ length: 20 }, (_, i) => call('asyncAdd', [i, 10, 2])));
    outs.forEach((o, i) => {
      expect(o.status).toBe('ok');
      expect(o.value).toBe(i + 10);
    });
  });

  it('reports thrown errors with name, message and stack', async () => {
    const d = await open();
    const [sync, async_, ok] = await d.run([call('boom', ['bad row']), call('asyncBoom', ['late']), call('add', [1, 1])]);
    expect(sync!.status).toBe('error');
    expect(errOf(sync!)).toMatchObject({ name: 'TypeError', message: 'bad row' });
    expect(errOf(sync!).stack).toContain('exec-tasks');
    expect(deserializeError(errOf(sync!))).toBeInstanceOf(TypeError);
    expect(async_!.status).toBe('error');
    expect(errOf(async_!)).toMatchObject({ name: 'RangeError', message: 'late' });
    expect(ok!.value).toBe(2);
  });

  it('round-trips signals by name and data', async () => {
    const d = await open();
    const [o] = await d.run([call('skipWith', [{ rows: [1, 2], why: 'empty' }])]);
    expect(o!.status).toBe('error');
    const e = errOf(o!);
    expect(e.name).toBe('SkipSignal');
    expect(e.data).toEqual({ rows: [1, 2], why: 'empty' });
    const back = deserializeError(e);
    expect(back).toBeInstanceOf(SkipSignal);
    expect((back as SkipSignal).data).toEqual({ rows: [1, 2], why: 'empty' });
  });

  itWith('wire', 'fails only the task whose result cannot be sent', async () => {
    const d = await open();
    // Warm the estimate so the three calls travel in one batch.
    await d.run([call('add', [0, 0]), call('unsendable', [])]);
    const [a, bad, b] = await d.run([call('add', [1, 2]), call('unsendable', []), call('add', [3, 4])]);
    expect(a!.value).toBe(3);
    expect(b!.value).toBe(7);
    expect(bad!.status).toBe('error');
    expect(errOf(bad!).name).toBe('TaskSerializationError');
    expect(errOf(bad!).message).toMatch(/^result of task "unsendable" cannot be sent between (threads|processes): /);
  });

  itWith('wire', 'fails only the call whose arguments cannot be sent', async () => {
    const d = await open();
    await d.run([call('echo', [0])]);
    const [a, bad, b] = await d.run([call('echo', [1]), call('echo', [() => 2]), call('echo', [3])]);
    expect(a!.value).toBe(1);
    expect(b!.value).toBe(3);
    expect(bad!.status).toBe('error');
    expect(errOf(bad!).name).toBe('TaskSerializationError');
    expect(errOf(bad!).message).toMatch(/^arguments of task "echo" cannot be sent between (threads|processes): /);
  });

  it('moves ArrayBuffers and typed arrays in results intact', async () => {
    const d = await open();
    const n = 1 << 20;
    const [bytes, ab, sub] = await d.run([call('bytes', [n]), call('arrayBuffer', [4096]), call('subview', [])]);
    const u = bytes!.value as Uint8Array;
    expect(u).toBeInstanceOf(Uint8Array);
    expect(u.length).toBe(n);
    expect(u[0]).toBe(0);
    expect(u[255]).toBe(255);
    expect(u[n - 1]).toBe((n - 1) & 0xff);
    const b = ab!.value as ArrayBuffer;
    expect(b).toBeInstanceOf(ArrayBuffer);
    expect(b.byteLength).toBe(4096);
    expect(new Uint8Array(b)[3]).toBe(21);
    expect(Array.from(sub!.value as Uint8Array)).toEqual([8, 9, 10, 11, 12, 13, 14, 15]);
  });

  it('times out a call that runs too long, and keeps working', async () => {
    const d = await open();
    const t0 = Date.now();
    // Local can only stop waiting for an async task; a pool stops a busy thread/process.
    const slow = mode === 'local' ? call('sleep', [10_000], { timeoutMs: 100 }) : call('busy', [10_000], { timeoutMs: 200 });
    const [o] = await d.run([slow]);
    expect(o!.status).toBe('timeout');
    expect(errOf(o!).name).toBe('TaskTimeoutError');
    expect(Date.now() - t0).toBeLessThan(5_000);
    const outs = await d.run(Array.from({ length: 50 }, (_, i) => call('add', [i, i])));
    outs.forEach((x, i) => expect(x.value).toBe(2 * i));
  });

  it('cancels queued calls', async () => {
    const d = await open();
    // Every slot busy (at least two calls), so the adds after them are queued.
    const slow = (): TaskCall => (mode === 'local' ? call('sleep', [150]) : call('busy', [150]));
    const slows = Array.from({ length: Math.max(2, d.ex.workers) }, slow);
    const queued = [call('add', [1, 1]), call('add', [2, 2]), call('add', [3, 3])];
    const all = d.run([...slows, ...queued]);
    d.ex.cancel([queued[0]!.id, queued[2]!.id]);
    const outs = await all;
    expect(outs.map((o) => o.status)).toEqual([...slows.map(() => 'ok'), 'cancelled', 'ok', 'cancelled']);
    expect(errOf(outs[slows.length]!).name).toBe('CancelledError');
    expect(outs[slows.length + 1]!.value).toBe(4);
    expect(d.ex.freeSlots()).toBe(d.limit);
  });

  it('cancels a running call, and keeps working', async () => {
    const d = await open();
    const running = mode === 'local' ? call('sleep', [10_000]) : call('busy', [10_000]);
    const p = d.run([running]);
    await sleep(300);
    const t0 = Date.now();
    d.ex.cancel([running.id]);
    const [o] = await p;
    expect(o!.status).toBe('cancelled');
    expect(Date.now() - t0).toBeLessThan(2_000);
    const outs = await d.run(Array.from({ length: 20 }, (_, i) => call('add', [i, 0])));
    outs.forEach((x, i) => expect(x.value).toBe(i));
    expect(d.ex.freeSlots()).toBe(d.limit);
  });

  itWith('crash', 'reports calls on a crashed worker as lost, replaces it, and keeps working', async () => {
    const d = await open();
    const [o] = await d.run([call('exit', [1])]);
    expect(o!.status).toBe('lost');
    expect(errOf(o!).name).toBe('WorkerLostError');
    expect(o!.worker).toMatch(workerName ?? /^(thread|process)-/);
    const outs = await d.run(Array.from({ length: 200 }, (_, i) => call('add', [i, 1])));
    outs.forEach((x, i) => expect(x.value).toBe(i + 1));
    // The replacement joins (it imports the modules first): both workers serve again.
    let seen = 0;
    for (let i = 0; i < 50 && seen < 2; i++) {
      const many = await d.run(Array.from({ length: 4 }, () => call('busy', [20])));
      seen = new Set(many.map((x) => x.worker)).size;
    }
    expect(seen).toBe(2);
  });

  it('never accepts more than freeSlots() calls', async () => {
    const d = await open();
    const cap = d.ex.freeSlots();
    expect(() => d.ex.submit(Array.from({ length: cap + 1 }, () => call('noop', [])))).toThrow(RangeError);
    expect(d.ex.freeSlots()).toBe(cap);
    const outs = await d.run(Array.from({ length: cap * 3 + 17 }, () => call('noop', [])));
    expect(outs.every((o) => o.status === 'ok')).toBe(true);
    expect(d.maxInFlight).toBeLessThanOrEqual(cap);
    expect(d.maxInFlight).toBe(cap);
    expect(d.ex.freeSlots()).toBe(cap);
  });

  itWith('sharedMemory', 'runs at most `workers` synchronous tasks at once', async () => {
    const d = await open();
    const sab = new SharedArrayBuffer(8);
    const outs = await d.run(Array.from({ length: 24 }, () => call('concurrency', [sab, 10])));
    expect(outs.every((o) => o.status === 'ok')).toBe(true);
    const max = new Int32Array(sab)[1]!;
    expect(max).toBeGreaterThanOrEqual(1);
    expect(max).toBeLessThanOrEqual(d.ex.workers);
  });

  it('shuts down promptly while a task runs, leaving no worker behind', async () => {
    const d = await open();
    const before = process.getActiveResourcesInfo().filter((r) => r !== 'Timeout' && r !== 'Immediate').length;
    void d.run([mode === 'local' ? call('sleep', [10_000]) : call('busy', [10_000])]).catch(() => {});
    await sleep(200);
    const t0 = Date.now();
    await d.ex.shutdown();
    await d.ex.shutdown(); // idempotent
    expect(Date.now() - t0).toBeLessThan(3_000);
    expect(d.ex.freeSlots()).toBe(0);
    await sleep(50);
    const kinds = process.getActiveResourcesInfo();
    expect(kinds).not.toContain('MessagePort');
    expect(kinds).not.toContain('ProcessWrap');
    expect(kinds.filter((r) => r !== 'Timeout' && r !== 'Immediate').length).toBeLessThanOrEqual(before);
  });

  it('rejects start() naming a task that cannot be resolved', async () => {
    ex = make();
    const err = await new Driver(ex).start([key('add'), key('nope')]).then(
      () => null,
      (e: unknown) => e as Error,
    );
    expect(err).toBeInstanceOf(TaskResolutionError);
    expect(err!.message).toMatch(/^task "nope" \(file:\/\/.*exec-tasks\.ts#nope\) cannot be found in .*: it is defined inside a function or its module did not register it$/);
  });

  it('rejects start() naming a module that fails to import, and the cause', async () => {
    ex = make();
    const bad = 'data:text/javascript,throw new Error("exploded on purpose")';
    // A key that only the bad module would register: an executor whose thread already
    // has every key (LocalExecutor in the thread that built the flow) imports nothing.
    const err = await new Driver(ex).start([key('add'), `${bad}#boom`], [MODULE, bad]).then(
      () => null,
      (e: unknown) => e as Error,
    );
    expect(err).toBeInstanceOf(TaskResolutionError);
    expect(err!.message).toContain('data:text/javascript');
    expect(err!.message).toContain('exploded on purpose');

    await ex.shutdown();
    ex = make();
    const missing = new URL('./fixtures/no-such-module.ts', import.meta.url).href;
    const err2 = await new Driver(ex).start([], [missing]).then(
      () => null,
      (e: unknown) => e as Error,
    );
    expect(err2).toBeInstanceOf(TaskResolutionError);
    expect(err2!.message).toContain('no-such-module.ts');
  });

  itWith('warm', 'keeps its workers across runs: two sessions, different modules, then close() leaves nothing', async () => {
    const before = handleKinds().length;
    const warm = makeWarm!();
    ex = warm;
    // Session 1.
    const d1 = new Driver(warm);
    await d1.start([key('add'), key('ctx'), key('busy')]);
    const first = await d1.run(Array.from({ length: 400 }, (_, i) => call('add', [i, 1])));
    first.forEach((o, i) => expect(o.value).toBe(i + 1));
    const names1 = new Set<string>();
    for (let i = 0; i < 50 && names1.size < 2; i++) {
      for (const o of await d1.run(Array.from({ length: 4 }, () => call('busy', [10])))) names1.add(o.worker!);
    }
    expect(names1.size).toBe(2);
    await warm.shutdown();
    await warm.shutdown(); // idempotent
    expect(warm.freeSlots()).toBe(0);
    expect(() => warm.submit([call('add', [1, 1])])).toThrow();

    // Session 2: another module, flow name and parameters, on the same workers.
    const d2 = new Driver(warm);
    await d2.start([key2('add'), key2('ctx'), key2('busy')], [MODULE2], { p: 2 }, 'second');
    expect(d2.limit).toBe(d1.limit);
    const again = await d2.run(Array.from({ length: 400 }, (_, i) => call('add', [i, 2], { taskKey: key2('add') })));
    again.forEach((o, i) => {
      expect(o.status).toBe('ok');
      expect(o.value).toBe(i + 2);
    });
    const [c] = await d2.run([call('ctx', [], { taskKey: key2('ctx'), key: 'ctx2' })]);
    expect(c!.value).toMatchObject({ flowName: 'second', key: 'ctx2', parameters: { p: 2 } });
    const names2 = new Set<string>();
    for (let i = 0; i < 50 && names2.size < 2; i++) {
      const many = await d2.run(Array.from({ length: 4 }, () => call('busy', [10], { taskKey: key2('busy') })));
      for (const o of many) names2.add(o.worker!);
    }
    expect([...names2].sort()).toEqual([...names1].sort());
    await warm.shutdown();

    // Session 3 names a key that does not resolve: start() rejects, the pool stays usable.
    const err = await new Driver(warm).start([key2('add'), key2('nope')]).then(
      () => null,
      (e: unknown) => e as Error,
    );
    expect(err).toBeInstanceOf(TaskResolutionError);
    expect(err!.message).toContain('"nope"');
    const d4 = new Driver(warm);
    await d4.start([key('add')]);
    const [o4] = await d4.run([call('add', [20, 22])]);
    expect(o4!.value).toBe(42);
    expect(names1.has(o4!.worker!)).toBe(true);

    await warm.close!();
    await warm.close!(); // idempotent
    await expect(warm.start({ flowName: 'x', modules: [], taskKeys: [], parameters: {}, onOutcomes: () => {} })).rejects.toThrow();
    await sleep(50);
    const kinds = process.getActiveResourcesInfo();
    expect(kinds).not.toContain('MessagePort');
    expect(kinds).not.toContain('ProcessWrap');
    expect(handleKinds().length).toBeLessThanOrEqual(before);
  });

  itWith('warm', 'ends a session while a call runs: the busy worker is replaced, the next session runs', async () => {
    const warm = makeWarm!();
    ex = warm;
    const d1 = new Driver(warm);
    await d1.start([key('busy'), key('add')]);
    const stuck = call('busy', [10_000]);
    void d1.run([stuck]).catch(() => {});
    await sleep(200);
    const t0 = Date.now();
    await warm.shutdown();
    const d2 = new Driver(warm);
    await d2.start([key('add')]);
    const outs = await d2.run(Array.from({ length: 100 }, (_, i) => call('add', [i, 3])));
    outs.forEach((o, i) => expect(o.value).toBe(i + 3));
    expect(Date.now() - t0).toBeLessThan(8_000);
    // Nothing of session 1 reaches session 2.
    expect(d2.outcomes.has(stuck.id)).toBe(false);
    expect(d1.outcomes.has(stuck.id)).toBe(false);
    await warm.close!();
  });
});

describe('LocalExecutor: startNow and runNow (a cluster worker starts runs and calls without waiting a turn)', () => {
  const session = (modules: readonly string[], taskKeys: readonly string[], onOutcomes: (o: Outcome[]) => void) => ({
    flowName: 'now',
    modules,
    taskKeys,
    parameters: {},
    onOutcomes,
  });

  it('startNow starts at once when every module was imported here and no key is asked for, and declines otherwise', async () => {
    const never = `${MODULE}?never-imported`;
    const a = new LocalExecutor();
    expect(a.startNow(session([never], [], () => {}))).toBe(false);
    expect(() => a.submit([call('add', [1, 2])])).toThrow(/before start/);
    const b = new LocalExecutor();
    expect(b.startNow(session([MODULE], [key('add')], () => {}))).toBe(false); // keys to check: start() does
    // After one start() that imports it (no keys given, so it does not stop at the registry), the module counts as imported here.
    const c = new LocalExecutor();
    await c.start(session([MODULE], [], () => {}));
    await c.shutdown();
    const outs: Outcome[] = [];
    const d = new LocalExecutor();
    expect(d.startNow(session([MODULE], [], (o) => outs.push(...o)))).toBe(true);
    expect(() => d.startNow(session([MODULE], [], () => {}))).toThrow(/twice/);
    d.submit([call('add', [2, 3])]);
    await sleep(20);
    expect(outs.map((o) => o.value)).toEqual([5]);
    await Promise.all([a.shutdown(), b.shutdown(), d.shutdown()]);
  });

  it('runNow runs the queued calls before returning (not inside a delivery), and is a no-op with nothing queued', async () => {
    const outs: Outcome[] = [];
    let nested = -1;
    const ex = new LocalExecutor();
    await ex.start(
      session([MODULE], [key('add')], (o) => {
        outs.push(...o);
        if (nested === -1) {
          // Inside a delivery: runNow leaves the new call to the scheduled turn.
          ex.submit([call('add', [10, 10])]);
          ex.runNow();
          nested = outs.length;
        }
      }),
    );
    ex.runNow();
    expect(outs).toHaveLength(0);
    ex.submit([call('add', [1, 1]), call('add', [2, 2])]);
    ex.runNow();
    expect(outs.slice(0, 2).map((o) => o.value)).toEqual([2, 4]);
    expect(nested).toBe(2);
    await sleep(20);
    expect(outs.map((o) => o.value)).toEqual([2, 4, 20]);
    await ex.shutdown();
  });
});
