/**
 * benchmark.js micro-benchmarks of the scheduler core's hot operations: each op is a
 * small, fixed amount of work, so benchmark.js can sample it many times and report
 * ops/s ± rme (its relative margin of error at 95 %) over many samples.
 *
 *   node --import tsx bench/core.benchmarkjs.ts            # full: benchmark.js defaults (≥ 5 samples, ~5 s a case)
 *   node --import tsx bench/core.benchmarkjs.ts --quick    # smoke: ~0.2 s a case, wide margins
 *   weft bench --micro                                     # after the core.micro suites
 *
 * Cases (one op each):
 *
 * - `heap random 1,024` / `heap sorted 1,024`: push 1,024 ids into a `ReadyHeap`, then pop
 *   them all. Random keys (a fixed-seed permutation) exercise the binary heap; sorted keys
 *   stay on the heap's O(1) sorted run. "Transitions" per op = pushes + pops (2,048): the
 *   queue's share of a task's pending -> ready -> running.
 * - `core independent 4,096`, `core tree 4,095`, `core chain 4,096`: construct a
 *   `SchedulerCore` over a prebuilt spec, `start()`, `takeReady(512)` in a loop and
 *   `success()` every task (`runLoop` of core.micro.ts). Transitions per op =
 *   `core.transitions` = 3 × tasks (checked every op). Construction is inside the op: at
 *   this size it includes zero-filling the story ring (65,536 entries × 20 B = 1.3 MB),
 *   which also dominates bytes/task.
 * - `construct tree 65,535`: `new SchedulerCore(spec)` alone over a 32,768-leaf binary
 *   tree (a binary reduction has 2L − 1 tasks: 65,535 is the closest to 65,536). No
 *   transitions; see µs/task.
 *
 * Reported per case: ops/s, ± rme %, samples, mean ms/op, transitions/s (ops/s ×
 * transitions per op), µs per task (per key for the heap cases) and, for core cases,
 * bytes/task = `core.bytes() / core.size` after one op.
 *
 * Why a second harness next to core.micro.ts: that one times whole runs of 10k–1M tasks
 * with its own loop (medians, no forced re-runs); this one gives benchmark.js's
 * statistics for small fixed ops. The two agree in order of magnitude, not to the digit:
 * small ops stay in cache, and the GC of the garbage each op leaves is charged to later
 * samples.
 */
import { pathToFileURL } from 'node:url';
import Benchmark from 'benchmark';
import type { GraphSpec } from '../src/flow/spec.ts';
import { SchedulerCore } from '../src/scheduler/core.ts';
import { ReadyHeap } from '../src/scheduler/heap.ts';
import { chain, independent, runLoop, runToEnd, tree } from './core.micro.ts';
import { fmt, mulberry32, table } from './stats.ts';

export type CaseKind = 'heap' | 'core' | 'construct';

export interface Row {
  readonly name: string;
  readonly kind: CaseKind;
  /** Keys (heap) or tasks (core, construct) per op. */
  readonly size: number;
  /** benchmark.js `hz`. */
  readonly opsPerS: number;
  /** benchmark.js `stats.rme`: the margin of error at 95 % as a percentage of the mean. */
  readonly rmePct: number;
  /** benchmark.js samples (each the mean of `count` ops). */
  readonly samples: number;
  /** Mean time per op, milliseconds. */
  readonly msPerOp: number;
  /** Core: `core.transitions` of one op (3 × tasks); heap: pushes + pops; construct: 0. */
  readonly transitionsPerOp: number;
  /** opsPerS × transitionsPerOp. */
  readonly transitionsPerS: number;
  /** µs per task (per key for the heap cases): 1e6 / (opsPerS × size). */
  readonly usPerTask: number;
  /** `core.bytes() / core.size` after one op (core and construct cases), else NaN. */
  readonly bytesPerTask: number;
}

