/** `weft register`, `weft flows`, `weft runs` (placeholder while it is being written). */
import type { CliIO } from './main.ts';

export async function deployCommand(command: string, _args: readonly string[], io: CliIO): Promise<number> {
  io.stderr.write(`weft ${command}: not available yet\n`);
  return 2;
}
