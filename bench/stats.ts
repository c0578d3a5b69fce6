/**
 * Timing helpers shared by the harness and the baselines: medians, repeated
 * measurement, and number formatting for the tables.
 */

/** Median of a non-empty list (mean of the two middle values for an even count). */
export function median(xs: readonly number[]): number {
  if (xs.length === 0) throw new RangeError('median of an empty list');
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

/** Runs the collector if the process was started with `--expose-gc`, so garbage of one run is not charged to the next. */
export function collectGarbage(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (typeof gc === 'function') gc();
}

/**
 * Calls `fn` `warmup` times untimed, then `runs` times timed; returns the wall-clock
 * seconds of each timed call. `fn` may return a number of seconds to use instead of
 * its wall clock (a baseline that times only its own hot part).
 */
export async function timeRuns(runs: number, fn: () => Promise<number | void> | number | void, warmup = 1): Promise<number[]> {
  if (!Number.isSafeInteger(runs) || runs < 1) throw new RangeError(`runs must be an integer >= 1 (got ${runs})`);
  for (let i = 0; i < warmup; i++) {
    collectGarbage();
    await fn();
  }
  const samples: number[] = [];
  for (let i = 0; i < runs; i++) {
    collectGarbage();
    const t0 = performance.now();
    const own = await fn();
    const wall = (performance.now() - t0) / 1000;
    samples.push(typeof own === 'number' ? own : wall);
  }
  return samples;
}

/** µs per item for `seconds` over `n` items. */
export function usPer(seconds: number, n: number): number {
  return n > 0 ? (seconds * 1e6) / n : NaN;
}

/** Three significant digits, no exponent for the usual ranges. */
export function fmt(x: number): string {
  if (!Number.isFinite(x)) return '-';
  const a = Math.abs(x);
  if (a === 0) return '0';
  if (a >= 1000) return Math.round(x).toLocaleString('en-US');
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  if (a >= 1) return x.toFixed(2);
  if (a >= 0.001) return x.toPrecision(3);
  return x.toExponential(2);
}

/** Parses a count with an optional k/M suffix or underscores: `10k`, `1M`, `100_000`, `16384`. */
export function parseCount(raw: string): number {
  const m = /^(\d+(?:_\d+)*(?:\.\d+)?)([kKmM])?$/.exec(raw.trim());
  if (m === null) throw new RangeError(`not a count: '${raw}' (use e.g. 10000, 10k, 1M)`);
  const mult = m[2] === undefined ? 1 : m[2].toLowerCase() === 'k' ? 1e3 : 1e6;
  const v = Number(m[1]!.replaceAll('_', '')) * mult;
  if (!Number.isSafeInteger(v) || v < 1) throw new RangeError(`count must be a positive integer: '${raw}'`);
  return v;
}

/** A plain text table: columns padded, numbers right-aligned. */
export function table(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((h, c) => Math.max(h.length, ...rows.map((r) => (r[c] ?? '').length)));
  const numeric = header.map((_, c) => rows.length > 0 && rows.every((r) => /^[-\d.,e+x]*$/.test(r[c] ?? '')));
  const line = (r: readonly string[]): string =>
    r.map((cell, c) => (numeric[c] ? cell.padStart(widths[c]!) : cell.padEnd(widths[c]!))).join('  ').trimEnd();
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

/** mulberry32: a tiny seeded PRNG (uniform in [0, 1)), for inputs that must be the same on every run. */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