export interface SuiteOptions {
  /** Smoke run: tiny maxTime / minTime / minSamples (wide margins, for tests and --runs < 5). */
  quick?: boolean;
  /** benchmark.js minSamples (default 5; quick 3). */
  minSamples?: number;
  /** benchmark.js maxTime per case in seconds (default 5; quick 0.1). */
  maxTime?: number;
  /** Progress lines, one per finished case (the CLI sends them to stderr). */
  log?: (line: string) => void;
}

const HEAP_KEYS = 1024;

/** Keys for ids 0..n-1: a permutation of 0..n-1 (random) or the identity (sorted). */
function heapKeys(n: number, random: boolean): Float64Array {
  const keys = new Float64Array(n);
  for (let i = 0; i < n; i++) keys[i] = i;
  if (random) {
    const rnd = mulberry32(0x5eed);
    for (let i = n - 1; i > 0; i--) {
      const j = Math.floor(rnd() * (i + 1));
      const t = keys[i]!;
      keys[i] = keys[j]!;
      keys[j] = t;
    }
  }
  return keys;
}

interface Case {
  readonly name: string;
  readonly kind: CaseKind;
  readonly size: number;
  readonly transitionsPerOp: number;
  /** One op. Throws if the op did not do its work (benchmark.js then reports the error). */
  readonly fn: () => void;
  /** After sampling: bytes per task of one op (NaN when not applicable). */
  readonly bytesPerTask: () => number;
}

function heapCase(random: boolean): Case {
  const n = HEAP_KEYS;
  const order = heapKeys(n, random);
  const heap = new ReadyHeap(new Float64Array(0), order, n);
  heap.setUniformRank(true);
  // Checked once, untimed: every id comes back, in key order.
  for (let i = 0; i < n; i++) heap.push(i);
  for (let i = 0, last = -1; i < n; i++) {
    const k = order[heap.pop()]!;
    if (k <= last) throw new Error(`heap ${random ? 'random' : 'sorted'}: pops out of key order`);
    last = k;
  }
  if (heap.size !== 0) throw new Error('heap not empty after popping every id');
  const idSum = (n * (n - 1)) / 2;
  return {
    name: `heap ${random ? 'random' : 'sorted'} ${n.toLocaleString('en-US')}`,
    kind: 'heap',
    size: n,
    transitionsPerOp: 2 * n,
    fn: () => {
      for (let i = 0; i < n; i++) heap.push(i);
      let sum = 0;
      for (let i = 0; i < n; i++) sum += heap.pop();
      if (sum !== idSum) throw new Error(`heap ${random ? 'random' : 'sorted'}: popped ids sum to ${sum}, expected ${idSum}`);
    },
    bytesPerTask: () => NaN,
  };
}

function coreCase(label: string, s: GraphSpec): Case {
  const tasks = s.nodes.length;
  const expected = 3 * tasks;
  runToEnd(s); // throws unless the run finishes with 3 transitions per task
  return {
    name: `core ${label} ${tasks.toLocaleString('en-US')}`,
    kind: 'core',
    size: tasks,
    transitionsPerOp: expected,
    fn: () => {
      const core = new SchedulerCore(s);
      runLoop(core);
      if (core.transitions !== expected) throw new Error(`${s.name}: ${core.transitions} transitions, expected ${expected}`);
    },
    bytesPerTask: () => {
      const core = runToEnd(s);
      return core.bytes() / core.size;
    },
  };
}

function constructCase(s: GraphSpec): Case {
  const tasks = s.nodes.length;
  return {
    name: `construct tree ${tasks.toLocaleString('en-US')}`,
    kind: 'construct',
    size: tasks,
    transitionsPerOp: 0,
    fn: () => {
      const core = new SchedulerCore(s);
      if (core.size !== tasks) throw new Error(`${s.name}: core of ${core.size} tasks, expected ${tasks}`);
    },
    bytesPerTask: () => {
      const core = new SchedulerCore(s);
      return core.bytes() / core.size;
    },
  };
}

/** The six cases, specs prebuilt (outside every timed op). */
function cases(): Case[] {
  return [
    heapCase(true),
    heapCase(false),
    coreCase('independent', independent(4096)),
    coreCase('tree', tree(2048)),
    coreCase('chain', chain(4096)),
    constructCase(tree(32_768)),
  ];
}

