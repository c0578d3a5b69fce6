/**
 * End-to-end semantics of flows (Prefect 1), run through `flow.run()` with the default
 * executor (in-process). These need the runner (`src/runner/run.ts`).
 */
import { describe, expect, it } from 'vitest';
import {
  Flow,
  FlowValidationError,
  LocalExecutor,
  PoolExecutor,
  TaskResolutionError,
  caseOf,
  context,
  fail,
  flatten,
  flow,
  ifElse,
  loop,
  merge,
  parameter,
  pause,
  retry,
  skip,
  switchOn,
  task,
  triggers,
  unmapped,
} from '../src/index.ts';
import type { RunProgress } from '../src/index.ts';
import { negTotal, plusOne, poolFlow, total } from './fixtures/flow-pool.ts';

// ---------------------------------------------------------------------------------
// Tasks (top level, as a flow module would define them)

const add = task(function add(a: number, b: number): number {
  return a + b;
});
const inc = task(async function inc(x: number): Promise<number> {
  await Promise.resolve();
  return x + 1;
});
const range = task(function range(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
});
const sum = task(function sum(xs: number[]): number {
  return xs.reduce((a, b) => a + b, 0);
});
const pair = task(function pair(x: number): number[] {
  return [x, x * 10];
});
const boom = task(function boom(_x?: unknown): number {
  throw new Error('boom');
});
const identity = task(function identity(x: string): string {
  return x;
});
const isPositive = task(function isPositive(x: number): boolean {
  return x > 0;
});
const label = task(function label(s: string): string {
  return `<${s}>`;
});
const cleanup = task({ trigger: triggers.anyFailed }, function cleanup(_x: unknown): string {
  return 'cleaned';
});
const always = task({ trigger: triggers.allFinished }, function always(_x: unknown): string {
  return 'finished';
});
const maybeSkip = task(function maybeSkip(x: number): number {
  if (x < 0) throw skip('negative');
  return x;
});
const afterSkip = task({ skipOnUpstreamSkip: false }, function afterSkip(x: number | undefined): string {
  return `ran with ${String(x)}`;
});
const failWith = task(function failWith(msg: string): number {
  throw fail(msg);
});
const withContext = task(function withContext(x: number): { key: string; mapIndex: number; flowName: string; p: unknown; x: number } {
  const c = context();
  return { key: c.key, mapIndex: c.mapIndex, flowName: c.flowName, p: c.parameters.p, x };
});

class FlakyError extends Error {
  override name = 'FlakyError';
}
const attempts = new Map<string, number>();
function bump(id: string): number {
  const n = (attempts.get(id) ?? 0) + 1;
  attempts.set(id, n);
  return n;
}
const flaky = task({ maxRetries: 2, retryDelay: '10ms', retryOn: [FlakyError] }, function flaky(id: string, failures: number): string {
  if (bump(id) <= failures) throw new FlakyError(`attempt ${attempts.get(id)}`);
  return `ok after ${attempts.get(id)}`;
});
const notRetried = task({ maxRetries: 3, retryOn: FlakyError }, function notRetried(id: string): string {
  bump(id);
  throw new TypeError('not flaky');
});
const retryOnce = task(function retryOnce(id: string): number {
  if (bump(id) === 1) throw retry('once more', 5);
  return attempts.get(id)!;
});
const countTo = task(function countTo(n: number): number {
  const c = context();
  const so = (c.loopResult as number | undefined) ?? 0;
  if (so < n) throw loop(so + 1);
  return so * 100 + c.loopCount;
});
const pauser = task(function pauser(): number {
  throw pause('wait for me');
});
const slow = task({ timeout: '50ms' }, async function slow(): Promise<number> {
  await new Promise((r) => setTimeout(r, 2000));
  return 1;
});

const nap = task(async function nap(ms: number): Promise<number> {
  await new Promise((r) => setTimeout(r, ms));
  return ms;
});

// ---------------------------------------------------------------------------------

