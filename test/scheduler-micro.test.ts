/**
 * The scheduler core micro-benchmarks (bench/core.micro.ts) and their CLI entry
 * (`weft bench --micro` / `--shape core`), at a tiny scale: the suites finish, count
 * 3 transitions per plain task, and the JSON carries the rows under "micro".
 */
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { coreMicro, formatRows, formatTargets, runToEnd, tree } from '../bench/core.micro.ts';
import { benchCommand } from '../src/cli/bench.ts';
import { captureIO } from './helpers/bench-io.ts';

const io = captureIO;

describe('core micro-benchmarks', () => {
  it('runs every suite to the end and counts 3 transitions per task', () => {
    const rows = coreMicro({ scale: 0.002, runs: 1 });
    expect(rows.map((r) => r.name)).toEqual(['independent 200', 'tree 33 leaves', 'chain 20', 'tree 1,000 leaves']);
    for (const r of rows) {
      expect(r.transitions).toBe(3 * r.tasks);
      expect(r.transitionsPerSExcl).toBeGreaterThan(0);
      expect(r.transitionsPerSIncl).toBeLessThanOrEqual(r.transitionsPerSExcl);
    }
    expect(formatRows(rows)).toContain('transitions/s excl.');
    expect(formatTargets(rows)).toMatch(/^targets: >= 5M transitions\/s/);
    expect(runToEnd(tree(5)).transitions).toBe(27);
  });

  it('weft bench --micro prints the table and writes the rows under "micro"', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'weft-micro-'));
    const t = io(dir);
    expect(await benchCommand(['--micro', '--n', '200', '--runs', '1', '--quick', '--json', 'm.json'], t)).toBe(0);
    expect(t.text()).toContain('Scheduler core (median of 1 samples)');
    const doc = JSON.parse(readFileSync(join(dir, 'm.json'), 'utf8')) as { micro: { tasks: number; transitions: number }[]; results: unknown[] };
    expect(doc.micro).toHaveLength(4);
    expect(doc.results).toEqual([]);
    for (const r of doc.micro) expect(r.transitions).toBe(3 * r.tasks);

    const t2 = io(dir);
    expect(await benchCommand(['--shape', 'core', '--n', '200', '--runs', '1', '--quick'], t2)).toBe(0);
    expect(t2.text()).toContain('independent 200');
  });

  it('flags that do not apply to --micro are usage errors', async () => {
    const cases: [string[], RegExp][] = [
      [['--micro', '--executor', 'local'], /--executor does not apply to --micro/],
      [['--micro', '--shape', 'tree'], /drop --shape tree/],
      [['--graph', 'all', '--micro'], /--micro does not apply/],
    ];
    for (const [argv, re] of cases) {
      const t = io(tmpdir());
      expect(await benchCommand(argv, t)).toBe(2);
      expect(t.errText()).toMatch(re);
    }
  });
});
