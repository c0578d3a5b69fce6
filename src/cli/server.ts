/**
 * `weft server`: run the backend server until SIGINT/SIGTERM.
 *
 * Its first stdout line is `weft server listening on http://HOST:PORT (db: …)` (scripts
 * and tests read the URL from it); the server's log lines go to stderr.
 */
import { readTokenFile } from '../cluster/auth.ts';
import { formatFlags, UsageError, type FlagSpec } from './args.ts';
import type { CliIO } from './main.ts';
import { listenFlags, numberFlag, parseServingArgs, portFlag, untilSignal } from './serving.ts';

export const SERVER_FLAGS: readonly FlagSpec[] = [
  { name: 'db', kind: 'string', value: 'URL', help: 'sqlite:PATH (default sqlite:.weft/server.db) or postgres://USER@HOST:PORT/DB' },
  ...listenFlags({
    port: 'port of the API (default 4200; 0 = any free port)',
    token: 'API token (file mode 600): every request but /api/health must send it as a Bearer token',
  }),
  { name: 'zombie-timeout', kind: 'string', value: 'S', help: 'a running flow run without a heartbeat for S seconds lost its process (default 60)' },
  { name: 'lazarus-timeout', kind: 'string', value: 'S', help: 'a submitted flow run not running after S seconds is rescheduled (default 60)' },
  { name: 'max-restarts', kind: 'string', value: 'N', help: 'times a lost or stuck flow run is rescheduled before it is Failed (default 3; 0 = fail at once)' },
  { name: 'agent-timeout', kind: 'string', value: 'S', help: 'an agent that has not polled for S seconds is listed unhealthy (default 60)' },
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
  const flags = parseServingArgs(args, SERVER_FLAGS, SERVER_USAGE, io.stdout);
  if (flags === null) return 0;
  const port = portFlag(flags.port, 4200);
  const db = typeof flags.db === 'string' ? flags.db : undefined;
  if (db !== undefined && !/^(sqlite:|postgres(ql)?:\/\/)/.test(db)) throw new UsageError(`--db must be sqlite:PATH or postgres://…, got '${db}'`);
  const zombie = numberFlag(flags['zombie-timeout'], 'zombie-timeout', 1, false);
  const lazarus = numberFlag(flags['lazarus-timeout'], 'lazarus-timeout', 1, false);
  const maxRestarts = numberFlag(flags['max-restarts'], 'max-restarts', 0);
  const agentTimeout = numberFlag(flags['agent-timeout'], 'agent-timeout', 1, false);

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
      ...(agentTimeout !== undefined ? { agentTimeoutMs: agentTimeout * 1000 } : {}),
      log,
    });
  } catch (err) {
    io.stderr.write(`weft server: cannot start on ${redact(db ?? DEFAULT_DB)}: ${(err as Error).message}\n`);
    return 1;
  }
  io.stdout.write(`weft server listening on ${server.url} (db: ${server.db.description}${token !== undefined ? ', token required' : ''})\n`);
  await untilSignal();
  log('shutting down');
  await server.close();
  return 0;
}
