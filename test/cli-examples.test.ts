/**
 * End-to-end `weft run` with weft's real flow API, runner and executors: the examples
 * the README points at, and real flows that fail, take parameters, or are cancelled.
 */
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { killAll, lines, runWeft, startWeft } from './fixtures/cli-spawn.ts';

interface RunJson {
  state: string;
  durationMs: number;
  tasks: { key: string; mapIndex: number; state: string; attempts: number; startMs: number; endMs: number }[];
}

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'weft-examples-'));
});
afterEach(() => killAll());
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const readJson = async (file: string): Promise<RunJson> => JSON.parse(await readFile(file, 'utf8')) as RunJson;
const row = (stdout: string, key: string): string | undefined => lines(stdout).find((l) => l.startsWith(`${key} `));
const runsOf = (doc: RunJson, key: string) => doc.tasks.filter((t) => t.key === key);

describe('examples/etl.ts (npm start)', () => {
  it('runs in a couple of seconds: progress, summary, result, exit 0', async () => {
    const out = join(tmp, 'etl');
    const json = join(tmp, 'etl.json');
    const started = Date.now();
    const r = await runWeft(['run', 'examples/etl.ts', '--param', `outDir=${out}`, '--json', json]);
    expect(r.stderr).toMatch(/^weft: running flow 'etl' from examples\/etl\.ts/);
    expect(r.code).toBe(0);
    expect(Date.now() - started).toBeLessThan(10_000);
    expect(lines(r.stderr).at(-1)).toMatch(/^progress: (\d+)\/\1 done · 0 running · 0 failed/);
    expect(row(r.stdout, 'extract')).toMatch(/^extract\s+1\s+Success\s+1\s/);
    // The flaky step: two failed attempts, then success.
    expect(row(r.stdout, 'rates')).toMatch(/^rates\s+1\s+Success\s+3\s/);
    expect(row(r.stdout, 'transform')).toMatch(/^transform \[map\]\s+20\s+Success 20\s+20\s/);
    expect(row(r.stdout, 'load')).toMatch(/^load\s+1\s+Success\s+1\s/);
    expect(r.stdout).toMatch(/^ {2}loaded: \{"file":".*report\.json","orders":\d+,"totalEur":[\d.]+\}$/m);
    expect(lines(r.stdout).at(-1)).toMatch(/^flow etl: Success in /);

    const report = JSON.parse(await readFile(join(out, 'report.json'), 'utf8')) as { orders: number; rejected: number };
    expect(report.orders + report.rejected).toBe(20_000);
    const doc = await readJson(json);
    expect(doc.state).toBe('Success');
    expect(runsOf(doc, 'transform').filter((t) => t.mapIndex >= 0)).toHaveLength(20);
  });

  it('takes parameters and runs on the thread pool', async () => {
    const json = join(tmp, 'etl-pool.json');
    const r = await runWeft([
      'run', 'examples/etl.ts', '--executor', 'pool', '--threads', '2',
      '--param', 'orders=5000', '--param', 'chunkSize=500', '--param', `outDir=${join(tmp, 'etl-pool')}`, '--json', json,
    ]);
    expect(r.stderr).toContain('(executor: pool, 2 threads)');
    expect(r.code).toBe(0);
    expect(row(r.stdout, 'transform')).toMatch(/^transform \[map\]\s+10\s+Success 10\s/);
    expect((await readJson(json)).state).toBe('Success');
  });

  it('an unknown parameter exits 2 before running', async () => {
    const r = await runWeft(['run', 'examples/etl.ts', '--param', 'order=5']);
    expect(r.code).toBe(2);
    expect(lines(r.stderr)).toEqual(["weft run: unknown parameter 'order' for flow 'etl' (its parameters: orders, chunkSize, outDir)"]);
  });
});

describe('examples/squares.ts (the README example)', () => {
  it('maps, skips the unlucky child and sums the rest, on threads too', async () => {
    for (const extra of [[], ['--threads', '2']]) {
      const json = join(tmp, `squares${extra.length}.json`);
      const r = await runWeft(['run', 'examples/squares.ts', '--param', 'n=20', '--param', 'k=2', '--json', json, ...extra]);
      expect(r.code).toBe(0);
      // 2 * (sum of x^2 for x in 0..19) - 2 * 13^2
      expect(r.stdout).toMatch(/^ {2}total: 4602$/m);
      const doc = await readJson(json);
      const children = runsOf(doc, 'square').filter((t) => t.mapIndex >= 0);
      expect(children).toHaveLength(20);
      expect(children.find((t) => t.mapIndex === 13)?.state).toBe('Skipped');
      expect(children.filter((t) => t.state === 'Success')).toHaveLength(19);
    }
  });
});

