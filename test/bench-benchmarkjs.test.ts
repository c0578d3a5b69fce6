/**
 * The benchmark.js suite of the scheduler core (bench/core.benchmarkjs.ts) in quick mode,
 * and its part of `weft bench --micro`: the rows' shape and that every case did work.
 * No timing thresholds (this machine is shared).
 */
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { benchmarkjsSuite, formatRows, type Row } from '../bench/core.benchmarkjs.ts';
import { benchCommand } from '../src/cli/bench.ts';
import { captureIO } from './helpers/bench-io.ts';

const io = captureIO;

const NAMES = [
  'heap random 1,024',
  'heap sorted 1,024',
  'core independent 4,096',
  'core tree 4,095',
  'core chain 4,096',
  'construct tree 65,535',
];

function checkRows(rows: readonly Row[]): void {
  expect(rows.map((r) => r.name)).toEqual(NAMES);
  expect(rows.map((r) => r.kind)).toEqual(['heap', 'heap', 'core', 'core', 'core', 'construct']);
  for (const r of rows) {
    expect(r.opsPerS).toBeGreaterThan(0);
    expect(Number.isFinite(r.rmePct) && r.rmePct >= 0).toBe(true);
    expect(r.samples).toBeGreaterThanOrEqual(3);
    expect(r.msPerOp).toBeCloseTo(1000 / r.opsPerS, 6);
    expect(r.usPerTask).toBeGreaterThan(0);
    if (r.kind === 'construct') {
      expect(r.transitionsPerOp).toBe(0);
      expect(r.size).toBe(65_535);
    } else {
      expect(r.transitionsPerS).toBeGreaterThan(0);
      expect(r.transitionsPerS).toBeCloseTo(r.opsPerS * r.transitionsPerOp, 0);
    }
    if (r.kind === 'heap') {
      expect(r.transitionsPerOp).toBe(2 * r.size);
      expect(r.bytesPerTask).toBeNaN();
    } else {
      expect(r.bytesPerTask).toBeGreaterThan(0);
    }
    if (r.kind === 'core') expect(r.transitionsPerOp).toBe(3 * r.size);
  }
}

describe('benchmark.js suite of the scheduler core', () => {
  it('quick mode reports ops/s ± rme, transitions/s and bytes/task for every case', async () => {
    const lines: string[] = [];
    const rows = await benchmarkjsSuite({ quick: true, log: (l) => lines.push(l) });
    checkRows(rows);
    expect(lines).toHaveLength(NAMES.length);
    const text = formatRows(rows);
    for (const h of ['ops/s', '± rme %', 'samples', 'transitions/s', 'B/task']) expect(text).toContain(h);
    for (const n of NAMES) expect(text).toContain(n);
  });

  it('weft bench --micro --quick prints its table and writes its rows under "benchmarkjs"', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-bjs-'));
    const t = io(dir);
    expect(await benchCommand(['--micro', '--quick', '--n', '200', '--runs', '1', '--json', 'b.json'], t)).toBe(0);
    expect(t.text()).toContain('Scheduler core, benchmark.js (quick)');
    expect(t.text()).toContain('core chain 4,096');
    const doc = JSON.parse(readFileSync(join(dir, 'b.json'), 'utf8')) as { micro: unknown[]; benchmarkjs: Row[] };
    expect(doc.micro).toHaveLength(4);
    // JSON turns the heap rows' NaN bytes/task into null.
    checkRows(doc.benchmarkjs.map((r) => ({ ...r, bytesPerTask: r.bytesPerTask ?? NaN })));
  });

  it('--quick outside --micro is a usage error', async () => {
    const t = io(tmpdir());
    expect(await benchCommand(['--shape', 'tree', '--quick'], t)).toBe(2);
    expect(t.errText()).toMatch(/--quick applies to --micro only/);
  });
});
