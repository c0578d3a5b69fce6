/**
 * Micro-benchmarks of the scheduler core alone (no executor, no runner): how many state
 * transitions per second it makes, and how many bytes per task it holds.
 *
 *   node --import tsx bench/core.micro.ts                 # all suites
 *   node --expose-gc --import tsx bench/core.micro.ts     # plus a heap delta per task at 1M
 *
 * Each benchmark.js op is one whole run of a prebuilt graph: construct the core, start(),
 * then takeReady in batches of 512 and success() each task until done. A plain success is
 * three transitions (pending -> ready -> running -> success), so transitions/s =
 * ops/s x tasks x 3 (counted that way rather than with onTransition, which would slow the
 * hot path it measures). Graph construction is outside the timed op.
 *
 * Targets: >= 5M transitions/s; <= 200 bytes per task at 1M tasks.
 */
import Benchmark from 'benchmark';
import { pathToFileURL } from 'node:url';
import type { GraphSpec, NodeSpec } from '../src/flow/spec.ts';
import { taskOptions } from '../src/flow/defaults.ts';
import { SchedulerCore } from '../src/scheduler/core.ts';
import { collectGarbage, fmt, parseCount, table } from './stats.ts';

export interface Row {
  readonly name: string;
  readonly tasks: number;
  /** benchmark.js mean ops/s (one op = one whole run) and its relative margin of error (%). */
  readonly opsPerS: number;
  readonly rme: number;
  readonly samples: number;
  readonly transitionsPerS: number;
  /** `core.bytes() / size` after the run. */
  readonly coreBytesPerTask: number;
  /** heapUsed + arrayBuffers delta per task across one run (needs --expose-gc), else NaN. */
  readonly heapBytesPerTask: number;
}

const BATCH = 512;
const OPTIONS = taskOptions();
const NO_UPSTREAM: readonly number[] = Object.freeze([]);
const NO_ARGS = Object.freeze([]);

/** One node per call; options and empty arrays are shared so a 1M-node spec stays small. */
function node(id: number, deps: readonly number[]): NodeSpec {
  return {
    id,
    key: `t-${id}`,
    kind: 'task',
    taskKey: 'bench#t',
    module: '',
    args: deps.length === 0 ? NO_ARGS : deps.map((u) => ({ kind: 'ref', node: u, mode: 'plain' }) as const),
    upstream: NO_UPSTREAM,
    mapped: false,
    options: OPTIONS,
  };
}

function spec(name: string, nodes: NodeSpec[]): GraphSpec {
  const hasDown = new Uint8Array(nodes.length);
  for (const n of nodes) for (const a of n.args) if (a.kind === 'ref') hasDown[a.node] = 1;
  const refs: number[] = [];
  for (let i = 0; i < nodes.length; i++) if (hasDown[i] === 0) refs.push(i);
  return { name, nodes, referenceTasks: refs, modules: [] };
}

export function independent(n: number): GraphSpec {
  return spec(`independent-${n}`, Array.from({ length: n }, (_, i) => node(i, NO_UPSTREAM)));
}

export function chain(n: number): GraphSpec {
  return spec(`chain-${n}`, Array.from({ length: n }, (_, i) => node(i, i === 0 ? NO_UPSTREAM : [i - 1])));
}

/** A binary reduction over `leaves` leaves (an odd one out moves up a level): 2 x leaves - 1 tasks. */
export function tree(leaves: number): GraphSpec {
  const nodes: NodeSpec[] = [];
  let level: number[] = [];
  for (let i = 0; i < leaves; i++) {
    level.push(nodes.length);
    nodes.push(node(nodes.length, NO_UPSTREAM));
  }
  while (level.length > 1) {
    const next: number[] = [];
    for (let i = 0; i + 1 < level.length; i += 2) {
      next.push(nodes.length);
      nodes.push(node(nodes.length, [level[i]!, level[i + 1]!]));
    }
    if (level.length % 2 === 1) next.push(level[level.length - 1]!);
    level = next;
  }
  return spec(`tree-${leaves}`, nodes);
}

const out = new Int32Array(BATCH);

