/**
 * Clocks: when a scheduled flow's runs are due. All times are UTC, in ms.
 *
 * - Interval clock: `startAt + k × everyMs` for every integer k. Without `startAt` it is
 *   anchored at the epoch, so the same clock always yields the same times (the
 *   scheduler's idempotency keys depend on that).
 * - Cron clock: the five classic fields `minute hour day-of-month month day-of-week`,
 *   each a list of `*`, `N`, `A-B`, with an optional `/STEP` (`*\/15`, `1-30/2`, `5/10`),
 *   months and weekdays also by name (`JAN`…`DEC`, `SUN`…`SAT`), weekday 7 as Sunday,
 *   and the macros `@yearly` `@annually` `@monthly` `@weekly` `@daily` `@midnight`
 *   `@hourly`. As in cron, when both day fields are restricted (neither starts with
 *   `*`) a day matches if either does.
 */
import { createHash } from 'node:crypto';
import type { Clock, Schedule } from './model.ts';

export class CronError extends TypeError {
  constructor(message: string) {
    super(message);
    this.name = 'CronError';
  }
}

export interface Cron {
  readonly source: string;
  readonly minutes: readonly boolean[];
  readonly hours: readonly boolean[];
  /** Index 1..31. */
  readonly days: readonly boolean[];
  /** Index 1..12. */
  readonly months: readonly boolean[];
  /** Index 0..6, Sunday 0. */
  readonly weekdays: readonly boolean[];
  readonly dayStar: boolean;
  readonly weekdayStar: boolean;
}

const MONTHS = ['JAN', 'FEB', 'MAR', 'APR', 'MAY', 'JUN', 'JUL', 'AUG', 'SEP', 'OCT', 'NOV', 'DEC'];
const WEEKDAYS = ['SUN', 'MON', 'TUE', 'WED', 'THU', 'FRI', 'SAT'];

const MACROS: Record<string, string> = {
  '@yearly': '0 0 1 1 *',
  '@annually': '0 0 1 1 *',
  '@monthly': '0 0 1 * *',
  '@weekly': '0 0 * * 0',
  '@daily': '0 0 * * *',
  '@midnight': '0 0 * * *',
  '@hourly': '0 * * * *',
};

interface FieldSpec {
  readonly name: string;
  readonly min: number;
  readonly max: number;
  readonly names?: readonly string[];
  /** Where names start counting (JAN = 1, SUN = 0). */
  readonly nameBase?: number;
}

const FIELDS: readonly FieldSpec[] = [
  { name: 'minute', min: 0, max: 59 },
  { name: 'hour', min: 0, max: 23 },
  { name: 'day-of-month', min: 1, max: 31 },
  { name: 'month', min: 1, max: 12, names: MONTHS, nameBase: 1 },
  // 7 is accepted as Sunday and folded onto 0.
  { name: 'day-of-week', min: 0, max: 7, names: WEEKDAYS, nameBase: 0 },
];

/** Parse a cron expression; throws a CronError naming the field that is wrong. */
export function parseCron(expr: string): Cron {
  const source = expr.trim();
  const text = MACROS[source.toLowerCase()] ?? source;
  if (text.startsWith('@')) throw new CronError(`cron ${JSON.stringify(expr)}: unknown macro ${text}`);
  const parts = text.split(/\s+/).filter((p) => p !== '');
  if (parts.length !== 5) {
    throw new CronError(`cron ${JSON.stringify(expr)}: expected 5 fields (minute hour day-of-month month day-of-week), got ${parts.length}`);
  }
  const sets = parts.map((p, i) => parseField(p, FIELDS[i] as FieldSpec, expr));
  const weekdays = sets[4] as boolean[];
  if (weekdays[7] === true) weekdays[0] = true;
  return {
    source,
    minutes: sets[0] as boolean[],
    hours: sets[1] as boolean[],
    days: sets[2] as boolean[],
    months: sets[3] as boolean[],
    weekdays: weekdays.slice(0, 7),
    dayStar: (parts[2] as string).startsWith('*'),
    weekdayStar: (parts[4] as string).startsWith('*'),
  };
}

function parseField(field: string, spec: FieldSpec, expr: string): boolean[] {
  const set = new Array<boolean>(spec.max + 1).fill(false);
  const fail = (why: string): never => {
    throw new CronError(`cron ${JSON.stringify(expr)}: ${spec.name} field ${JSON.stringify(field)}: ${why}`);
  };
  const value = (s: string): number => {
    if (/^\d+$/.test(s)) {
      const n = Number(s);
      if (n < spec.min || n > spec.max) fail(`${n} is out of range ${spec.min}-${spec.max}`);
      return n;
    }
    const i = spec.names?.indexOf(s.toUpperCase()) ?? -1;
    if (i === -1) fail(`${JSON.stringify(s)} is not a number${spec.names !== undefined ? ' or a name' : ''}`);
    return i + (spec.nameBase ?? 0);
  };
  for (const item of field.split(',')) {
    if (item === '') fail('empty list item');
    const [range, stepText, extra] = item.split('/');
    if (extra !== undefined) fail(`${JSON.stringify(item)} has two steps`);
    let step = 1;
    if (stepText !== undefined) {
      if (!/^\d+$/.test(stepText) || Number(stepText) < 1) fail(`step ${JSON.stringify(stepText)} must be a positive integer`);
      step = Number(stepText);
    }
    let lo: number;
    let hi: number;
    if (range === '*') {
      lo = spec.min;
      hi = spec.name === 'day-of-week' ? 6 : spec.max;
    } else if (range !== undefined && range.includes('-')) {
      const [a, b, more] = range.split('-');
      if (more !== undefined || a === undefined || b === undefined) fail(`bad range ${JSON.stringify(range)}`);
      lo = value(a as string);
      hi = value(b as string);
      if (lo > hi) fail(`range ${range} runs backwards`);
    } else {
      lo = value(range ?? '');
      // `5/10` means 5, 15, 25…: from N to the end in steps.
      hi = stepText !== undefined ? spec.max : lo;
    }
    for (let v = lo; v <= hi; v += step) set[v] = true;
  }
  return set;
}

