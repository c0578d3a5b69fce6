/**
 * LocalAgent: starts each flow run as a child process on this machine,
 * `node <this installation's bin/weft.js> execute flow-run <id> --server URL`.
 *
 * - Labels: the given ones plus `host:<hostname>` (LocalStorage refs carry that label,
 *   so a flow kept in a file here runs only on agents of this host).
 * - The process: cwd is the LocalRun's `workingDir` (resolved against the agent's cwd;
 *   a directory that does not exist is a deploy error), env is the agent's, then the
 *   agent's `env` option, then the run config's `env`, then the WEFT_* variables
 *   (WEFT_SERVER, WEFT_FLOW_RUN_ID, WEFT_AGENT_ID, WEFT_OUTPUT_FORWARDED).
 * - Output: the agent reads the child's stdout and stderr line by line and ships the
 *   lines to the run's logs (source 'flow-run'; stdout at info, stderr at warn), batched
 *   with every other child's. WEFT_OUTPUT_FORWARDED=1 tells the process so, and it does
 *   not ship its console output itself (no line twice). A process whose pipes break (the
 *   agent went away) takes the shipping over.
 * - Exits: children are tracked by PID. A child that exits with a non-zero code while
 *   its run is still Submitted or Running did not finish its run (a crash, a failed
 *   start): the agent fails the run, with the exit code and the last stderr lines in its
 *   logs; a run that was Cancelling becomes Cancelled. A child killed by a signal the
 *   agent did not send (SIGKILL by the OOM killer, a machine going down) is only logged
 *   by default (`onSignalExit: 'leave'`): the run stays Running, the server's zombie
 *   killer notices the missing heartbeats and lazarus reruns it (with its checkpointed
 *   results), as in Prefect 1. `onSignalExit: 'fail'` fails it at once instead.
 * - Stop: like Prefect 1's local agent, stopping the agent leaves its flow-run processes
 *   running (`stop()`; they heartbeat to the server on their own; their output is no
 *   longer forwarded). `stop({ stopRuns: true })` sends them SIGTERM (SIGKILL after
 *   5 s) and waits for them: their runs stay Running until lazarus reruns them.
 * - Standby processes (`standby: n`, default 0): starting a flow-run process is mostly
 *   Node starting, tsx registering and weft's TypeScript modules loading (~0.45 s of a
 *   ~0.6 s no-op run). The agent keeps up to n processes started ahead of time
 *   (`weft execute flow-run --standby`) that have done that and wait on stdin. A claimed
 *   run goes to a ready standby (else to one still loading: it is ahead of a fresh spawn)
 *   as one JSON line — the arguments, whole environment and working directory a fresh
 *   process would get — and a replacement starts in the background. From then on it is
 *   a flow-run process like any other (tracked by PID, same exits, cancel, stop). A run
 *   that a standby cannot serve as a fresh process would gets a fresh process: its
 *   environment differs in a variable read only at start-up (STARTUP_ENV: Node's, libuv's,
 *   tsx's, the locale), or its working directory finds another tsconfig.json than the
 *   agent's (tsx reads it once, at register). Standbys that never get a run are stopped
 *   by `stop()` (their stdin is closed: they exit at once); a standby whose agent dies
 *   exits the same way. A standby that dies unasked is logged and replaced only at the
 *   next claim (no spawn loop on a broken installation).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { hostname } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { STANDBY_READY, type StandbyAssignment } from '../cli/execute.ts';
import type { ClaimedRun, FlowRunState } from '../server/model.ts';
import { Agent, type AgentOptions, type AgentStopOptions } from './agent.ts';
import { describe } from './errors.ts';

/** This installation's command (the child runs the same weft as the agent). */
export const WEFT_BIN = fileURLToPath(new URL('../../bin/weft.js', import.meta.url));

/** Lines of a child's stderr kept for the failure message when it crashes. */
const TAIL_LINES = 20;
/** Longest log line shipped (a runaway line is cut, not sent whole). */
const MAX_LINE = 8_192;
const STOP_GRACE_MS = 5_000;
/** Lines a standby may print before its run (kept for that run's logs; more are dropped). */
const STANDBY_PENDING_LINES = 100;

