/** The progress and summary renderers (pure) and the progress reporter (fake sink, fake clock). */
import { describe, expect, it } from 'vitest';
import type { RunProgress, TaskRunRecord } from '../src/runner/types.ts';
import { formatDuration, formatRate, ProgressReporter, renderProgressBar, renderProgressLine } from '../src/cli/progress.ts';
import { formatStates, renderFailures, renderFinalLine, renderSummary, renderSummaryTable, summarizeTasks, toRunJson } from '../src/cli/summary.ts';

const P = (over: Partial<RunProgress> = {}): RunProgress => ({
  total: 40, done: 12, running: 3, failed: 1, skipped: 0, rate: 25.34, elapsedMs: 1200, ...over,
});

describe('formatting', () => {
  it('formatDuration', () => {
    expect(formatDuration(0)).toBe('0ms');
    expect(formatDuration(999.4)).toBe('999ms');
    expect(formatDuration(1000)).toBe('1.00s');
    expect(formatDuration(12_345)).toBe('12.35s');
    expect(formatDuration(125_000)).toBe('2m05s');
    expect(formatDuration(3_725_000)).toBe('1h02m');
    expect(formatDuration(-5)).toBe('0ms');
    expect(formatDuration(Number.NaN)).toBe('0ms');
  });

  it('formatRate', () => {
    expect(formatRate(0)).toBe('0.0');
    expect(formatRate(25.34)).toBe('25.3');
    expect(formatRate(1234.6)).toBe('1235');
    expect(formatRate(Number.POSITIVE_INFINITY)).toBe('0.0');
  });
});

describe('progress lines', () => {
  it('plain line: done/total, running, failed, rate, elapsed', () => {
    expect(renderProgressLine(P())).toBe('progress: 12/40 done · 3 running · 1 failed · 25.3 tasks/s · 1.20s');
  });

  it('shows skipped only when some were', () => {
    expect(renderProgressLine(P({ skipped: 2 }))).toBe('progress: 12/40 done · 3 running · 1 failed · 2 skipped · 25.3 tasks/s · 1.20s');
  });

  it('bar: filled in proportion, fits the width', () => {
    const line = renderProgressBar(P({ done: 20, total: 40 }), 100);
    expect(line).toMatch(/^\[(█+)(░+)\] {2}20\/40 {2}3 running · 1 failed · 25\.3 tasks\/s · 1\.20s$/);
    const m = /^\[(█*)(░*)\]/.exec(line);
    expect(m?.[1]?.length).toBe(15);
    expect(m?.[2]?.length).toBe(15);
    expect(renderProgressBar(P({ done: 20, total: 40 }), 80).length).toBeLessThanOrEqual(80);
  });

  it('bar: empty at 0 of 0, full at the end', () => {
    expect(renderProgressBar(P({ done: 0, total: 0 }), 80)).toMatch(/^\[░+\] {2}0\/0/);
    expect(renderProgressBar(P({ done: 40, total: 40 }), 80)).toMatch(/^\[█+\] {2}40\/40/);
  });

  it('bar: drops the bar on a narrow terminal and never exceeds the width', () => {
    const narrow = renderProgressBar(P(), 50);
    expect(narrow.startsWith('12/40')).toBe(true);
    expect(narrow.length).toBeLessThan(50);
    for (const w of [10, 30, 60, 100, 200]) expect(renderProgressBar(P(), w).length).toBeLessThanOrEqual(w);
  });
});

class FakeSink {
  chunks: string[] = [];
  constructor(readonly isTTY: boolean, readonly columns = 80) {}
  write(s: string): boolean {
    this.chunks.push(s);
    return true;
  }
  get text(): string {
    return this.chunks.join('');
  }
}

