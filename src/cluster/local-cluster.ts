/**
 * LocalCluster: a weft cluster on this machine — one `weft scheduler` child process and
 * n `weft worker` child processes — for a ClusterExecutor without an address, for tests
 * and for trying the cluster out (like dask's `LocalCluster`).
 *
 * - The scheduler listens on 127.0.0.1 on a free port; its first stdout line names the
 *   address. Workers are started once it is up; `start()` resolves when the scheduler's
 *   /status lists them all.
 * - Nanny: a worker that exits while the cluster is open, and not because we stopped it,
 *   is started again (so a task that kills its worker is rerun elsewhere and the cluster
 *   keeps its size). Quick successive deaths back off, up to 5 s between restarts.
 * - Adapt (`adapt: {min, max}`): every 500 ms /status is read; ready tasks waiting for
 *   credits and fewer than `max` workers start one more; nothing queued or running for
 *   2 s and more than `min` workers retire one (SIGTERM: it moves its unique results to
 *   the others first, then exits).
 * - `close()`: SIGTERM to the workers, then to the scheduler, each waited for by PID
 *   (SIGKILL after a grace period); temp files (the token file) are removed.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { get as httpGet } from 'node:http';
import { get as httpsGet } from 'node:https';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const BIN = fileURLToPath(new URL('../../bin/weft.js', import.meta.url));
const ADAPT_EVERY_MS = 500;
const IDLE_BEFORE_SHRINK_MS = 2_000;
/** Lines of output kept per process, for the error when it fails to start. */
const TAIL_LINES = 40;

/** The scheduler's GET /status (the fields the client side reads; it has more). */
export interface ClusterStatus {
  readonly workers: readonly {
    readonly id: string;
    readonly name: string;
    readonly threads: number;
    readonly credits?: number;
    readonly used?: number;
    readonly address?: string;
  }[];
  /** Task slots across the workers. */
  readonly slots: number;
  /** Ready tasks waiting for credits. */
  readonly queued: number;
  readonly running: number;
  readonly tasks?: Readonly<Record<string, number>>;
}