/** One whole run: every task dispatched in batches and succeeded. Returns the finished core. */
export function runToEnd(s: GraphSpec): SchedulerCore {
  const core = new SchedulerCore(s);
  core.start();
  for (;;) {
    const k = core.takeReady(BATCH, out);
    if (k === 0) break;
    for (let j = 0; j < k; j++) {
      const id = out[j]!;
      core.success(id, core.runId[id]!);
    }
  }
  const ins = core.instructions;
  const last = ins[ins.length - 1];
  if (core.size !== s.nodes.length || last?.op !== 'done' || last.state !== 'Success') {
    throw new Error(`${s.name}: the run did not finish (${JSON.stringify(last)})`);
  }
  return core;
}

function memUsed(): number {
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

/** heapUsed + arrayBuffers delta per task of one run with the core kept alive (NaN without --expose-gc). */
function heapPerTask(s: GraphSpec): number {
  if (typeof (globalThis as { gc?: unknown }).gc !== 'function') return NaN;
  collectGarbage();
  const before = memUsed();
  const core = runToEnd(s);
  collectGarbage();
  const after = memUsed();
  const per = (after - before) / s.nodes.length;
  if (core.size < 0) throw new Error('unreachable'); // keeps `core` alive across the measurement
  return per;
}

interface Case {
  readonly name: string;
  readonly spec: GraphSpec;
  readonly options: Benchmark.Options;
}

function measure(c: Case): Promise<Row> {
  return new Promise((resolve, reject) => {
    const s = c.spec;
    const bench = new Benchmark(c.name, () => void runToEnd(s), {
      ...c.options,
      onComplete() {
        if (bench.error !== undefined && bench.error !== null) {
          reject(bench.error as Error);
          return;
        }
        const core = runToEnd(s);
        const tasks = s.nodes.length;
        resolve({
          name: c.name,
          tasks,
          opsPerS: bench.hz,
          rme: bench.stats.rme,
          samples: bench.stats.sample.length,
          transitionsPerS: bench.hz * tasks * 3,
          coreBytesPerTask: core.bytes() / core.size,
          heapBytesPerTask: heapPerTask(s),
        });
      },
    });
    bench.run({ async: false });
  });
}

/** The four suites; `scale` < 1 shrinks them (for a quick smoke run). */
export async function coreMicro(scale = 1): Promise<Row[]> {
  const sz = (n: number): number => Math.max(2, Math.round(n * scale));
  const quick: Benchmark.Options = { minSamples: 10, maxTime: 3 };
  const cases: Case[] = [
    { name: `independent ${fmt(sz(100_000))}`, spec: independent(sz(100_000)), options: quick },
    { name: `tree ${fmt(sz(16_384))} leaves`, spec: tree(sz(16_384)), options: quick },
    { name: `chain ${fmt(sz(10_000))}`, spec: chain(sz(10_000)), options: quick },
    { name: `tree ${fmt(sz(500_000))} leaves (~1M tasks)`, spec: tree(sz(500_000)), options: { minSamples: 3, maxTime: 8, initCount: 1 } },
  ];
  const rows: Row[] = [];
  for (const c of cases) rows.push(await measure(c));
  return rows;
}

export function formatRows(rows: readonly Row[]): string {
  return table(
    ['suite', 'tasks', 'ops/s', '±%', 'samples', 'transitions/s', 'core B/task', 'heap B/task'],
    rows.map((r) => [
      r.name,
      fmt(r.tasks),
      fmt(r.opsPerS),
      r.rme.toFixed(1),
      String(r.samples),
      fmt(r.transitionsPerS),
      fmt(r.coreBytesPerTask),
      fmt(r.heapBytesPerTask),
    ]),
  );
}

async function main(argv: readonly string[]): Promise<void> {
  // --n N: size of the independent suite (the others scale with it); --scale X directly.
  const flag = (name: string): string | undefined => {
    const i = argv.indexOf(name);
    if (i >= 0) return argv[i + 1];
    return argv.find((a) => a.startsWith(`${name}=`))?.slice(name.length + 1);
  };
  const n = flag('--n');
  const scale = n !== undefined ? parseCount(n) / 100_000 : Number(flag('--scale') ?? 1);
  const rows = await coreMicro(scale);
  console.log(formatRows(rows));
  const big = rows[rows.length - 1]!;
  const minTps = Math.min(...rows.map((r) => r.transitionsPerS));
  console.log(
    `\ntargets: >= 5M transitions/s (slowest suite: ${fmt(minTps)}), <= 200 B/task at 1M (core: ${fmt(big.coreBytesPerTask)}, heap: ${fmt(big.heapBytesPerTask)})`,
  );
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main(process.argv.slice(2)).catch((err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  });
}
