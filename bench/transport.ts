/**
 * PoolExecutor, cold and warm, against its transport limits — one process, same run:
 *
 * - `cold`: a new PoolExecutor per run (thread start, TS loader, imports inside the time);
 * - `warm`: one `keepAlive` pool reused by every run (start-up paid once, untimed);
 * - `direct`: the warm pool driven without the runner (submit up to freeSlots(), refill
 *   from onOutcomes, like the runner): the executor's own share of the per-task cost;
 * - `start-up`: a cold one-task run (start + shutdown);
 * - baselines: raw batched postMessage (the transport's limit) and raw piscina `run()`.
 *
 * Cases: independent 100k no-op tasks and a tree reduction over 16,384 leaves, both
 * through `runFlow` on `threads` threads. Variants run interleaved round by round (so a
 * burst of load elsewhere hits them alike); medians of `runs` rounds after one warm-up.
 * Also prints CPU time per task (all threads of the process), steadier than wall time
 * on a shared machine.
 *
 *   npx tsx bench/transport.ts [runs=5] [threads=2] [independent-n=100000] [tree-leaves=16384]
 */
import { performance } from 'node:perf_hooks';
import { PoolExecutor } from '../src/executor/pool.ts';
import type { Outcome, TaskCall } from '../src/executor/types.ts';
import { runFlow } from '../src/runner/run.ts';
import { piscinaBaseline, postMessageBaseline } from './baselines.ts';
import { buildShape, type BuiltShape } from './shapes.ts';
import { median } from './stats.ts';
import { taskKey, TASKS_MODULE } from './tasks.ts';

const RUNS = Number(process.argv[2] ?? 5);
const THREADS = Number(process.argv[3] ?? 2);
const IND_N = Number(process.argv[4] ?? 100_000);
const TREE_L = Number(process.argv[5] ?? 16_384);

interface Sample {
  wallMs: number;
  cpuMs: number;
}

async function timed(fn: () => Promise<void>): Promise<Sample> {
  const c0 = process.cpuUsage();
  const t0 = performance.now();
  await fn();
  const wallMs = performance.now() - t0;
  const c = process.cpuUsage(c0);
  return { wallMs, cpuMs: (c.user + c.system) / 1000 };
}

async function flowRun(b: BuiltShape, ex: PoolExecutor, check: boolean): Promise<void> {
  const res = await runFlow(b.spec, { executor: ex, keepResults: check });
  if (res.state !== 'Success') throw new Error(`${b.shape}: flow ended ${res.state}: ${res.message}`);
  if (check && b.expected !== undefined && res.result(b.spec.referenceTasks[0]!) !== b.expected) {
    throw new Error(`${b.shape}: wrong result`);
  }
}

/** n no-op calls straight into the executor, refilled from onOutcomes (no runner, no scheduler core). */
async function directRun(ex: PoolExecutor, n: number): Promise<void> {
  const noop = taskKey('noop');
  let next = 0;
  let got = 0;
  let resolve!: () => void;
  const finished = new Promise<void>((r) => (resolve = r));
  const feed = (): void => {
    const k = Math.min(ex.freeSlots(), n - next);
    if (k <= 0) return;
    const calls = new Array<TaskCall>(k);
    for (let i = 0; i < k; i++, next++) {
      calls[i] = { id: next, runId: 1, taskKey: noop, key: `noop-${next}`, args: [], timeoutMs: 0, mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined };
    }
    ex.submit(calls);
  };
  await ex.start({
    flowName: 'direct',
    modules: [TASKS_MODULE],
    taskKeys: [noop],
    parameters: {},
    onOutcomes(outs: Outcome[]) {
      got += outs.length;
      if (got >= n) resolve();
      else feed();
    },
  });
  feed();
  await finished;
  await ex.shutdown();
}

const fmt = (label: string, xs: Sample[], tasks: number): string => {
  const w = median(xs.map((s) => s.wallMs));
  const c = median(xs.map((s) => s.cpuMs));
  const us = (w * 1000) / tasks;
  return `  ${label.padEnd(26)} ${w.toFixed(1).padStart(8)} ms  ${us.toFixed(2).padStart(6)} µs/task  cpu ${((c * 1000) / tasks).toFixed(2).padStart(6)} µs/task  [${xs.map((s) => s.wallMs.toFixed(0)).join(' ')}]`;
};

const warm = new PoolExecutor({ threads: THREADS, keepAlive: true });
const one = buildShape('independent', 1);
try {
  for (const b of [buildShape('independent', IND_N), buildShape('tree', TREE_L)]) {
    const s: Record<'cold' | 'warm' | 'direct' | 'startup', Sample[]> = { cold: [], warm: [], direct: [], startup: [] };
    for (let r = 0; r <= RUNS; r++) {
      const cold = await timed(() => flowRun(b, new PoolExecutor({ threads: THREADS }), r === 0));
      const hot = await timed(() => flowRun(b, warm, r === 0));
      const direct = b.shape === 'independent' ? await timed(() => directRun(warm, b.tasks)) : null;
      const startup = await timed(() => flowRun(one, new PoolExecutor({ threads: THREADS }), false));
      if (r === 0) continue;
      s.cold.push(cold);
      s.warm.push(hot);
      if (direct !== null) s.direct.push(direct);
      s.startup.push(startup);
    }
    const pm = await postMessageBaseline(b.tasks, THREADS, RUNS);
    const pis = await piscinaBaseline(b.tasks, THREADS, RUNS);
    const startMs = median(s.startup.map((x) => x.wallMs));
    const coldMs = median(s.cold.map((x) => x.wallMs));
    console.log(`${b.shape} n=${b.n} (${b.tasks} tasks), ${THREADS} threads, median of ${RUNS}`);
    console.log(`  baseline postmessage-batched  ${pm.us_per_task.toFixed(3)} µs/task;  piscina run()  ${pis.us_per_task.toFixed(2)} µs/task`);
    console.log(fmt('pool cold (runFlow)', s.cold, b.tasks));
    console.log(fmt('pool warm (runFlow)', s.warm, b.tasks));
    if (s.direct.length > 0) console.log(fmt('pool warm, no runner', s.direct, b.tasks));
    const st = (k: 'wallMs' | 'cpuMs'): string => median(s.startup.map((x) => x[k])).toFixed(1);
    console.log(`  ${'cold start-up (1-task run)'.padEnd(26)} ${st('wallMs').padStart(8)} ms  cpu ${st('cpuMs')} ms  [${s.startup.map((x) => x.wallMs.toFixed(0)).join(' ')}]`);
    console.log(`  cold net of start-up: ${(((coldMs - startMs) * 1000) / b.tasks).toFixed(2)} µs/task`);
  }
} finally {
  await warm.close();
}
