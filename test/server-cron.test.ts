/**
 * Pure parts of the server: the cron parser and clocks, the schedule's next ticks, the
 * SQL placeholder translation, the flow fingerprint and the request error messages.
 */
import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { toSqlitePlaceholders } from '../src/server/db.ts';
import { describeZodError } from '../src/server/http.ts';
import type { RegisterFlowInput } from '../src/server/model.ts';
import { canonicalJson, checkClock, clockId, CronError, nextCron, nextInterval, nextTicks, parseCron } from '../src/server/schedule.ts';
import { flowFingerprint } from '../src/server/store.ts';

const at = (iso: string): number => Date.parse(iso);
const iso = (t: number | null): string | null => (t === null ? null : new Date(t).toISOString());

/** The next `n` times of `expr` after `from`, as ISO strings. */
function next(expr: string, from: string, n = 1): (string | null)[] {
  const cron = parseCron(expr);
  const out: (string | null)[] = [];
  let t = at(from);
  for (let i = 0; i < n; i++) {
    const x = nextCron(cron, t);
    out.push(iso(x));
    if (x === null) break;
    t = x;
  }
  return out;
}

describe('cron parser', () => {
  it('every minute, strictly after the given time', () => {
    expect(next('* * * * *', '2025-03-01T10:00:00Z', 3)).toEqual(['2025-03-01T10:01:00.000Z', '2025-03-01T10:02:00.000Z', '2025-03-01T10:03:00.000Z']);
    expect(next('* * * * *', '2025-03-01T10:00:30Z')).toEqual(['2025-03-01T10:01:00.000Z']);
  });

  it('steps, ranges and lists', () => {
    expect(next('*/15 * * * *', '2025-03-01T10:07:00Z', 4)).toEqual([
      '2025-03-01T10:15:00.000Z',
      '2025-03-01T10:30:00.000Z',
      '2025-03-01T10:45:00.000Z',
      '2025-03-01T11:00:00.000Z',
    ]);
    expect(next('0 9-11 * * *', '2025-03-01T10:30:00Z', 3)).toEqual(['2025-03-01T11:00:00.000Z', '2025-03-02T09:00:00.000Z', '2025-03-02T10:00:00.000Z']);
    expect(next('5,35 1-5/2 * * *', '2025-03-01T00:00:00Z', 4)).toEqual([
      '2025-03-01T01:05:00.000Z',
      '2025-03-01T01:35:00.000Z',
      '2025-03-01T03:05:00.000Z',
      '2025-03-01T03:35:00.000Z',
    ]);
    // N/STEP: from N to the end of the range.
    expect(next('50/5 0 * * *', '2025-03-01T00:00:00Z', 3)).toEqual(['2025-03-01T00:50:00.000Z', '2025-03-01T00:55:00.000Z', '2025-03-02T00:50:00.000Z']);
  });

  it('month and weekday names, weekday 7 as Sunday', () => {
    // 2025-03-01 is a Saturday.
    expect(next('0 12 * * MON', '2025-03-01T00:00:00Z')).toEqual(['2025-03-03T12:00:00.000Z']);
    expect(next('0 12 * * 7', '2025-03-01T00:00:00Z')).toEqual(['2025-03-02T12:00:00.000Z']);
    expect(next('0 12 * * sun', '2025-03-01T00:00:00Z')).toEqual(['2025-03-02T12:00:00.000Z']);
    expect(next('0 0 1 jun-aug *', '2025-03-01T00:00:00Z', 4)).toEqual([
      '2025-06-01T00:00:00.000Z',
      '2025-07-01T00:00:00.000Z',
      '2025-08-01T00:00:00.000Z',
      '2026-06-01T00:00:00.000Z',
    ]);
    expect(next('0 8 * * MON-FRI', '2025-03-07T09:00:00Z', 2)).toEqual(['2025-03-10T08:00:00.000Z', '2025-03-11T08:00:00.000Z']);
  });

  it('both day fields restricted: either matches (cron rule); one a star: both must', () => {
    // The 13th, or any Friday.
    expect(next('0 0 13 * FRI', '2025-06-01T00:00:00Z', 3)).toEqual(['2025-06-06T00:00:00.000Z', '2025-06-13T00:00:00.000Z', '2025-06-20T00:00:00.000Z']);
    // Day-of-month star: Fridays only.
    expect(next('0 0 * * FRI', '2025-06-01T00:00:00Z', 2)).toEqual(['2025-06-06T00:00:00.000Z', '2025-06-13T00:00:00.000Z']);
  });

  it('month ends, leap days, year ends; impossible dates give null', () => {
    expect(next('0 0 31 * *', '2025-04-01T00:00:00Z', 2)).toEqual(['2025-05-31T00:00:00.000Z', '2025-07-31T00:00:00.000Z']);
    expect(next('0 0 29 2 *', '2025-01-01T00:00:00Z')).toEqual(['2028-02-29T00:00:00.000Z']);
    expect(next('59 23 31 12 *', '2025-12-31T23:59:00Z')).toEqual(['2026-12-31T23:59:00.000Z']);
    expect(next('0 0 30 2 *', '2025-01-01T00:00:00Z')).toEqual([null]);
  });

  it('macros', () => {
    expect(next('@hourly', '2025-03-01T10:20:00Z')).toEqual(['2025-03-01T11:00:00.000Z']);
    expect(next('@daily', '2025-03-01T10:20:00Z')).toEqual(['2025-03-02T00:00:00.000Z']);
    expect(next('@weekly', '2025-03-01T10:20:00Z')).toEqual(['2025-03-02T00:00:00.000Z']);
    expect(next('@monthly', '2025-03-01T10:20:00Z')).toEqual(['2025-04-01T00:00:00.000Z']);
    expect(next('@yearly', '2025-03-01T10:20:00Z')).toEqual(['2026-01-01T00:00:00.000Z']);
  });

  it.each([
    ['* * * *', /expected 5 fields/],
    ['* * * * * *', /expected 5 fields/],
    ['60 * * * *', /minute field "60": 60 is out of range 0-59/],
    ['* 24 * * *', /hour field/],
    ['* * 0 * *', /day-of-month field/],
    ['* * * 13 *', /month field/],
    ['* * * FOO *', /month field "FOO": "FOO" is not a number or a name/],
    ['* * * * 8', /day-of-week field/],
    ['*/0 * * * *', /step "0" must be a positive integer/],
    ['5-1 * * * *', /runs backwards/],
    ['1,,2 * * * *', /empty list item/],
    ['@every', /unknown macro/],
  ])('refuses %s naming the field', (expr, msg) => {
    expect(() => parseCron(expr)).toThrow(CronError);
    expect(() => parseCron(expr)).toThrow(msg);
  });
});

