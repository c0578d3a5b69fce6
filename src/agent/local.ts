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
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
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
}

interface Child {
  readonly pid: number;
  readonly runId: string;
  readonly proc: ChildProcess;
  /** Last stderr lines (at most TAIL_LINES). */
  readonly tail: string[];
  /** The agent sent it a signal (stop): its exit is not a crash. */
  stoppedByAgent: boolean;
  /** Left running at stop: the agent no longer watches it. */
  detached: boolean;
  readonly exited: Promise<void>;
}

export class LocalAgent extends Agent {
  readonly kind = 'local' as const;
  private readonly local: LocalAgentOptions;
  /** Running flow-run processes by PID. */
  private readonly children = new Map<number, Child>();
  /** Exit handling in flight (a run read and maybe failed); `stop()` waits for it. */
  private readonly exits = new Set<Promise<void>>();

  constructor(opts: LocalAgentOptions) {
    super(opts);
    this.local = opts;
  }

  /** PIDs of the flow-run processes running now, by run id. */
  get processes(): ReadonlyMap<number, string> {
    return new Map([...this.children.values()].map((c) => [c.pid, c.runId]));
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
    const base = this.local.cwd ?? process.cwd();
    const cwd = rc.kind === 'local' && rc.workingDir !== undefined ? resolve(base, rc.workingDir) : base;
    try {
      if (!(await stat(cwd)).isDirectory()) throw new Error(`working directory ${cwd} is not a directory`);
    } catch (err) {
      if ((err as { code?: unknown }).code === 'ENOENT') throw new Error(`working directory ${cwd} does not exist`);
      throw err;
    }
    const args = [...(this.local.nodeArgs ?? []), this.local.weftBin ?? WEFT_BIN, 'execute', 'flow-run', run.id, '--server', this.local.serverUrl];
    if (this.local.tokenFile !== undefined) args.push('--token-file', resolve(base, this.local.tokenFile));
    if (this.local.runHeartbeatMs !== undefined) args.push('--heartbeat-ms', String(this.local.runHeartbeatMs));
    if (this.local.resultDir !== undefined) args.push('--result-dir', resolve(base, this.local.resultDir));
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      ...(this.local.env ?? {}),
      ...(rc.env ?? {}),
      WEFT_SERVER: this.local.serverUrl,
      WEFT_FLOW_RUN_ID: run.id,
      WEFT_AGENT_ID: this.id ?? '',
      WEFT_OUTPUT_FORWARDED: '1',
    };
    const proc = spawn(process.execPath, args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] });
    await new Promise<void>((ok, fail) => {
      proc.once('spawn', ok);
      proc.once('error', fail);
    });
    const pid = proc.pid!;
    const exited = new Promise<void>((r) => proc.once('close', () => r()));
    const child: Child = { pid, runId: run.id, proc, tail: [], stoppedByAgent: false, detached: false, exited };
    this.children.set(pid, child);
    this.forward(child, 'stdout');
    this.forward(child, 'stderr');
    // 'close': the pipes are drained too, so the tail is complete when the exit is judged.
    proc.once('close', (code, signal) => {
      if (child.detached) return;
      this.children.delete(pid);
      const p = this.onExit(child, code, signal).finally(() => this.exits.delete(p));
      this.exits.add(p);
      this.wake();
    });
  }

  protected override async onStop(opts: AgentStopOptions): Promise<void> {
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
        c.proc.stdout?.destroy();
        c.proc.stderr?.destroy();
        c.proc.unref();
        this.children.delete(c.pid);
      }
      if (kids.length > 0) this.say(`left ${kids.length} flow-run process(es) running: ${kids.map((c) => c.pid).join(', ')}`);
    }
    await Promise.all([...this.exits]);
  }

  private forward(child: Child, stream: 'stdout' | 'stderr'): void {
    const s = child.proc[stream];
    if (s === null) return;
    s.on('error', () => {}); // destroyed at stop: nothing to report
    const rl = createInterface({ input: s, crlfDelay: Infinity });
    rl.on('line', (raw: string) => {
      const line = raw.length > MAX_LINE ? `${raw.slice(0, MAX_LINE)}… (${raw.length - MAX_LINE} more characters)` : raw;
      if (stream === 'stderr') {
        child.tail.push(line);
        if (child.tail.length > TAIL_LINES) child.tail.shift();
      }
      this.logs.push({ flowRunId: child.runId, level: stream === 'stdout' ? 'info' : 'warn', message: line, at: Date.now(), source: 'flow-run' });
    });
  }

  /** A child ended: if its run is still in its hands, decide what becomes of it. */
  private async onExit(child: Child, code: number | null, sig: NodeJS.Signals | null): Promise<void> {
    if (code === 0 || child.stoppedByAgent) return;
    const how = sig !== null ? `was killed by ${sig}` : `exited with code ${code ?? '?'}`;
    // Its last lines reach the server before the verdict.
    await this.logs.flush();
    let run;
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
