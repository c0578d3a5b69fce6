/**
 * `weft worker <ws(s)://host:port>`: run a cluster worker until the scheduler retires it
 * or a signal arrives.
 *
 * stdout gets one line per (re)connection, `weft worker <name> connected to <url> (peer
 * <address>)`, which scripts may wait for; diagnostics go to stderr. SIGTERM or SIGINT
 * retires the worker gracefully (the scheduler first moves the results only it holds);
 * a second signal closes it at once. Exit codes: 0 after retiring or closing, 1 when it
 * cannot start, 2 for a usage problem.
 */
import { readTokenFile } from '../cluster/auth.ts';
import { readTlsFlags } from './tls-flags.ts';
import { startWorker, type ClusterWorker, type WorkerOptions } from '../cluster/worker.ts';
import { formatFlags, parseArgs, UsageError, type FlagSpec } from './args.ts';

export const WORKER_FLAGS: readonly FlagSpec[] = [
  { name: 'threads', short: 't', kind: 'count', value: 'N', help: 'task slots (default 1: tasks run in the worker thread, console output captured; more: a pool of N threads)' },
  { name: 'memory-limit', kind: 'string', value: 'SIZE', help: 'e.g. 2GiB, 500MB or bytes: results spill to disk above 60%, no new work above 80% (default: none)' },
  { name: 'resources', kind: 'string', value: 'NAME=N,...', help: 'abstract resources this worker offers, e.g. GPU=1,MEM=2' },
  { name: 'name', kind: 'string', value: 'NAME', help: 'unique worker name (default <hostname>-<pid>)' },
  { name: 'token-file', kind: 'string', value: 'FILE', help: "the cluster's shared secret (file mode 600)" },
  { name: 'tls-cert', kind: 'string', value: 'FILE', help: 'PEM certificate: client certificate towards the scheduler and peers, and serve peers over wss://' },
  { name: 'tls-key', kind: 'string', value: 'FILE', help: 'PEM private key of --tls-cert' },
  { name: 'tls-ca', kind: 'string', value: 'FILE', help: 'PEM CA that signed the scheduler and peer certificates (peers must then present one)' },
  { name: 'host', kind: 'string', value: 'HOST', help: 'address the peer data server binds to (default 127.0.0.1; 0.0.0.0 for other machines)' },
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

export const WORKER_USAGE = `Usage: weft worker <ws://HOST:PORT | wss://HOST:PORT> [options]

Runs a cluster worker connected to the scheduler at the address ('weft scheduler'
prints it). It reconnects whenever the connection is lost. SIGTERM or Ctrl-C retires
it gracefully (its results are moved to other workers first); a second one stops it
at once.

Options:
${formatFlags(WORKER_FLAGS)}

Examples:
  weft worker ws://127.0.0.1:8786
  weft worker wss://sched.example:8786 --threads 4 --memory-limit 8GiB --token-file ~/.weft-token --tls-ca ca.pem`;

const UNITS: Readonly<Record<string, number>> = {
  '': 1,
  b: 1,
  k: 1e3,
  kb: 1e3,
  m: 1e6,
  mb: 1e6,
  g: 1e9,
  gb: 1e9,
  t: 1e12,
  tb: 1e12,
  ki: 2 ** 10,
  kib: 2 ** 10,
  mi: 2 ** 20,
  mib: 2 ** 20,
  gi: 2 ** 30,
  gib: 2 ** 30,
  ti: 2 ** 40,
  tib: 2 ** 40,
};

/** Bytes of `2GiB`, `500MB`, `1.5g`, `1048576` (decimal units are powers of 1000, binary ones of 1024). */
export function parseMemoryLimit(raw: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([a-z]*)$/i.exec(raw.trim());
  const unit = m?.[2]?.toLowerCase() ?? '';
  const scale = m !== null ? UNITS[unit] : undefined;
  if (m === null || scale === undefined) {
    throw new UsageError(`--memory-limit must be a size like 2GiB, 500MB or a number of bytes, got '${raw}'`);
  }
  const bytes = Math.floor(Number(m[1]) * scale);
  if (!Number.isSafeInteger(bytes)) throw new UsageError(`--memory-limit is too large: '${raw}'`);
  return bytes;
}

/** `GPU=1,MEM=2` → `{ GPU: 1, MEM: 2 }`. */
export function parseResources(raw: string): Record<string, number> {
  const out: Record<string, number> = {};
  for (const part of raw.split(',')) {
    const item = part.trim();
    const eq = item.indexOf('=');
    const name = eq < 0 ? item : item.slice(0, eq).trim();
    const value = eq < 0 ? '' : item.slice(eq + 1).trim();
    if (eq <= 0 || !/^[A-Za-z_][\w.-]*$/.test(name)) throw new UsageError(`--resources expects NAME=N[,NAME=N...], got '${raw}'`);
    const n = Number(value);
    if (value === '' || !Number.isFinite(n) || n < 0) throw new UsageError(`--resources: ${name} must be a number >= 0, got '${value}'`);
    if (Object.prototype.hasOwnProperty.call(out, name)) throw new UsageError(`--resources: ${name} given twice`);
    out[name] = n;
  }
  return out;
}

export interface WorkerCommandIO {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown };
  /** Call `handler` on SIGTERM/SIGINT; returns an unsubscribe function. Default: the process's signals. */
  onSignal?(handler: (signal: string) => void): () => void;
}

