/**
 * Bad input to `flow.run()`: a malformed flow or bad parameters are refused before any
 * task runs, with an error that names the task (or parameter) and the problem; a task
 * that goes wrong at run time (throws, returns something unsendable, passes its
 * timeout) ends in a state and with an error that say why, and the run carries on as
 * its triggers say.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import {
  Flow,
  FlowValidationError,
  LocalExecutor,
  PoolExecutor,
  TaskResolutionError,
  flow,
  parameter,
  task,
  type FlowRunResult,
  type TaskRunRecord,
} from '../src/index.ts';
import { join2, onAnyFailure, ran, thrower, tooSlow, touch, unsendable, whatever } from './fixtures/run-bad-input-tasks.ts';

const tmp = mkdtempSync(join(tmpdir(), 'weft-bad-input-'));
afterAll(() => rmSync(tmp, { recursive: true, force: true }));
let files = 0;
const counterFile = (): string => join(tmp, `count-${++files}`);
const countIn = (file: string): number => (existsSync(file) ? readFileSync(file, 'utf8').length : 0);

beforeEach(() => {
  ran.count = 0;
});

/** The rejection of `p` (fails the test if it resolves). */
async function rejection(p: Promise<unknown>): Promise<Error & { task?: string }> {
  try {
    await p;
  } catch (err) {
    return err as Error & { task?: string };
  }
  throw new Error('expected the run to be refused, but it ran');
}

