/**
 * Micro-benchmarks of the scheduler core alone (no executor, no runner): how many state
 * transitions per second it makes, and how many bytes per task it holds.
 *
 *   node --expose-gc --import tsx bench/core.micro.ts             # all suites, 7 runs each
 *   node --expose-gc --import tsx bench/core.micro.ts --runs 9    # more runs
 *   node --import tsx bench/core.micro.ts --n 10000               # smaller (independent n; the rest scale)
 *   weft bench --micro   (= --shape core)                         # the same, from the CLI
 *
 * One run of a suite = construct the core over a prebuilt graph (timed apart), then
 * start(), takeReady in batches of 512 and success() each task until done (the run loop).
 * Transitions are the core's own count of state changes (`core.transitions`: a plain
 * task makes 3, pending -> ready -> running -> success), checked against 3 x tasks.
 *
 * Reported per suite, as medians of R timed runs (R >= 5) after warm-up runs (JIT):
 * construction µs/task, transitions/s of the run loop alone ("excl." construction) and of
 * construction + loop ("incl."). Small suites repeat the run inside one sample so a
 * sample lasts >= ~40 ms (timer and GC noise), and report per-run figures. With
 * `--expose-gc` a full GC precedes each suite's samples (untimed; GCs during the samples
 * are the run's own) and the 1M suite also reports the heap delta per task (heapUsed +
 * arrayBuffers, core kept alive). The "cpu" columns
 * give the same rates from process CPU time, which a loaded machine disturbs less (time
 * spent preempted is not charged); the wall-clock columns are the headline figures.
 *
 * Targets: >= 5M transitions/s; <= 200 bytes per task at 1M tasks.
 */
import { pathToFileURL } from 'node:url';
import type { GraphSpec, NodeSpec } from '../src/flow/spec.ts';
import { taskOptions } from '../src/flow/defaults.ts';
import { SchedulerCore } from '../src/scheduler/core.ts';
import { collectGarbage, fmt, median, parseCount, table } from './stats.ts';