describe('ProgressReporter', () => {
  it('not a TTY: start line, at most one line per interval, end line', () => {
    let now = 0;
    const sink = new FakeSink(false);
    const r = new ProgressReporter(sink, { now: () => now });
    r.start('start');
    for (let t = 0; t <= 3000; t += 100) {
      now = t;
      r.update(P({ done: t / 100, elapsedMs: t }));
    }
    r.finish(P({ done: 31, total: 31, running: 0, elapsedMs: 3050 }));
    const ls = sink.text.split('\n').filter((l) => l !== '');
    expect(ls).toEqual([
      'start',
      expect.stringMatching(/^progress: 10\/40 done .* 1\.00s$/),
      expect.stringMatching(/^progress: 20\/40 done .* 2\.00s$/),
      expect.stringMatching(/^progress: 30\/40 done .* 3\.00s$/),
      expect.stringMatching(/^progress: 31\/31 done · 0 running .* 3\.05s$/),
    ]);
    expect(sink.text).not.toContain('\r');
  });

  it('not a TTY: a short run prints only start and end', () => {
    let now = 0;
    const sink = new FakeSink(false);
    const r = new ProgressReporter(sink, { now: () => now });
    r.start('start');
    now = 100;
    r.update(P());
    now = 200;
    r.finish();
    expect(sink.text.split('\n').filter((l) => l !== '')).toEqual(['start', renderProgressLine(P())]);
  });

  it('TTY: redraws in place with \\r and erase-line, ends with a newline', () => {
    let now = 0;
    const sink = new FakeSink(true, 100);
    const r = new ProgressReporter(sink, { now: () => now });
    r.start('start');
    r.update(P({ done: 1 }));
    now = 10;
    r.update(P({ done: 2 })); // within the redraw interval: skipped
    now = 100;
    r.update(P({ done: 3 }));
    r.finish(P({ done: 40, running: 0 }));
    expect(sink.chunks[0]).toBe('start\n');
    const draws = sink.chunks.slice(1, -1);
    expect(draws).toHaveLength(3);
    for (const d of draws) expect(d).toMatch(/^\r\[.*\x1b\[K$/);
    expect(draws[0]).toContain(' 1/40 ');
    expect(draws[1]).toContain(' 3/40 ');
    expect(draws[2]).toContain(' 40/40 ');
    expect(sink.chunks.at(-1)).toBe('\n');
  });

  it('TTY: log() prints above the bar and redraws it', () => {
    const sink = new FakeSink(true);
    const r = new ProgressReporter(sink, { now: () => 0 });
    r.update(P());
    r.log('hello');
    expect(sink.chunks.slice(1)).toEqual(['\r\x1b[Khello\n', `\r${renderProgressBar(P(), 80)}\x1b[K`]);
  });

  it('TTY with no window size (0 columns) draws at 80 columns', () => {
    const sink = new FakeSink(true, 0);
    new ProgressReporter(sink, { now: () => 0 }).update(P());
    expect(sink.chunks[0]).toBe(`\r${renderProgressBar(P(), 80)}\x1b[K`);
  });

  it('finish is idempotent and updates after it are ignored', () => {
    const sink = new FakeSink(false);
    const r = new ProgressReporter(sink, { now: () => 0 });
    r.finish(P());
    r.finish(P());
    r.update(P());
    expect(sink.chunks).toHaveLength(1);
  });
});

const rec = (key: string, mapIndex: number, state: TaskRunRecord['state'], over: Partial<TaskRunRecord> = {}): TaskRunRecord => ({
  key, node: 0, mapIndex, state, attempts: 1, startMs: 1000, endMs: 1100, ...over,
});

const TASKS: TaskRunRecord[] = [
  rec('records', -1, 'Success', { attempts: 0, startMs: 0, endMs: 0 }),
  rec('extract', -1, 'Success', { attempts: 2, startMs: 1000, endMs: 1250 }),
  rec('transform', -1, 'Mapped', { attempts: 0, startMs: 0, endMs: 0 }),
  rec('transform', 0, 'Success'),
  rec('transform', 1, 'Failed', { attempts: 3, error: { name: 'TypeError', message: 'bad row 7\n    at x' } }),
  rec('transform', 2, 'Success'),
  rec('load', -1, 'TriggerFailed', { attempts: 0, startMs: 0, endMs: 0 }),
  rec('empty', -1, 'Mapped', { attempts: 0, startMs: 0, endMs: 0 }),
];

describe('summary', () => {
  it('one row per key; mapped children folded; parameters excluded', () => {
    const rows = summarizeTasks(TASKS, new Set(['records']));
    expect(rows.map((r) => [r.key, r.mapped, r.runs, formatStates(r), r.attempts, r.totalMs])).toEqual([
      ['extract', false, 1, 'Success', 2, 250],
      ['transform', true, 3, 'Success 2, Failed 1', 5, 300],
      ['load', false, 1, 'TriggerFailed', 0, 0],
      ['empty', true, 1, 'Mapped', 0, 0],
    ]);
  });

  it('table: header, aligned columns, numbers right-aligned', () => {
    const table = renderSummaryTable(summarizeTasks(TASKS, new Set(['records'])));
    expect(table.split('\n')).toEqual([
      'TASK             RUNS  STATES               ATTEMPTS   TIME',
      'extract             1  Success                     2  250ms',
      'transform [map]     3  Success 2, Failed 1         5  300ms',
      'load                1  TriggerFailed               0    0ms',
      'empty [map]         1  Mapped                      0    0ms',
    ]);
  });

  it('failures: first line of each error, capped', () => {
    expect(renderFailures(TASKS)).toEqual(['  Failed transform[1]: TypeError: bad row 7', '  TriggerFailed (1): load']);
    const many = Array.from({ length: 13 }, (_, i) => rec('t', i, 'Failed'));
    const ls = renderFailures(many, 10);
    expect(ls).toHaveLength(11);
    expect(ls.at(-1)).toBe('  ... and 3 more');
  });

  it('final line: state, duration, every record counted, message when not Success', () => {
    const base = { flowName: 'etl', durationMs: 1234, tasks: TASKS };
    expect(renderFinalLine({ ...base, state: 'Failed', message: 'transform failed' })).toBe(
      'flow etl: Failed in 1.23s (8 task runs) — transform failed',
    );
    expect(renderFinalLine({ ...base, state: 'Success', message: 'ok', tasks: [rec('a', -1, 'Success')] })).toBe(
      'flow etl: Success in 1.23s (1 task run)',
    );
  });

  it('renderSummary: table, failures, final line', () => {
    const text = renderSummary({ flowName: 'etl', state: 'Failed', durationMs: 50, message: '', tasks: TASKS }, new Set(['records']));
    const blocks = text.split('\n\n');
    expect(blocks).toHaveLength(3);
    expect(blocks[0]?.startsWith('TASK')).toBe(true);
    expect(blocks[1]).toBe('failures:\n  Failed transform[1]: TypeError: bad row 7\n  TriggerFailed (1): load');
    expect(blocks[2]).toBe('flow etl: Failed in 50ms (8 task runs)');
  });

  it('toRunJson keeps exactly the documented fields', () => {
    const doc = toRunJson({ state: 'Failed', durationMs: 50, tasks: TASKS });
    expect(Object.keys(doc)).toEqual(['state', 'durationMs', 'tasks']);
    expect(doc.tasks[4]).toEqual({ key: 'transform', mapIndex: 1, state: 'Failed', attempts: 3, startMs: 1000, endMs: 1100 });
    for (const t of doc.tasks) expect(Object.keys(t)).toEqual(['key', 'mapIndex', 'state', 'attempts', 'startMs', 'endMs']);
  });
});