describe('results', () => {
  it('runs a small graph and returns typed results', async () => {
    const f = flow('results', () => {
      const a = add(1, 2);
      const b = inc(a);
      const c = add(a, b);
      return { a, b, c };
    });
    const r = await f.run();
    expect(r.state).toBe('Success');
    expect(r.flowName).toBe('results');
    expect(r.result(f.outputs.a)).toBe(3);
    expect(r.result(f.outputs.b)).toBe(4);
    expect(r.result(f.outputs.c)).toBe(7);
    expect(r.stateOf(f.outputs.c)).toBe('Success');
    expect(r.tasks).toHaveLength(3);
  });

  it('imperative flows run the same', async () => {
    const f = new Flow('imperative');
    const a = f.add(add, [2, 3]);
    const b = f.add(inc, [a]);
    const r = await f.run();
    expect(r.result(b)).toBe(6);
  });

  it('a task sees its context', async () => {
    const f = flow('ctx', () => {
      const p = parameter('p', 'pv');
      return { one: withContext(1), many: withContext.map([5, 6]), p };
    });
    const r = await f.run();
    expect(r.result(f.outputs.one)).toEqual({ key: 'withContext', mapIndex: -1, flowName: 'ctx', p: 'pv', x: 1 });
    expect(r.result(f.outputs.many)).toEqual([
      { key: 'withContext-2', mapIndex: 0, flowName: 'ctx', p: 'pv', x: 5 },
      { key: 'withContext-2', mapIndex: 1, flowName: 'ctx', p: 'pv', x: 6 },
    ]);
  });
});

describe('parameters', () => {
  const f = flow('params', () => {
    const n = parameter('n', 3);
    const who = parameter<string>('who');
    return { n2: add(n, n), who: label(who) };
  });

  it('takes values from the run, else defaults', async () => {
    const r1 = await f.run({ parameters: { who: 'a' } });
    expect(r1.result(f.outputs.n2)).toBe(6);
    expect(r1.result(f.outputs.who)).toBe('<a>');
    expect(r1.parameters).toMatchObject({ n: 3, who: 'a' });
    const r2 = await f.run({ parameters: { n: 10, who: 'b' } });
    expect(r2.result(f.outputs.n2)).toBe(20);
  });

  it('a missing required parameter rejects before anything runs', async () => {
    await expect(f.run()).rejects.toThrow(FlowValidationError);
    await expect(f.run()).rejects.toThrow(/who/);
  });

  it('a parameter of the wrong type rejects', async () => {
    const g = flow('typed-param', () => add(parameter('n', 1, { type: 'number' }), 1));
    await expect(g.run({ parameters: { n: 'x' } })).rejects.toThrow(FlowValidationError);
  });
});

describe('mapping', () => {
  it('maps, maps over a mapped result child by child, and reduces', async () => {
    const f = flow('map', () => {
      const xs = range(4);
      const plus = add.map(xs, unmapped(10));
      const again = inc.map(plus);
      return { plus, again, total: sum(again) };
    });
    const r = await f.run();
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs.plus)).toEqual([10, 11, 12, 13]);
    expect(r.result(f.outputs.again)).toEqual([11, 12, 13, 14]);
    expect(r.result(f.outputs.total)).toBe(50);
    expect(r.stateOf(f.outputs.again)).toBe('Mapped');
    const runs = r.runsOf(f.outputs.again);
    expect(runs.map((x) => x.mapIndex)).toEqual([-1, 0, 1, 2, 3]);
    expect(runs.slice(1).every((x) => x.state === 'Success')).toBe(true);
  });

  it('maps over several lists pairwise, and over constants', async () => {
    const f = flow('map2', () => ({ sums: add.map([1, 2, 3], [10, 20, 30]) }));
    const r = await f.run();
    expect(r.result(f.outputs.sums)).toEqual([11, 22, 33]);
  });

  it('flatten maps over the concatenation of lists', async () => {
    const f = flow('flatten', () => {
      const pairs = pair.map(range(3));
      return { pairs, flat: inc.map(flatten(pairs)) };
    });
    const r = await f.run();
    expect(r.result(f.outputs.pairs)).toEqual([[0, 0], [1, 10], [2, 20]]);
    expect(r.result(f.outputs.flat)).toEqual([1, 1, 2, 11, 3, 21]);
  });

  it('mapping over an empty list gives an empty result', async () => {
    const f = flow('empty-map', () => {
      const m = inc.map(range(0));
      return { m, total: sum(m) };
    });
    const r = await f.run();
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs.m)).toEqual([]);
    expect(r.result(f.outputs.total)).toBe(0);
  });

  it('a failed child fails the run; its siblings still succeed', async () => {
    const check = task(function check(x: number): number {
      if (x === 2) throw new Error('two');
      return x;
    });
    const f = flow('map-fail', () => check.map([1, 2, 3]));
    const r = await f.run();
    expect(r.state).toBe('Failed');
    const states = r.runsOf(f.outputs).slice(1).map((x) => x.state);
    expect(states).toEqual(['Success', 'Failed', 'Success']);
  });
});

