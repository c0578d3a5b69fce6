/**
 * The deployment benchmark (`weft bench --deploy`, bench/deploy/): it runs end to end on
 * a tiny setting and reports sane, complete output — every row, positive medians, p90 at
 * least the median, rates where they belong — and every process it started is gone
 * afterwards. Nothing here asserts speed.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { benchDeploy, HTTP_CREATE, HTTP_GET, ONE_RUN_ROWS, percentile, SPAWN_NODE, SPAWN_WEFT, type DeployRow } from '../bench/deploy/harness.ts';
import { summarizeProfiles } from '../bench/deploy/profile.ts';
import { benchCommand } from '../src/cli/bench.ts';
import { captureIO, openHandles, settledHandles } from './helpers/bench-io.ts';

let dir: string;

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'weft-bench-deploy-test-'));
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/**
 * Whether `pid` is still a child of this process (Linux: its parent in /proc/PID/stat; a
 * PID that exited may already belong to another machine user's process). Elsewhere: alive.
 */
function stillOurs(pid: number): boolean {
  if (process.platform === 'linux') {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      return ppid === process.pid;
    } catch {
      return false;
    }
  }
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}


const NAMES = (drainN: number, maxRuns: number): string[] => [
  HTTP_GET,
  HTTP_CREATE,
  SPAWN_NODE,
  SPAWN_WEFT,
  'claim, batches of 1 (1 agent)',
  'claim, batches of 10 (1 agent)',
  ...Object.values(ONE_RUN_ROWS),
  `drain ${drainN} runs, 1 agent × ${maxRuns} processes`,
  `drain ${drainN} runs, 2 agents × ${maxRuns} processes`,
];

function expectSane(rows: readonly DeployRow[], runs: number): void {
  for (const r of rows) {
    expect(Number.isFinite(r.median_ms) && r.median_ms > 0, `${r.name}: median ${r.median_ms}`).toBe(true);
    if (r.p90_ms !== null) expect(r.p90_ms, r.name).toBeGreaterThanOrEqual(r.median_ms);
    if (r.per_s !== null) expect(r.per_s, r.name).toBeGreaterThan(0);
    expect(r.run_medians_ms, r.name).toHaveLength(r.runs);
    expect(r.runs, r.name).toBe(runs);
  }
  const by = new Map(rows.map((r) => [r.name, r]));
  // Phases of one run are ordered: claimed, spawned, Running, Success, exited.
  const m = (k: keyof typeof ONE_RUN_ROWS): number => by.get(ONE_RUN_ROWS[k])!.median_ms;
  expect(m('submitted')).toBeLessThanOrEqual(m('spawned'));
  expect(m('spawned')).toBeLessThanOrEqual(m('running'));
  expect(m('running')).toBeLessThanOrEqual(m('success'));
  expect(m('success')).toBeLessThanOrEqual(m('exited'));
  for (const k of ['running', 'success', 'exited'] as const) {
    expect(by.get(ONE_RUN_ROWS[k])!.ratio_vs_spawn).toBeGreaterThan(0);
    expect(by.get(ONE_RUN_ROWS[k])!.spawn_floor_ms).toBeGreaterThan(0);
  }
  if (process.platform === 'linux') {
    // CPU of the processes started: a flow-run process and a tsx start-up cost tens of ms at least.
    expect(by.get(ONE_RUN_ROWS.success)!.child_cpu_ms).toBeGreaterThan(0);
    expect(by.get(SPAWN_WEFT)!.child_cpu_ms).toBeGreaterThan(0);
    for (const r of rows.filter((x) => x.group === 'drain')) expect(r.child_cpu_ms).toBeGreaterThan(0);
  }
  for (const r of rows.filter((x) => x.group === 'drain')) {
    expect(r.per_s).toBeGreaterThan(0);
    expect(r.extra?.to_last_exit_ms).toBeGreaterThanOrEqual(r.median_ms);
  }
}

describe('benchDeploy', () => {
  it('reports every row with positive medians, and stops every process it started', async () => {
    const before = openHandles();
    const lines: string[] = [];
    const res = await benchDeploy({
      runs: 1,
      drainN: 2,
      drainRuns: 1,
      agents: [1, 2],
      maxRuns: 2,
      pollMs: 20,
      httpN: 5,
      claimN: 5,
      claimBatches: [1, 10],
      log: (l) => lines.push(l),
    });
    expect(res.rows.map((r) => r.name)).toEqual(NAMES(2, 2));
    expectSane(res.rows, 1);
    // Spawn floors (2 × 2), one-run processes (2), drains (2 + 2).
    expect(res.pids.length).toBeGreaterThanOrEqual(10);
    for (const pid of res.pids) expect(stillOurs(pid), `process ${pid}`).toBe(false);
    expect(res.settings).toMatchObject({ db: 'sqlite', runs: 1, drain_n: 2, max_runs: 2, poll_ms: 20 });
    expect(lines.some((l) => l.includes('drain 1/1'))).toBe(true);
    expect(await settledHandles(before)).toBe(before);
  });

  it('rejects settings that are not positive integers', async () => {
    await expect(benchDeploy({ runs: 0, drainN: 1, drainRuns: 1, agents: [], maxRuns: 1, pollMs: 10, httpN: 1, claimN: 1, claimBatches: [] })).rejects.toThrow(/runs must be/);
  });
});

