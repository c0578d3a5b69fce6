/**
 * `weft server` as a command: usage errors, and the real process (SQLite and
 * PostgreSQL) printing its URL, requiring its token, keeping its data across a
 * restart, listing silent agents unhealthy after --agent-timeout, two processes on one
 * PostgreSQL database feeding each other's changes, and stopping cleanly on SIGTERM and SIGINT. Every process is stopped by PID.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmod, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { main, type CliIO } from '../src/cli/main.ts';
import { BackendClient } from '../src/server/client.ts';
import type { ServerEvent } from '../src/server/model.ts';
import { startPostgres, type TestPostgres } from './helpers/postgres.ts';

const BIN = fileURLToPath(new URL('../bin/weft.js', import.meta.url));
const TOKEN = 'cli-token-5b1e';

function fakeIO(cwd: string): CliIO & { out: string; err: string } {
  const io = {
    out: '',
    err: '',
    cwd,
    stdout: { write: (s: string) => (io.out += s) },
    stderr: { write: (s: string) => (io.err += s) },
  };
  return io;
}

interface ServerProc {
  readonly child: ChildProcess;
  readonly url: string;
  readonly exited: Promise<number | null>;
  output(): string;
}

const procs: ServerProc[] = [];

/** `weft server ARGS` until it prints its URL. */
async function spawnServer(args: readonly string[], cwd: string): Promise<ServerProc> {
  const child = spawn(process.execPath, [BIN, 'server', ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, NO_COLOR: '1' } });
  let out = '';
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (out += d));
  const url = await new Promise<string>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`weft server did not start:\n${out}`)), 20_000);
    const check = (): void => {
      const m = /weft server listening on (http:\/\/\S+)/.exec(out);
      if (m !== null) {
        clearTimeout(t);
        resolve(m[1] as string);
      }
    };
    child.stdout!.on('data', check);
    void exited.then(() => {
      clearTimeout(t);
      reject(new Error(`weft server exited:\n${out}`));
    });
  });
  const p: ServerProc = { child, url, exited, output: () => out };
  procs.push(p);
  return p;
}

async function stop(p: ServerProc, signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
  if (p.child.exitCode === null && p.child.signalCode === null) process.kill(p.child.pid!, signal);
  const t = setTimeout(() => p.child.exitCode === null && process.kill(p.child.pid!, 'SIGKILL'), 10_000);
  const code = await p.exited;
  clearTimeout(t);
  return code;
}

const flowInput = {
  project: 'cli',
  name: 'f',
  graph: { nodes: [] },
  storage: { kind: 'module' as const, specifier: './f.ts', flow: 'f' },
  runConfig: { kind: 'universal' as const },
  executor: { kind: 'local' as const },
  parameters: [],
  labels: [],
};