describe('triggers and failures', () => {
  it('a failure makes allSuccessful dependents TriggerFailed; anyFailed and allFinished run', async () => {
    const f = flow('triggers', () => {
      const b = boom();
      const next = inc(b);
      return { b, next, c: cleanup(b), a: always(b) };
    });
    const r = await f.run();
    expect(r.stateOf(f.outputs.b)).toBe('Failed');
    expect(r.stateOf(f.outputs.next)).toBe('TriggerFailed');
    expect(r.result(f.outputs.c)).toBe('cleaned');
    expect(r.result(f.outputs.a)).toBe('finished');
    expect(r.state).toBe('Failed'); // `next` is a reference (terminal) task
    const rec = r.runsOf(f.outputs.b)[0]!;
    expect(rec.error?.message).toBe('boom');
  });

  it('anyFailed does not run when everything succeeded (TriggerFailed)', async () => {
    const f = flow('no-cleanup', () => cleanup(add(1, 1)));
    const r = await f.run();
    expect(r.stateOf(f.outputs)).toBe('TriggerFailed');
  });

  it('reference tasks decide the flow state', async () => {
    const f = flow(
      'reference',
      () => {
        const b = boom();
        return { b, c: cleanup(b) };
      },
      { referenceTasks: (o) => [o.c] },
    );
    const r = await f.run();
    expect(r.stateOf(f.outputs.b)).toBe('Failed');
    expect(r.state).toBe('Success');
    // Default reference tasks: the terminal node `cleanup` succeeded, so the flow did too.
    const g = flow('terminal', () => cleanup(boom()));
    expect((await g.run()).state).toBe('Success');
  });

  it('someSuccessful bounds and a custom trigger', async () => {
    const atLeast2 = task({ trigger: triggers.someSuccessful({ atLeast: 2 }) }, function atLeast2(..._xs: unknown[]): string {
      return 'ran';
    });
    const custom = task({ trigger: (up) => up.filter((u) => u.state === 'Failed').length === 1 }, function custom(..._xs: unknown[]): string {
      return 'custom ran';
    });
    const f = flow('some', () => {
      const ok1 = add(1, 1);
      const ok2 = add(2, 2);
      const bad = boom();
      return { yes: atLeast2(ok1, ok2, bad), no: atLeast2.with({ name: 'no' })(ok1, bad), c: custom(ok1, bad) };
    });
    const r = await f.run();
    expect(r.result(f.outputs.yes)).toBe('ran');
    expect(r.stateOf(f.outputs.no)).toBe('TriggerFailed');
    expect(r.result(f.outputs.c)).toBe('custom ran');
  });

  it('manualOnly pauses the task', async () => {
    const manual = task({ trigger: triggers.manualOnly }, function manual(x: number): number {
      return x;
    });
    const f = flow('manual', () => manual(add(1, 1)));
    const r = await f.run();
    expect(r.stateOf(f.outputs)).toBe('Paused');
    expect(r.state).toBe('Paused');
  });

  it('ordering-only edges: the trigger sees upstream states, no data flows', async () => {
    const f = flow('ordering', () => {
      const b = boom();
      const after = inc.with({ upstream: [b] })(1);
      const tolerant = always(1).after(b);
      return { after, tolerant };
    });
    const r = await f.run();
    expect(r.stateOf(f.outputs.after)).toBe('TriggerFailed');
    expect(r.result(f.outputs.tolerant)).toBe('finished');
  });
});

