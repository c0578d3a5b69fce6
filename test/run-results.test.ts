/**
 * Results beyond memory and what decides a run's outcome: checkpoint files at templated
 * locations, `target` files that make a task Cached, `cacheFor` with its validators,
 * restarting from an earlier run, state handlers and `onFailure`, reference tasks.
 * In-process runs (LocalExecutor), `validate: true` throughout.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { unpack } from 'msgpackr';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { LocalExecutor, flow, parameter, triggers, unmapped, type Flow, type FlowRunResult, type RunOptions } from '../src/index.ts';
import { clearResultCache } from '../src/runner/results.ts';
import {
  broken,
  cachedAny,
  cachedBriefly,
  cachedInputs,
  cachedParams,
  counts,
  extract,
  failures,
  fetchRows,
  flags,
  load,
  notCheckpointed,
  ok,
  packed,
  resetCounts,
  scale,
  square,
  targeted,
  targetedEach,
  total,
  transitions,
  watched,
  watchedNext,
  withBrokenHandler,
} from './fixtures/run-results-tasks.ts';

const root = mkdtempSync(join(tmpdir(), 'weft-results-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let dirs = 0;
let resultDir = '';

beforeEach(() => {
  resultDir = join(root, `run-${++dirs}`);
  resetCounts();
  clearResultCache();
  flags.loadBroken = true;
  transitions.length = 0;
  failures.length = 0;
});

const run = <O>(f: Flow<O>, opts: RunOptions = {}): Promise<FlowRunResult> =>
  f.run({ executor: new LocalExecutor(), validate: true, resultDir, ...opts });

const readJson = (...parts: string[]): unknown => JSON.parse(readFileSync(join(resultDir, ...parts), 'utf8'));
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('checkpoints', () => {
  it('writes each result at its templated location: {flow}/{task}/{mapIndex}.json', async () => {
    const f = flow('ckpt', () => {
      const xs = extract(3);
      return { xs, squares: square.map(xs) };
    });
    const r = await run(f);
    expect(r.state).toBe('Success');
    // A task that is not mapped has mapIndex "all".
    expect(readdirSync(join(resultDir, 'ckpt', 'extract'))).toEqual(['all.json']);
    expect(readJson('ckpt', 'extract', 'all.json')).toEqual([1, 2, 3]);
    expect(readdirSync(join(resultDir, 'ckpt', 'square')).sort()).toEqual(['0.json', '1.json', '2.json']);
    expect([0, 1, 2].map((i) => readJson('ckpt', 'square', `${i}.json`))).toEqual([1, 4, 9]);
    // Nothing but the files (no temp files left behind).
    expect(readdirSync(join(resultDir, 'ckpt')).sort()).toEqual(['extract', 'square']);
  });

  it('the msgpack serializer writes msgpack', async () => {
    const f = flow('ckpt-msgpack', () => packed());
    await run(f);
    const buf = readFileSync(join(resultDir, 'ckpt-msgpack', 'packed.msgpack'));
    expect(unpack(buf)).toEqual({ a: 1, b: [1, 2, 3], c: 'x' });
  });

  it('checkpoint: false writes nothing, even with a location', async () => {
    const f = flow('ckpt-off', () => notCheckpointed());
    const r = await run(f);
    expect(r.result(f.outputs)).toBe('memory only');
    expect(existsSync(join(resultDir, 'ckpt-off', 'notCheckpointed.json'))).toBe(false);
  });
});

describe('targets', () => {
  const f = flow('tgt', () => ({ t: targeted(parameter('day', 'mon')) }));

  it('a second run with the target present is Cached and does not run the task', async () => {
    const r1 = await run(f);
    expect(r1.stateOf(f.outputs.t)).toBe('Success');
    expect(counts.targeted).toBe(1);
    expect(readJson('tgt', 'targeted-mon.json')).toEqual({ day: 'mon', rows: 3 });

    const r2 = await run(f);
    expect(r2.stateOf(f.outputs.t)).toBe('Cached');
    expect(r2.result(f.outputs.t)).toEqual({ day: 'mon', rows: 3 });
    expect(counts.targeted).toBe(1);
    expect(r2.state).toBe('Success');
  });

  it('the target is templated: another parameter value is another file, so the task runs', async () => {
    await run(f, { parameters: { day: 'mon' } });
    const r = await run(f, { parameters: { day: 'tuesday' } });
    expect(r.stateOf(f.outputs.t)).toBe('Success');
    expect(r.result(f.outputs.t)).toEqual({ day: 'tuesday', rows: 7 });
    expect(counts.targeted).toBe(2);
    expect(readJson('tgt', 'targeted-tuesday.json')).toEqual({ day: 'tuesday', rows: 7 });
  });

  it('a target file written by someone else is taken as the result', async () => {
    mkdirSync(join(resultDir, 'tgt'), { recursive: true });
    writeFileSync(join(resultDir, 'tgt', 'targeted-wed.json'), JSON.stringify({ day: 'wed', rows: 99 }));
    const r = await run(f, { parameters: { day: 'wed' } });
    expect(r.stateOf(f.outputs.t)).toBe('Cached');
    expect(r.result(f.outputs.t)).toEqual({ day: 'wed', rows: 99 });
    expect(counts.targeted).toBeUndefined();
  });
});

describe('targets of mapped children', () => {
  it('each child has its own target file; only the missing one runs again', async () => {
    const f = flow('tgt-map', () => targetedEach.map([1, 2, 3]));
    const r1 = await run(f);
    expect(r1.result(f.outputs)).toEqual([3, 6, 9]);
    expect([0, 1, 2].map((i) => readJson('tgt-map', 'targetedEach', `${i}.json`))).toEqual([3, 6, 9]);
    rmSync(join(resultDir, 'tgt-map', 'targetedEach', '1.json'));
    const r2 = await run(f);
    expect(r2.result(f.outputs)).toEqual([3, 6, 9]);
    expect(r2.runsOf(f.outputs).slice(1).map((t) => t.state)).toEqual(['Cached', 'Success', 'Cached']);
    expect(counts.targetedEach).toBe(4);
  });
});

describe('cacheFor', () => {
  it('durationOnly: any inputs hit while the entry lives', async () => {
    const f = flow('cache-duration', () => cachedAny(parameter('x', 1)));
    const r1 = await run(f);
    expect(r1.stateOf(f.outputs)).toBe('Success');
    const r2 = await run(f, { parameters: { x: 2 } });
    expect(r2.stateOf(f.outputs)).toBe('Cached');
    expect(r2.result(f.outputs)).toBe(10); // the cached value, whatever the input
    expect(counts.cachedAny).toBe(1);
  });

  it('allInputs: the same input hits, a different input misses', async () => {
    const f = flow('cache-inputs', () => cachedInputs(parameter('x', 1)));
    await run(f);
    const same = await run(f, { parameters: { x: 1 } });
    expect(same.stateOf(f.outputs)).toBe('Cached');
    expect(same.result(f.outputs)).toBe(100);
    expect(counts.cachedInputs).toBe(1);
    const other = await run(f, { parameters: { x: 2 } });
    expect(other.stateOf(f.outputs)).toBe('Success');
    expect(other.result(f.outputs)).toBe(200);
    expect(counts.cachedInputs).toBe(2);
    // Both entries are kept: going back to 1 hits again.
    const back = await run(f, { parameters: { x: 1 } });
    expect(back.stateOf(f.outputs)).toBe('Cached');
    expect(counts.cachedInputs).toBe(2);
  });

  it('allParameters: another value of any parameter misses', async () => {
    const f = flow('cache-params', () => {
      parameter('unused', 'a');
      return cachedParams(parameter('x', 1));
    });
    await run(f);
    expect((await run(f)).stateOf(f.outputs)).toBe('Cached');
    expect((await run(f, { parameters: { unused: 'b' } })).stateOf(f.outputs)).toBe('Success');
    expect(counts.cachedParams).toBe(2);
  });

  it('an expired entry misses', async () => {
    const f = flow('cache-expiry', () => cachedBriefly(1));
    await run(f);
    expect((await run(f)).stateOf(f.outputs)).toBe('Cached');
    await sleep(100);
    expect((await run(f)).stateOf(f.outputs)).toBe('Success');
    expect(counts.cachedBriefly).toBe(2);
  });

  it('mapped children are cached one by one', async () => {
    const f = flow('cache-mapped', () => cachedInputs.map(parameter('xs', [1, 2, 3])));
    await run(f);
    const r = await run(f, { parameters: { xs: [1, 2, 4] } });
    expect(r.result(f.outputs)).toEqual([100, 200, 400]);
    expect(r.runsOf(f.outputs).slice(1).map((t) => t.state)).toEqual(['Cached', 'Cached', 'Success']);
    expect(counts.cachedInputs).toBe(4);
  });
});

describe('restart', () => {
  const f = flow('etl-restart', () => {
    const rows = fetchRows(parameter('n', 4));
    const scaled = scale.map(rows, unmapped(3));
    const t = total(scaled);
    return { rows, scaled, t, loaded: load(t) };
  });

  it('reuses the earlier Success results (Cached, not run again) and runs the fixed task', async () => {
    const r1 = await run(f);
    expect(r1.state).toBe('Failed');
    expect(r1.stateOf(f.outputs.loaded)).toBe('Failed');
    expect(r1.result(f.outputs.t)).toBe(36);
    expect(counts).toEqual({ fetchRows: 1, scale: 4, total: 1, load: 1 });

    flags.loadBroken = false;
    const r2 = await run(f, { restartFrom: r1 });
    expect(r2.state).toBe('Success');
    expect(r2.result(f.outputs.loaded)).toBe('loaded 36');
    expect(r2.stateOf(f.outputs.loaded)).toBe('Success');
    expect(r2.stateOf(f.outputs.rows)).toBe('Cached');
    expect(r2.stateOf(f.outputs.t)).toBe('Cached');
    expect(r2.runsOf(f.outputs.scaled).slice(1).map((x) => x.state)).toEqual(['Cached', 'Cached', 'Cached', 'Cached']);
    expect(r2.result(f.outputs.scaled)).toEqual([0, 6, 12, 18]);
    // Only the fixed task ran again.
    expect(counts).toEqual({ fetchRows: 1, scale: 4, total: 1, load: 2 });
    // The earlier run's parameters carry over.
    expect(r2.parameters).toEqual({ n: 4 });
  });

  it('a restart from a run that kept no results still computes the right values', async () => {
    const r1 = await run(f, { keepResults: false });
    expect(r1.state).toBe('Failed');
    flags.loadBroken = false;
    const r2 = await run(f, { restartFrom: r1 });
    expect(r2.state).toBe('Success');
    expect(r2.result(f.outputs.loaded)).toBe('loaded 36');
  });

  it('a restart of a restart still reuses everything that succeeded', async () => {
    const r1 = await run(f);
    const r2 = await run(f, { restartFrom: r1 }); // still broken
    expect(r2.stateOf(f.outputs.loaded)).toBe('Failed');
    flags.loadBroken = false;
    const r3 = await run(f, { restartFrom: r2 });
    expect(r3.result(f.outputs.loaded)).toBe('loaded 36');
    expect(counts).toEqual({ fetchRows: 1, scale: 4, total: 1, load: 3 });
  });
});

describe('state handlers', () => {
  it('stateHandlers see every transition with the old and new state; onFailure only failures', async () => {
    const f = flow('handlers', () => {
      const good = watched(false);
      const bad = watched.with({ name: 'bad' })(true);
      return { good, bad, next: watchedNext(bad), fine: watchedNext.with({ name: 'fine' })(good) };
    });
    const r = await run(f);
    expect(r.stateOf(f.outputs.good)).toBe('Success');
    expect(r.stateOf(f.outputs.bad)).toBe('Failed');
    expect(r.stateOf(f.outputs.next)).toBe('TriggerFailed');

    const of = (key: string): string[] => transitions.filter((t) => t.key === key).map((t) => `${t.from}->${t.to}`);
    expect(of('watched')).toEqual([
      'Pending->Scheduled',
      'Scheduled->Running',
      'Running->Retrying',
      'Retrying->Scheduled',
      'Scheduled->Running',
      'Running->Success',
    ]);
    expect(of('bad')).toEqual([
      'Pending->Scheduled',
      'Scheduled->Running',
      'Running->Retrying',
      'Retrying->Scheduled',
      'Scheduled->Running',
      'Running->Failed',
    ]);
    expect(of('watchedNext')).toEqual(['Pending->TriggerFailed']);
    expect(of('fine').at(-1)).toBe('Running->Success');

    const success = transitions.find((t) => t.key === 'watched' && t.to === 'Success');
    expect(success?.result).toBe('watched ok');
    const retrying = transitions.find((t) => t.key === 'watched' && t.to === 'Retrying');
    expect(retrying?.error).toBe('first attempt fails');
    const failed = transitions.find((t) => t.key === 'bad' && t.to === 'Failed');
    expect(failed?.error).toBe('always fails');

    // onFailure: the final failures only (not the retried first attempt), TriggerFailed included.
    expect(failures.map((t) => `${t.key}:${t.from}->${t.to}`)).toEqual(['bad:Running->Failed', 'watchedNext:Pending->TriggerFailed']);
    expect(failures[0]!.error).toBe('always fails');
  });

  it('a state handler that throws does not break the run', async () => {
    const f = flow('handler-throws', () => withBrokenHandler());
    const r = await run(f);
    expect(r.state).toBe('Success');
    expect(r.result(f.outputs)).toBe(1);
  });
});

describe('reference tasks', () => {
  it('decide the flow state, from the builder option or set later', async () => {
    const f = flow(
      'refs',
      () => {
        const b = broken();
        const cleanup = ok.with({ name: 'cleanup', trigger: triggers.anyFailed })(1).after(b);
        const side = ok.with({ name: 'side' })(2);
        return { b, cleanup, side };
      },
      { referenceTasks: (o) => [o.cleanup, o.side] },
    );
    const r1 = await run(f);
    expect(r1.stateOf(f.outputs.b)).toBe('Failed');
    expect(r1.state).toBe('Success');

    f.setReferenceTasks([f.outputs.b]);
    const r2 = await run(f);
    expect(r2.state).toBe('Failed');
    expect(r2.message).toMatch(/1 reference task run\(s\) failed/);

    // Back to the default: the terminal nodes (cleanup and side) succeeded.
    f.setReferenceTasks(null);
    expect((await run(f)).state).toBe('Success');
  });

  it('a mapped reference task with a failed child fails the flow', async () => {
    const f = flow('refs-mapped', () => {
      const xs = ok.map([1, 2]);
      const bad = broken.map(xs);
      const after = ok.with({ name: 'after', trigger: triggers.allFinished })(0).after(bad);
      return { xs, bad, after };
    }, { referenceTasks: (o) => [o.xs, o.bad] });
    const r = await run(f);
    expect(r.stateOf(f.outputs.after)).toBe('Success');
    expect(r.state).toBe('Failed');
    expect(r.message).toMatch(/2 reference task run\(s\) failed/);
  });
});