function processSignals(handler: (signal: string) => void): () => void {
  const onTerm = (): void => handler('SIGTERM');
  const onInt = (): void => handler('SIGINT');
  process.on('SIGTERM', onTerm);
  process.on('SIGINT', onInt);
  return () => {
    process.off('SIGTERM', onTerm);
    process.off('SIGINT', onInt);
  };
}

/** The options a command line asks for. Throws UsageError (or AuthError for the token file). */
export async function workerOptions(argv: readonly string[], log: (line: string) => void): Promise<WorkerOptions | 'help'> {
  const { flags, positionals } = parseArgs(argv, WORKER_FLAGS);
  if (flags.help === true) return 'help';
  const [address, ...extra] = positionals;
  if (address === undefined) throw new UsageError('missing the scheduler address (ws://HOST:PORT)');
  if (extra.length > 0) throw new UsageError(`unexpected argument '${extra[0]}'`);
  let url: URL;
  try {
    url = new URL(address);
  } catch {
    throw new UsageError(`the scheduler address must be ws://HOST:PORT or wss://HOST:PORT, got '${address}'`);
  }
  if ((url.protocol !== 'ws:' && url.protocol !== 'wss:') || url.hostname === '') {
    throw new UsageError(`the scheduler address must be ws://HOST:PORT or wss://HOST:PORT, got '${address}'`);
  }
  const o: WorkerOptions = { scheduler: address, log };
  if (typeof flags.threads === 'number') o.threads = flags.threads;
  if (typeof flags['memory-limit'] === 'string') o.memoryLimit = parseMemoryLimit(flags['memory-limit']);
  if (typeof flags.resources === 'string') o.resources = parseResources(flags.resources);
  if (typeof flags.name === 'string') o.name = flags.name;
  if (typeof flags.host === 'string') o.host = flags.host;
  const tls = await readTlsFlags(flags);
  if (tls !== undefined) o.tls = tls;
  if (typeof flags['token-file'] === 'string') o.token = await readTokenFile(flags['token-file']);
  return o;
}

/** Runs a worker until it is retired or closed; resolves with the exit code. */
export async function workerCommand(argv: string[], io: WorkerCommandIO = process): Promise<number> {
  let name = '';
  const log = (line: string): void => {
    io.stderr.write(`[weft worker${name !== '' ? ` ${name}` : ''}] ${line}\n`);
  };
  let o: WorkerOptions | 'help';
  try {
    o = await workerOptions(argv, log);
  } catch (err) {
    io.stderr.write(`weft worker: ${(err as Error).message}${err instanceof UsageError ? " (see 'weft help worker')" : ''}\n`);
    return 2;
  }
  if (o === 'help') {
    io.stdout.write(`${WORKER_USAGE}\n`);
    return 0;
  }
  let worker: ClusterWorker;
  try {
    worker = await startWorker(o);
  } catch (err) {
    io.stderr.write(`weft worker: cannot start: ${(err as Error).message}\n`);
    return 1;
  }
  name = worker.name;
  const url = o.scheduler;
  worker.on('connected', () => {
    io.stdout.write(`weft worker ${worker.name} connected to ${url} (peer ${worker.address})\n`);
  });
  let signals = 0;
  const unsubscribe = (io.onSignal ?? processSignals)((signal) => {
    signals++;
    if (signals === 1) {
      log(`${signal}: retiring (again to stop at once)`);
      worker.retire(signal).catch((err: unknown) => log(`retiring failed: ${(err as Error).message}`));
    } else {
      log(`${signal}: stopping now`);
      worker.close().catch((err: unknown) => log(`closing failed: ${(err as Error).message}`));
    }
  });
  try {
    await worker.closed;
  } finally {
    unsubscribe();
  }
  return 0;
}