describe('weft bench --deploy', () => {
  it('prints the table and writes the JSON rows under "deploy", with a CPU profile summary', async () => {
    const io = captureIO(dir);
    const out = join(dir, 'deploy.json');
    const prof = join(dir, 'prof');
    const code = await benchCommand(['--deploy', '--quick', '--runs', '1', '--n', '2', '--poll-ms', '20', '--cpu-prof', prof, '--json', out], io);
    expect(code, io.errText()).toBe(0);
    const text = io.text();
    for (const name of NAMES(2, 2)) expect(text).toContain(name);
    expect(text).toContain('weft --version ms');
    expect(text).toMatch(/CPU profiles of the one-run flow-run processes/);
    const doc = JSON.parse(readFileSync(out, 'utf8')) as {
      deploy: DeployRow[];
      deploy_settings: { drain_n: number; runs: number };
      deploy_profile: { processes: number; buckets: { bucket: string; main_ms: number }[] };
      environment: { cpus: number };
    };
    expect(doc.deploy.map((r) => r.name)).toEqual(NAMES(2, 2));
    expectSane(doc.deploy, 1);
    expect(doc.deploy_settings).toMatchObject({ drain_n: 2, runs: 1 });
    // The warm-up and the timed run: two flow-run processes, two profiles each (main and loader threads).
    expect(doc.deploy_profile.processes).toBe(2);
    expect(doc.deploy_profile.buckets.reduce((s, b) => s + b.main_ms, 0)).toBeGreaterThan(0);
    expect(doc.environment.cpus).toBeGreaterThan(0);
  });

  it('usage errors: flags of other modes, and deploy flags elsewhere', async () => {
    const io = captureIO(dir);
    expect(await benchCommand(['--deploy', '--executor', 'pool'], io)).toBe(2);
    expect(await benchCommand(['--deploy', '--shape', 'tree'], io)).toBe(2);
    expect(await benchCommand(['--deploy', '--db', 'mysql://x'], io)).toBe(2);
    expect(await benchCommand(['--shape', 'tree', '--db', 'sqlite:x.db'], io)).toBe(2);
    expect(await benchCommand(['--shape', 'latency', '--poll-ms', '10'], io)).toBe(2);
    expect(await benchCommand(['--graph', 'all', '--deploy'], io)).toBe(2);
    expect(await benchCommand(['--shape', 'tree', '--quick'], io)).toBe(2);
    expect(io.errText()).toMatch(/--db applies to --deploy only/);
  });

  it('--help lists the mode', async () => {
    const io = captureIO(dir);
    expect(await benchCommand(['--help'], io)).toBe(0);
    expect(io.text()).toMatch(/--deploy \(or --shape deploy\)/);
  });
});

describe('helpers', () => {
  it('percentile: nearest rank', () => {
    expect(percentile([5, 1, 4, 2, 3], 0.9)).toBe(5);
    expect(percentile([5, 1, 4, 2, 3], 0.5)).toBe(3);
    expect(percentile([7], 0.9)).toBe(7);
    expect(() => percentile([], 0.5)).toThrow(RangeError);
  });

  it('summarizeProfiles: self time by bucket, per process, main and loader threads apart', () => {
    const pdir = join(dir, 'synthetic-prof');
    mkdirSync(pdir, { recursive: true });
    const nodes = [
      { id: 1, callFrame: { functionName: '(root)', url: '' } },
      { id: 2, callFrame: { functionName: 'transform', url: 'file:///x/node_modules/esbuild/lib/main.js' } },
      { id: 3, callFrame: { functionName: 'executeFlowRun', url: 'file:///x/src/deploy/flow-run.ts' } },
      { id: 4, callFrame: { functionName: '(idle)', url: '' } },
    ];
    const profile = (samples: number[], deltasUs: number[]): string => JSON.stringify({ nodes, startTime: 0, endTime: 1_000_000, samples, timeDeltas: deltasUs });
    writeFileSync(join(pdir, 'CPU.20260101.000000.111.0.001.cpuprofile'), profile([3, 3, 4], [1000, 1000, 2000]));
    writeFileSync(join(pdir, 'CPU.20260101.000000.111.1.002.cpuprofile'), profile([2, 2], [500, 500]));
    const s = summarizeProfiles(pdir);
    expect(s.processes).toBe(1);
    expect(s.profiles).toBe(2);
    const b = new Map(s.buckets.map((x) => [x.bucket, x]));
    expect(b.get('weft src/')?.main_ms).toBe(2);
    expect(b.get('(idle)')?.main_ms).toBe(2);
    expect(b.get('esbuild (tsx transforms)')?.loader_ms).toBe(1);
    expect(s.main_span_ms).toBe(1000);
    expect(s.top[0]?.fn).toMatch(/^executeFlowRun src\/deploy\/flow-run\.ts$/);
  });
});
