/** `weft` with no run: help, version, unknown commands and flags (spawned). */
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { killAll, lines, runWeft } from './fixtures/cli-spawn.ts';

const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string };

afterEach(() => killAll());

describe('weft', () => {
  it('--version prints the package version', async () => {
    for (const flag of ['--version', '-v']) {
      const r = await runWeft([flag]);
      expect(r.code).toBe(0);
      expect(r.stdout).toBe(`weft ${pkg.version}\n`);
      expect(r.stderr).toBe('');
    }
  });

  it('--help prints the usage on stdout, exit 0', async () => {
    const r = await runWeft(['--help']);
    expect(r.code).toBe(0);
    expect(r.stdout).toMatch(/^weft — /);
    expect(r.stdout).toContain('weft run <flow file> [options]');
    expect(r.stdout).toContain('weft bench');
    expect(r.stderr).toBe('');
  });

  it('help run lists every run flag', async () => {
    const r = await runWeft(['help', 'run']);
    expect(r.code).toBe(0);
    for (const flag of ['--param NAME=VALUE', '--executor local|pool', '--threads N', '--json OUT', '--flow NAME', '--quiet', '--help']) {
      expect(r.stdout).toContain(flag);
    }
    const same = await runWeft(['run', '--help']);
    expect(same.code).toBe(0);
    expect(same.stdout).toBe(r.stdout);
  });

  it('no command: usage on stderr, exit 2', async () => {
    const r = await runWeft([]);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe('');
    expect(r.stderr).toContain('Usage:');
  });

  it('an unknown command: exit 2, names it, then the usage', async () => {
    const r = await runWeft(['deploy', 'x']);
    expect(r.code).toBe(2);
    expect(lines(r.stderr)[0]).toBe("weft: unknown command 'deploy'");
    expect(r.stderr).toContain('Usage:');
  });

  it('an unknown top-level flag: exit 2, names it', async () => {
    const r = await runWeft(['--verbose']);
    expect(r.code).toBe(2);
    expect(lines(r.stderr)[0]).toBe('weft: unknown flag --verbose');
  });

  it('help for an unknown command: exit 2', async () => {
    const r = await runWeft(['help', 'deploy']);
    expect(r.code).toBe(2);
    expect(lines(r.stderr)[0]).toBe("weft: no help for unknown command 'deploy'");
  });

  it('bench is dispatched to the bench command (its help, its flag errors)', async () => {
    const help = await runWeft(['help', 'bench']);
    expect(help.code).toBe(0);
    expect(help.stdout).toContain('weft bench');
    const bad = await runWeft(['bench', '--bogus']);
    expect(bad.code).toBe(2);
    expect(bad.stderr).toContain('--bogus');
  });

  describe('weft run: bad flags name the flag, exit 2, one line', () => {
    const cases: [string[], string][] = [
      [['run', 'f.ts', '--bogus'], 'unknown flag --bogus'],
      [['run', 'f.ts', '-x'], 'unknown flag -x'],
      [['run', 'f.ts', '--threads'], '--threads needs a value (N)'],
      [['run', 'f.ts', '--threads', 'four'], "--threads must be a positive integer, got 'four'"],
      [['run', 'f.ts', '--threads=0'], "--threads must be a positive integer, got '0'"],
      [['run', 'f.ts', '--executor', 'gpu'], "--executor must be one of local, pool, cluster, got 'gpu'"],
      [['run', 'f.ts', '--executor', 'local', '--threads', '2'], '--threads applies to --executor pool or cluster only'],
      [['run', 'f.ts', '--executor', 'pool', '--workers', '2'], '--workers applies to --executor cluster only'],
      [['run', 'f.ts', '--address', 'ws://127.0.0.1:1', '--workers', '2'], '--workers sizes a temporary cluster; a cluster at --address has its own workers'],
      [['run', 'f.ts', '--address', 'localhost:8786'], "--address must be ws://HOST:PORT or wss://HOST:PORT, got 'localhost:8786'"],
      [['run', 'f.ts', '--json'], '--json needs a value (OUT)'],
      [['run', 'f.ts', '--json', '--quiet'], '--json needs a value (OUT)'],
      [['run', 'f.ts', '--quiet=yes'], '--quiet takes no value'],
      [['run', 'f.ts', '--flow', 'a', '--flow', 'b'], '--flow given twice'],
      [['run'], 'missing the flow file'],
      [['run', 'a.ts', 'b.ts'], "expected one flow file, also got 'b.ts'"],
    ];
    for (const [args, message] of cases) {
      it(args.join(' '), async () => {
        const r = await runWeft(args);
        expect(r.code).toBe(2);
        expect(r.stdout).toBe('');
        expect(lines(r.stderr)).toEqual([`weft run: ${message} (see 'weft help run')`]);
      });
    }
  });
});