/**
 * Environment variables read when a process starts, not later: a run that sets one
 * otherwise than a standby started with needs a fresh process. NODE_* (NODE_OPTIONS,
 * NODE_PATH, NODE_EXTRA_CA_CERTS, ...; NODE_ENV is the application's), libuv's UV_*,
 * tsx's TSX_* (read by its register()), OpenSSL's certificate settings and the locale
 * (ICU's default locale is fixed at start).
 */
const STARTUP_ENV = /^(NODE_(?!ENV$)|UV_|TSX_|OPENSSL_|SSL_CERT_|LC_|LANG$|LANGUAGE$)/;

export interface LocalAgentOptions extends AgentOptions {
  /** The server's base URL as the flow-run processes reach it. */
  readonly serverUrl: string;
  /** Token file for the server, passed on to the processes (`--token-file`). */
  readonly tokenFile?: string;
  /** Add `host:<hostname>` to the labels (default true). */
  readonly hostnameLabel?: boolean;
  /** Environment variables for every run (a run config's `env` overrides them). */
  readonly env?: Readonly<Record<string, string>>;
  /** Default working directory of the processes (default: the agent's cwd). */
  readonly cwd?: string;
  /** The flow-run processes' heartbeat interval (`--heartbeat-ms`; default theirs). */
  readonly runHeartbeatMs?: number;
  /** The processes' checkpoint directory (`--result-dir`; default theirs: `.weft/results` under their cwd). */
  readonly resultDir?: string;
  /** A child killed by a signal the agent did not send: leave the run to lazarus (default) or fail it. */
  readonly onSignalExit?: 'leave' | 'fail';
  /** Node flags of the child processes (default none). */
  readonly nodeArgs?: readonly string[];
  /** The script the children run (default this installation's bin/weft.js). */
  readonly weftBin?: string;
  /** Flow-run processes kept started ahead of their runs (default 0: each run spawns its own). */
  readonly standby?: number;
}

interface Child {
  readonly pid: number;
  /** The run it executes; null while it is a standby waiting for one. */
  runId: string | null;
  readonly proc: ChildProcess;
  /** Last stderr lines (at most TAIL_LINES). */
  readonly tail: string[];
  /** Started as a standby: its STANDBY_READY line is the protocol's, not output. */
  readonly standby: boolean;
  /** A standby said STANDBY_READY (it has loaded). */
  ready: boolean;
  /** The environment it started with (what a run's start-up variables must match). */
  readonly env: NodeJS.ProcessEnv;
  /** Output of a standby before its run (shipped to the run's logs at the hand-over). */
  readonly pending: { readonly level: 'info' | 'warn'; readonly message: string; readonly at: number }[];
  /** The agent sent it a signal (stop): its exit is not a crash. */
  stoppedByAgent: boolean;
  /** Left running at stop: the agent no longer watches it. */
  detached: boolean;
  readonly exited: Promise<void>;
}

export class LocalAgent extends Agent {
  readonly kind = 'local' as const;
  private readonly local: LocalAgentOptions;
  /** Running flow-run processes by PID (each has a run). */
  private readonly children = new Map<number, Child>();
  /** Standby processes by PID, oldest first (none has a run). */
  private readonly pool = new Map<number, Child>();
  /** The tsconfig.json tsx finds from the agent's working directory (what standbys registered with). */
  private baseTsconfig: Promise<string | null> | null = null;
  /** Exit handling in flight (a run read and maybe failed); `stop()` waits for it. */
  private readonly exits = new Set<Promise<void>>();

  constructor(opts: LocalAgentOptions) {
    super(opts);
    this.local = opts;
  }

  /** PIDs of the flow-run processes running now, by run id (a standby is listed once it has a run). */
  get processes(): ReadonlyMap<number, string> {
    return new Map([...this.children.values()].map((c) => [c.pid, c.runId ?? '']));
  }

