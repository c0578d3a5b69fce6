/**
 * `weft server`: run the backend server until SIGINT/SIGTERM.
 *
 * Its first stdout line is `weft server listening on http://HOST:PORT (db: …)` (scripts
 * and tests read the URL from it); the server's log lines go to stderr.
 */
import { readTokenFile } from '../cluster/auth.ts';
import { formatFlags, parseArgs, UsageError, type FlagSpec } from './args.ts';
import type { CliIO } from './main.ts';

export const SERVER_FLAGS: readonly FlagSpec[] = [
  { name: 'db', kind: 'string', value: 'URL', help: 'sqlite:PATH (default sqlite:.weft/server.db) or postgres://USER@HOST:PORT/DB' },
  { name: 'host', kind: 'string', value: 'HOST', help: 'address to listen on (default 127.0.0.1)' },
  { name: 'port', kind: 'string', value: 'PORT', help: 'port of the API (default 4200; 0 = any free port)' },
  { name: 'token-file', kind: 'string', value: 'FILE', help: 'API token (file mode 600): every request but /api/health must send it as a Bearer token' },
  { name: 'zombie-timeout', kind: 'string', value: 'S', help: 'a running flow run without a heartbeat for S seconds lost its process (default 60)' },
  { name: 'lazarus-timeout', kind: 'string', value: 'S', help: 'a submitted flow run not running after S seconds is rescheduled (default 60)' },
  { name: 'max-restarts', kind: 'string', value: 'N', help: 'times a lost or stuck flow run is rescheduled before it is Failed (default 3; 0 = fail at once)' },
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

export const SERVER_USAGE = `Usage: weft server [options]

Runs the backend: flows and their versions, flow runs, task runs, logs, bundles and
concurrency limits behind an HTTP API (/api/…), a live feed (WebSocket /api/events) and
/metrics. Agents ('weft agent'), flow-run processes and 'weft register|flows|runs' talk
to it. SQLite needs no set-up; several servers can share one PostgreSQL database.

Options:
${formatFlags(SERVER_FLAGS)}

Examples:
  weft server
  weft server --db postgres://weft@db.internal:5432/weft --host 0.0.0.0 --token-file ~/.weft/token`;

function numberFlag(v: unknown, flag: string, min: number, integer: boolean): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n < min || (integer && !Number.isInteger(n))) {
    throw new UsageError(`--${flag} must be ${integer ? 'an integer' : 'a number'} >= ${min}, got ${JSON.stringify(v)}`);
  }
  return n;
}

export async function serverCommand(args: readonly string[], io: CliIO): Promise<number> {
  try {
    return await serve(args, io);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    io.stderr.write(`weft server: ${err.message} (see 'weft help server')\n`);
    return 2;
  }
}

async function serve(args: readonly string[], io: CliIO): Promise<number> {
  const { flags, positionals } = parseArgs(args, SERVER_FLAGS);
  if (flags.help === true) {
    io.stdout.write(`${SERVER_USAGE}\n`);
    return 0;
  }
  if (positionals.length > 0) throw new UsageError(`unexpected argument ${JSON.stringify(positionals[0])}`);
  const port = numberFlag(flags.port, 'port', 0, true) ?? 4200;
  if (port > 65535) throw new UsageError(`--port must be at most 65535, got ${port}`);
  const db = typeof flags.db === 'string' ? flags.db : undefined;
  if (db !== undefined && !/^(sqlite:|postgres(ql)?:\/\/)/.test(db)) throw new UsageError(`--db must be sqlite:PATH or postgres://…, got '${db}'`);
  const zombie = numberFlag(flags['zombie-timeout'], 'zombie-timeout', 1, false);
  const lazarus = numberFlag(flags['lazarus-timeout'], 'lazarus-timeout', 1, false);
  const maxRestarts = numberFlag(flags['max-restarts'], 'max-restarts', 0, true);

  let token: string | undefined;
  if (typeof flags['token-file'] === 'string') {
    try {
      token = await readTokenFile(flags['token-file']);
    } catch (err) {
      io.stderr.write(`weft server: ${(err as Error).message}\n`);
      return 2;
    }
  }

  const { startServer } = await import('../server/index.ts');
  const { redact, DEFAULT_DB } = await import('../server/db.ts');
  const log = (line: string): void => void io.stderr.write(`[weft server] ${line}\n`);
  let server;
  try {
    server = await startServer({
      db: db ?? DEFAULT_DB,
      cwd: io.cwd,
      host: typeof flags.host === 'string' ? flags.host : '127.0.0.1',
      port,
      ...(token !== undefined ? { token } : {}),
      ...(zombie !== undefined ? { zombieTimeoutMs: zombie * 1000 } : {}),
      ...(lazarus !== undefined ? { lazarusTimeoutMs: lazarus * 1000 } : {}),
      ...(maxRestarts !== undefined ? { maxRestarts } : {}),
      log,
    });
  } catch (err) {
    io.stderr.write(`weft server: cannot start on ${redact(db ?? DEFAULT_DB)}: ${(err as Error).message}\n`);
    return 1;
  }
  io.stdout.write(`weft server listening on ${server.url} (db: ${server.db.description}${token !== undefined ? ', token required' : ''})\n`);
  await new Promise<void>((resolve) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      resolve();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  log('shutting down');
  await server.close();
  return 0;
}