describe('weft server', () => {
  let tmp: string;
  let tokenFile: string;

  beforeAll(async () => {
    tmp = await mkdtemp(join(tmpdir(), 'weft-server-cli-'));
    tokenFile = join(tmp, 'token');
    await writeFile(tokenFile, `${TOKEN}\n`);
    await chmod(tokenFile, 0o600);
  });
  afterEach(async () => {
    await Promise.all(procs.splice(0).map((p) => stop(p)));
  });
  afterAll(async () => {
    await rm(tmp, { recursive: true, force: true });
  });

  it('--help, and usage errors exit 2 naming the flag', async () => {
    const help = fakeIO(tmp);
    expect(await main(['server', '--help'], help)).toBe(0);
    expect(help.out).toMatch(/^Usage: weft server \[options\]/);
    expect(help.out).toMatch(/--zombie-timeout S/);
    expect(help.out).toMatch(/--agent-timeout S +an agent that has not polled for S seconds is listed unhealthy/);
    for (const [args, msg] of [
      [['--port', 'abc'], /--port must be an integer >= 0, got "abc"/],
      [['--port', '70000'], /--port must be at most 65535/],
      [['--db', 'mysql://x'], /--db must be sqlite:PATH or postgres:\/\/…, got 'mysql:\/\/x'/],
      [['--max-restarts', '-1'], /--max-restarts must be an integer >= 0/],
      [['--zombie-timeout', '0'], /--zombie-timeout must be a number >= 1/],
      [['--agent-timeout', 'soon'], /--agent-timeout must be a number >= 1, got "soon"/],
      [['--bogus'], /unknown flag --bogus/],
      [['extra'], /unexpected argument "extra"/],
    ] as const) {
      const io = fakeIO(tmp);
      expect(await main(['server', ...args], io)).toBe(2);
      expect(io.err).toMatch(msg);
    }
    const insecure = join(tmp, 'open-token');
    await writeFile(insecure, 'x');
    await chmod(insecure, 0o644);
    const io = fakeIO(tmp);
    expect(await main(['server', '--token-file', insecure], io)).toBe(2);
    expect(io.err).toMatch(/readable by every user/);
  });

  it('serves SQLite (relative path from its cwd), requires its token, keeps data across restarts, stops on SIGTERM and SIGINT', async () => {
    const args = ['--db', 'sqlite:data/server.db', '--port', '0', '--token-file', tokenFile, '--zombie-timeout', '30', '--max-restarts', '0', '--agent-timeout', '1'];
    const first = await spawnServer(args, tmp);
    expect(first.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    expect(first.output()).toMatch(new RegExp(`\\(db: sqlite:${tmp.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/data/server\\.db, token required\\)`));
    expect((await fetch(`${first.url}/api/health`)).status).toBe(200);
    expect((await fetch(`${first.url}/api/flows`)).status).toBe(401);
    const c = new BackendClient(first.url, { token: TOKEN });
    const { flow } = await c.registerFlow(flowInput);
    // --agent-timeout 1: an agent silent for longer is listed unhealthy.
    expect(await c.registerAgent({ name: 'cli-agent', kind: 'local', labels: [] })).toMatchObject({ status: 'healthy' });
    await new Promise((r) => setTimeout(r, 1_500));
    expect(await c.listAgents()).toMatchObject([{ name: 'cli-agent', status: 'unhealthy' }]);
    expect(await stop(first)).toBe(0);
    expect(first.output()).toMatch(/\[weft server\] refused GET \/api\/flows from 127\.0\.0\.1: no token/);

    const second = await spawnServer(args, tmp);
    const c2 = new BackendClient(second.url, { token: TOKEN });
    expect((await c2.getFlow(flow.id)).name).toBe('f');
    expect(await stop(second, 'SIGINT')).toBe(0);
  });

  describe('on PostgreSQL', () => {
    let pg: TestPostgres;
    beforeAll(async () => {
      pg = await startPostgres();
    });
    afterAll(async () => {
      await pg?.stop();
    });

    it("two server processes share one database, and each one's feed carries the other's changes", async () => {
      const [a, b] = await Promise.all([spawnServer(['--db', pg.url, '--port', '0'], tmp), spawnServer(['--db', pg.url, '--port', '0'], tmp)]);
      expect(a.output()).toMatch(/\(db: postgres:\/\/\S+@127\.0\.0\.1:\d+\/weft_test\)/);
      const events: ServerEvent[] = [];
      const unsubscribe = await new BackendClient(b!.url).subscribe((e) => events.push(e));
      const { flow } = await new BackendClient(a!.url).registerFlow(flowInput);
      expect((await new BackendClient(b!.url).getFlow(flow.id)).id).toBe(flow.id);
      const run = await new BackendClient(a!.url).createFlowRun({ flowId: flow.id });
      const deadline = Date.now() + 15_000;
      while (!events.some((e) => e.type === 'flowRun' && e.run.id === run.id) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 25));
      unsubscribe();
      expect(events).toEqual([
        { type: 'flow', flow },
        { type: 'flowRun', run },
      ]);
      expect(await stop(a!)).toBe(0);
      expect(await stop(b!)).toBe(0);
    });
  });
});
