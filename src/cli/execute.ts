/** `weft execute` (placeholder while it is being written). */
import type { CliIO } from './main.ts';

export async function executeCommand(_args: readonly string[], io: CliIO): Promise<number> {
  io.stderr.write('weft execute: not available yet\n');
  return 2;
}
