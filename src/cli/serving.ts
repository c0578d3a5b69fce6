/**
 * What the commands that serve until a signal share (`weft server`, `weft scheduler`):
 * the listening flags, their number checks, and the wait for SIGINT/SIGTERM.
 */
import { parseArgs, UsageError, type FlagSpec, type FlagValue } from './args.ts';

/**
 * The command's flags; null when `--help` was given (the usage is written to `stdout`).
 * A positional argument is a UsageError: these commands take none.
 */
export function parseServingArgs(
  argv: readonly string[],
  specs: readonly FlagSpec[],
  usage: string,
  stdout: { write(s: string): unknown },
): Readonly<Record<string, FlagValue>> | null {
  const { flags, positionals } = parseArgs(argv, specs);
  if (flags.help === true) {
    stdout.write(`${usage}\n`);
    return null;
  }
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[0])}`);
  return flags;
}

/** `--host`, `--port` and `--token-file`, with the command's own words for the port and the token. */
export function listenFlags(o: { readonly port: string; readonly token: string }): FlagSpec[] {
  return [
    { name: 'host', kind: 'string', value: 'HOST', help: 'address to listen on (default 127.0.0.1)' },
    { name: 'port', kind: 'string', value: 'PORT', help: o.port },
    { name: 'token-file', kind: 'string', value: 'FILE', help: o.token },
  ];
}

/** A numeric flag's value (undefined when absent); a UsageError naming the flag when it is not a number >= `min`. */
export function numberFlag(v: unknown, flag: string, min: number, integer = true): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
    throw new UsageError(`--${flag} must be ${integer ? 'an integer' : 'a number'} >= ${min}, got ${JSON.stringify(v)}`);
  }
  return n;
}

/** `--port`: an integer 0..65535, `fallback` when absent. */
export function portFlag(v: unknown, fallback: number): number {
  const port = numberFlag(v, 'port', 0) ?? fallback;
  if (port > 65535) throw new UsageError(`--port must be at most 65535, got ${port}`);
  return port;
}

/** Resolves at the first SIGINT or SIGTERM (then no longer listening for them). */
export function untilSignal(): Promise<NodeJS.Signals> {
  return new Promise((resolve) => {
    const stop = (signal: NodeJS.Signals): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve(signal);
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
}