describe('skips', () => {
  it('a skip propagates downstream unless skipOnUpstreamSkip is off', async () => {
    const f = flow('skip', () => {
      const s = maybeSkip(-1);
      const down = inc(s);
      const downer = inc(down);
      return { s, down, downer, tolerant: afterSkip(s) };
    });
    const r = await f.run();
    expect(r.stateOf(f.outputs.s)).toBe('Skipped');
    expect(r.stateOf(f.outputs.down)).toBe('Skipped');
    expect(r.stateOf(f.outputs.downer)).toBe('Skipped');
    // A skip without data leaves no result (undefined, or null after a trip through a wire format).
    expect(r.result(f.outputs.tolerant)).toMatch(/^ran with (undefined|null)$/);
    expect(r.state).toBe('Success'); // skipped counts as success for the flow
  });
});

describe('conditionals', () => {
  const f = flow('case-merge', () => {
    const x = parameter('x', 1);
    const cond = isPositive(x);
    const pos = caseOf(cond, true, () => label(identity('pos')));
    const neg = caseOf(cond, false, () => label('neg'));
    return { pos, neg, out: merge(pos, neg) };
  });

  it('caseOf runs the matching branch, skips the other; merge picks the one that ran', async () => {
    const r1 = await f.run({ parameters: { x: 5 } });
    expect(r1.state).toBe('Success');
    expect(r1.result(f.outputs.out)).toBe('<pos>');
    expect(r1.stateOf(f.outputs.neg)).toBe('Skipped');
    expect(r1.stateOf(f.outputs.pos)).toBe('Success');

    const r2 = await f.run({ parameters: { x: -5 } });
    expect(r2.result(f.outputs.out)).toBe('<neg>');
    expect(r2.stateOf(f.outputs.pos)).toBe('Skipped');
  });

  it('ifElse and switchOn', async () => {
    const g = flow('ifelse-switch', () => {
      const x = parameter('x', 1);
      const kind = parameter('kind', 'csv');
      const yes = label('yes');
      const no = label('no');
      ifElse(isPositive(x), yes, no);
      const csv = label('csv');
      const json = label('json');
      switchOn(kind, { csv, json });
      return { yes, no, csv, json, picked: merge(csv, json) };
    });
    const r = await g.run({ parameters: { x: 0, kind: 'json' } });
    expect(r.stateOf(g.outputs.yes)).toBe('Skipped');
    expect(r.result(g.outputs.no)).toBe('<no>');
    expect(r.stateOf(g.outputs.csv)).toBe('Skipped');
    expect(r.result(g.outputs.picked)).toBe('<json>');
  });

  it('merge of all-skipped branches is skipped', async () => {
    const g = flow('all-skipped', () => {
      const cond = isPositive(1);
      const a = caseOf(cond, false, () => label('a'));
      return merge(a);
    });
    const r = await g.run();
    expect(r.stateOf(g.outputs)).toBe('Skipped');
  });

  it('merge ignores a branch that skipped itself with skip()', async () => {
    const g = flow('merge-skip-signal', () => merge(maybeSkip(-1), label('other')));
    const r = await g.run();
    expect(r.result(g.outputs)).toBe('<other>');
  });

  it('get(key) reads a field of a result', async () => {
    const obj = task(function obj(): { a: number; b: string } {
      return { a: 41, b: 'x' };
    });
    const g = flow('get', () => inc(obj().get('a')));
    expect((await g.run()).result(g.outputs)).toBe(42);
  });
});

