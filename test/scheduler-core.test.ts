/**
 * The scheduler core as a state machine with no I/O (STYLE #5): feed events, assert the
 * exact instructions and states. Validate mode is on everywhere (invariants after every
 * event) except where a test breaks the core on purpose.
 */
import { describe, expect, it } from 'vitest';
import type { TriggerName, TriggerSpec, UpstreamState } from '../src/flow/spec.ts';
import { SchedulerCore, SchedulerError, type CoreOptions, type FailureKind } from '../src/scheduler/core.ts';
import { MAPPED, MAPPING, PENDING, READY, RUNNING, SUCCESS } from '../src/scheduler/states.ts';
import { SpecBuilder, drain, flatten, konst, mapped, take, type NodeOpts } from './helpers/spec-builder.ts';

const DONE_OK = { op: 'done', state: 'Success', message: 'All reference tasks succeeded.' } as const;
const doneFailed = (n: number) => ({ op: 'done', state: 'Failed', message: `${n} reference task run(s) failed.` }) as const;
const DONE_CANCELLED = { op: 'done', state: 'Cancelled', message: 'The run was cancelled.' } as const;

const trig = (name: TriggerName, bounds: { atLeast?: number; atMost?: number } = {}): NodeOpts => ({
  trigger: { kind: 'builtin', name, ...bounds },
});

function coreOf(g: SpecBuilder, opts: CoreOptions = {}): SchedulerCore {
  return new SchedulerCore(g.build(), { validate: true, ...opts });
}

function ok(core: SchedulerCore, id: number): void {
  expect(core.success(id, core.runId[id]!)).toBe(true);
}

function fail(core: SchedulerCore, id: number, kind: FailureKind = 'error', retryable = true, delayMs = -1, message?: string): void {
  expect(core.failure(id, core.runId[id]!, kind, retryable, delayMs, message)).toBe(true);
}

/** Dispatch one task at a time and succeed it until nothing is ready; the dispatch order. */
function runSerially(core: SchedulerCore): number[] {
  const seen: number[] = [];
  for (;;) {
    const [id] = take(core, 1);
    if (id === undefined) return seen;
    seen.push(id);
    ok(core, id);
  }
}

