/**
 * `weft scheduler`: run a cluster scheduler until SIGINT/SIGTERM.
 *
 * Its first stdout line is `weft scheduler listening on <ws-address> (status <http>/status)`
 * (LocalCluster and scripts read the address from it); logs go to stderr.
 */
import { readTokenFile } from '../cluster/auth.ts';
import { startScheduler, type SchedulerOptions } from '../cluster/scheduler.ts';
import { formatFlags, UsageError, type FlagSpec } from './args.ts';
import { listenFlags, numberFlag, parseServingArgs, portFlag, untilSignal } from './serving.ts';
import { readTlsFlags } from './tls-flags.ts';

export const SCHEDULER_FLAGS: readonly FlagSpec[] = [
  ...listenFlags({
    port: 'port for workers, clients, /status and /metrics (default 8786; 0 = any free port)',
    token: 'shared secret (file mode 600): workers and clients must prove they know it',
  }),
  { name: 'tls-cert', kind: 'string', value: 'FILE', help: 'PEM certificate: serve wss:// and https://' },
  { name: 'tls-key', kind: 'string', value: 'FILE', help: 'PEM private key of --tls-cert' },
  { name: 'tls-ca', kind: 'string', value: 'FILE', help: 'PEM CA: peers must present a client certificate it signed' },
  { name: 'heartbeat-ms', kind: 'string', value: 'MS', help: 'heartbeat interval for small clusters (default 500; grows with the cluster)' },
  { name: 'worker-ttl', kind: 'string', value: 'N', help: 'a worker silent for N heartbeat intervals is lost (default 60)' },
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

export const SCHEDULER_USAGE = `Usage: weft scheduler [options]

Runs a cluster scheduler: workers ('weft worker ws://HOST:PORT') and clients
('weft run flow.ts --executor cluster --address ws://HOST:PORT') connect to it.
GET /status (JSON) and /metrics (Prometheus) on the same port.

Options:
${formatFlags(SCHEDULER_FLAGS)}`;

export interface SchedulerCommandIO {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown };
}

/** Runs until a signal; resolves with the exit code. */
export async function schedulerCommand(argv: string[], io: SchedulerCommandIO = process): Promise<number> {
  let opts: SchedulerOptions;
  try {
    const flags = parseServingArgs(argv, SCHEDULER_FLAGS, SCHEDULER_USAGE, io.stdout);
    if (flags === null) return 0;
    const port = portFlag(flags.port, 8786);
    opts = { host: (flags.host as string | undefined) ?? '127.0.0.1', port, log: (line) => io.stderr.write(`[weft scheduler] ${line}\n`) };
    const hb = numberFlag(flags['heartbeat-ms'], 'heartbeat-ms', 10);
    if (hb !== undefined) opts.heartbeatMs = hb;
    const ttl = numberFlag(flags['worker-ttl'], 'worker-ttl', 2);
    if (ttl !== undefined) opts.missedHeartbeats = ttl;
    if (typeof flags['token-file'] === 'string') opts.token = await readTokenFile(flags['token-file']);
    const tls = await readTlsFlags(flags);
    if (tls !== undefined) {
      if (tls.cert === undefined || tls.key === undefined) throw new UsageError('--tls-ca needs --tls-cert and --tls-key');
      // With a CA, peers must present a certificate it signed.
      opts.tls = { cert: tls.cert, key: tls.key, ...(tls.ca !== undefined ? { ca: tls.ca, requireClientCert: true } : {}) };
    }
  } catch (err) {
    io.stderr.write(`weft scheduler: ${(err as Error).message}\n`);
    return 2;
  }
  let server;
  try {
    server = await startScheduler(opts);
  } catch (err) {
    io.stderr.write(`weft scheduler: cannot listen on ${opts.host}:${opts.port}: ${(err as Error).message}\n`);
    return 1;
  }
  io.stdout.write(`weft scheduler listening on ${server.address} (status ${server.httpUrl}/status)\n`);
  await untilSignal();
  await server.close();
  return 0;
}