describe('signals and retries', () => {
  it('fail() fails the task with its message', async () => {
    const f = flow('fail', () => failWith('bad row'));
    const r = await f.run();
    expect(r.stateOf(f.outputs)).toBe('Failed');
    expect(r.runsOf(f.outputs)[0]!.error).toMatchObject({ name: 'FailSignal', message: 'bad row' });
    expect(r.state).toBe('Failed');
  });

  it('retries on a listed error until it succeeds', async () => {
    const f = flow('retry-on', () => flaky('a', 2));
    const r = await f.run();
    expect(r.result(f.outputs)).toBe('ok after 3');
    expect(r.runsOf(f.outputs)[0]!.attempts).toBe(3);
  });

  it('gives up after maxRetries', async () => {
    const f = flow('retry-exhausted', () => flaky('b', 5));
    const r = await f.run();
    expect(r.stateOf(f.outputs)).toBe('Failed');
    expect(attempts.get('b')).toBe(3);
  });

  it('does not retry an error that retryOn does not list', async () => {
    const f = flow('retry-not', () => notRetried('c'));
    const r = await f.run();
    expect(r.stateOf(f.outputs)).toBe('Failed');
    expect(attempts.get('c')).toBe(1);
    expect(r.runsOf(f.outputs)[0]!.error?.name).toBe('TypeError');
  });

  it('retry() retries whatever maxRetries says', async () => {
    const f = flow('retry-signal', () => retryOnce('d'));
    const r = await f.run();
    expect(r.result(f.outputs)).toBe(2);
  });

  it('loop() runs the task again with the carried value', async () => {
    const f = flow('loop', () => countTo(3));
    const seen: string[] = [];
    const r = await f.run({ onTaskState: (e) => seen.push(`${e.from}>${e.to}`) });
    expect(r.result(f.outputs)).toBe(303);
    // Each loop passes through Looped, as in Prefect 1.
    expect(seen).toEqual([
      'Pending>Scheduled',
      ...Array.from({ length: 3 }, () => ['Scheduled>Running', 'Running>Looped', 'Looped>Scheduled']).flat(),
      'Scheduled>Running',
      'Running>Success',
    ]);
  });

  it('pause() pauses the task and the run', async () => {
    const f = flow('pause', () => {
      const p = pauser();
      return { p, next: inc(p) };
    });
    const r = await f.run();
    expect(r.stateOf(f.outputs.p)).toBe('Paused');
    expect(r.state).toBe('Paused');
  });

  it('a timeout stops the task', async () => {
    const f = flow('timeout', () => slow());
    const r = await f.run();
    expect(r.stateOf(f.outputs)).toBe('TimedOut');
    expect(r.state).toBe('Failed');
  });
});

describe('executors', () => {
  it('a flow module runs on worker threads: workers resolve named, unnamed and duplicate-named tasks', async () => {
    expect(plusOne.key).toMatch(/flow-pool\.ts#@3$/);
    expect(total.key).toMatch(/flow-pool\.ts#total$/);
    expect(negTotal.key).toMatch(/flow-pool\.ts#total~2$/);
    const r = await poolFlow.run({ executor: new PoolExecutor({ threads: 2 }), parameters: { n: 5 } });
    expect(r.state).toBe('Success');
    expect(r.result(poolFlow.outputs.squares)).toEqual([0, 1, 4, 9, 16]);
    expect(r.result(poolFlow.outputs.sum)).toBe(35);
    expect(r.result(poolFlow.outputs.neg)).toBe(-35);
  });

  it('a closure task cannot run on worker threads: a clear TaskResolutionError', async () => {
    const f = flow('closure-on-pool', () => {
      const local = task(function local(x: number): number {
        return x;
      });
      return local(1);
    });
    await expect(f.run({ executor: new PoolExecutor({ threads: 1 }) })).rejects.toThrow(TaskResolutionError);
    // In-process it runs.
    expect((await f.run()).result(f.outputs)).toBe(1);
  });

  it("the flow's default executor is used, and RunOptions.executor overrides it", async () => {
    const f = flow('default-executor', () => add(1, 2), { executor: new LocalExecutor() });
    expect(f.executor).toBeInstanceOf(LocalExecutor);
    expect((await f.run()).result(f.outputs)).toBe(3);
    expect((await f.run({ executor: new LocalExecutor() })).result(f.outputs)).toBe(3);
  });
});

describe('progress', () => {
  it('counts as running only what the executor can run at once (LocalExecutor: one)', async () => {
    const f = flow('progress', () => ({ a: nap(60), b: nap(60), c: nap(60), d: nap(60) }));
    const seen: RunProgress[] = [];
    const r = await f.run({ onProgress: (p) => seen.push(p), progressIntervalMs: 10 });
    expect(r.state).toBe('Success');
    expect(seen.length).toBeGreaterThan(3);
    expect(Math.max(...seen.map((p) => p.running))).toBe(1);
    expect(seen.at(-1)).toMatchObject({ total: 4, done: 4, running: 0, failed: 0 });
  });
});
