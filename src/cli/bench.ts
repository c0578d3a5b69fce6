/**
 * `weft bench`: the benchmark harness behind the CLI.
 *
 *   weft bench [--shape independent|chain|tree|mapreduce|all] [--n N] [--executor local|pool|all]
 *              [--workers N] [--runs R] [--json OUT]
 *   weft bench --graph FILE|NAME|all [--total-work 2s | --scale X] [--executor ...] [--workers N] [--json OUT]
 *   weft bench --micro | --shape core [--n N] [--runs R] [--quick] [--json OUT]
 *   weft bench --shape latency [--n RUNS] [--executor cluster-warm|...|all] [--json OUT]
 *   weft bench --shape scheduler [--n TASKS] [--sim-workers N] [--credits N] [--runs R] [--json OUT]
 *   weft bench --deploy | --shape deploy [--n RUNS] [--runs R] [--drain-runs R] [--max-runs N] [--poll-ms MS] [--standby N] [--db URL] [--cpu-prof DIR] [--quick] [--json OUT]
 *
 * Returns the exit code: 0 all benchmarks ran, 1 a run failed (or the runner could not
 * be loaded), 2 a usage problem. Everything heavy lives in `bench/`; this file parses
 * flags, sequences the runs and prints.
 */
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { runBaselines, type BaselineResult } from '../../bench/baselines.ts';
import type { LatencyResult, SchedulerSimResult } from '../../bench/cluster.ts';
import { benchmarkjsSuite, formatRows as benchmarkjsTable, NOTES as benchmarkjsNotes } from '../../bench/core.benchmarkjs.ts';
import { coreMicro, formatRows as microTable, formatTargets as microTargets } from '../../bench/core.micro.ts';
import { createExecutor as defaultCreateExecutor, DEFAULT_EXECUTORS, executorNames, isClusterExecutor, releaseExecutors } from '../../bench/executors.ts';
import {
  benchReplay,
  benchShape,
  loadRunFlow,
  measureStartup,
  withRatios,
  withStartup,
  type CreateExecutorFn,
  type HarnessDeps,
  type ReplayResult,
  type RunFlowFn,
  type ShapeResult,
} from '../../bench/harness.ts';
import { DEPLOY_DEFAULTS, DEPLOY_QUICK } from '../../bench/deploy/options.ts';
import { defaultWorkflowDir, DEFAULT_SCALING, parseDurationS, parsePriority, workflowFiles, type Scaling } from '../../bench/replay.ts';
import {
  baselineTable,
  benchJson,
  clusterTable,
  environment,
  latencyTable,
  referenceUsPerTask,
  replayJson,
  replayTable,
  schedulerTable,
  shapeTable,
} from '../../bench/report.ts';
import { buildShape, DEFAULT_N, DEFAULT_SUITE, isShapeName, SHAPES, type BuiltShape, type Payload, type ShapeName } from '../../bench/shapes.ts';
import { parseCount } from '../../bench/stats.ts';
import { formatFlags, parseArgs, UsageError, type FlagSpec } from './args.ts';

export interface BenchIO {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown };
  cwd: string;
  /** Defaults to the runner's `runFlow` (loaded on first use). */
  runFlow?: RunFlowFn;
  /** Defaults to `bench/executors.ts`. */
  createExecutor?: CreateExecutorFn;
}

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

const DEFAULT_WORKERS = 2;
const DEFAULT_RUNS = 5;
/** Baselines run at least this many tasks, so their medians are not all timer noise. */
const MIN_BASELINE_N = 10_000;
/** `--shape latency`: sequential one-task runs (default) and the executors of `--executor all`. */
const DEFAULT_LATENCY_RUNS = 500;
const LATENCY_EXECUTORS: readonly string[] = ['local', 'pool-warm', 'cluster-warm'];
/** `--shape scheduler`: tasks, simulated workers, credits each. */
const DEFAULT_SIM_TASKS = 200_000;
const DEFAULT_SIM_WORKERS = 500;
const DEFAULT_SIM_CREDITS = 2;
/** What a real worker raises its credits to for tasks under 50 µs (1 thread). */
const SIM_RAISED_CREDITS = 2048;
/** Cluster modes: the special shapes (not graph shapes). */
const CLUSTER_MODES = ['latency', 'scheduler'] as const;
/** Flags of `--shape deploy` only. */
const DEPLOY_FLAGS = ['db', 'poll-ms', 'max-runs', 'drain-runs', 'cpu-prof', 'standby'] as const;