describe('refused before any task runs', () => {
  it('a cycle made with the imperative API names the tasks around it', async () => {
    const f = new Flow('bad-cycle');
    const a = f.add(touch, [1]);
    const b = f.add(touch, [a]);
    const c = f.add(join2, [b, 1]);
    f.add(touch, [c]); // downstream of the cycle, not part of it
    f.setDependencies(a, { upstream: [c] });
    const err = await rejection(f.run({ validate: true }));
    expect(err).toBeInstanceOf(FlowValidationError);
    expect(err.message).toBe('flow "bad-cycle" has a cycle: "touch" -> "touch-2" -> "join2" -> "touch"');
    expect(err.task).toBe('touch');
    expect(ran.count).toBe(0);
  });

  it('a task that depends on itself is a cycle of one', async () => {
    const f = new Flow('bad-self');
    const a = f.add(touch, [1]);
    f.add(touch, [a]);
    f.setDependencies(a, { upstream: [a] });
    const err = await rejection(f.run({ validate: true }));
    expect(err).toBeInstanceOf(FlowValidationError);
    expect(err.message).toBe('flow "bad-self" has a cycle: "touch" -> "touch"');
    expect(ran.count).toBe(0);
  });

  it('a dependency on a node that is not in the flow names the task and the node', async () => {
    const f = new Flow('bad-missing');
    const a = f.add(touch, [1]);
    f.add(touch, [a]);
    f.setDependencies(a, { upstream: [42] });
    const err = await rejection(f.run({ validate: true }));
    expect(err).toBeInstanceOf(FlowValidationError);
    expect(err.message).toMatch(/task "touch": depends on node 42, which is not in flow "bad-missing"/);
    expect(err.task).toBe('touch');
    expect(ran.count).toBe(0);
  });

  it('a dependency on a ref of another flow names the task and the other flow', async () => {
    const other = flow('other-flow', () => touch(7));
    const f = flow('bad-foreign', () => join2(touch(1), other.outputs));
    const err = await rejection(f.run({ validate: true }));
    expect(err).toBeInstanceOf(FlowValidationError);
    expect(err.message).toMatch(/task "join2"/);
    expect(err.message).toMatch(/"other-flow"/);
    expect(err.task).toBe('join2');
    expect(ran.count).toBe(0);
  });

  it('a duplicate task key names the key', async () => {
    const f = flow('bad-duplicate', () => {
      const a = touch.with({ name: 'load' })(1);
      const b = touch.with({ name: 'load' })(2);
      return join2(a, b);
    });
    const err = await rejection(f.run({ validate: true }));
    expect(err).toBeInstanceOf(FlowValidationError);
    expect(err.message).toMatch(/"load": duplicate key in flow "bad-duplicate"/);
    expect(err.task).toBe('load');
    expect(ran.count).toBe(0);
  });

  describe('parameters', () => {
    const f = flow('bad-params', () => {
      const n = parameter('n', 1, { type: 'number' });
      const who = parameter<string>('who');
      return { a: touch(n), b: touch(join2(n, n)), who: touch.with({ name: 'greet' })(who as unknown as number) };
    });

    it('a missing required parameter is named', async () => {
      const err = await rejection(f.run({ validate: true }));
      expect(err).toBeInstanceOf(FlowValidationError);
      expect(err.message).toBe('flow "bad-params": required parameter "who" was not given');
      expect(err.task).toBe('who');
      expect(ran.count).toBe(0);
    });

    it('a parameter of the wrong type is named with the expected and the actual type', async () => {
      const err = await rejection(f.run({ validate: true, parameters: { who: 'x', n: '3' } }));
      expect(err).toBeInstanceOf(FlowValidationError);
      expect(err.message).toMatch(/parameter "n" must be of type number, got string \("3"\)/);
      expect(err.task).toBe('n');
      expect(ran.count).toBe(0);
    });

    it('an unknown parameter name is named, with the names the flow has', async () => {
      const err = await rejection(f.run({ validate: true, parameters: { who: 'x', nn: 3 } }));
      expect(err).toBeInstanceOf(FlowValidationError);
      expect(err.message).toMatch(/flow "bad-params" has no parameter "nn" \(it has: n, who\)/);
      expect(err.task).toBe('nn');
      expect(ran.count).toBe(0);
    });

    it('the same checks hold on a pool, which is then never started', async () => {
      const pool = new PoolExecutor({ threads: 1 });
      const err = await rejection(f.run({ validate: true, executor: pool, parameters: { who: 'x', n: true } }));
      expect(err).toBeInstanceOf(FlowValidationError);
      expect(err.message).toMatch(/parameter "n" must be of type number, got boolean/);
      expect(ran.count).toBe(0);
      await pool.shutdown();
    });

    it('with good parameters the same flow runs', async () => {
      const r = await f.run({ validate: true, parameters: { who: 7, n: 2 } });
      expect(r.state).toBe('Success');
      expect(r.result(f.outputs.b)).toBe(4);
      expect(ran.count).toBe(4);
    });
  });

  it('a task defined in a closure, run on the pool: TaskResolutionError naming the task', async () => {
    const file = counterFile();
    const f = flow('bad-closure', () => {
      const local = task(function localOnly(x: number): number {
        return x;
      });
      return touch(local(touch(1, file)), file);
    });
    const err = await rejection(f.run({ validate: true, executor: new PoolExecutor({ threads: 1 }) }));
    expect(err).toBeInstanceOf(TaskResolutionError);
    expect(err.name).toBe('TaskResolutionError');
    expect(err.message).toMatch(/task "localOnly"/);
    expect(err.message).toMatch(/closure|inside a function/);
    expect(err.task).toBe('localOnly');
    expect(countIn(file)).toBe(0);
    expect(ran.count).toBe(0);
    // In-process the same flow runs.
    const r = await f.run({ validate: true, executor: new LocalExecutor() });
    expect(r.state).toBe('Success');
    expect(countIn(file)).toBe(2);
  });
});

