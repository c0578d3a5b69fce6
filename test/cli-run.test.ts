/**
 * End-to-end `weft run` against hand-written runnables (test/fixtures/cli-fake*.ts): the
 * CLI's loading, parameters, progress, summary, --json, exit codes and Ctrl-C, with no
 * runner behind them. `cli-examples.test.ts` runs real flows.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { killAll, lines, runWeft, startWeft } from './fixtures/cli-spawn.ts';

const FIX = 'test/fixtures';
let tmp: string;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'weft-cli-'));
});
afterEach(() => killAll());
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

describe('weft run: a flow that succeeds', () => {
  it('exits 0, prints progress on stderr and the summary table on stdout', async () => {
    const r = await runWeft(['run', `${FIX}/cli-fake-ok.ts`]);
    expect(r.code).toBe(0);
    const err = lines(r.stderr);
    expect(err[0]).toBe(`weft: running flow 'fake-ok' from ${FIX}/cli-fake-ok.ts (executor: local)`);
    // Not a TTY: plain lines, the last one the end line.
    expect(err.at(-1)).toMatch(/^progress: 7\/7 done · 0 running · 0 failed · [\d.]+ tasks\/s · /);
    expect(r.stderr).not.toContain('\r');
    const out = lines(r.stdout);
    expect(out).toContain('params={"n":3,"label":"x","opts":null}');
    const header = out.findIndex((l) => l.startsWith('TASK'));
    expect(out[header]).toMatch(/^TASK\s+RUNS\s+STATES\s+ATTEMPTS\s+TIME$/);
    // One row per node key: the four mapped children fold into one row; parameters get none.
    expect(out[header + 1]).toMatch(/^extract\s+1\s+Success\s+1\s+\d+ms$/);
    expect(out[header + 2]).toMatch(/^transform \[map\]\s+4\s+Success 4\s+8\s+\d+ms$/);
    expect(out[header + 3]).toMatch(/^load\s+1\s+Success\s+1\s+\d+ms$/);
    expect(out.some((l) => /^(n|label|opts)\s/.test(l))).toBe(false);
    expect(out.at(-1)).toMatch(/^flow fake-ok: Success in \d+(ms|\.\d\ds) \(7 task runs\)$/);
  });

  it('--quiet prints only the final line', async () => {
    const r = await runWeft(['run', `${FIX}/cli-fake-ok.ts`, '--quiet']);
    expect(r.code).toBe(0);
    expect(r.stderr).toBe('');
    expect(lines(r.stdout).filter((l) => !l.startsWith('params='))).toEqual([expect.stringMatching(/^flow fake-ok: Success in /)]);
  });

  it('--json writes {state, durationMs, runId, parameters, tasks[{key, mapIndex, state, attempts, startMs, endMs}]}', async () => {
    const out = join(tmp, 'nested', 'run.json');
    const r = await runWeft(['run', `${FIX}/cli-fake-ok.ts`, '--json', out, '-q']);
    expect(r.code).toBe(0);
    const doc = JSON.parse(await readFile(out, 'utf8')) as Record<string, unknown>;
    expect(Object.keys(doc).sort()).toEqual(['durationMs', 'parameters', 'runId', 'state', 'tasks']);
    expect(doc.state).toBe('Success');
    expect(typeof doc.durationMs).toBe('number');
    const tasks = doc.tasks as Record<string, unknown>[];
    expect(tasks).toHaveLength(7); // extract, transform (parent) + 4 children, load
    for (const t of tasks) {
      expect(Object.keys(t).sort()).toEqual(['attempts', 'endMs', 'key', 'mapIndex', 'startMs', 'state']);
      expect(typeof t.key).toBe('string');
      expect(Number.isInteger(t.mapIndex)).toBe(true);
      expect(typeof t.state).toBe('string');
      expect(typeof t.attempts).toBe('number');
      expect(typeof t.startMs).toBe('number');
      expect(typeof t.endMs).toBe('number');
    }
    expect(tasks.filter((t) => t.key === 'transform').map((t) => t.mapIndex)).toEqual([-1, 0, 1, 2, 3]);
  });

  it('with several flows in a file, --flow picks one by flow name or export name', async () => {
    const a = await runWeft(['run', `${FIX}/cli-two-flows.ts`, '--flow', 'second-flow', '-q']);
    expect(a.code).toBe(0);
    expect(a.stdout).toMatch(/^flow second-flow: Success .*\(2 task runs\)/m);
    const b = await runWeft(['run', `${FIX}/cli-two-flows.ts`, '--flow=first', '-q']);
    expect(b.code).toBe(0);
    expect(b.stdout).toMatch(/^flow first: Success/m);
  });
});

describe('weft run: parameters', () => {
  it('parses values as JSON when they parse, else as strings', async () => {
    const r = await runWeft([
      'run', `${FIX}/cli-fake-ok.ts`, '-q',
      '--param', 'n=42', '--param', 'label=hello world', '-p', 'opts={"deep":[1,true,null]}',
    ]);
    expect(r.code).toBe(0);
    expect(lines(r.stdout)[0]).toBe('params={"n":42,"label":"hello world","opts":{"deep":[1,true,null]}}');
  });

  it('keeps a value with "=" in it whole, and takes quoted JSON as a string', async () => {
    const r = await runWeft(['run', `${FIX}/cli-fake-ok.ts`, '-q', '--param', 'label=a=b', '--param', 'opts="7"']);
    expect(r.code).toBe(0);
    expect(lines(r.stdout)[0]).toBe('params={"n":3,"label":"a=b","opts":"7"}');
  });

  it('an unknown parameter name exits 2 with one line naming it and the known ones', async () => {
    const r = await runWeft(['run', `${FIX}/cli-fake-ok.ts`, '--param', 'nn=1']);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(lines(r.stderr)).toEqual(["weft run: unknown parameter 'nn' for flow 'fake-ok' (its parameters: n, label, opts)"]);
  });

  it('a value of the wrong declared type exits 2', async () => {
    const r = await runWeft(['run', `${FIX}/cli-fake-ok.ts`, '--param', 'n=many']);
    expect(r.code).toBe(2);
    expect(lines(r.stderr)).toEqual([`weft run: parameter 'n' of flow 'fake-ok' expects a number, got "many"`]);
  });

  it('a missing required parameter exits 2; giving it runs', async () => {
    const missing = await runWeft(['run', `${FIX}/cli-fake-required.ts`]);
    expect(missing.code).toBe(2);
    expect(lines(missing.stderr)).toEqual(["weft run: flow 'fake-required' needs parameter 'date': give it with --param date=VALUE"]);
    const given = await runWeft(['run', `${FIX}/cli-fake-required.ts`, '-q', '--param', 'date=2024-01-31']);
    expect(given.code).toBe(0);
    expect(lines(given.stdout)[0]).toBe('params={"date":"2024-01-31"}');
  });

  it('a --param without "=" exits 2 naming the flag', async () => {
    const r = await runWeft(['run', `${FIX}/cli-fake-ok.ts`, '--param', 'n']);
    expect(r.code).toBe(2);
    expect(lines(r.stderr)).toEqual(["weft run: --param expects NAME=VALUE, got 'n' (see 'weft help run')"]);
  });
});

describe('weft run: a flow that fails', () => {
  it('exits 1 and lists the failed runs with their first error line', async () => {
    const r = await runWeft(['run', `${FIX}/cli-fake-fail.ts`]);
    expect(r.code).toBe(1);
    const out = lines(r.stdout);
    expect(out.find((l) => l.startsWith('transform'))).toMatch(/^transform \[map\]\s+3\s+Success 2, Failed 1\s+3\s/);
    expect(out).toContain('  Failed transform[1]: Error: transform broke');
    expect(out).toContain('  TriggerFailed (1): load');
    expect(r.stdout).not.toContain('second line');
    expect(out.at(-1)).toMatch(/^flow fake-fail: Failed in .* \(6 task runs\) — /);
  });

  it('--json records the failed state', async () => {
    const out = join(tmp, 'fail.json');
    const r = await runWeft(['run', `${FIX}/cli-fake-fail.ts`, '--json', out, '-q']);
    expect(r.code).toBe(1);
    const doc = JSON.parse(await readFile(out, 'utf8')) as { state: string; tasks: { key: string; mapIndex: number; state: string }[] };
    expect(doc.state).toBe('Failed');
    expect(doc.tasks.find((t) => t.key === 'transform' && t.mapIndex === 1)?.state).toBe('Failed');
  });
});

describe('weft run: files that do not give a flow (exit 2, one line)', () => {
  const oneLine = (stderr: string): string => {
    const ls = lines(stderr);
    expect(ls).toHaveLength(1);
    return ls[0] as string;
  };

  it('a missing file', async () => {
    const r = await runWeft(['run', 'flows/does-not-exist.ts']);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(oneLine(r.stderr)).toBe('weft: cannot load flows/does-not-exist.ts: file not found');
  });

  it('a directory', async () => {
    const r = await runWeft(['run', FIX]);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toBe(`weft: cannot load ${FIX}: not a file`);
  });

  it('a TypeScript syntax error (in an ESM package)', async () => {
    const dir = join(tmp, 'esm-pkg');
    await import('node:fs/promises').then((fs) => fs.mkdir(dir, { recursive: true }));
    await writeFile(join(dir, 'package.json'), '{ "type": "module" }\n');
    const file = join(dir, 'broken.ts');
    await writeFile(file, "export const ok = 1;\nconst bad: number = ;\nexport default { name: 'x' };\n");
    const r = await runWeft(['run', file]);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(oneLine(r.stderr)).toBe(`weft: cannot load ${file}: syntax error at line 2:20: Unexpected ";"`);
  });

  it('a syntax error in a file outside an ESM package', async () => {
    const file = join(tmp, 'broken-cjs.ts');
    await writeFile(file, 'export const x = (;\n');
    const r = await runWeft(['run', file]);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(new RegExp(`^weft: cannot load ${file.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}: `));
  });

  it('a JavaScript syntax error', async () => {
    const file = join(tmp, 'broken.mjs');
    await writeFile(file, 'export default {{;\n');
    const r = await runWeft(['run', file]);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/^weft: cannot load .*broken\.mjs: SyntaxError: /);
  });

  it('a module that throws while loading: first line of the error only', async () => {
    const r = await runWeft(['run', `${FIX}/cli-throws.ts`]);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toBe(`weft: cannot load ${FIX}/cli-throws.ts: config missing: WEFT_TEST_SETTING`);
  });

  it('a module with no flow among its exports', async () => {
    const r = await runWeft(['run', `${FIX}/cli-no-flow.ts`]);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(new RegExp(`^weft: cannot load ${FIX}/cli-no-flow\\.ts: it exports no flow`));
  });

  it('several flows and no --flow', async () => {
    const r = await runWeft(['run', `${FIX}/cli-two-flows.ts`]);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toBe(
      `weft: cannot load ${FIX}/cli-two-flows.ts: it exports several flows (first, second ('second-flow')); choose one with --flow NAME`,
    );
  });

  it('--flow naming no flow', async () => {
    const r = await runWeft(['run', `${FIX}/cli-two-flows.ts`, '--flow', 'third']);
    expect(r.code).toBe(2);
    expect(oneLine(r.stderr)).toMatch(/no flow named 'third' \(found: first, second \('second-flow'\)\)$/);
  });
});

describe('weft run: progress when not a TTY', () => {
  it('prints at most one line per second, plus the start and end lines', async () => {
    const started = Date.now();
    const r = await runWeft(['run', `${FIX}/cli-fake-slow.ts`, '--flow', 'steady']);
    const seconds = (Date.now() - started) / 1000;
    expect(r.code).toBe(0);
    const err = lines(r.stderr);
    expect(err[0]).toMatch(/^weft: running flow 'fake-steady'/);
    const progress = err.filter((l) => l.startsWith('progress: '));
    expect(progress.at(-1)).toMatch(/^progress: 51\/51 done · 0 running · 0 failed · /);
    // ~2.5 s of run: two timed lines at most per elapsed second, plus the end line.
    expect(progress.length).toBeGreaterThanOrEqual(2);
    expect(progress.length).toBeLessThanOrEqual(Math.ceil(seconds) + 1);
  });
});

describe('weft run: Ctrl-C', () => {
  it('the first SIGINT cancels the run through its signal: the flow ends Cancelled, exit 1', async () => {
    const w = startWeft(['run', `${FIX}/cli-fake-slow.ts`, '--flow', 'slow']);
    await w.waitFor("running flow 'fake-slow'");
    w.child.kill('SIGINT');
    const r = await w.done;
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('weft: interrupted: cancelling the run (Ctrl-C again to exit now)');
    expect(lines(r.stdout).at(-1)).toMatch(/^flow fake-slow: Cancelled in /);
  });

  it('a second SIGINT exits at once (130) even when the run ignores the signal', async () => {
    const w = startWeft(['run', `${FIX}/cli-fake-slow.ts`, '--flow', 'stubborn']);
    await w.waitFor("running flow 'fake-stubborn'");
    w.child.kill('SIGINT');
    await w.waitFor('cancelling the run');
    w.child.kill('SIGINT');
    const r = await w.done;
    expect(r.code).toBe(130);
    expect(lines(r.stderr).at(-1)).toBe('weft: interrupted twice: exiting now');
  });
});