export interface Row {
  readonly name: string;
  readonly tasks: number;
  /** Timed samples (each the median basis) and core runs per sample. */
  readonly samples: number;
  readonly repsPerSample: number;
  /** State changes of one run (core.transitions). */
  readonly transitions: number;
  /** Medians per run, milliseconds. */
  readonly constructMs: number;
  readonly loopMs: number;
  readonly totalMs: number;
  readonly constructUsPerTask: number;
  /** transitions / loop time: the run loop alone. */
  readonly transitionsPerSExcl: number;
  /** transitions / (construction + loop). */
  readonly transitionsPerSIncl: number;
  /** Spread of the loop samples: (max - min) / median, %. */
  readonly spreadPct: number;
  /**
   * The same two rates from process CPU time (user + system, all threads) instead of wall
   * time: on a loaded machine, time spent preempted is not charged (GC helper threads are).
   */
  readonly cpuTransitionsPerSExcl: number;
  readonly cpuTransitionsPerSIncl: number;
  /** `core.bytes() / size` after the run. */
  readonly coreBytesPerTask: number;
  /** heapUsed + arrayBuffers delta per task across one run (1M suite, needs --expose-gc), else NaN. */
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

/** The run loop: start, then every task dispatched in batches and succeeded. */
export function runLoop(core: SchedulerCore): void {
  core.start();
  for (;;) {
    const k = core.takeReady(BATCH, out);
    if (k === 0) break;
    for (let j = 0; j < k; j++) {
      const id = out[j]!;
      core.success(id, core.runId[id]!);
    }
  }
}

function checkFinished(s: GraphSpec, core: SchedulerCore): void {
  const ins = core.instructions;
  const last = ins[ins.length - 1];
  if (core.size !== s.nodes.length || last?.op !== 'done' || last.state !== 'Success') {
    throw new Error(`${s.name}: the run did not finish (${JSON.stringify(last)})`);
  }
  if (core.transitions !== 3 * s.nodes.length) {
    throw new Error(`${s.name}: ${core.transitions} transitions for ${s.nodes.length} plain tasks (expected 3 each)`);
  }
}

/** One whole run (construction + loop), checked. Returns the finished core. */
export function runToEnd(s: GraphSpec): SchedulerCore {
  const core = new SchedulerCore(s);
  runLoop(core);
  checkFinished(s, core);
  return core;
}

function memUsed(): number {
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

const hasGc = (): boolean => typeof (globalThis as { gc?: unknown }).gc === 'function';

/** heapUsed + arrayBuffers delta per task of one run with the core kept alive (NaN without --expose-gc). */
function heapPerTask(s: GraphSpec): number {
  if (!hasGc()) return NaN;
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
  /** Report the heap delta per task (the big suite). */
  readonly heap: boolean;
}

/** One sample: `reps` runs, construction and loop timed apart (ms, summed). */
interface Sample {
  ctor: number;
  loop: number;
  cpuCtor: number;
  cpuLoop: number;
  transitions: number;
}

const cpuMs = (): number => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

function sample(s: GraphSpec, reps: number): Sample {
  const x: Sample = { ctor: 0, loop: 0, cpuCtor: 0, cpuLoop: 0, transitions: 0 };
  for (let r = 0; r < reps; r++) {
    const c0 = cpuMs();
    const t0 = performance.now();
    const core = new SchedulerCore(s);
    const t1 = performance.now();
    const c1 = cpuMs();
    runLoop(core);
    const t2 = performance.now();
    const c2 = cpuMs();
    x.ctor += t1 - t0;
    x.loop += t2 - t1;
    x.cpuCtor += c1 - c0;
    x.cpuLoop += c2 - c1;
    checkFinished(s, core);
    x.transitions = core.transitions;
  }
  return x;
}

const SAMPLE_MS = 40;
const WARMUP_MS = 300;

function measure(c: Case, runs: number): Row {
  const s = c.spec;
  // Warm up (the JIT settles) for >= WARMUP_MS and >= 2 runs; the last run sizes the samples.
  let last = 0;
  const w0 = performance.now();
  for (let i = 0; i < 2 || performance.now() - w0 < WARMUP_MS; i++) {
    const t = performance.now();
    runToEnd(s);
    last = performance.now() - t;
  }
  const reps = Math.max(1, Math.ceil(SAMPLE_MS / Math.max(last, 0.01)));
  // One full GC before the samples, none between them: a forced GC throws away the core's
  // optimised code (V8 deopts code whose embedded objects died: "weak objects"), so a GC
  // per sample would time half-warm code on a busy machine, where the background compiler
  // is slow to re-optimise. Re-warm after it.
  collectGarbage();
  if (last < 100) for (let i = 0; i < 3; i++) runToEnd(s);
  const ctor: number[] = [];
  const loop: number[] = [];
  const total: number[] = [];
  const cpuLoop: number[] = [];
  const cpuTotal: number[] = [];
  let transitions = 0;
  for (let i = 0; i < runs; i++) {
    const x = sample(s, reps);
    ctor.push(x.ctor / reps);
    loop.push(x.loop / reps);
    total.push((x.ctor + x.loop) / reps);
    cpuLoop.push(x.cpuLoop / reps);
    cpuTotal.push((x.cpuCtor + x.cpuLoop) / reps);
    transitions = x.transitions;
  }
  const core = runToEnd(s);
  const loopMs = median(loop);
  const totalMs = median(total);
  const constructMs = median(ctor);
  return {
    name: c.name,
    tasks: s.nodes.length,
    samples: runs,
    repsPerSample: reps,
    transitions,
    constructMs,
    loopMs,
    totalMs,
    constructUsPerTask: (constructMs * 1000) / s.nodes.length,
    transitionsPerSExcl: transitions / (loopMs / 1000),
    transitionsPerSIncl: transitions / (totalMs / 1000),
    spreadPct: (100 * (Math.max(...loop) - Math.min(...loop))) / loopMs,
    cpuTransitionsPerSExcl: transitions / (median(cpuLoop) / 1000),
    cpuTransitionsPerSIncl: transitions / (median(cpuTotal) / 1000),
    coreBytesPerTask: core.bytes() / core.size,
    heapBytesPerTask: c.heap ? heapPerTask(s) : NaN,
  };
}

export interface MicroOptions {
  /** < 1 shrinks every suite (a quick smoke run). */
  scale?: number;
  /** Timed samples per suite (>= 5 for a report; default 7). */
  runs?: number;
  /** Progress lines (the CLI sends them to stderr). */
  log?: (line: string) => void;
}

/** The four suites: independent 100k, tree 16,384 leaves, chain 10k, tree 500k leaves (~1M tasks). */
export function coreMicro(opts: MicroOptions = {}): Row[] {
  const scale = opts.scale ?? 1;
  const runs = opts.runs ?? 7;
  if (!Number.isSafeInteger(runs) || runs < 1) throw new RangeError(`runs must be an integer >= 1 (got ${runs})`);
  const sz = (n: number): number => Math.max(2, Math.round(n * scale));
  const num = (n: number): string => n.toLocaleString('en-US');
  const cases: (() => Case)[] = [
    () => ({ name: `independent ${num(sz(100_000))}`, spec: independent(sz(100_000)), heap: false }),
    () => ({ name: `tree ${num(sz(16_384))} leaves`, spec: tree(sz(16_384)), heap: false }),
    () => ({ name: `chain ${num(sz(10_000))}`, spec: chain(sz(10_000)), heap: false }),
    () => ({ name: `tree ${num(sz(500_000))} leaves${scale === 1 ? ' (~1M tasks)' : ''}`, spec: tree(sz(500_000)), heap: true }),
  ];
  const rows: Row[] = [];
  for (const make of cases) {
    const c = make(); // one graph alive at a time
    opts.log?.(`core micro: ${c.name} (${runs} samples)`);
    rows.push(measure(c, runs));
  }
  return rows;
}

export function formatRows(rows: readonly Row[]): string {
  return table(
    [
      'suite',
      'tasks',
      'runs',
      'construct µs/task',
      'loop ms',
      'transitions/s excl.',
      'transitions/s incl.',
      'spread %',
      'cpu excl.',
      'cpu incl.',
      'core B/task',
      'heap B/task',
    ],
    rows.map((r) => [
      r.name,
      fmt(r.tasks),
      `${r.samples}x${r.repsPerSample}`,
      fmt(r.constructUsPerTask),
      fmt(r.loopMs),
      fmt(r.transitionsPerSExcl),
      fmt(r.transitionsPerSIncl),
      fmt(r.spreadPct),
      fmt(r.cpuTransitionsPerSExcl),
      fmt(r.cpuTransitionsPerSIncl),
      fmt(r.coreBytesPerTask),
      fmt(r.heapBytesPerTask),
    ]),
  );
}

/** The targets line under the table. */
export function formatTargets(rows: readonly Row[]): string {
  const big = rows[rows.length - 1]!;
  const minExcl = Math.min(...rows.map((r) => r.transitionsPerSExcl));
  const minIncl = Math.min(...rows.map((r) => r.transitionsPerSIncl));
  return (
    `targets: >= 5M transitions/s (slowest suite: ${fmt(minExcl)} excl. construction, ${fmt(minIncl)} incl.), ` +
    `<= 200 B/task at 1M (${fmt(big.tasks)} tasks here; core: ${fmt(big.coreBytesPerTask)}, heap: ${fmt(big.heapBytesPerTask)})`
  );
}

function main(argv: readonly string[]): void {
  // --n N: size of the independent suite (the others scale with it); --scale X directly; --runs R.
  const flag = (name: string): string | undefined => {
    const i = argv.indexOf(name);
    if (i >= 0) return argv[i + 1];
    return argv.find((a) => a.startsWith(`${name}=`))?.slice(name.length + 1);
  };
  const n = flag('--n');
  const scale = n !== undefined ? parseCount(n) / 100_000 : Number(flag('--scale') ?? 1);
  const runs = Number(flag('--runs') ?? 7);
  if (!hasGc()) console.error('(run with --expose-gc for a GC between samples and the heap B/task column)');
  const rows = coreMicro({ scale, runs, log: (l) => console.error(l) });
  console.log(formatRows(rows));
  console.log(`\n${formatTargets(rows)}`);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  try {
    main(process.argv.slice(2));
  } catch (err) {
    console.error(err);
    process.exitCode = 1;
  }
}