describe('clocks and schedules', () => {
  it('interval clocks are anchored (epoch or startAt), so the same clock gives the same times', () => {
    expect(nextInterval(60_000, 0, at('2025-03-01T10:00:30Z'))).toBe(at('2025-03-01T10:01:00Z'));
    expect(nextInterval(60_000, 0, at('2025-03-01T10:01:00Z'))).toBe(at('2025-03-01T10:02:00Z'));
    expect(nextInterval(60_000, at('2030-01-01T00:00:00Z'), at('2025-03-01T10:00:00Z'))).toBe(at('2030-01-01T00:00:00Z'));
    expect(nextInterval(90_000, 15_000, 100_000)).toBe(105_000);
  });

  it('nextTicks merges clocks, earliest first, n in all', () => {
    const from = at('2025-03-01T10:00:00Z');
    const ticks = nextTicks(
      {
        clocks: [
          { kind: 'interval', everyMs: 20 * 60_000 },
          { kind: 'cron', cron: '*/30 * * * *', parameters: { from: 'cron' } },
        ],
      },
      from,
      5,
    );
    expect(ticks.map((t) => [iso(t.time), t.clock.kind])).toEqual([
      ['2025-03-01T10:20:00.000Z', 'interval'],
      ['2025-03-01T10:30:00.000Z', 'cron'],
      ['2025-03-01T10:40:00.000Z', 'interval'],
      ['2025-03-01T11:00:00.000Z', expect.any(String)],
      ['2025-03-01T11:00:00.000Z', expect.any(String)],
    ]);
    expect(new Set(ticks.map((t) => t.clockId)).size).toBe(2);
    // A clock's id is stable and ignores key order.
    expect(clockId({ kind: 'cron', cron: '0 * * * *', labels: ['a'] })).toBe(clockId({ labels: ['a'], cron: '0 * * * *', kind: 'cron' } as never));
  });

  it('checkClock names what is wrong', () => {
    expect(() => checkClock({ kind: 'cron', cron: '* *' }, 'schedule.clocks[0]')).toThrow(/^schedule\.clocks\[0\]\.cron: cron "\* \*": expected 5 fields/);
    expect(() => checkClock({ kind: 'interval', everyMs: 10 }, 'c')).toThrow(/c\.everyMs: expected at least 1000 ms/);
  });
});