describe('basic shapes', () => {
  it('runs a chain one task at a time', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b', [a]);
    const c = g.task('c', [b]);
    const core = coreOf(g);
    core.start();
    expect(drain(core)).toEqual([]);
    expect(core.stateName(a)).toBe('Scheduled');
    expect([core.stateName(b), core.stateName(c)]).toEqual(['Pending', 'Pending']);
    expect(take(core)).toEqual([a]);
    expect(core.stateName(a)).toBe('Running');
    expect(core.runId[a]).toBe(1);
    expect(take(core)).toEqual([]);
    ok(core, a);
    expect(drain(core)).toEqual([]);
    expect(take(core)).toEqual([b]);
    ok(core, b);
    expect(take(core)).toEqual([c]);
    expect(core.runId[c]).toBe(3);
    ok(core, c);
    expect(drain(core)).toEqual([DONE_OK]);
    expect(core.isDone).toBe(true);
    expect(core.counts[SUCCESS]).toBe(3);
    expect(core.runState()).toEqual({ state: 'Success', message: 'All reference tasks succeeded.' });
  });

  it('runs a diamond: the join waits for both branches', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b', [a]);
    const c = g.task('c', [a]);
    const d = g.task('d', [b, c]);
    const core = coreOf(g);
    core.start();
    expect(take(core)).toEqual([a]);
    ok(core, a);
    expect(take(core)).toEqual([b, c]);
    ok(core, c);
    expect(core.stateName(d)).toBe('Pending');
    expect(core.remaining[d]).toBe(1);
    ok(core, b);
    expect(drain(core)).toEqual([]);
    expect(take(core)).toEqual([d]);
    ok(core, d);
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('runs independent tasks as many at a time as asked', () => {
    const g = new SpecBuilder();
    for (let i = 0; i < 5; i++) g.task(`t${i}`);
    const core = coreOf(g);
    core.start();
    expect(core.readyCount).toBe(5);
    expect(take(core, 2)).toEqual([0, 1]);
    expect(take(core, 2)).toEqual([2, 3]);
    ok(core, 1);
    expect(take(core, 10)).toEqual([4]);
    for (const id of [0, 2, 3]) ok(core, id);
    expect(drain(core)).toEqual([]);
    ok(core, 4);
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('a flow with no tasks is done at start', () => {
    const core = coreOf(new SpecBuilder());
    core.start();
    expect(drain(core)).toEqual([DONE_OK]);
    expect(() => core.start()).toThrow('start() called twice');
  });
});

describe('dispatch order', () => {
  it('higher priority first among ready tasks', () => {
    const g = new SpecBuilder();
    const low = g.task('low', [], { priority: -1 });
    const zero = g.task('zero');
    const high = g.task('high', [], { priority: 5 });
    const mid = g.task('mid', [], { priority: 1 });
    const core = coreOf(g);
    core.start();
    expect(runSerially(core)).toEqual([high, mid, zero, low]);
  });

  it('a newly ready high-priority task overtakes queued ones', () => {
    const g = new SpecBuilder();
    const a = g.task('a', [], { priority: 1 });
    const b = g.task('b');
    const c = g.task('c');
    const urgent = g.task('urgent', [a], { priority: 10 });
    const core = coreOf(g);
    core.start();
    expect(take(core, 1)).toEqual([a]);
    ok(core, a);
    expect(take(core, 1)).toEqual([urgent]);
    expect(take(core)).toEqual([b, c]);
  });

  it('a binary tree reduction finishes one subtree before opening the next (static order)', () => {
    const leaves = 16;
    const g = new SpecBuilder();
    let level: number[] = [];
    for (let i = 0; i < leaves; i++) level.push(g.task(`leaf${i}`));
    // Parents after all leaves, level by level: declaration order is breadth first.
    const kids = new Map<number, [number, number]>();
    while (level.length > 1) {
      const next: number[] = [];
      for (let i = 0; i < level.length; i += 2) {
        const p = g.task(`sum`, [level[i]!, level[i + 1]!]);
        kids.set(p, [level[i]!, level[i + 1]!]);
        next.push(p);
      }
      level = next;
    }
    const root = level[0]!;
    const expected: number[] = [];
    const post = (n: number): void => {
      const k = kids.get(n);
      if (k !== undefined) {
        post(k[0]);
        post(k[1]);
      }
      expected.push(n);
    };
    post(root);
    const core = coreOf(g);
    core.start();
    const order = runSerially(core);
    expect(order).toEqual(expected);
    expect(order.slice(0, 7)).toEqual([0, 1, 16, 2, 3, 17, 24]);
    expect(drain(core)).toEqual([DONE_OK]);
  });
});

describe('retries and failures', () => {
  it('maxRetries=2: two retry instructions with retryDelayMs, then Failed', () => {
    const g = new SpecBuilder();
    const a = g.task('a', [], { maxRetries: 2, retryDelayMs: 250 });
    const b = g.task('b', [a]);
    const core = coreOf(g);
    core.start();
    for (let attempt = 1; attempt <= 2; attempt++) {
      expect(take(core)).toEqual([a]);
      expect(core.attempts[a]).toBe(attempt);
      fail(core, a);
      expect(drain(core)).toEqual([{ op: 'retry', id: a, delayMs: 250 }]);
      expect(core.stateName(a)).toBe('Retrying');
      expect(take(core)).toEqual([]);
      core.retryDue(a);
      expect(core.stateName(a)).toBe('Scheduled');
    }
    expect(take(core)).toEqual([a]);
    expect(core.attempts[a]).toBe(3);
    fail(core, a);
    expect(core.stateName(a)).toBe('Failed');
    expect(core.stateName(b)).toBe('TriggerFailed');
    expect(core.messages.get(b)).toBe('trigger "allSuccessful" failed (upstream: 0 successful, 0 skipped, 1 failed)');
    expect(drain(core)).toEqual([doneFailed(1)]);
  });

  it('retryable=false fails at once', () => {
    const g = new SpecBuilder();
    const a = g.task('a', [], { maxRetries: 2, retryDelayMs: 250 });
    const core = coreOf(g);
    core.start();
    take(core);
    fail(core, a, 'error', false);
    expect(core.stateName(a)).toBe('Failed');
    expect(drain(core)).toEqual([doneFailed(1)]);
  });

  it('a retry succeeds', () => {
    const g = new SpecBuilder();
    const a = g.task('a', [], { maxRetries: 1 });
    const core = coreOf(g);
    core.start();
    take(core);
    fail(core, a);
    expect(drain(core)).toEqual([{ op: 'retry', id: a, delayMs: 0 }]);
    core.retryDue(a);
    core.retryDue(a); // a second timer is ignored
    expect(take(core)).toEqual([a]);
    ok(core, a);
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('the timeout kind ends TimedOut (after its retries)', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b', [], { maxRetries: 1, retryDelayMs: 7 });
    const core = coreOf(g);
    core.start();
    take(core);
    fail(core, a, 'timeout');
    expect(core.stateName(a)).toBe('TimedOut');
    fail(core, b, 'timeout');
    expect(drain(core)).toEqual([{ op: 'retry', id: b, delayMs: 7 }]);
    core.retryDue(b);
    take(core);
    fail(core, b, 'timeout');
    expect(core.stateName(b)).toBe('TimedOut');
    expect(drain(core)).toEqual([doneFailed(2)]);
  });

  it('cached is success-like', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b', [a]);
    const core = coreOf(g);
    core.start();
    take(core);
    expect(core.cached(a, core.runId[a]!)).toBe(true);
    expect(core.stateName(a)).toBe('Cached');
    expect(take(core)).toEqual([b]);
    ok(core, b);
    expect(drain(core)).toEqual([DONE_OK]);
  });
});

describe('skip propagation', () => {
  it('skips downstream by default, all the way down', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b', [a]);
    const c = g.task('c', [b]);
    const core = coreOf(g);
    core.start();
    take(core);
    fail(core, a, 'skip');
    expect([a, b, c].map((i) => core.stateName(i))).toEqual(['Skipped', 'Skipped', 'Skipped']);
    expect(drain(core)).toEqual([DONE_OK]); // skipped counts as success
  });

  it('skipOnUpstreamSkip=false runs the task (skipped counts as success for its trigger)', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b', [a], { skipOnUpstreamSkip: false });
    const core = coreOf(g);
    core.start();
    take(core);
    fail(core, a, 'skip');
    expect(core.stateName(b)).toBe('Scheduled');
    expect(take(core)).toEqual([b]);
    ok(core, b);
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('a skip deep in a 200k chain cascades without recursion', () => {
    const g = new SpecBuilder();
    let prev = g.task('t');
    for (let i = 1; i < 200_000; i++) prev = g.task('t', [prev]);
    const core = new SchedulerCore(g.build());
    core.start();
    take(core);
    fail(core, 0, 'skip');
    expect(core.stateName(prev)).toBe('Skipped');
    expect(drain(core)).toEqual([DONE_OK]);
  });
});

describe('triggers', () => {
  type Outcome = 'ok' | 'fail' | 'skip';
  /** Upstream tasks end as given; returns the downstream task's state and message. */
  function verdict(opts: NodeOpts, outcomes: readonly Outcome[]): { state: string; message: string | undefined; core: SchedulerCore; t: number } {
    const g = new SpecBuilder();
    const ups = outcomes.map((_, i) => g.task(`u${i}`));
    const t = g.task('t', ups, { skipOnUpstreamSkip: false, ...opts });
    const core = coreOf(g);
    core.start();
    expect(take(core)).toEqual(ups);
    outcomes.forEach((o, i) => {
      if (o === 'ok') ok(core, i);
      else if (o === 'fail') fail(core, i, 'error', false);
      else fail(core, i, 'skip');
    });
    return { state: core.stateName(t), message: core.messages.get(t), core, t };
  }
  const stateOf = (opts: NodeOpts, outcomes: readonly Outcome[]): string => verdict(opts, outcomes).state;

  it('allSuccessful (skipped counts as success)', () => {
    expect(stateOf(trig('allSuccessful'), ['ok', 'skip'])).toBe('Scheduled');
    const v = verdict(trig('allSuccessful'), ['ok', 'fail', 'skip']);
    expect(v.state).toBe('TriggerFailed');
    expect(v.message).toBe('trigger "allSuccessful" failed (upstream: 1 successful, 1 skipped, 1 failed)');
    expect(drain(v.core)).toEqual([doneFailed(1)]);
  });

  it('allFailed', () => {
    expect(stateOf(trig('allFailed'), ['fail', 'fail'])).toBe('Scheduled');
    expect(stateOf(trig('allFailed'), ['fail', 'ok'])).toBe('TriggerFailed');
    expect(stateOf(trig('allFailed'), ['fail', 'skip'])).toBe('TriggerFailed');
  });

  it('anySuccessful', () => {
    expect(stateOf(trig('anySuccessful'), ['fail', 'ok'])).toBe('Scheduled');
    expect(stateOf(trig('anySuccessful'), ['fail', 'skip'])).toBe('Scheduled');
    expect(stateOf(trig('anySuccessful'), ['fail', 'fail'])).toBe('TriggerFailed');
  });

  it('anyFailed', () => {
    expect(stateOf(trig('anyFailed'), ['ok', 'fail'])).toBe('Scheduled');
    expect(stateOf(trig('anyFailed'), ['ok', 'ok'])).toBe('TriggerFailed');
  });

  it('allFinished and alwaysRun', () => {
    expect(stateOf(trig('allFinished'), ['fail', 'skip', 'ok'])).toBe('Scheduled');
    expect(stateOf(trig('alwaysRun'), ['fail', 'fail'])).toBe('Scheduled');
  });

  it('notAllSkipped: runs, skips when all upstream skipped, fails on a failed upstream', () => {
    expect(stateOf(trig('notAllSkipped'), ['skip', 'ok'])).toBe('Scheduled');
    const v = verdict(trig('notAllSkipped'), ['skip', 'skip']);
    expect(v.state).toBe('Skipped');
    expect(drain(v.core)).toEqual([DONE_OK]);
    expect(stateOf(trig('notAllSkipped'), ['skip', 'fail'])).toBe('TriggerFailed');
  });

  it('manualOnly pauses; resume() runs it and the run reports done again', () => {
    const v = verdict(trig('manualOnly'), ['ok']);
    const { core, t } = v;
    expect(v.state).toBe('Paused');
    expect(drain(core)).toEqual([{ op: 'done', state: 'Paused', message: '1 task run(s) are paused.' }]);
    expect(core.runState().state).toBe('Paused');
    expect(core.resume(t)).toBe(true);
    expect(core.resume(t)).toBe(false);
    expect(core.stateName(t)).toBe('Scheduled');
    expect(take(core)).toEqual([t]);
    ok(core, t);
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('someSuccessful with counts and fractions', () => {
    expect(stateOf(trig('someSuccessful', { atLeast: 2 }), ['ok', 'skip', 'fail'])).toBe('Scheduled');
    expect(stateOf(trig('someSuccessful', { atLeast: 2 }), ['ok', 'fail', 'fail'])).toBe('TriggerFailed');
    expect(stateOf(trig('someSuccessful', { atMost: 1 }), ['ok', 'ok', 'fail'])).toBe('TriggerFailed');
    expect(stateOf(trig('someSuccessful', { atMost: 1 }), ['ok', 'fail', 'fail'])).toBe('Scheduled');
    // Fractions of the upstream count: 0.5 of 2 = 1, 0.5 of 3 = 1.5.
    expect(stateOf(trig('someSuccessful', { atLeast: 0.5 }), ['ok', 'fail'])).toBe('Scheduled');
    expect(stateOf(trig('someSuccessful', { atLeast: 0.5 }), ['ok', 'fail', 'fail'])).toBe('TriggerFailed');
  });

  it('someFailed with counts and fractions', () => {
    expect(stateOf(trig('someFailed', { atLeast: 1, atMost: 2 }), ['fail', 'ok'])).toBe('Scheduled');
    expect(stateOf(trig('someFailed', { atLeast: 1, atMost: 2 }), ['ok', 'ok'])).toBe('TriggerFailed');
    expect(stateOf(trig('someFailed', { atLeast: 1, atMost: 2 }), ['fail', 'fail', 'fail'])).toBe('TriggerFailed');
    expect(stateOf(trig('someFailed', { atMost: 0.5 }), ['fail', 'ok', 'ok'])).toBe('Scheduled');
    const v = verdict(trig('someFailed', { atMost: 0.5 }), ['fail', 'fail', 'ok']);
    expect(v.state).toBe('TriggerFailed');
    expect(v.message).toBe('trigger "someFailed" failed (upstream: 1 successful, 0 skipped, 2 failed)');
  });

  it('custom trigger functions: true, false, a skip signal, another error', () => {
    const seen: UpstreamState[][] = [];
    const custom = (fn: (up: readonly UpstreamState[]) => boolean): NodeOpts => ({
      trigger: { kind: 'custom', name: 'mine', fn: (up) => (seen.push([...up]), fn(up)) } satisfies TriggerSpec,
    });
    expect(stateOf(custom(() => true), ['ok', 'fail'])).toBe('Scheduled');
    expect(seen[0]).toEqual([
      { key: 'u0', state: 'Success', mapIndex: -1 },
      { key: 'u1', state: 'Failed', mapIndex: -1 },
    ]);
    const no = verdict(custom(() => false), ['ok']);
    expect(no.state).toBe('TriggerFailed');
    expect(no.message).toBe('trigger "mine" failed (upstream: 1 successful, 0 skipped, 0 failed)');
    const skip = verdict(
      custom(() => {
        throw Object.assign(new Error('nope'), { name: 'SkipSignal' });
      }),
      ['ok'],
    );
    expect(skip.state).toBe('Skipped');
    const boom = verdict(
      custom(() => {
        throw new Error('boom');
      }),
      ['ok'],
    );
    expect(boom.state).toBe('TriggerFailed');
    expect(boom.message).toBe('trigger "mine" threw: boom');
  });
});

describe('signals', () => {
  it('loop runs the task again: loopCount increments, attempts do not', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const core = coreOf(g);
    core.start();
    take(core);
    const r1 = core.runId[a]!;
    fail(core, a, 'loop');
    expect(drain(core)).toEqual([]);
    expect(core.stateName(a)).toBe('Scheduled');
    expect(take(core)).toEqual([a]);
    expect(core.runId[a]).not.toBe(r1);
    fail(core, a, 'loop');
    take(core);
    expect([core.loopCount[a], core.attempts[a]]).toEqual([2, 1]);
    ok(core, a);
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('a retry signal retries after its delay even beyond maxRetries', () => {
    const g = new SpecBuilder();
    const a = g.task('a', [], { maxRetries: 0, retryDelayMs: 11 });
    const core = coreOf(g);
    core.start();
    take(core);
    fail(core, a, 'retry', true, 5000);
    expect(drain(core)).toEqual([{ op: 'retry', id: a, delayMs: 5000 }]);
    expect(core.stateName(a)).toBe('Retrying');
    core.retryDue(a);
    take(core);
    fail(core, a, 'retry'); // no delay given: the task's retryDelayMs
    expect(drain(core)).toEqual([{ op: 'retry', id: a, delayMs: 11 }]);
    core.retryDue(a);
    take(core);
    expect(core.attempts[a]).toBe(3);
    fail(core, a); // a plain error: maxRetries 0 is exhausted
    expect(core.stateName(a)).toBe('Failed');
  });

  it('pause: Paused, and the run is Paused once nothing else can move', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b', [a]);
    const c = g.task('c');
    const core = coreOf(g);
    core.start();
    expect(take(core)).toEqual([a, c]);
    fail(core, a, 'pause');
    expect(core.stateName(a)).toBe('Paused');
    expect(drain(core)).toEqual([]); // c still runs
    ok(core, c);
    expect(drain(core)).toEqual([{ op: 'done', state: 'Paused', message: '1 task run(s) are paused.' }]);
    expect(core.stateName(b)).toBe('Pending');
    expect(core.resume(a)).toBe(true);
    take(core);
    ok(core, a);
    take(core);
    ok(core, b);
    expect(drain(core)).toEqual([DONE_OK]);
  });
});

describe('lost workers and stale outcomes', () => {
  it('a lost task is re-queued with a new run id; the stale outcome is dropped', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const core = coreOf(g);
    core.start();
    take(core);
    const r1 = core.runId[a]!;
    expect(core.failure(a, r1, 'lost', true, -1, 'worker 3 exited')).toBe(true);
    expect(drain(core)).toEqual([]);
    expect(core.stateName(a)).toBe('Scheduled');
    expect(core.success(a, r1)).toBe(false); // before the re-dispatch
    expect(take(core)).toEqual([a]);
    const r2 = core.runId[a]!;
    expect(r2).not.toBe(r1);
    expect(core.success(a, r1)).toBe(false);
    expect(core.failure(a, r1, 'error')).toBe(false);
    expect(core.stateName(a)).toBe('Running');
    expect(core.attempts[a]).toBe(1);
    expect(core.story(a)).toEqual([
      '#1 pending -> ready',
      '#2 ready -> running (run 1, attempt 1)',
      '#3 running -> ready',
      '#4 stale outcome dropped (state ready)',
      '#5 ready -> running (run 2, attempt 1)',
      '#6 stale outcome dropped (state running)',
      '#7 stale outcome dropped (state running)',
    ]);
    expect(core.success(a, r2)).toBe(true);
    expect(core.success(a, r2)).toBe(false); // a duplicate
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('lost 3 times: Failed as a suspected poison task', () => {
    const g = new SpecBuilder();
    const a = g.task('a', [], { maxRetries: 5 });
    const core = coreOf(g);
    core.start();
    for (let i = 1; i <= 3; i++) {
      expect(take(core)).toEqual([a]);
      fail(core, a, 'lost', true, -1, `worker ${i} exited`);
    }
    expect(core.stateName(a)).toBe('Failed');
    expect(core.messages.get(a)).toMatch(/^task "\w+" is a suspected poison task: 3 workers died while running it \(worker 3 exited\)$/);
    expect(drain(core)).toEqual([doneFailed(1)]);
  });

  it('poisonLimit is configurable', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const core = coreOf(g, { poisonLimit: 1 });
    core.start();
    take(core);
    fail(core, a, 'lost');
    expect(core.messages.get(a)).toMatch(/^task "\w+" is a suspected poison task: 1 workers died while running it$/);
  });
});

describe('cancel', () => {
  it('ready and pending tasks are Cancelled; running ones get a stop instruction', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b');
    const c = g.task('c', [a]);
    const d = g.task('d', [], { maxRetries: 1 });
    const e = g.task('e');
    const core = coreOf(g);
    core.start();
    // b is a terminal declared before c (a's dependent): the static order visits it first.
    expect(take(core, 4)).toEqual([b, a, d, e]);
    ok(core, e);
    fail(core, d);
    expect(drain(core)).toEqual([{ op: 'retry', id: d, delayMs: 0 }]);
    core.cancel();
    expect(drain(core)).toEqual([{ op: 'stop', ids: [a, b] }]);
    expect([c, d].map((i) => core.stateName(i))).toEqual(['Cancelled', 'Cancelled']);
    core.retryDue(d);
    expect(core.stateName(d)).toBe('Cancelled');
    expect(take(core)).toEqual([]);
    fail(core, a, 'cancelled');
    expect(drain(core)).toEqual([]);
    // A task that returned before the stop landed keeps its result.
    ok(core, b);
    expect(drain(core)).toEqual([DONE_CANCELLED]);
    expect([a, b, c, d, e].map((i) => core.stateName(i))).toEqual(['Cancelled', 'Success', 'Cancelled', 'Cancelled', 'Success']);
    core.cancel(); // idempotent
    expect(drain(core)).toEqual([]);
  });

  it('cancel with nothing running is done at once; signals while cancelling cancel', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const b = g.task('b');
    const c = g.task('c', [a, b]);
    const core = coreOf(g);
    core.start();
    take(core);
    core.cancel();
    expect(drain(core)).toEqual([{ op: 'stop', ids: [a, b] }]);
    fail(core, a, 'loop');
    fail(core, b, 'error'); // retries do not start while cancelling
    expect([a, b, c].map((i) => core.stateName(i))).toEqual(['Cancelled', 'Failed', 'Cancelled']);
    expect(drain(core)).toEqual([DONE_CANCELLED]);
    const core2 = coreOf(new SpecBuilder().reference());
    core2.start();
    drain(core2);
    core2.cancel(); // already done: nothing
    expect(drain(core2)).toEqual([]);
  });
});

describe('tag limits', () => {
  it('never more than n running tasks with a tag', () => {
    const g = new SpecBuilder();
    const db = [0, 1, 2, 3, 4].map((i) => g.task(`db${i}`, [], { tags: ['db'] }));
    const free = g.task('free', [], { tags: ['other'] });
    const both = g.task('both', [], { tags: ['db', 'gpu'], priority: -1 });
    const core = coreOf(g, { tagLimits: { db: 2, gpu: 1 } });
    core.start();
    const running = new Set<number>();
    let maxDb = 0;
    const dbRunning = () => [...running].filter((id) => db.includes(id) || id === both).length;
    const dispatch = (max = 100): number[] => {
      const got = take(core, max);
      for (const id of got) running.add(id);
      maxDb = Math.max(maxDb, dbRunning());
      return got;
    };
    expect(dispatch()).toEqual([db[0], db[1], free]);
    expect(core.readyCount).toBe(0); // the rest are parked, not queued
    expect(core.stateName(db[2]!)).toBe('Scheduled');
    const finish = (id: number) => {
      running.delete(id);
      ok(core, id);
    };
    finish(db[0]!);
    expect(dispatch()).toEqual([db[2]]);
    finish(free);
    expect(dispatch()).toEqual([]);
    while (running.size > 0) {
      finish([...running][0]!);
      dispatch(1);
    }
    expect(maxDb).toBe(2);
    expect(drain(core)).toEqual([DONE_OK]);
    expect(() => new SchedulerCore(g.build(), { tagLimits: { db: 0 } })).toThrow('tag limit for "db" must be a positive integer, got 0');
  });

  it('cancel drops parked tasks', () => {
    const g = new SpecBuilder();
    const a = g.task('a', [], { tags: ['x'] });
    const b = g.task('b', [], { tags: ['x'] });
    const core = coreOf(g, { tagLimits: { x: 1 } });
    core.start();
    expect(take(core)).toEqual([a]);
    core.cancel();
    expect(core.stateName(b)).toBe('Cancelled');
    expect(drain(core)).toEqual([{ op: 'stop', ids: [a] }]);
    ok(core, a);
    expect(drain(core)).toEqual([DONE_CANCELLED]);
  });
});

describe('mapping', () => {
  /** list -> mapped m (width from inputLength) -> reduce. */
  function mapReduce(width: number | string, mOpts: NodeOpts = {}) {
    const g = new SpecBuilder();
    const list = g.task('list');
    const m = g.map('m', [mapped(list)], mOpts);
    const reduce = g.task('reduce', [m]);
    const calls: [number, number][] = [];
    const core = coreOf(g, {
      inputLength: (id, arg) => {
        calls.push([id, arg]);
        return width;
      },
    });
    core.start();
    expect(take(core)).toEqual([list]);
    return { g, core, list, m, reduce, calls };
  }

  it('expands into k children; the reducer waits for all of them', () => {
    const { core, list, m, reduce, calls } = mapReduce(3);
    expect(calls).toEqual([]);
    ok(core, list);
    expect(calls).toEqual([[m, 0]]);
    expect(core.mapRange(m)).toEqual({ start: 3, width: 3 });
    expect(core.state[m]).toBe(MAPPING);
    expect(core.stateName(m)).toBe('Mapped');
    expect(core.size).toBe(6);
    expect([3, 4, 5].map((c) => [core.parent[c], core.mapIndex[c], core.node[c], core.stateName(c)])).toEqual([
      [m, 0, m, 'Scheduled'],
      [m, 1, m, 'Scheduled'],
      [m, 2, m, 'Scheduled'],
    ]);
    expect(take(core)).toEqual([3, 4, 5]);
    ok(core, 4);
    ok(core, 3);
    expect(core.stateName(reduce)).toBe('Pending');
    ok(core, 5);
    expect(core.state[m]).toBe(MAPPED);
    expect(core.stateName(reduce)).toBe('Scheduled');
    expect(take(core)).toEqual([reduce]);
    ok(core, reduce);
    expect(drain(core)).toEqual([DONE_OK]);
    expect(core.describe(4)).toBe('"m"[1]');
  });

  it('width 0: Mapped at once, the reducer runs', () => {
    const { core, list, m, reduce } = mapReduce(0);
    ok(core, list);
    expect(core.state[m]).toBe(MAPPED);
    expect(core.mapRange(m)).toEqual({ start: 3, width: 0 });
    expect(take(core)).toEqual([reduce]);
    ok(core, reduce);
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('inputLength returning a string: Failed with that message', () => {
    const { core, list, m, reduce } = mapReduce('argument 0 is not a list (number)');
    ok(core, list);
    expect(core.stateName(m)).toBe('Failed');
    expect(core.messages.get(m)).toBe('cannot map: argument 0 is not a list (number)');
    expect(core.stateName(reduce)).toBe('TriggerFailed');
    expect(drain(core)).toEqual([doneFailed(1)]);
  });

  it('mapped over a failed upstream: TriggerFailed; over a skipped one: Skipped', () => {
    const f = mapReduce(3);
    fail(f.core, f.list);
    expect(f.core.stateName(f.m)).toBe('TriggerFailed');
    expect(f.core.messages.get(f.m)).toBe('cannot map: upstream "list" failed');
    expect(f.calls).toEqual([]);
    const s = mapReduce(3);
    fail(s.core, s.list, 'skip');
    expect([s.core.stateName(s.m), s.core.stateName(s.reduce)]).toEqual(['Skipped', 'Skipped']);
    expect(drain(s.core)).toEqual([DONE_OK]);
  });

  it('a failing child makes an allSuccessful reducer TriggerFailed', () => {
    const { core, list, m, reduce } = mapReduce(3);
    ok(core, list);
    take(core);
    ok(core, 3);
    fail(core, 4);
    ok(core, 5);
    expect(core.stateName(m)).toBe('Mapped');
    expect(core.stateName(reduce)).toBe('TriggerFailed');
    expect(core.messages.get(reduce)).toBe('trigger "allSuccessful" failed (upstream: 2 successful, 0 skipped, 1 failed)');
    expect(drain(core)).toEqual([doneFailed(1)]);
  });

  it('a mapped reference task: the run state looks at its children', () => {
    const g = new SpecBuilder();
    const m = g.map('m', [konst([1, 2, 3], 'mapped')]);
    const core = coreOf(g);
    core.start();
    expect(core.mapRange(m)).toEqual({ start: 1, width: 3 });
    expect(take(core)).toEqual([1, 2, 3]);
    ok(core, 1);
    fail(core, 2, 'skip');
    fail(core, 3);
    expect(drain(core)).toEqual([doneFailed(1)]);
  });

  it('mapped -> mapped pairs child i with child i, depth first', () => {
    const g = new SpecBuilder();
    const list = g.task('list');
    const m1 = g.map('m1', [mapped(list)]);
    const m2 = g.map('m2', [mapped(m1), konst('x')]);
    const reduce = g.task('reduce', [m2]);
    const core = coreOf(g, { inputLength: () => 3 });
    core.start();
    take(core);
    ok(core, list);
    expect(core.mapRange(m1)).toEqual({ start: 4, width: 3 });
    expect(core.mapRange(m2)).toEqual({ start: 7, width: 3 });
    expect([7, 8, 9].map((c) => core.stateName(c))).toEqual(['Pending', 'Pending', 'Pending']);
    const order = runSerially(core);
    expect(order).toEqual([4, 7, 5, 8, 6, 9, reduce]);
    expect(core.upstreamStates(8)).toEqual([{ key: 'm1', state: 'Success', mapIndex: 1 }]);
    expect(core.upstreamStates(reduce)).toEqual([7, 8, 9].map((c, i) => ({ key: 'm2', state: 'Success', mapIndex: i })));
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('mapped -> mapped: a failed child fails only its partner', () => {
    const g = new SpecBuilder();
    const m1 = g.map('m1', [konst([1, 2], 'mapped')]);
    const m2 = g.map('m2', [mapped(m1)]);
    const core = coreOf(g);
    core.start();
    expect(core.mapRange(m2)).toEqual({ start: 4, width: 2 });
    expect(take(core)).toEqual([2, 3]);
    fail(core, 3, 'error', false); // m1[1]
    expect(core.stateName(5)).toBe('TriggerFailed'); // m2[1]
    expect(core.stateName(4)).toBe('Pending');
    ok(core, 2);
    expect(take(core)).toEqual([4]);
    ok(core, 4);
    expect(drain(core)).toEqual([doneFailed(1)]);
  });

  it('mapped over a mapped upstream that did not map: TriggerFailed; that was skipped: Skipped', () => {
    const build = () => {
      const g = new SpecBuilder();
      const list = g.task('list');
      const m1 = g.map('m1', [mapped(list)]);
      const m2 = g.map('m2', [mapped(m1)]);
      const core = coreOf(g, { inputLength: () => 2 });
      core.start();
      take(core);
      return { core, list, m1, m2 };
    };
    const f = build();
    fail(f.core, f.list);
    expect([f.core.stateName(f.m1), f.core.stateName(f.m2)]).toEqual(['TriggerFailed', 'TriggerFailed']);
    expect(f.core.messages.get(f.m2)).toBe('cannot map: upstream "m1" did not map (trigger-failed)');
    const s = build();
    fail(s.core, s.list, 'skip');
    expect([s.core.stateName(s.m1), s.core.stateName(s.m2)]).toEqual(['Skipped', 'Skipped']);
  });

  it('flatten: maps over the concatenation once the mapped upstream finished', () => {
    const g = new SpecBuilder();
    const m1 = g.map('m1', [konst([[1, 2], [3, 4, 5]], 'mapped')]);
    const m2 = g.map('m2', [flatten(m1)]);
    const calls: number[] = [];
    const core = coreOf(g, {
      inputLength: (id, arg) => {
        calls.push(id, arg);
        return 5;
      },
    });
    core.start();
    expect(take(core)).toEqual([2, 3]);
    ok(core, 2);
    expect(calls).toEqual([]);
    ok(core, 3);
    expect(calls).toEqual([m2, 0]);
    expect(core.mapRange(m2)).toEqual({ start: 4, width: 5 });
    expect(runSerially(core)).toEqual([4, 5, 6, 7, 8]);
    expect(drain(core)).toEqual([DONE_OK]);
  });

  it('flatten over a mapped upstream with a failed child: TriggerFailed', () => {
    const g = new SpecBuilder();
    const m1 = g.map('m1', [konst([[1], [2]], 'mapped')]);
    const m2 = g.map('m2', [flatten(m1)]);
    const core = coreOf(g, { inputLength: () => 2 });
    core.start();
    take(core);
    ok(core, 2);
    fail(core, 3);
    expect(core.stateName(m2)).toBe('TriggerFailed');
    expect(core.messages.get(m2)).toBe('cannot map: upstream "m1" has failed children');
  });

  it('unmapped / plain inputs of children wait for their upstream; a const that is not a list fails', () => {
    const g = new SpecBuilder();
    const slow = g.task('slow');
    const m = g.map('m', [konst([1, 2], 'mapped'), slow]);
    const bad = g.map('bad', [konst(7, 'mapped')]);
    const core = coreOf(g);
    core.start();
    expect(core.stateName(bad)).toBe('Failed');
    expect(core.messages.get(bad)).toBe('cannot map: argument 0 is mapped over a constant that is not a list');
    expect(core.mapRange(m)).toEqual({ start: 3, width: 2 });
    expect(take(core)).toEqual([slow]);
    expect(core.state[3]).toBe(PENDING);
    ok(core, slow);
    expect(take(core)).toEqual([3, 4]);
  });
});

describe('run state and diagnostics', () => {
  it('referenceTasks decide the run state', () => {
    const build = (refs: number[] | null) => {
      const g = new SpecBuilder();
      const a = g.task('a');
      g.task('b');
      if (refs !== null) g.reference(...refs);
      const core = coreOf(g);
      core.start();
      take(core);
      fail(core, a);
      ok(core, 1);
      return drain(core);
    };
    expect(build(null)).toEqual([doneFailed(1)]);
    expect(build([1])).toEqual([DONE_OK]);
    expect(build([0, 1])).toEqual([doneFailed(1)]);
  });

  it('story(id) tells what happened, with the run id and attempt of each dispatch', () => {
    const g = new SpecBuilder();
    const z = g.task('z');
    const a = g.task('a', [], { maxRetries: 1 });
    const core = coreOf(g);
    core.start();
    take(core);
    ok(core, z);
    fail(core, a);
    core.retryDue(a);
    take(core);
    ok(core, a);
    expect(core.story(a)).toEqual([
      '#2 pending -> ready',
      '#4 ready -> running (run 2, attempt 1)',
      '#6 running -> retrying',
      '#7 retrying -> ready',
      '#8 ready -> running (run 3, attempt 2)',
      '#9 running -> success',
    ]);
  });

  it('the story ring is bounded', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const core = coreOf(g, { storySize: 4 });
    core.start();
    for (let i = 0; i < 5; i++) {
      take(core);
      fail(core, a, 'loop');
    }
    expect(core.story(a)).toEqual([
      '#13 looped -> ready',
      '#14 ready -> running (run 5, attempt 1)',
      '#15 running -> looped',
      '#16 looped -> ready',
    ]);
  });

  it('an illegal transition throws with the task story', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    const core = new SchedulerCore(g.build()); // no validation: we corrupt the state on purpose
    core.start();
    expect(core.state[a]).toBe(READY);
    core.state[a] = SUCCESS; // queued, but (wrongly) finished
    let err: unknown;
    try {
      take(core);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(SchedulerError);
    expect((err as Error).message).toBe('illegal transition success -> running for task "a"; story:\n  #1 pending -> ready');
  });

  it('validate mode catches a corrupted count', () => {
    const g = new SpecBuilder();
    const a = g.task('a');
    g.task('b');
    const core = coreOf(g);
    core.start();
    core.state[a] = RUNNING;
    core.runId[a] = 99;
    expect(() => core.success(a, 99)).toThrow(/state count mismatch/);
  });
});