/** GET <httpUrl>/status. */
export function fetchStatus(
  httpUrl: string,
  tls: { ca?: string | Buffer; cert?: string | Buffer; key?: string | Buffer } = {},
  timeoutMs = 5_000,
): Promise<ClusterStatus> {
  return new Promise<ClusterStatus>((resolve, reject) => {
    const url = new URL('/status', httpUrl);
    const get = url.protocol === 'https:' ? httpsGet : httpGet;
    const req = get(url, { timeout: timeoutMs, ...(url.protocol === 'https:' ? tls : {}), agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => {
        if (res.statusCode !== 200) {
          reject(new Error(`GET ${url.href}: HTTP ${res.statusCode ?? '?'}`));
          return;
        }
        try {
          resolve(JSON.parse(body) as ClusterStatus);
        } catch (err) {
          reject(new Error(`GET ${url.href}: not JSON: ${(err as Error).message}`));
        }
      });
      res.on('error', reject);
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${url.href}: no answer within ${timeoutMs} ms`)));
    req.on('error', reject);
  });
}

/** `ws://host:port` → `http://host:port` (wss → https). */
export function httpUrlOf(address: string): string {
  const u = new URL(address);
  u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
  return u.origin;
}

export interface LocalClusterOptions {
  /** Worker processes (default 2). */
  readonly workers?: number;
  /** Task slots per worker (default 1). */
  readonly threads?: number;
  /** Cluster token: written to a temp file (mode 600) that every process reads. */
  readonly token?: string;
  /** Extra environment for the processes. */
  readonly env?: NodeJS.ProcessEnv;
  /** Grow and shrink between `min` and `max` workers by the scheduler's queue. */
  readonly adapt?: { readonly min: number; readonly max: number };
  /** Scheduler heartbeat interval (ms). */
  readonly heartbeatMs?: number;
  /** Restart workers that exit on their own (default true). */
  readonly nanny?: boolean;
  /** Every output line of the processes (default: kept only for error messages). */
  readonly onOutput?: (line: string, from: string) => void;
  /** Scheduler up plus workers connected. Default 30 s. */
  readonly startTimeoutMs?: number;
  /** SIGKILL a process this long after SIGTERM in `close()` / `scale()`. Default 5 s. */
  readonly killAfterMs?: number;
  /**
   * The processes (and their output pipes) do not keep this process's event loop alive
   * (for a cluster shared by tests or embedded in a tool). `close()` is then all the more
   * required: processes not closed outlive this one.
   */
  readonly unref?: boolean;
}

interface Proc {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly name: string;
  readonly startedAt: number;
  /** Stopped on purpose: its exit starts nobody. */
  stopping: boolean;
  readonly exited: Promise<void>;
  readonly tail: string[];
}

export class LocalCluster {
  /** Start the scheduler and the workers; resolves once every worker has joined. */
  static async start(options: LocalClusterOptions = {}): Promise<LocalCluster> {
    const c = new LocalCluster(options);
    try {
      await c.boot();
    } catch (err) {
      await c.close();
      throw err;
    }
    return c;
  }

  /** `ws://127.0.0.1:PORT`. */
  address = '';
  /** `http://127.0.0.1:PORT` (GET /status, /metrics). */
  httpUrl = '';
  private scheduler: Proc | null = null;
  private readonly workers: Proc[] = [];
  private readonly stopped = new Set<Proc>();
  private readonly dir: string;
  private readonly tokenFile: string | null = null;
  private nextName = 0;
  private closing: Promise<void> | null = null;
  private adaptTimer: NodeJS.Timeout | null = null;
  private idleSince = 0;
  private adapting = false;
  /** Consecutive quick worker deaths (nanny back-off). */
  private quickDeaths = 0;
  private readonly restartTimers = new Set<NodeJS.Timeout>();
  private readonly killAfterMs: number;

  private constructor(private readonly options: LocalClusterOptions) {
    const workers = options.workers ?? options.adapt?.min ?? 2;
    if (!Number.isInteger(workers) || workers < 0) throw new RangeError(`LocalCluster: workers must be an integer ≥ 0, got ${String(workers)}`);
    const threads = options.threads ?? 1;
    if (!Number.isInteger(threads) || threads < 1) throw new RangeError(`LocalCluster: threads must be a positive integer, got ${String(threads)}`);
    if (options.adapt !== undefined) {
      const { min, max } = options.adapt;
      if (!Number.isInteger(min) || !Number.isInteger(max) || min < 0 || max < Math.max(1, min)) {
        throw new RangeError(`LocalCluster: adapt needs integers 0 ≤ min ≤ max, max ≥ 1; got min ${String(min)}, max ${String(max)}`);
      }
    }
    this.killAfterMs = options.killAfterMs ?? 5_000;
    this.dir = mkdtempSync(join(tmpdir(), 'weft-local-cluster-'));
    if (options.token !== undefined) {
      this.tokenFile = join(this.dir, 'token');
      writeFileSync(this.tokenFile, options.token, { mode: 0o600 });
    }
  }

  /** PIDs of the worker processes now. */
  get workerPids(): number[] {
    return this.workers.map((w) => w.pid);
  }

  get schedulerPid(): number {
    return this.scheduler?.pid ?? 0;
  }

  /** Worker processes now (started ones, joined or not). */
  get size(): number {
    return this.workers.length;
  }

  get closed(): boolean {
    return this.closing !== null;
  }

  status(): Promise<ClusterStatus> {
    return fetchStatus(this.httpUrl);
  }

  /** Grow or shrink to `n` workers; resolves when /status lists exactly n. */
  async scale(n: number): Promise<void> {
    if (!Number.isInteger(n) || n < 0) throw new RangeError(`LocalCluster.scale: n must be an integer ≥ 0, got ${String(n)}`);
    if (this.closing !== null) throw new Error('LocalCluster is closed');
    while (this.workers.length < n) this.startWorker();
    const retiring: Promise<void>[] = [];
    while (this.workers.length > n) retiring.push(this.stop(this.workers.pop()!));
    await Promise.all(retiring);
    await this.waitForWorkers(n, this.options.startTimeoutMs ?? 30_000);
  }

  /** Stop everything (workers first), by PID; idempotent. */
  close(): Promise<void> {
    if (this.closing !== null) return this.closing;
    this.closing = (async () => {
      if (this.adaptTimer !== null) clearInterval(this.adaptTimer);
      for (const t of this.restartTimers) clearTimeout(t);
      this.restartTimers.clear();
      const workers = this.workers.splice(0);
      await Promise.all([...workers.map((w) => this.stop(w)), ...[...this.stopped].map((p) => p.exited)]);
      if (this.scheduler !== null) await this.stop(this.scheduler);
      rmSync(this.dir, { recursive: true, force: true });
    })();
    return this.closing;
  }

  // ---- internals ------------------------------------------------------------------

  private async boot(): Promise<void> {
    const timeoutMs = this.options.startTimeoutMs ?? 30_000;
    const args = ['scheduler', '--host', '127.0.0.1', '--port', '0', ...this.tokenArgs()];
    if (this.options.heartbeatMs !== undefined) args.push('--heartbeat-ms', String(this.options.heartbeatMs));
    const scheduler = this.spawn(args, 'scheduler');
    this.scheduler = scheduler;
    this.address = await firstLine(scheduler, /listening on (wss?:\/\/\S+)/, timeoutMs);
    this.httpUrl = httpUrlOf(this.address);
    const n = this.options.workers ?? this.options.adapt?.min ?? 2;
    for (let i = 0; i < n; i++) this.startWorker();
    await this.waitForWorkers(n, timeoutMs);
    if (this.options.adapt !== undefined) {
      this.adaptTimer = setInterval(() => void this.adapt(), ADAPT_EVERY_MS);
      this.adaptTimer.unref();
    }
  }

  private tokenArgs(): string[] {
    return this.tokenFile !== null ? ['--token-file', this.tokenFile] : [];
  }

  private spawn(args: string[], name: string): Proc {
    const child = spawn(process.execPath, [BIN, ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NO_COLOR: '1', ...this.options.env },
    });
    if (child.pid === undefined) throw new Error(`LocalCluster: could not start ${name} (${process.execPath} ${BIN} ${args.join(' ')})`);
    if (this.options.unref === true) {
      child.unref();
      for (const s of [child.stdout, child.stderr]) (s as { unref?: () => void } | null)?.unref?.();
    }
    const tail: string[] = [];
    const onLine = (line: string): void => {
      tail.push(line);
      if (tail.length > TAIL_LINES) tail.shift();
      this.options.onOutput?.(line, name);
    };
    for (const stream of [child.stdout, child.stderr]) {
      let buf = '';
      stream?.setEncoding('utf8').on('data', (d: string) => {
        buf += d;
        let i: number;
        while ((i = buf.indexOf('\n')) >= 0) {
          onLine(buf.slice(0, i));
          buf = buf.slice(i + 1);
        }
      });
    }
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.on('error', () => undefined); // 'exit' follows, or spawn failed (pid undefined, thrown above)
    return { child, pid: child.pid, name, startedAt: Date.now(), stopping: false, exited, tail };
  }

  private startWorker(): Proc {
    const threads = this.options.threads ?? 1;
    const name = `local-${this.nextName++}`;
    const w = this.spawn(['worker', this.address, '--threads', String(threads), '--name', name, ...this.tokenArgs()], name);
    this.workers.push(w);
    void w.exited.then(() => this.onWorkerExit(w));
    return w;
  }

  private onWorkerExit(w: Proc): void {
    const i = this.workers.indexOf(w);
    if (i >= 0) this.workers.splice(i, 1);
    if (w.stopping || this.closing !== null || this.options.nanny === false) return;
    // Nanny: replace it. Deaths right after start-up back off (a worker that cannot start).
    this.quickDeaths = Date.now() - w.startedAt < 2_000 ? this.quickDeaths + 1 : 0;
    const delay = this.quickDeaths === 0 ? 0 : Math.min(5_000, 100 * 2 ** (this.quickDeaths - 1));
    const t = setTimeout(() => {
      this.restartTimers.delete(t);
      if (this.closing === null) this.startWorker();
    }, delay);
    this.restartTimers.add(t);
  }

  /** SIGTERM, then SIGKILL after `killAfterMs`; resolves when it has exited. */
  private async stop(p: Proc): Promise<void> {
    p.stopping = true;
    if (p.child.exitCode !== null || p.child.signalCode !== null) return;
    this.stopped.add(p);
    signal(p.pid, 'SIGTERM');
    const kill = setTimeout(() => signal(p.pid, 'SIGKILL'), this.killAfterMs);
    await p.exited;
    clearTimeout(kill);
    this.stopped.delete(p);
  }

  private async waitForWorkers(n: number, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let last = '';
    for (;;) {
      try {
        const s = await this.status();
        if (s.workers.length === n) return;
        last = `${s.workers.length} of ${n} workers joined`;
      } catch (err) {
        last = (err as Error).message;
      }
      if (this.closing !== null) throw new Error('LocalCluster closed while starting');
      if (Date.now() > deadline) {
        const tails = this.workers.map((w) => `${w.name}: ${w.tail.slice(-5).join(' | ') || '(no output)'}`).join('\n  ');
        throw new Error(`LocalCluster: workers did not join within ${timeoutMs} ms (${last})${tails !== '' ? `\n  ${tails}` : ''}`);
      }
      await sleep(50);
    }
  }

  private async adapt(): Promise<void> {
    if (this.adapting || this.closing !== null) return;
    const { min, max } = this.options.adapt!;
    this.adapting = true;
    try {
      const s = await this.status();
      // Workers that were started but have not joined yet count as coming.
      const joined = s.workers.length;
      const size = this.workers.length;
      if (s.queued > 0) {
        this.idleSince = 0;
        if (size < max && joined >= size) this.startWorker();
        return;
      }
      if (s.running > 0) {
        this.idleSince = 0;
        return;
      }
      if (this.idleSince === 0) this.idleSince = Date.now();
      if (Date.now() - this.idleSince >= IDLE_BEFORE_SHRINK_MS && size > min) {
        this.idleSince = Date.now(); // one at a time, each after 2 s of quiet
        void this.stop(this.workers.pop()!);
      }
    } catch {
      // The scheduler did not answer this time: try again on the next tick.
    } finally {
      this.adapting = false;
    }
  }
}

/** Resolves with the first capture of `re` in the process's output; rejects if it exits or times out first. */
function firstLine(p: Proc, re: RegExp, timeoutMs: number): Promise<string> {
  return new Promise<string>((resolve, reject) => {
    let settled = false;
    const done = (err: Error | null, v?: string): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      p.child.stdout?.off('data', onData);
      if (err !== null) reject(err);
      else resolve(v!);
    };
    let seen = '';
    const onData = (d: string): void => {
      seen += d;
      const m = re.exec(seen);
      if (m?.[1] !== undefined) done(null, m[1]);
    };
    const output = (): string => (p.tail.length > 0 ? `: ${p.tail.slice(-10).join('\n  ')}` : ' (no output)');
    const timer = setTimeout(() => done(new Error(`LocalCluster: the ${p.name} did not start within ${timeoutMs} ms${output()}`)), timeoutMs);
    p.child.stdout?.on('data', onData);
    void p.exited.then(() => done(new Error(`LocalCluster: the ${p.name} exited (code ${String(p.child.exitCode)}) before listening${output()}`)));
  });
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