  /** PIDs of the standby processes waiting for a run, and whether each has loaded (is ready). */
  get standbys(): ReadonlyMap<number, boolean> {
    return new Map([...this.pool.values()].map((c) => [c.pid, c.ready]));
  }

  override async start(): Promise<void> {
    await super.start();
    this.refill();
  }

  protected override implicitLabels(): readonly string[] {
    return this.local.hostnameLabel === false ? [] : [`host:${hostname()}`];
  }

  protected override activeRuns(): number {
    return super.activeRuns() + this.children.size;
  }

  protected override async deploy(claimed: ClaimedRun): Promise<void> {
    const { run, version } = claimed;
    const rc = version.runConfig;
    const base = this.baseCwd();
    const cwd = rc.kind === 'local' && rc.workingDir !== undefined ? resolve(base, rc.workingDir) : base;
    try {
      if (!(await stat(cwd)).isDirectory()) throw new Error(`working directory ${cwd} is not a directory`);
    } catch (err) {
      if ((err as { code?: unknown }).code === 'ENOENT') throw new Error(`working directory ${cwd} does not exist`);
      throw err;
    }
    const args = ['flow-run', run.id, '--server', this.local.serverUrl];
    if (this.local.tokenFile !== undefined) args.push('--token-file', resolve(base, this.local.tokenFile));
    if (this.local.runHeartbeatMs !== undefined) args.push('--heartbeat-ms', String(this.local.runHeartbeatMs));
    if (this.local.resultDir !== undefined) args.push('--result-dir', resolve(base, this.local.resultDir));
    const env: NodeJS.ProcessEnv = {
      ...this.agentEnv(),
      ...(rc.env ?? {}),
      WEFT_SERVER: this.local.serverUrl,
      WEFT_FLOW_RUN_ID: run.id,
      WEFT_AGENT_ID: this.id ?? '',
      WEFT_OUTPUT_FORWARDED: '1',
    };
    if (!(await this.handToStandby(run.id, { args, env: definedOnly(env), cwd }))) {
      const proc = this.spawnExecute(args, cwd, env, 'ignore');
      await new Promise<void>((ok, fail) => {
        proc.once('spawn', ok);
        proc.once('error', fail);
      });
      const child = this.adopt(proc, run.id, env, false);
      this.children.set(child.pid, child);
    }
    // After this turn: forking a replacement standby (milliseconds of this thread) does not delay this run.
    setImmediate(() => this.refill());
  }

  private baseCwd(): string {
    return this.local.cwd ?? process.cwd();
  }

  /** `weft execute <args>` as a child process; stdin a pipe for standbys (their assignment). */
  private spawnExecute(args: readonly string[], cwd: string, env: NodeJS.ProcessEnv, stdin: 'ignore' | 'pipe'): ChildProcess {
    return spawn(process.execPath, [...(this.local.nodeArgs ?? []), this.local.weftBin ?? WEFT_BIN, 'execute', ...args], { cwd, env, stdio: [stdin, 'pipe', 'pipe'] });
  }

  /** The environment every run starts from: the agent's, then the `env` option. */
  private agentEnv(): NodeJS.ProcessEnv {
    return { ...process.env, ...(this.local.env ?? {}) };
  }

  /** Watch a started process: its output, its exit. */
  private adopt(proc: ChildProcess, runId: string | null, env: NodeJS.ProcessEnv, standby: boolean): Child {
    const pid = proc.pid!;
    const exited = new Promise<void>((r) => proc.once('close', () => r()));
    const child: Child = { pid, runId, proc, tail: [], stoppedByAgent: false, detached: false, exited, standby, ready: false, env, pending: [] };
    this.forward(child, 'stdout');
    this.forward(child, 'stderr');
    // 'close': the pipes are drained too, so the tail is complete when the exit is judged.
    proc.once('close', (code, signal) => {
      if (child.detached) return;
      if (child.runId === null) {
        this.pool.delete(pid);
        if (!child.stoppedByAgent) {
          const how = signal !== null ? `was killed by ${signal}` : `exited with code ${code ?? '?'}`;
          this.say(`standby process ${pid} ${how} before it got a run${child.tail.length > 0 ? `; its last output:\n${child.tail.join('\n')}` : ''}`);
        }
        return;
      }
      this.children.delete(pid);
      const p = this.onExit(child, code, signal).finally(() => this.exits.delete(p));
      this.exits.add(p);
      this.wake();
    });
    return child;
  }

