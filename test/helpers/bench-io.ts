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