describe('SQL placeholders for SQLite', () => {
  it('$n becomes ?n outside quotes, and the numbers used are listed', () => {
    const t = toSqlitePlaceholders("SELECT * FROM t WHERE a = $1 AND b = '$2' AND c IN ($3, $1) AND d = \"$4x\"");
    expect(t.sql).toBe("SELECT * FROM t WHERE a = ?1 AND b = '$2' AND c IN (?3, ?1) AND d = \"$4x\"");
    expect([...t.used].sort()).toEqual([1, 3]);
    expect(toSqlitePlaceholders('SELECT $12, $1').sql).toBe('SELECT ?12, ?1');
  });
});

describe('flow fingerprint', () => {
  const base: RegisterFlowInput = {
    project: 'p',
    name: 'f',
    graph: { nodes: [{ key: 'a', options: { retries: 1, tags: ['x'] } }] },
    storage: { kind: 'module', specifier: './f.ts', flow: 'f' },
    runConfig: { kind: 'local', env: { A: '1' } },
    executor: { kind: 'local' },
    parameters: [{ name: 'n', required: false, default: 1 }],
    labels: ['b', 'a'],
    schedule: { clocks: [{ kind: 'interval', everyMs: 60_000 }] },
  };

  it('ignores key order, label order and paused; sees every other change', () => {
    const same = flowFingerprint(base);
    expect(flowFingerprint({ ...base, graph: { nodes: [{ options: { tags: ['x'], retries: 1 }, key: 'a' }] } })).toBe(same);
    expect(flowFingerprint({ ...base, labels: ['a', 'b', 'a'] })).toBe(same);
    expect(flowFingerprint({ ...base, schedule: { ...base.schedule!, paused: true } })).toBe(same);
    expect(flowFingerprint({ ...base, project: 'other' })).toBe(same);
    for (const changed of [
      { graph: { nodes: [] } },
      { storage: { kind: 'module', specifier: './g.ts', flow: 'f' } },
      { runConfig: { kind: 'local', env: { A: '2' } } },
      { executor: { kind: 'pool', threads: 2 } },
      { parameters: [] },
      { labels: ['a'] },
      { schedule: null },
      { schedule: { clocks: [{ kind: 'interval', everyMs: 120_000 }] } },
    ] as Partial<RegisterFlowInput>[]) {
      expect(flowFingerprint({ ...base, ...changed })).not.toBe(same);
    }
  });

  it('canonicalJson sorts keys at every depth and drops undefined', () => {
    expect(canonicalJson({ b: 1, a: { d: [{ z: 1, y: 2 }], c: undefined } })).toBe('{"a":{"d":[{"y":2,"z":1}]},"b":1}');
  });
});

describe('request error messages', () => {
  it('name the field, its path and what was expected', () => {
    const s = z.object({ parameters: z.record(z.unknown()), updates: z.array(z.object({ state: z.enum(['A', 'B']) })) });
    const msg = (v: unknown): string => describeZodError(s.safeParse(v).error!, 'body');
    expect(msg({ parameters: 'x', updates: [] })).toBe('body.parameters: expected object, received string');
    expect(msg({ updates: [] })).toBe('body.parameters: required (expected object)');
    expect(msg({ parameters: {}, updates: [{ state: 'C' }] })).toMatch(/^body\.updates\[0\]\.state: invalid enum value/);
  });
});