  // --- standby processes ----------------------------------------------------------

  /** Start standbys until `standby` of them wait (not while stopping). */
  private refill(): void {
    const want = this.local.standby ?? 0;
    while (this.pool.size < want && !this.isStopping) {
      const env = this.agentEnv();
      const proc = this.spawnExecute(['flow-run', '--standby'], this.baseCwd(), env, 'pipe');
      proc.stdin?.on('error', () => {}); // a standby that died: its exit is reported
      if (proc.pid === undefined) {
        proc.once('error', (err) => this.say(`cannot start a standby process: ${describe(err)}`));
        return; // the next claim tries again
      }
      const child = this.adopt(proc, null, env, true);
      this.pool.set(child.pid, child);
    }
  }

  /**
   * Give the run to a standby if one can serve it as a fresh process would: the oldest
   * ready one, else the oldest still loading (it is ahead of a fresh process). From then
   * on the standby is that run's process. False: the run needs a fresh process.
   */
  private async handToStandby(runId: string, a: StandbyAssignment): Promise<boolean> {
    if (this.pool.size === 0) return false;
    if (a.cwd !== this.baseCwd()) {
      this.baseTsconfig ??= findTsconfig(this.baseCwd());
      if ((await findTsconfig(a.cwd)) !== (await this.baseTsconfig)) return false;
    }
    // Synchronous from here: no other deploy takes the same standby, and none exits unseen.
    const sb = [...this.pool.values()].filter((c) => c.proc.exitCode === null && c.proc.signalCode === null).sort((x, y) => Number(y.ready) - Number(x.ready))[0];
    if (sb === undefined) return false;
    const keys = new Set([...Object.keys(sb.env), ...Object.keys(a.env)]);
    for (const k of keys) if (STARTUP_ENV.test(k) && sb.env[k] !== a.env[k]) return false;
    this.pool.delete(sb.pid);
    sb.runId = runId;
    this.children.set(sb.pid, sb);
    for (const l of sb.pending.splice(0)) this.logs.push({ flowRunId: runId, level: l.level, message: l.message, at: l.at, source: 'flow-run' });
    sb.proc.stdin?.end(`${JSON.stringify(a)}\n`);
    return true;
  }

  protected override async onStop(opts: AgentStopOptions): Promise<void> {
    await this.stopStandbys();
    const kids = [...this.children.values()];
    if (opts.stopRuns === true) {
      for (const c of kids) {
        c.stoppedByAgent = true;
        signal(c.pid, 'SIGTERM');
      }
      await Promise.all(
        kids.map(async (c) => {
          const t = setTimeout(() => signal(c.pid, 'SIGKILL'), STOP_GRACE_MS);
          await c.exited;
          clearTimeout(t);
        }),
      );
    } else {
      // Left running: stop reading their output and let the agent's process exit without them.
      for (const c of kids) {
        c.detached = true;
        c.proc.stdin?.destroy();
        c.proc.stdout?.destroy();
        c.proc.stderr?.destroy();
        c.proc.unref();
        this.children.delete(c.pid);
      }
      if (kids.length > 0) this.say(`left ${kids.length} flow-run process(es) running: ${kids.map((c) => c.pid).join(', ')}`);
    }
    await Promise.all([...this.exits]);
  }

  /** Standbys that never got a run: closing their stdin ends them at once (SIGKILL after the grace). */
  private async stopStandbys(): Promise<void> {
    const standbys = [...this.pool.values()];
    for (const c of standbys) {
      c.stoppedByAgent = true;
      c.proc.stdin?.end();
    }
    await Promise.all(
      standbys.map(async (c) => {
        const t = setTimeout(() => signal(c.pid, 'SIGKILL'), STOP_GRACE_MS);
        await c.exited;
        clearTimeout(t);
      }),
    );
  }

