/** A `BenchIO` that captures what `weft bench` prints, for tests that call `benchCommand` in-process. */
import type { BenchIO } from '../../src/cli/bench.ts';

export function captureIO(cwd: string): BenchIO & { text: () => string; errText: () => string } {
  let out = '';
  let err = '';
  return {
    stdout: { write: (s: string) => (out += s) },
    stderr: { write: (s: string) => (err += s) },
    cwd,
    text: () => out,
    errText: () => err,
  };
}

/** Sockets, servers and child processes this test process holds. */
export function openHandles(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'TCPSocketWrap' || r === 'TCPServerWrap' || r === 'ProcessWrap').length;
}

/** Handles close on their next turns: give them a few. */
export async function settledHandles(before: number): Promise<number> {
  let n = openHandles();
  for (let i = 0; i < 50 && n > before; i++) {
    await new Promise((r) => setTimeout(r, 20));
    n = openHandles();
  }
  return n;
}