function toRow(c: Case, b: Benchmark): Row {
  const hz = b.hz;
  return {
    name: c.name,
    kind: c.kind,
    size: c.size,
    opsPerS: hz,
    rmePct: b.stats.rme,
    samples: b.stats.sample.length,
    msPerOp: b.stats.mean * 1000,
    transitionsPerOp: c.transitionsPerOp,
    transitionsPerS: hz * c.transitionsPerOp,
    usPerTask: 1e6 / (hz * c.size),
    bytesPerTask: c.bytesPerTask(),
  };
}

/**
 * Runs the suite (asynchronously: benchmark.js yields between cycles) and returns one row
 * per case, in order. Rejects if any case threw.
 */
export function benchmarkjsSuite(opts: SuiteOptions = {}): Promise<Row[]> {
  const quick = opts.quick ?? false;
  const options: Benchmark.Options = {
    minSamples: opts.minSamples ?? (quick ? 3 : 5),
    maxTime: opts.maxTime ?? (quick ? 0.1 : 5),
    // benchmark.js's default minTime (>= 50 ms per sample) is right for a report; quick
    // runs shorten the samples too.
    ...(quick ? { minTime: 0.01 } : {}),
  };
  const all = cases();
  const suite = new Benchmark.Suite('weft scheduler core');
  for (const c of all) suite.add(c.name, c.fn, options);
  return new Promise<Row[]>((resolve, reject) => {
    const rows: Row[] = [];
    const errors: string[] = [];
    suite.on('cycle', (event: Benchmark.Event) => {
      const b = event.target as unknown as Benchmark;
      const c = all.find((x) => x.name === b.name);
      if (b.error !== undefined && b.error !== null) {
        errors.push(`${b.name ?? '?'}: ${b.error instanceof Error ? b.error.message : String(b.error)}`);
        return;
      }
      if (c === undefined) return;
      try {
        const row = toRow(c, b);
        rows.push(row);
        opts.log?.(`benchmark.js: ${c.name}: ${fmt(row.opsPerS)} ops/s ±${row.rmePct.toFixed(2)}% (${row.samples} samples)`);
      } catch (err) {
        errors.push(`${c.name}: ${err instanceof Error ? err.message : String(err)}`);
      }
    });
    suite.on('complete', () => {
      if (errors.length > 0) reject(new Error(`benchmark.js suite failed: ${errors.join('; ')}`));
      else if (rows.length !== all.length) reject(new Error(`benchmark.js suite: ${rows.length} of ${all.length} cases reported`));
      else resolve(rows);
    });
    try {
      suite.run({ async: true });
    } catch (err) {
      reject(err instanceof Error ? err : new Error(String(err)));
    }
  });
}

export function formatRows(rows: readonly Row[]): string {
  return table(
    ['case', 'size', 'ops/s', '± rme %', 'samples', 'ms/op', 'transitions/op', 'transitions/s', 'µs/task', 'B/task'],
    rows.map((r) => [
      r.name,
      fmt(r.size),
      fmt(r.opsPerS),
      r.rmePct.toFixed(2),
      String(r.samples),
      fmt(r.msPerOp),
      r.transitionsPerOp === 0 ? '-' : fmt(r.transitionsPerOp),
      r.transitionsPerOp === 0 ? '-' : fmt(r.transitionsPerS),
      fmt(r.usPerTask),
      fmt(r.bytesPerTask),
    ]),
  );
}

/** The note printed under the table. */
export const NOTES =
  'heap rows: transitions = pushes + pops, µs per key; core rows: construct + start + takeReady(512)/success loop, ' +
  'transitions = core.transitions (3 per task); construct: new SchedulerCore alone. ± rme: 95 % margin of the mean.';

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const quick = process.argv.includes('--quick');
  const rows = await benchmarkjsSuite({ quick, log: (line) => process.stderr.write(`${line}\n`) });
  process.stdout.write(`\nScheduler core, benchmark.js ${Benchmark.version}${quick ? ' (quick)' : ''}\n${formatRows(rows)}\n\n${NOTES}\n`);
}
