/** `weft server` (placeholder while it is being written). */
import type { CliIO } from './main.ts';

export async function serverCommand(_args: readonly string[], io: CliIO): Promise<number> {
  io.stderr.write('weft server: not available yet\n');
  return 2;
}
