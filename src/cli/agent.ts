/** `weft agent` (placeholder while it is being written). */
import type { CliIO } from './main.ts';

export async function agentCommand(_args: readonly string[], io: CliIO): Promise<number> {
  io.stderr.write('weft agent: not available yet\n');
  return 2;
}