function flags(): FlagSpec[] {
  return [
    {
      name: 'shape',
      short: 's',
      kind: 'string',
      choices: [...SHAPES, 'all', 'core', ...CLUSTER_MODES, 'deploy'],
      help: 'graph shape (default: all); core = --micro; latency = one-task runs; scheduler = the cluster scheduler with simulated workers; deploy = --deploy',
    },
    { name: 'micro', kind: 'boolean', help: 'scheduler core micro-benchmarks only (no executor, no baselines)' },
    { name: 'deploy', kind: 'boolean', help: 'the deployment path: server, LocalAgent and flow-run processes (floors, claims/s, one run end to end, drains)' },
    { name: 'quick', kind: 'boolean', help: '--micro: a short benchmark.js suite; --deploy: a smoke run (2 runs, drains of 4)' },
    { name: 'n', short: 'n', kind: 'string', value: 'N', help: 'size: tasks, chain length or leaves; 10k and 1M work (default per shape)' },
    { name: 'executor', short: 'e', kind: 'string', choices: [...executorNames(), 'all'], help: `executor (default: all = ${DEFAULT_EXECUTORS.join(', ')})` },
    { name: 'workers', short: 'w', kind: 'count', value: 'N', help: `threads for pool and for the threaded baselines (default ${DEFAULT_WORKERS})` },
    { name: 'runs', short: 'r', kind: 'count', value: 'R', help: `timed runs per measurement, after one warm-up; the median is reported (default ${DEFAULT_RUNS})` },
    { name: 'json', kind: 'string', value: 'OUT', help: 'also write the results as JSON to the file OUT' },
    { name: 'payload', kind: 'string', choices: ['none', 'kib'], help: 'leaf results: none (null / 1, default) or a 1 KiB string each' },
    { name: 'baseline-n', kind: 'string', value: 'N', help: `tasks per baseline run (default: the largest graph, at least ${MIN_BASELINE_N})` },
    { name: 'baselines-only', kind: 'boolean', help: 'measure the baselines only (no weft runs)' },
    { name: 'graph', short: 'g', kind: 'string', value: 'FILE', help: "replay a workflow trace: a file, a name in ../shared/workflows, or 'all'" },
    { name: 'total-work', kind: 'string', value: 'DURATION', help: 'replay: scale runtimes so the total work is this long (default 2s)' },
    { name: 'scale', kind: 'string', value: 'X', help: 'replay: multiply recorded runtimes by X instead' },
    { name: 'priority', kind: 'string', choices: ['critical-path', 'none'], help: 'replay: ready-task priorities from the trace\'s critical-path ranks (default) or none' },
    { name: 'sim-workers', kind: 'count', value: 'N', help: `--shape scheduler: simulated workers (default ${DEFAULT_SIM_WORKERS})` },
    { name: 'credits', kind: 'count', value: 'N', help: `--shape scheduler: fixed credits per simulated worker (default: ${DEFAULT_SIM_CREDITS}, raised to ${SIM_RAISED_CREDITS} after the first compute, as real workers do for short tasks)` },
    { name: 'db', kind: 'string', value: 'URL', help: '--deploy: the server\'s database, sqlite:PATH or postgres://... (default: a SQLite file in a temp directory)' },
    { name: 'poll-ms', kind: 'count', value: 'MS', help: `--deploy: the agents' poll interval when idle (default ${DEPLOY_DEFAULTS.pollMs})` },
    { name: 'max-runs', kind: 'count', value: 'N', help: `--deploy: flow-run processes per agent at once (default ${DEPLOY_DEFAULTS.maxRuns})` },
    { name: 'drain-runs', kind: 'count', value: 'R', help: `--deploy: timed drains per agent count (default ${DEPLOY_DEFAULTS.drainRuns}; --quick: --runs)` },
    { name: 'standby', kind: 'count', value: 'N', help: '--deploy: the one-run rows again, through an agent keeping N standby flow-run processes (default: not measured)' },
    { name: 'cpu-prof', kind: 'string', value: 'DIR', help: '--deploy: profile the one-run flow-run processes (node --cpu-prof) into DIR and print where their time goes' },
    { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
  ];
}

function usage(): string {
  return `Usage:
  weft bench [--shape S|all] [--n N] [--executor E|all] [--workers N] [--runs R] [--json OUT]
  weft bench --graph FILE|NAME|all [--total-work 2s | --scale X] [--priority critical-path|none] [--executor E|all] [--workers N] [--json OUT]
  weft bench --micro [--n N] [--runs R] [--quick] [--json OUT]
  weft bench --shape latency [--n RUNS] [--executor E|all] [--workers N] [--json OUT]
  weft bench --shape scheduler [--n TASKS] [--sim-workers N] [--credits N] [--runs R] [--json OUT]
  weft bench --deploy [--n RUNS] [--runs R] [--drain-runs R] [--max-runs N] [--poll-ms MS] [--standby N] [--db URL] [--cpu-prof DIR] [--quick] [--json OUT]

Shapes (each node explicit, no mapping):
  independent  n no-op tasks                    chain      n no-op tasks, each on the previous
  tree         binary reduction, n leaves       mapreduce  n leaves -> 100 partial sums -> 1 sum
  all          independent 10k and 100k, chain 10k, tree 16384 leaves, mapreduce 10k leaves

Every shape run is preceded by the baselines (plain loop, raw piscina, raw postMessage
batched and unbatched), measured in the same process; µs/task is divided by the batched
postMessage figure (the transport's limit). Times are wall clock around runFlow, with a
fresh executor per run (start-up included); medians of R runs after one warm-up.

--micro (or --shape core) times the scheduler core alone: construction and the
dispatch/success loop over independent, tree and chain graphs up to ~1M tasks
(transitions/s with and without construction, bytes per task); --n sizes the independent
suite (default 100k; the others scale with it); JSON rows go under "micro". Then a
benchmark.js suite of small fixed ops (ReadyHeap push+pop of 1,024 keys; a 4,096-task
independent, tree and chain run; construction of a 65,535-task tree): ops/s ± rme,
transitions/s, bytes per task; --runs R sets its minimum samples (at least 5), --quick
makes it a short smoke run; JSON rows go under "benchmarkjs".

Replay runs each trace task as a busy spin of its recorded runtime x scale and compares
the makespan with max(critical path, total work / workers), both scaled.

Cluster (--executor cluster: a fresh local cluster of --workers worker processes x 1
thread per run, start-up timed; cluster-warm: one kept-alive cluster): shape runs add
the raw ws+msgpackr baselines (echo child processes on loopback, batched and one in
flight), a ratio to the batched one and the bytes the scheduler relayed.
--shape latency: --n sequential runs (default ${DEFAULT_LATENCY_RUNS}) of a one-task graph, result
back at the client, then --n single calls on one open session (submit → outcome), on
--executor (default cluster-warm; all = ${LATENCY_EXECUTORS.join(', ')}): median, p90, p99 in µs
next to the ws and postMessage round trips and the relay floor (client → relay → echo
and back: a one-task cluster run's four hops with no work at each). --runs does not apply.
--shape scheduler: a scheduler in its own process, --sim-workers simulated workers
(real connections answering every call at once) and an independent graph of --n tasks
(default 200k) through ClusterExecutor({ address }): assignments/s counted in the
scheduler's process, end-to-end time, scheduler heap per task; JSON rows go under
"latency" / "scheduler".

--deploy (or --shape deploy): the deployment path through a weft server (127.0.0.1,
a temp SQLite file or --db), LocalAgents and \`weft execute flow-run\` processes, with a
one-task no-op flow registered with local storage. Floors: an HTTP GET and a
create-run POST round trip (--runs x ${DEPLOY_DEFAULTS.httpN} each), \`node -e 0\` and
\`weft --version\` spawn -> exit; claims/s of one agent claiming ${DEPLOY_DEFAULTS.claimN} due runs in
batches of 1 and 10 (no process); one run at a time through a LocalAgent polling every
--poll-ms: created -> Submitted / spawned / Running / Success / process exited (server
history and agent times), ratio to the \`weft --version\` floor; drains: --n runs (default
${DEPLOY_DEFAULTS.drainN}) created first, then 1 and 2 agents of --max-runs processes each: wall time
to the last Success, runs/s. Medians of --runs (default ${DEFAULT_RUNS}) after a warm-up, p90
over every item; drains: --drain-runs (default ${DEPLOY_DEFAULTS.drainRuns}) each. JSON rows go under "deploy".

Options:
${formatFlags(flags())}

Examples:
  weft bench
  weft bench --shape tree --n 65536 --executor pool --workers 2 --json bench/results/tree.json
  weft bench --graph all --total-work 2s --executor pool
  weft bench --micro --runs 7 --json bench/results/core.json
  weft bench --shape independent --n 100k --executor cluster-warm --workers 2
  weft bench --shape latency --executor cluster-warm --n 500
  weft bench --shape scheduler --n 200k --sim-workers 500 --runs 3
  weft bench --deploy --json bench/results/deploy.json
  weft bench --deploy --quick --cpu-prof /tmp/weft-prof`;
}

function stringFlag(f: Readonly<Record<string, unknown>>, name: string): string | undefined {
  const v = f[name];
  return typeof v === 'string' ? v : undefined;
}

function numberFlag(f: Readonly<Record<string, unknown>>, name: string): number | undefined {
  const v = f[name];
  return typeof v === 'number' ? v : undefined;
}

function asUsage<T>(flag: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    if (err instanceof RangeError) throw new UsageError(`--${flag}: ${err.message}`);
    throw err;
  }
}