  private forward(child: Child, stream: 'stdout' | 'stderr'): void {
    const s = child.proc[stream];
    if (s === null) return;
    s.on('error', () => {}); // destroyed at stop: nothing to report
    const rl = createInterface({ input: s, crlfDelay: Infinity });
    rl.on('line', (raw: string) => {
      // A standby prints this once, when it has loaded (before or after its run came).
      if (child.standby && !child.ready && stream === 'stdout' && raw === STANDBY_READY) {
        child.ready = true;
        return;
      }
      const line = raw.length > MAX_LINE ? `${raw.slice(0, MAX_LINE)}… (${raw.length - MAX_LINE} more characters)` : raw;
      if (stream === 'stderr') {
        child.tail.push(line);
        if (child.tail.length > TAIL_LINES) child.tail.shift();
      }
      const level = stream === 'stdout' ? 'info' : 'warn';
      if (child.runId === null) {
        if (child.pending.length < STANDBY_PENDING_LINES) child.pending.push({ level, message: line, at: Date.now() });
        return;
      }
      this.logs.push({ flowRunId: child.runId, level, message: line, at: Date.now(), source: 'flow-run' });
    });
  }

  /** A child ended: if its run is still in its hands, decide what becomes of it. */
  private async onExit(child: Child, code: number | null, sig: NodeJS.Signals | null): Promise<void> {
    if (code === 0 || child.stoppedByAgent) return;
    const how = sig !== null ? `was killed by ${sig}` : `exited with code ${code ?? '?'}`;
    // Its last lines reach the server before the verdict.
    await this.logs.flush();
    let run;
    if (child.runId === null) return;
    try {
      run = await this.backend.getFlowRun(child.runId);
    } catch (err) {
      this.say(`flow-run process ${child.pid} of run ${child.runId} ${how}; cannot read the run: ${describe(err)}`);
      return;
    }
    const open: readonly FlowRunState[] = ['Submitted', 'Running', 'Cancelling'];
    if (!open.includes(run.state)) return; // it finished its run (or another process holds it)
    if (run.state === 'Cancelling') {
      try {
        await this.backend.setFlowRunState(run.id, 'Cancelled', { message: `cancelled (its flow-run process ${how})`, expectVersion: run.stateVersion });
      } catch (err) {
        this.say(`cannot mark run ${run.id} Cancelled: ${describe(err)}`);
      }
      return;
    }
    if (sig !== null && (this.local.onSignalExit ?? 'leave') === 'leave') {
      const message = `flow-run process ${child.pid} ${how}; the run stays ${run.state} until the server's zombie killer and lazarus reschedule it`;
      this.say(`run ${run.id}: ${message}`);
      try {
        await this.backend.writeLogs([{ flowRunId: run.id, level: 'warn', message, at: Date.now(), source: 'agent' }]);
      } catch {
        // best effort: the run's fate does not depend on this line
      }
      return;
    }
    const tail = child.tail.length > 0 ? `its last output:\n${child.tail.join('\n')}` : undefined;
    await this.failRun(run, `flow-run process ${child.pid} ${how} before finishing the run`, tail);
  }
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    // already gone
  }
}

/** The tsconfig.json tsx's register() would use from `dir` (the first one up the tree), or null. */
async function findTsconfig(dir: string): Promise<string | null> {
  for (let d = resolve(dir), i = 0; i < 256; d = dirname(d), i++) {
    const f = join(d, 'tsconfig.json');
    try {
      if ((await stat(f)).isFile()) return f;
    } catch {
      // not here
    }
    if (dirname(d) === d) return null;
  }
  return null;
}

/** An environment without its undefined entries (as JSON keeps it). */
function definedOnly(env: NodeJS.ProcessEnv): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(env)) if (v !== undefined) out[k] = v;
  return out;
}