describe('a task that goes wrong at run time', () => {
  const rec = (r: FlowRunResult, ref: { readonly node: number }): TaskRunRecord => r.runsOf(ref)[0]!;

  it('throws / returns an unsendable value / passes its timeout: state and error say why, triggers decide the rest', async () => {
    const file = counterFile();
    const f = flow('bad-runtime', () => {
      const threw = thrower(7);
      const unsent = unsendable();
      const slow = tooSlow();
      const fine = touch(1, file);
      return {
        threw,
        unsent,
        slow,
        fine,
        afterThrew: touch.with({ name: 'afterThrew' })(threw, file),
        afterUnsent: touch.with({ name: 'afterUnsent' })(unsent as unknown as number, file),
        afterSlow: touch.with({ name: 'afterSlow' })(slow as unknown as number, file),
        afterFine: touch.with({ name: 'afterFine' })(fine, file),
        alert: onAnyFailure(file).after(threw, unsent, slow),
        cleanup: whatever(file).after(threw, unsent, slow, fine),
        noAlert: onAnyFailure.with({ name: 'noAlert' })(file).after(fine),
      };
    });
    const r = await f.run({ validate: true, executor: new PoolExecutor({ threads: 2 }) });
    const o = f.outputs;
    // Settled at its timeout: the slow task would take 5 s.
    expect(rec(r, o.slow).startMs, 'startMs of a task run that ran').toBeGreaterThan(0);
    expect(rec(r, o.slow).endMs - rec(r, o.slow).startMs).toBeLessThan(3_000);

    const threw = rec(r, o.threw);
    expect(threw.state).toBe('Failed');
    expect(threw.error).toMatchObject({ name: 'RangeError', message: 'bad row 7' });
    expect(threw.error?.stack).toContain('run-bad-input-tasks.ts');

    const unsent = rec(r, o.unsent);
    expect(unsent.state).toBe('Failed');
    expect(unsent.error?.name).toBe('TaskSerializationError');
    expect(unsent.error?.message).toMatch(/result of task "unsendable" cannot be sent/);

    const slow = rec(r, o.slow);
    expect(slow.state).toBe('TimedOut');
    expect(slow.error?.name).toBe('TaskTimeoutError');
    expect(slow.error?.message).toMatch(/task "tooSlow" timed out after 100 ms/);

    for (const k of [o.afterThrew, o.afterUnsent, o.afterSlow]) {
      const t = rec(r, k);
      expect(t.state).toBe('TriggerFailed');
      expect(t.error?.message).toMatch(/trigger "allSuccessful" failed/);
    }
    expect(r.result(o.fine)).toBe(1);
    expect(r.result(o.afterFine)).toBe(1);
    expect(r.result(o.alert)).toBe('alerted');
    expect(r.result(o.cleanup)).toBe('cleaned up');
    expect(r.stateOf(o.noAlert)).toBe('TriggerFailed');
    expect(r.state).toBe('Failed');
    // fine, afterFine, alert, cleanup ran; nothing else that counts did.
    expect(countIn(file)).toBe(4);
  });

  it('a mapped task whose upstream returned something that is not a list fails, saying so', async () => {
    const f = flow('bad-map', () => {
      const notAList = touch(5);
      const m = touch.with({ name: 'mapped' }).map(notAList as unknown as number[]);
      return { m, after: join2.with({ name: 'after' })(m as unknown as number, 1), fine: touch.with({ name: 'fine' })(2) };
    });
    const r = await f.run({ validate: true, executor: new LocalExecutor() });
    const m = rec(r, f.outputs.m);
    expect(m.state).toBe('Failed');
    expect(m.error?.message).toMatch(/"mapped" maps over argument 0, but upstream "touch" returned number, not a list/);
    expect(r.stateOf(f.outputs.after)).toBe('TriggerFailed');
    expect(r.result(f.outputs.fine)).toBe(2);
    expect(ran.count).toBe(2); // touch(5) and fine
  });

  it('the same on the local executor (minus sending): a throw and a timeout', async () => {
    const f = flow('bad-runtime-local', () => {
      const threw = thrower(8);
      const slow = tooSlow();
      return { threw, slow, after: touch(threw), alert: onAnyFailure().after(threw, slow), fine: touch.with({ name: 'fine' })(3) };
    });
    const r = await f.run({ validate: true, executor: new LocalExecutor() });
    expect(rec(r, f.outputs.threw).error).toMatchObject({ name: 'RangeError', message: 'bad row 8' });
    expect(rec(r, f.outputs.slow)).toMatchObject({ state: 'TimedOut', error: { name: 'TaskTimeoutError' } });
    expect(r.stateOf(f.outputs.after)).toBe('TriggerFailed');
    expect(r.result(f.outputs.alert)).toBe('alerted');
    expect(r.result(f.outputs.fine)).toBe(3);
    expect(ran.count).toBe(2); // alert and fine
  });
});