describe('examples/mapping.ts', () => {
  it('maps, flattens and reduces', async () => {
    const json = join(tmp, 'mapping.json');
    const r = await runWeft(['run', 'examples/mapping.ts', '--param', 'docs=10', '--json', json]);
    expect(r.code).toBe(0);
    const doc = await readJson(json);
    expect(runsOf(doc, 'tokenize').filter((t) => t.mapIndex >= 0)).toHaveLength(10);
    // 120 words per document in batches of 50: 3 batches each.
    expect(runsOf(doc, 'normalize').filter((t) => t.mapIndex >= 0)).toHaveLength(30);
    expect(r.stdout).toMatch(/^ {2}top: \[\["[a-z]+",\d+\],\["[a-z]+",\d+\],\["[a-z]+",\d+\]\]$/m);
  });
});

describe('examples/retries.ts', () => {
  it('retries the flaky step, fails one table, alerts, cleans up; the reference tasks say Success', async () => {
    const json = join(tmp, 'retries.json');
    const r = await runWeft(['run', 'examples/retries.ts', '--json', json]);
    expect(r.code).toBe(0);
    const doc = await readJson(json);
    expect(doc.state).toBe('Success');
    expect(runsOf(doc, 'connect')[0]).toMatchObject({ state: 'Success', attempts: 3 });
    const children = runsOf(doc, 'sync').filter((t) => t.mapIndex >= 0);
    expect(children.map((t) => t.state)).toEqual(['Success', 'Success', 'Success', 'Failed', 'Success']);
    expect(runsOf(doc, 'alert')[0]?.state).toBe('Success');
    expect(runsOf(doc, 'disconnect')[0]?.state).toBe('Success');
    expect(r.stdout).toContain('  Failed sync[3]: FailSignal: audit_log: permission denied on db://replica-1');
    expect(r.stdout).toMatch(/^ {2}summary: \{"synced":4,"rows":\d+\}$/m);
  });
});

describe('examples/conditionals.ts', () => {
  const states = async (args: string[]): Promise<Record<string, string>> => {
    const json = join(tmp, `cond-${args.join('-').replace(/[^a-z]/gi, '')}.json`);
    const r = await runWeft(['run', 'examples/conditionals.ts', ...args, '--json', json, '-q']);
    expect(r.code).toBe(0);
    return Object.fromEntries((await readJson(json)).tasks.map((t) => [t.key, t.state]));
  };

  it('incremental by default', async () => {
    const s = await states([]);
    expect(s).toMatchObject({ incrementalLoad: 'Success', fullReload: 'Skipped', publish: 'Success', notify: 'Success' });
  });

  it('--param mode=full takes the other branch', async () => {
    const s = await states(['--param', 'mode=full']);
    expect(s).toMatchObject({ incrementalLoad: 'Skipped', fullReload: 'Success', publish: 'Success' });
  });

  it('--param dryRun=true skips publishing (and what follows)', async () => {
    const s = await states(['--param', 'dryRun=true']);
    expect(s).toMatchObject({ incrementalLoad: 'Success', publish: 'Skipped', notify: 'Skipped' });
  });
});

describe('real flows', () => {
  it('a failing flow exits 1 and shows the failed run', async () => {
    const r = await runWeft(['run', 'test/fixtures/cli-real-fail.ts']);
    expect(r.code).toBe(1);
    expect(row(r.stdout, 'check')).toMatch(/^check \[map\]\s+4\s+Success 3, Failed 1\s/);
    expect(r.stdout).toContain('  Failed check[2]: RangeError: value 2 is out of range');
    expect(r.stdout).not.toContain('second line');
    expect(lines(r.stdout).at(-1)).toMatch(/^flow real-fail: Failed in /);
  });

  it('--param values reach the run as JSON or strings', async () => {
    const r = await runWeft([
      'run', 'test/fixtures/cli-real-params.ts',
      '--param', 'n=7', '--param', 'label=night run', '--param', 'tags=["a","b"]', '--param', 'opts={"x":true}',
    ]);
    expect(r.code).toBe(0);
    expect(r.stdout).toContain('  echo: {"n":7,"label":"night run","tags":["a","b"],"opts":{"x":true}}');
  });

  it('a parameter of the wrong type exits 2', async () => {
    const r = await runWeft(['run', 'test/fixtures/cli-real-params.ts', '--param', 'tags=a,b']);
    expect(r.code).toBe(2);
    expect(lines(r.stderr)).toEqual([`weft run: parameter 'tags' of flow 'real-params' expects an array, got "a,b"`]);
  });

  it('Ctrl-C cancels the run: state Cancelled, exit 1, well before the tasks would end', async () => {
    const started = Date.now();
    const w = startWeft(['run', 'test/fixtures/cli-real-slow.ts']);
    await w.waitFor("running flow 'real-slow'");
    await new Promise((r) => setTimeout(r, 300));
    w.child.kill('SIGINT');
    const r = await w.done;
    expect(r.code).toBe(1);
    expect(lines(r.stdout).at(-1)).toMatch(/^flow real-slow: Cancelled in /);
    expect(Date.now() - started).toBeLessThan(8_000);
  });
});