const MINUTE = 60_000;

/** The first time strictly after `after` that `cron` matches, or null if none within 8 years. */
export function nextCron(cron: Cron, after: number): number | null {
  let t = Math.floor(after / MINUTE) * MINUTE + MINUTE;
  const limit = new Date(t).getUTCFullYear() + 8;
  for (;;) {
    const d = new Date(t);
    const y = d.getUTCFullYear();
    if (y > limit) return null;
    const mo = d.getUTCMonth();
    const day = d.getUTCDate();
    const h = d.getUTCHours();
    if (cron.months[mo + 1] !== true) {
      t = Date.UTC(y, mo + 1, 1);
      continue;
    }
    if (!dayMatches(cron, day, d.getUTCDay())) {
      t = Date.UTC(y, mo, day + 1);
      continue;
    }
    if (cron.hours[h] !== true) {
      t = Date.UTC(y, mo, day, h + 1);
      continue;
    }
    let m = d.getUTCMinutes();
    while (m < 60 && cron.minutes[m] !== true) m++;
    if (m === 60) {
      t = Date.UTC(y, mo, day, h + 1);
      continue;
    }
    return Date.UTC(y, mo, day, h, m);
  }
}

function dayMatches(cron: Cron, day: number, weekday: number): boolean {
  const dom = cron.days[day] === true;
  const dow = cron.weekdays[weekday] === true;
  if (cron.dayStar || cron.weekdayStar) return dom && dow;
  return dom || dow;
}

/** The first `startAt + k × everyMs` strictly after `after`. */
export function nextInterval(everyMs: number, startAt: number, after: number): number {
  if (after < startAt) return startAt;
  return startAt + (Math.floor((after - startAt) / everyMs) + 1) * everyMs;
}

/** Throws a TypeError naming what is wrong with a clock (a bad cron, a bad interval). */
export function checkClock(clock: Clock, where = 'clock'): void {
  if (clock.kind === 'cron') {
    try {
      parseCron(clock.cron);
    } catch (err) {
      throw new TypeError(`${where}.cron: ${(err as Error).message}`);
    }
  } else if (!Number.isFinite(clock.everyMs) || clock.everyMs < 1000) {
    throw new TypeError(`${where}.everyMs: expected at least 1000 ms, got ${clock.everyMs}`);
  }
}

/** A due time of one clock. */
export interface ClockTick {
  readonly time: number;
  readonly clock: Clock;
  /** Stable name of the clock (hash of its definition), for idempotency keys. */
  readonly clockId: string;
}

export function clockId(clock: Clock): string {
  return createHash('sha256').update(canonicalJson(clock)).digest('hex').slice(0, 16);
}

/** The schedule's next `n` due times after `after`, over all its clocks, earliest first. */
export function nextTicks(schedule: Schedule, after: number, n: number): ClockTick[] {
  const ticks: ClockTick[] = [];
  for (const clock of schedule.clocks) {
    const id = clockId(clock);
    const cron = clock.kind === 'cron' ? parseCron(clock.cron) : null;
    let t = after;
    for (let i = 0; i < n; i++) {
      const next = cron !== null ? nextCron(cron, t) : nextInterval(clock.kind === 'interval' ? clock.everyMs : 1, clock.kind === 'interval' ? (clock.startAt ?? 0) : 0, t);
      if (next === null) break;
      ticks.push({ time: next, clock, clockId: id });
      t = next;
    }
  }
  ticks.sort((a, b) => a.time - b.time || a.clockId.localeCompare(b.clockId));
  return ticks.slice(0, n);
}

/** JSON with object keys sorted: equal values give equal text (fingerprints, clock ids). */
export function canonicalJson(v: unknown): string {
  return JSON.stringify(sortKeys(v));
}

function sortKeys(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(sortKeys);
  if (v !== null && typeof v === 'object' && !(v instanceof Uint8Array)) {
    const o: Record<string, unknown> = {};
    for (const k of Object.keys(v).sort()) {
      const x = (v as Record<string, unknown>)[k];
      if (x !== undefined) o[k] = sortKeys(x);
    }
    return o;
  }
  return v;
}