async function writeJson(io: BenchIO, out: string, doc: unknown): Promise<string> {
  const path = resolve(io.cwd, out);
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, `${JSON.stringify(doc, null, 2)}\n`);
  return path;
}

function errorText(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

function processIO(): BenchIO {
  return { stdout: process.stdout, stderr: process.stderr, cwd: process.cwd() };
}

export async function benchCommand(argv: string[], io: BenchIO = processIO()): Promise<number> {
  let f: Readonly<Record<string, unknown>>;
  try {
    const parsed = parseArgs(argv, flags());
    if (parsed.positionals.length > 0) throw new UsageError(`unexpected argument '${parsed.positionals[0]}'`);
    f = parsed.flags;
  } catch (err) {
    if (err instanceof UsageError) {
      io.stderr.write(`weft bench: ${err.message}\nRun 'weft bench --help' for the options.\n`);
      return EXIT_USAGE;
    }
    throw err;
  }
  if (f.help === true) {
    io.stdout.write(`${usage()}\n`);
    return EXIT_OK;
  }
  try {
    return stringFlag(f, 'graph') !== undefined ? await replayMode(f, io) : await shapeMode(f, io);
  } catch (err) {
    if (err instanceof UsageError) {
      io.stderr.write(`weft bench: ${err.message}\n`);
      return EXIT_USAGE;
    }
    io.stderr.write(`weft bench: ${errorText(err)}\n`);
    return EXIT_FAILED;
  }
}

function selectedExecutors(f: Readonly<Record<string, unknown>>): string[] {
  const e = stringFlag(f, 'executor') ?? 'all';
  return e === 'all' ? [...DEFAULT_EXECUTORS] : [e];
}

async function harnessDeps(io: BenchIO): Promise<HarnessDeps> {
  const log = (line: string): void => {
    io.stderr.write(`${line}\n`);
  };
  const runFlow = io.runFlow ?? (await loadRunFlow());
  return { runFlow, log, ...(io.createExecutor === undefined ? {} : { createExecutor: io.createExecutor }) };
}

/** Core micro-benchmarks: `coreMicro()` from bench/core.micro.ts, its table, its rows under "micro". */
async function microMode(f: Readonly<Record<string, unknown>>, io: BenchIO): Promise<number> {
  for (const shapeOnly of ['executor', 'workers', 'payload', 'baseline-n', 'baselines-only']) {
    if (f[shapeOnly] !== undefined) throw new UsageError(`--${shapeOnly} does not apply to --micro`);
  }
  const nRaw = stringFlag(f, 'n');
  const scale = nRaw === undefined ? 1 : asUsage('n', () => parseCount(nRaw)) / 100_000;
  const runs = numberFlag(f, 'runs') ?? DEFAULT_RUNS;
  const rows = coreMicro({ scale, runs, log: (line) => io.stderr.write(`${line}\n`) });
  io.stdout.write(`\nScheduler core (median of ${runs} samples)\n${microTable(rows)}\n\n${microTargets(rows)}\n`);
  // benchmark.js suite (bench/core.benchmarkjs.ts): fewer than 5 runs is a smoke run for it too.
  const quick = f.quick === true;
  const bjs = await benchmarkjsSuite({ quick, minSamples: quick ? undefined : Math.max(5, runs), log: (line) => io.stderr.write(`${line}\n`) });
  io.stdout.write(`\nScheduler core, benchmark.js${quick ? ' (quick)' : ''}\n${benchmarkjsTable(bjs)}\n\n${benchmarkjsNotes}\n`);
  const out = stringFlag(f, 'json');
  if (out !== undefined) {
    const path = await writeJson(io, out, { ...benchJson([], [], { environment: environment(), runs }), micro: rows, benchmarkjs: bjs });
    io.stderr.write(`wrote ${path}\n`);
  }
  return EXIT_OK;
}

async function shapeMode(f: Readonly<Record<string, unknown>>, io: BenchIO): Promise<number> {
  for (const replayOnly of ['total-work', 'scale', 'priority']) {
    if (f[replayOnly] !== undefined) throw new UsageError(`--${replayOnly} applies to --graph only`);
  }
  const shapeRaw = stringFlag(f, 'shape');
  if (f.micro === true || shapeRaw === 'core') {
    if (shapeRaw !== undefined && shapeRaw !== 'core') throw new UsageError(`--micro runs the core suites only; drop --shape ${shapeRaw}`);
    return microMode(f, io);
  }
  if (f.deploy === true || shapeRaw === 'deploy') {
    if (shapeRaw !== undefined && shapeRaw !== 'deploy') throw new UsageError(`--deploy runs the deployment suite only; drop --shape ${shapeRaw}`);
    return deployMode(f, io);
  }
  if (f.quick === true) throw new UsageError('--quick applies to --micro only (and --deploy)');
  for (const deployOnly of DEPLOY_FLAGS) {
    if (f[deployOnly] !== undefined) throw new UsageError(`--${deployOnly} applies to --deploy only`);
  }
  if (shapeRaw === 'latency') return latencyMode(f, io);
  if (shapeRaw === 'scheduler') return schedulerMode(f, io);
  for (const simOnly of ['sim-workers', 'credits']) {
    if (f[simOnly] !== undefined) throw new UsageError(`--${simOnly} applies to --shape scheduler only`);
  }
  const shapeFlag = shapeRaw ?? 'all';
  const nRaw = stringFlag(f, 'n');
  const n = nRaw === undefined ? undefined : asUsage('n', () => parseCount(nRaw));
  const workers = numberFlag(f, 'workers') ?? DEFAULT_WORKERS;
  const runs = numberFlag(f, 'runs') ?? DEFAULT_RUNS;
  const payload = (stringFlag(f, 'payload') ?? 'none') as Payload;
  const executors = selectedExecutors(f);

  let cases: { shape: ShapeName; n: number }[];
  if (shapeFlag === 'all') cases = n === undefined ? [...DEFAULT_SUITE] : SHAPES.map((shape) => ({ shape, n }));
  else if (isShapeName(shapeFlag)) cases = [{ shape: shapeFlag, n: n ?? DEFAULT_N[shapeFlag] }];
  else throw new UsageError(`unknown shape '${shapeFlag}'`);

  const built: BuiltShape[] = [];
  for (const c of cases) {
    const t0 = performance.now();
    built.push(buildShape(c.shape, c.n, { payload }));
    io.stderr.write(`built ${c.shape} n=${c.n} (${built[built.length - 1]!.tasks} tasks) in ${(performance.now() - t0).toFixed(0)} ms\n`);
  }

  const bnRaw = stringFlag(f, 'baseline-n');
  const baselineN =
    bnRaw === undefined ? Math.max(MIN_BASELINE_N, ...built.map((b) => b.tasks)) : asUsage('baseline-n', () => parseCount(bnRaw));
  io.stderr.write(`measuring baselines (n=${baselineN}, ${workers} threads, 1 warm-up + ${runs} runs)\n`);
  const baselines: BaselineResult[] = await runBaselines({ n: baselineN, workers, runs });
  const cluster = executors.some(isClusterExecutor);
  if (cluster) {
    const { runWsBaselines, WS_REFERENCE } = await import('../../bench/cluster.ts');
    io.stderr.write(`measuring ws+msgpackr baselines (n=${baselineN}, ${workers} echo processes, 1 warm-up + ${runs} runs)\n`);
    baselines.push(...(await runWsBaselines({ n: baselineN, workers, runs, only: [WS_REFERENCE, 'ws-msgpackr-roundtrip'] })));
  }
  io.stdout.write(`\nBaselines\n${baselineTable(baselines)}\n`);

  const results: ShapeResult[] = [];
  const startup = new Map<string, number>();
  let failed = false;
  const finish = async (): Promise<number> => {
    withRatios(results, referenceUsPerTask(baselines));
    withStartup(results, startup);
    if (results.length > 0) io.stdout.write(`\nweft (median of ${runs} runs)\n${shapeTable(results, baselines)}\n`);
    const clusterRows = results.filter((r) => isClusterExecutor(r.executor));
    if (clusterRows.length > 0) {
      const { CLUSTER_TARGETS } = await import('../../bench/cluster.ts');
      io.stdout.write(`\nCluster (ratio vs ws = µs/task ÷ ws-msgpackr-batched µs/message; relayed = result bytes through the scheduler)\n${clusterTable(clusterRows, CLUSTER_TARGETS)}\n`);
    }
    const out = stringFlag(f, 'json');
    if (out !== undefined) {
      const path = await writeJson(io, out, benchJson(results, baselines, { environment: environment(), runs }));
      io.stderr.write(`wrote ${path}\n`);
    }
    return failed ? EXIT_FAILED : EXIT_OK;
  };
  if (f['baselines-only'] === true) return finish();

  let deps: HarnessDeps;
  try {
    deps = await harnessDeps(io);
  } catch (err) {
    io.stderr.write(`weft bench: cannot load the runner: ${errorText(err)}\n`);
    failed = true;
    return finish();
  }
  for (const e of executors) {
    try {
      const s = await measureStartup(e, { workers }, runs, deps);
      startup.set(e, s);
      io.stderr.write(`start-up + shutdown of ${e}: ${(s * 1000).toFixed(1)} ms (median of ${runs} one-task runs)\n`);
    } catch (err) {
      failed = true;
      io.stderr.write(`weft bench: one-task run on ${e} failed: ${errorText(err)}\n`);
    }
  }
  for (const b of built) {
    for (const e of executors) {
      try {
        if (isClusterExecutor(e)) {
          const c = await import('../../bench/cluster.ts');
          c.takeClusterRuns();
          const r = await benchShape(b, e, { workers }, runs, deps);
          results.push(c.withClusterRuns(r, c.takeClusterRuns(), c.wsReferenceUs(baselines)));
          continue;
        }
        results.push(await benchShape(b, e, { workers }, runs, deps));
      } catch (err) {
        failed = true;
        io.stderr.write(`weft bench: ${b.shape} n=${b.n} on ${e} failed: ${errorText(err)}\n`);
      }
    }
  }
  return finish();
}

/** Flags of the graph shapes and replays that the cluster modes do not take. */
function rejectFlags(f: Readonly<Record<string, unknown>>, names: readonly string[], mode: string): void {
  for (const n of names) if (f[n] !== undefined) throw new UsageError(`--${n} does not apply to --shape ${mode}`);
}

async function writeModeJson(io: BenchIO, f: Readonly<Record<string, unknown>>, baselines: BaselineResult[], runs: number, extra: Record<string, unknown>): Promise<void> {
  const out = stringFlag(f, 'json');
  if (out === undefined) return;
  const path = await writeJson(io, out, { ...benchJson([], baselines, { environment: environment(), runs }), ...extra });
  io.stderr.write(`wrote ${path}\n`);
}

/**
 * `--shape latency`: n sequential one-task runs per executor (bench/cluster.ts
 * `benchLatency`), after the round-trip baselines (ws+msgpackr and postMessage).
 */
async function latencyMode(f: Readonly<Record<string, unknown>>, io: BenchIO): Promise<number> {
  rejectFlags(f, ['payload', 'baseline-n', 'baselines-only', 'sim-workers', 'credits'], 'latency');
  const nRaw = stringFlag(f, 'n');
  const n = nRaw === undefined ? DEFAULT_LATENCY_RUNS : asUsage('n', () => parseCount(nRaw));
  const workers = numberFlag(f, 'workers') ?? DEFAULT_WORKERS;
  const e = stringFlag(f, 'executor');
  const executors = e === undefined ? ['cluster-warm'] : e === 'all' ? [...LATENCY_EXECUTORS] : [e];
  const c = await import('../../bench/cluster.ts');
  const runs = numberFlag(f, 'runs') ?? DEFAULT_RUNS;
  io.stderr.write(`measuring round-trip baselines (1 warm-up + ${runs} runs)\n`);
  const baselines = [...(await runBaselines({ n: MIN_BASELINE_N, runs, only: ['postmessage-roundtrip'] })), ...(await c.runWsBaselines({ n: MIN_BASELINE_N, runs, only: ['ws-msgpackr-roundtrip', 'ws-msgpackr-relay'] }))];
  io.stdout.write(`\nBaselines\n${baselineTable(baselines)}\n`);
  const runFlow = io.runFlow ?? (await loadRunFlow());
  const createExecutor = io.createExecutor ?? defaultCreateExecutor;
  const rows: LatencyResult[] = [];
  let failed = false;
  for (const name of executors) {
    io.stderr.write(`running latency on ${name} (${n} one-task flow runs, then ${n} calls on one session, after warm-ups)\n`);
    try {
      rows.push(await c.benchLatency(name, { workers }, n, { runFlow, createExecutor }));
      rows.push(await c.benchCallLatency(name, { workers }, n, { createExecutor }));
    } catch (err) {
      failed = true;
      io.stderr.write(`weft bench: latency on ${name} failed: ${errorText(err)}\n`);
    } finally {
      if (io.createExecutor === undefined) await releaseExecutors();
    }
  }
  if (rows.length > 0) io.stdout.write(`\nOne-task latency (submit → result at the client; round trips = median ÷ one baseline round trip)\n${latencyTable(rows, baselines, c.CLUSTER_TARGETS)}\n`);
  await writeModeJson(io, f, baselines, runs, { latency: rows });
  return failed ? EXIT_FAILED : EXIT_OK;
}

/** `--shape scheduler`: the scheduler with simulated workers (bench/cluster.ts `benchSchedulerSim`). */
async function schedulerMode(f: Readonly<Record<string, unknown>>, io: BenchIO): Promise<number> {
  rejectFlags(f, ['payload', 'executor', 'baselines-only'], 'scheduler');
  const nRaw = stringFlag(f, 'n');
  const tasks = nRaw === undefined ? DEFAULT_SIM_TASKS : asUsage('n', () => parseCount(nRaw));
  const simWorkers = numberFlag(f, 'sim-workers') ?? DEFAULT_SIM_WORKERS;
  const fixed = numberFlag(f, 'credits');
  const credits = fixed ?? DEFAULT_SIM_CREDITS;
  // Without --credits the simulated workers behave like real ones: start at 2, then raise
  // their credits once they have seen how short their tasks are.
  const raiseTo = fixed === undefined ? SIM_RAISED_CREDITS : undefined;
  const runs = numberFlag(f, 'runs') ?? DEFAULT_RUNS;
  const bnRaw = stringFlag(f, 'baseline-n');
  const baselineN = bnRaw === undefined ? Math.max(MIN_BASELINE_N, Math.min(tasks, 1_000_000)) : asUsage('baseline-n', () => parseCount(bnRaw));
  const c = await import('../../bench/cluster.ts');
  io.stderr.write(`measuring the ws+msgpackr baseline (n=${baselineN}, 2 echo processes, 1 warm-up + ${runs} runs)\n`);
  const baselines = await c.runWsBaselines({ n: baselineN, runs, only: [c.WS_REFERENCE] });
  io.stdout.write(`\nBaselines\n${baselineTable(baselines)}\n`);
  const runFlow = io.runFlow ?? (await loadRunFlow());
  let rows: SchedulerSimResult[] = [];
  let failed = false;
  try {
    rows = [
      await c.benchSchedulerSim(runFlow, {
        tasks,
        workers: simWorkers,
        credits,
        ...(raiseTo !== undefined ? { raiseTo } : {}),
        runs,
        log: (line) => io.stderr.write(`${line}\n`),
      }),
    ];
    io.stdout.write(`\nScheduler with simulated workers (median of ${runs} runs; assignments/s counted in the scheduler's process)\n${schedulerTable(rows, baselines, c.CLUSTER_TARGETS)}\n`);
  } catch (err) {
    failed = true;
    io.stderr.write(`weft bench: scheduler bench failed: ${errorText(err)}\n`);
  }
  await writeModeJson(io, f, baselines, runs, { scheduler: rows });
  return failed ? EXIT_FAILED : EXIT_OK;
}

function replayFiles(graph: string, cwd: string): string[] {
  if (graph === 'all') return workflowFiles(defaultWorkflowDir());
  const direct = resolve(cwd, graph);
  if (existsSync(direct)) return [direct];
  const named = join(defaultWorkflowDir(), graph.endsWith('.json') ? graph : `${graph}.json`);
  if (existsSync(named)) return [named];
  throw new UsageError(`--graph: no file '${graph}' (nor '${named}')`);
}

async function replayMode(f: Readonly<Record<string, unknown>>, io: BenchIO): Promise<number> {
  for (const shapeOnly of ['shape', 'n', 'payload', 'baseline-n', 'baselines-only', 'micro', 'quick', 'deploy', ...DEPLOY_FLAGS]) {
    if (f[shapeOnly] !== undefined) throw new UsageError(`--${shapeOnly} does not apply to --graph`);
  }
  const priority = parsePriority(stringFlag(f, 'priority') ?? 'critical-path');
  const tw = stringFlag(f, 'total-work');
  const sc = stringFlag(f, 'scale');
  if (tw !== undefined && sc !== undefined) throw new UsageError('give --total-work or --scale, not both');
  let scaling: Scaling = DEFAULT_SCALING;
  if (tw !== undefined) scaling = { totalWorkS: asUsage('total-work', () => parseDurationS(tw)) };
  if (sc !== undefined) {
    const x = Number(sc);
    if (!(x > 0) || !Number.isFinite(x)) throw new UsageError(`--scale must be a positive number, got '${sc}'`);
    scaling = { scale: x };
  }
  const files = replayFiles(stringFlag(f, 'graph')!, io.cwd);
  const workers = numberFlag(f, 'workers') ?? DEFAULT_WORKERS;
  const runs = numberFlag(f, 'runs') ?? DEFAULT_RUNS;
  const executors = selectedExecutors(f);
  const deps = await harnessDeps(io);

  const results: ReplayResult[] = [];
  let failed = false;
  for (const file of files) {
    for (const e of executors) {
      try {
        results.push(await benchReplay(file, e, { workers }, scaling, runs, deps, priority));
      } catch (err) {
        failed = true;
        io.stderr.write(`weft bench: replay of ${file} on ${e} failed: ${errorText(err)}\n`);
      }
    }
  }
  if (results.length > 0) io.stdout.write(`\nReplay (median of ${runs} runs; ratio = makespan / lower bound)\n${replayTable(results)}\n`);
  const out = stringFlag(f, 'json');
  if (out !== undefined) {
    const path = await writeJson(io, out, replayJson(results));
    io.stderr.write(`wrote ${path}\n`);
  }
  return failed ? EXIT_FAILED : EXIT_OK;
}

/**
 * `--deploy` (`--shape deploy`): the deployment path (bench/deploy/harness.ts
 * `benchDeploy`): floors, claims/s, one run end to end, drains.
 */
async function deployMode(f: Readonly<Record<string, unknown>>, io: BenchIO): Promise<number> {
  for (const other of ['payload', 'baseline-n', 'baselines-only', 'executor', 'workers', 'sim-workers', 'credits', 'micro']) {
    if (f[other] !== undefined) throw new UsageError(`--${other} does not apply to --deploy`);
  }
  const quick = f.quick === true;
  const nRaw = stringFlag(f, 'n');
  const drainN = nRaw === undefined ? (quick ? DEPLOY_QUICK.drainN : DEPLOY_DEFAULTS.drainN) : asUsage('n', () => parseCount(nRaw));
  const runs = numberFlag(f, 'runs') ?? (quick ? DEPLOY_QUICK.runs : DEFAULT_RUNS);
  // A drain of 50 runs is 50 process starts: one per agent count keeps the default under ~2 minutes.
  const drainRuns = numberFlag(f, 'drain-runs') ?? (quick ? runs : DEPLOY_DEFAULTS.drainRuns);
  const db = stringFlag(f, 'db');
  if (db !== undefined && !db.startsWith('sqlite:') && !/^postgres(ql)?:\/\//.test(db)) throw new UsageError(`--db must be sqlite:PATH or postgres://..., got '${db}'`);
  const cpuProf = stringFlag(f, 'cpu-prof');
  const cpuProfDir = cpuProf === undefined ? undefined : resolve(io.cwd, cpuProf);
  if (cpuProfDir !== undefined) await mkdir(cpuProfDir, { recursive: true });
  const { benchDeploy } = await import('../../bench/deploy/harness.ts');
  const { deployTable, DEPLOY_NOTES } = await import('../../bench/deploy/report.ts');
  const log = (line: string): void => {
    io.stderr.write(`${line}\n`);
  };
  let result;
  try {
    result = await benchDeploy({
      ...DEPLOY_DEFAULTS,
      ...(quick ? { httpN: DEPLOY_QUICK.httpN, claimN: DEPLOY_QUICK.claimN } : {}),
      runs,
      drainRuns,
      drainN,
      maxRuns: numberFlag(f, 'max-runs') ?? DEPLOY_DEFAULTS.maxRuns,
      pollMs: numberFlag(f, 'poll-ms') ?? DEPLOY_DEFAULTS.pollMs,
      standby: numberFlag(f, 'standby') ?? DEPLOY_DEFAULTS.standby,
      ...(db !== undefined ? { db } : {}),
      ...(cpuProfDir !== undefined ? { cpuProfDir } : {}),
      log,
    });
  } catch (err) {
    io.stderr.write(`weft bench: deploy bench failed: ${errorText(err)}\n`);
    return EXIT_FAILED;
  }
  const s = result.settings;
  io.stdout.write(
    `\nDeployment path (${s.db}; agents poll every ${s.poll_ms} ms, ${s.max_runs} flow-run processes each; median of ${runs} runs after a warm-up, drains ${s.drain_runs} each)\n` +
      `${deployTable(result.rows)}\n\n${DEPLOY_NOTES}\n`,
  );
  let profile: unknown;
  if (cpuProfDir !== undefined) {
    const { summarizeProfiles, profileTable } = await import('../../bench/deploy/profile.ts');
    const summary = summarizeProfiles(cpuProfDir);
    profile = summary;
    io.stdout.write(`\nCPU profiles of the one-run flow-run processes (${cpuProfDir}; their rows above include the profiler)\n${profileTable(summary)}\n`);
  }
  await writeModeJson(io, f, [], runs, { deploy: result.rows, deploy_settings: s, ...(profile !== undefined ? { deploy_profile: profile } : {}) });
  return EXIT_OK;
}
