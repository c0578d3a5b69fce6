/**
 * `weft run --restart RUN.json`: a failed run restarted from its --json file loads the
 * checkpointed results of the tasks that succeeded instead of running them again.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { parseRestart } from '../src/cli/main.ts';
import { killAll, ROOT, runWeft } from './fixtures/cli-spawn.ts';

let tmp: string;
beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'weft-restart-'));
});
afterEach(() => killAll());
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const FLOW = join(ROOT, 'test/fixtures/cli-real-restart.ts');

describe('weft run --restart', () => {
  it('reruns only what failed, loading checkpointed results for the rest', async () => {
    const counter = join(tmp, 'runs.txt');
    const gate = join(tmp, 'gate');
    const first = join(tmp, 'first.json');
    const params = ['--param', `counter=${counter}`, '--param', `gate=${gate}`];
    const r1 = await runWeft(['run', FLOW, ...params, '--json', first, '-q'], { cwd: tmp });
    expect(r1.code).toBe(1);
    const doc = JSON.parse(await readFile(first, 'utf8')) as { runId: string; tasks: { key: string; state: string }[] };
    expect(doc.tasks.find((t) => t.key === 'produce')?.state).toBe('Success');
    expect(doc.tasks.find((t) => t.key === 'consume')?.state).toBe('Failed');
    expect(await readFile(counter, 'utf8')).toBe('x');
    // The checkpoint sits at the templated location under the default result dir.
    expect(JSON.parse(await readFile(join(tmp, '.weft/results/restartable/produce/all.json'), 'utf8'))).toEqual([0, 10, 20, 30]);

    await writeFile(gate, 'open');
    const second = join(tmp, 'second.json');
    const r2 = await runWeft(['run', FLOW, '--restart', first, '--json', second, '-q'], { cwd: tmp });
    expect(r2.stderr).toBe('');
    expect(r2.code).toBe(0);
    const doc2 = JSON.parse(await readFile(second, 'utf8')) as { tasks: { key: string; state: string }[] };
    expect(doc2.tasks.find((t) => t.key === 'produce')?.state).toBe('Cached');
    expect(doc2.tasks.find((t) => t.key === 'consume')?.state).toBe('Success');
    expect(await readFile(counter, 'utf8')).toBe('x'); // produce did not run again
  });

  it('rejects a restart file that is not a run record, naming the problem', async () => {
    const bad = join(tmp, 'bad.json');
    await writeFile(bad, JSON.stringify({ state: 'Failed' }));
    const r = await runWeft(['run', FLOW, '--restart', bad], { cwd: tmp });
    expect(r.code).toBe(2);
    expect(r.stderr.trim()).toBe(`weft: cannot restart from ${bad}: no "tasks" array (is it a weft run --json file?)`);
    expect(() => parseRestart('{"tasks":[{"key":"a"}]}')).toThrow('tasks[0] needs key (string), mapIndex (integer) and state (string)');
  });
});
