/**
 * Worker processes for cluster tests: `weft worker` children started, signalled and
 * stopped by PID, and polling helpers.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const BIN = fileURLToPath(new URL('../../bin/weft.js', import.meta.url));

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

export interface Spawned {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly exited: Promise<void>;
  output: string;
}

/** `weft worker <address> [args]` as a child process (stdout and stderr collected in `output`). */
export function spawnWorker(address: string, name: string, args: readonly string[] = [], env: Record<string, string> = {}): Spawned {
  const child = spawn(process.execPath, [BIN, 'worker', address, '--name', name, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NO_COLOR: '1', ...env },
  });
  const w: Spawned = { child, pid: child.pid!, exited: new Promise<void>((r) => child.once('exit', () => r())), output: '' };
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (w.output += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (w.output += d));
  return w;
}

/** SIGCONT (in case it was stopped), SIGTERM by PID, SIGKILL after `graceMs`; resolves once it has exited. */
export async function stopProcess(p: Spawned, graceMs = 5_000): Promise<void> {
  if (p.child.exitCode !== null || p.child.signalCode !== null) return;
  try {
    process.kill(p.pid, 'SIGCONT');
    process.kill(p.pid, 'SIGTERM');
  } catch {
    return;
  }
  const t = setTimeout(() => alive(p.pid) && process.kill(p.pid, 'SIGKILL'), graceMs);
  await p.exited;
  clearTimeout(t);
}

export async function waitFor(what: string, check: () => Promise<boolean> | boolean, timeoutMs = 20_000, everyMs = 20): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(everyMs);
  }
}
