/**
 * The flow-run process: runs one flow run of a registered flow, start to end, and keeps
 * the backend told (`weft execute flow-run <id>`, what agents start).
 *
 * 1. Claim. Read the run and its version; move it Submitted (or Scheduled, when started
 *    by hand) → Running naming the stateVersion read. A refused move means another
 *    process has the run: exit 0 without running anything.
 * 2. Load. Get the flow's code from its storage (`loadFromStorage`, scratch space under
 *    the OS temp directory) and pick the flow by name; build the executor the version
 *    names (local, pool, cluster). A failure here fails the run with the cause.
 * 3. Restart. When the run ran before (lazarus rescheduled it, or task runs exist), the
 *    server's task runs become the runner's `restartFrom`: tasks that ended Success or
 *    Cached there and whose results were checkpointed (under `resultDir`, shared by the
 *    attempts) are restored, not recomputed. Every attempt runs with the server's flow-run
 *    id as its `runId`, so a `{runId}` location names the same file in each of them.
 * 4. Run, with three side channels:
 *    - task states → `setTaskRunStates`, batched (TaskStateWriter), each write naming
 *      the version this process last saw of that task run; a refused write means the
 *      run is no longer ours: stop at once and write nothing more (fail-safe);
 *    - heartbeats → `heartbeatFlowRun` every `heartbeatMs`; an answer of Cancelling
 *      aborts the run through its AbortSignal (running tasks are stopped, not waited
 *      for) and the run ends Cancelled; an answer that shows another state or another
 *      Running (a newer stateVersion) means the run was taken away: stop, write nothing;
 *    - logs → `writeLogs`, batched: the process's own lines, each failed task's error,
 *      and (when no agent forwards the process's output) its console (ConsoleCapture).
 * 5. End. The flow's final state (Success, Failed, Cancelled; a Paused flow is Failed:
 *    nobody can resume it here) with its message, guarded by the version this process
 *    holds. A cancel that arrived after the last heartbeat is looked up and honoured.
 *
 * Exit codes: 0 the run succeeded, or it was not (or no longer) this process's to run;
 * 1 it ended Failed or Cancelled, or the server could not be reached at the start.
 * After a stop the run is not awaited past `stopGraceMs`: task code that cannot be
 * stopped in-process (a synchronous loop, a pending timer) is left to the process exit.
 *
 * Task tag concurrency limits (the server's) apply through `SlotGate` (slots.ts), which
 * sees task calls. Local and pool executors take calls. A cluster executor runs the whole
 * graph on its scheduler (graph mode, the fast path) unless the server limits a tag of
 * the flow's tasks, or the run restarts (the scheduler cannot restart a run): then it runs
 * in call mode, the runner here dispatching each call through the gate. The run's logs
 * say which mode and why. Limits are read when the run starts: a limit set later on a
 * tag of a graph-mode run applies from the next run.
 */
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { readTokenFile } from '../cluster/auth.ts';
import type { Executor } from '../executor/types.ts';
import { LocalExecutor, PoolExecutor, ClusterExecutor } from '../executor/index.ts';
import type { GraphSpec, TaskStateName } from '../flow/spec.ts';
import type { FlowRunResult, RestartRecord, RunOptions } from '../runner/types.ts';
import { BackendError, type Backend, type ExecutorSettings, type FlowRun, type FlowRunState, type FlowVersion, type LogLevel } from '../server/model.ts';
import { loadFromStorage } from '../storage/index.ts';
import type { LoadedCode } from '../storage/types.ts';
import { describe, isConflict } from '../agent/errors.ts';
import { LogBatcher } from '../agent/logs.ts';
import { loadFlow, type RunnableFlow } from '../cli/load.ts';
import { ConsoleCapture } from './console.ts';
import { SlotGate, taggedKeys } from './slots.ts';
import { TaskStateWriter } from './task-states.ts';

export interface FlowRunProcessOptions {
  readonly backend: Backend;
  readonly flowRunId: string;
  /** Base of relative paths (default: the process's cwd). */
  readonly cwd?: string;
  /** Checkpointed results (default `.weft/results` under `cwd`); every attempt of a run must see the same directory. */
  readonly resultDir?: string;
  /** Default 2,000 ms: also how soon a cancel is noticed. */
  readonly heartbeatMs?: number;
  /** Task state writes, default every 150 ms. */
  readonly stateIntervalMs?: number;
  /** Scratch space for the flow's code (default the OS temp directory). */
  readonly workDir?: string;
  /** An agent ships this process's stdout/stderr (WEFT_OUTPUT_FORWARDED=1): do not ship the console here. */
  readonly outputForwarded?: boolean;
  /** Wrap process.stdout/stderr to ship console lines (default true; off for in-process use). */
  readonly captureConsole?: boolean;
  /** After a cancel or a loss, how long the run may take to wind down before it is left behind (default 1,500 ms). */
  readonly stopGraceMs?: number;
  /** The token of a cluster the version's executor names (default: WEFT_CLUSTER_TOKEN_FILE's content). */
  readonly clusterToken?: string;
  /** Where the process's own lines are printed when no agent forwards them (default stderr). */
  readonly print?: (line: string) => void;
}

export interface FlowRunProcessResult {
  readonly code: number;
  /** The process ran (part of) the flow. */
  readonly ran: boolean;
  /** The final state it wrote (null: it wrote none). */
  readonly state: FlowRunState | null;
  readonly message: string;
  readonly processId: string;
}

const FAILED_LIKE: ReadonlySet<TaskStateName> = new Set<TaskStateName>(['Failed', 'TimedOut', 'TriggerFailed']);

export async function executeFlowRun(o: FlowRunProcessOptions): Promise<FlowRunProcessResult> {
  const { backend, flowRunId: id } = o;
  const processId = `${hostname()}:${process.pid}:${randomUUID().slice(0, 8)}`;
  const print = o.print ?? ((line: string) => void process.stderr.write(`${line}\n`));
  const done = (code: number, message: string): FlowRunProcessResult => {
    print(`weft execute: flow run ${id}: ${message}`);
    return { code, ran: false, state: null, message, processId };
  };

  let run: FlowRun;
  let version: FlowVersion;
  try {
    run = await backend.getFlowRun(id);
    if (run.state !== 'Submitted' && run.state !== 'Scheduled') return done(0, `it is ${run.state}: nothing to run here`);
    version = await backend.getFlowVersion(run.versionId);
  } catch (err) {
    return done(1, `cannot read it from the server: ${describe(err)}`);
  }
  try {
    run = await backend.setFlowRunState(id, 'Running', { expectVersion: run.stateVersion, message: `running in process ${processId}` });
  } catch (err) {
    if (isConflict(err)) return done(0, 'another process started it first: nothing to run here');
    return done(1, `cannot move it to Running: ${describe(err)}`);
  }
  return new FlowRunProcess(o, run, version, processId, print).execute();
}

/** What stopped the run before its end. */
type Stop = { readonly why: 'cancel' } | { readonly why: 'lost'; readonly reason: string };

/** One run, from Running to its final state. */
class FlowRunProcess {
  private readonly backend: Backend;
  private readonly id: string;
  private readonly logs: LogBatcher;
  private readonly console: ConsoleCapture;
  private readonly controller = new AbortController();
  /** Invariant: the newest run record this process has seen (its stateVersion guards the final write). */
  private run: FlowRun;
  private stop: Stop | null = null;
  /** Resolves (null) `stopGraceMs` after a stop: the run is not awaited longer. */
  private abandoned: Promise<null>;
  private abandon!: () => void;
  private heartbeatTimer: NodeJS.Timeout | null = null;
  private heartbeating: Promise<void> | null = null;
  private heartbeatErrorShown = false;
  private writer: TaskStateWriter | null = null;

  constructor(
    private readonly o: FlowRunProcessOptions,
    run: FlowRun,
    private readonly version: FlowVersion,
    private readonly processId: string,
    private readonly print: (line: string) => void,
  ) {
    this.backend = o.backend;
    this.id = run.id;
    this.run = run;
    this.logs = new LogBatcher((entries) => this.backend.writeLogs(entries), { intervalMs: 200 });
    this.console = new ConsoleCapture((stream, line) => {
      this.logs.push({ flowRunId: this.id, level: stream === 'stdout' ? 'info' : 'warn', message: line, at: Date.now(), source: 'flow-run' });
    }, o.outputForwarded === true);
    this.abandoned = new Promise<null>((r) => {
      this.abandon = () => r(null);
    });
  }

  async execute(): Promise<FlowRunProcessResult> {
    if (this.o.captureConsole !== false) this.console.start();
    this.armHeartbeat();
    let loaded: LoadedCode | null = null;
    let workDir: string | null = null;
    try {
      const cwd = this.o.cwd ?? process.cwd();
      let flow: RunnableFlow;
      try {
        workDir = await mkdtemp(join(this.o.workDir ?? tmpdir(), 'weft-run-'));
        loaded = await loadFromStorage(this.version.storage, { backend: this.backend, workDir, log: (l) => this.say('info', l) });
        flow = (await loadFlow(modulePath(loaded.module), { cwd, flowName: loaded.flow })).flow;
      } catch (err) {
        return await this.finish('Failed', `cannot load the flow: ${describe(err)}`);
      }
      if (this.stop !== null) {
        // Stopped while loading: nothing ran.
        return this.stop.why === 'lost' ? await this.lost(this.stop.reason) : await this.finish('Cancelled', 'cancelled before the flow started');
      }

      let executor: Executor;
      try {
        executor = await this.makeExecutor(this.version.executor);
      } catch (err) {
        return await this.finish('Failed', `cannot create the ${this.version.executor.kind} executor: ${describe(err)}`);
      }
      let known;
      try {
        known = await this.backend.getTaskRuns(this.id);
      } catch (err) {
        await executor.shutdown();
        return await this.finish('Failed', `cannot read the run's task runs: ${describe(err)}`);
      }
      const writer = new TaskStateWriter(this.backend, this.id, this.processId, known, {
        intervalMs: this.o.stateIntervalMs ?? 150,
        onLost: (reason) => this.stopRun({ why: 'lost', reason }),
        onError: (err) => this.say('warn', `cannot write task states (retrying): ${describe(err)}`),
      });
      this.writer = writer;

      const restarting = this.run.restarts > 0 || known.length > 0;
      executor = await this.gated(executor, flow.spec(), restarting);
      const runId = runIdOf(this.run.id);
      const opts: RunOptions = {
        runId,
        parameters: { ...this.run.parameters },
        executor,
        resultDir: resolve(cwd, this.o.resultDir ?? '.weft/results'),
        signal: this.controller.signal,
        onTaskState: (e) => writer.record(e),
      };
      if (restarting) {
        const restart: RestartRecord = {
          runId,
          parameters: this.run.parameters,
          tasks: known.map((t) => ({ key: t.key, mapIndex: t.mapIndex, state: t.state })),
        };
        opts.restartFrom = restart;
        const reusable = known.filter((t) => t.state === 'Success' || t.state === 'Cached').length;
        this.say('info', `restart ${this.run.restarts}: ${reusable} of ${known.length} task runs ended well before; their checkpointed results are reused`);
      }
      this.say('info', `running flow ${flow.name} (version ${this.version.version}, executor ${executor.kind}) in process ${this.processId}`);

      const running = flow.run(opts);
      running.catch(() => {}); // awaited below, unless abandoned after a stop
      let result: FlowRunResult | null;
      try {
        result = await Promise.race([running, this.abandoned]);
      } catch (err) {
        // Raised before any task ran (bad parameters, a task that cannot be resolved).
        return await this.finish('Failed', `the flow could not run: ${describe(err)}`);
      }
      if (this.stop !== null) return await this.finishStopped(result);
      return await this.finishResult(result!);
    } finally {
      this.stopHeartbeat();
      if (this.heartbeating !== null) await this.heartbeating;
      this.console.stop();
      await this.logs.close();
      try {
        await loaded?.cleanup();
        if (workDir !== null) await rm(workDir, { recursive: true, force: true });
      } catch {
        // scratch space: the OS cleans its temp directory
      }
    }
  }

  // --- the end --------------------------------------------------------------------

  private async finishResult(result: FlowRunResult): Promise<FlowRunProcessResult> {
    const writer = this.writer!;
    for (const t of result.tasks) {
      if (!FAILED_LIKE.has(t.state) || t.error === undefined) continue;
      const label = `${t.key}${t.mapIndex >= 0 ? `[${t.mapIndex}]` : ''}`;
      const message = `${t.error.name}: ${t.error.message}`;
      writer.note(t.key, t.mapIndex, t.state, message);
      const stack = t.error.stack !== undefined && t.error.stack !== '' ? `\n${t.error.stack.split('\n').slice(0, 20).join('\n')}` : '';
      this.logs.push({
        flowRunId: this.id,
        taskKey: t.key,
        mapIndex: t.mapIndex,
        level: 'error',
        message: `task ${label} ${t.state} after ${t.attempts} attempt(s): ${message}${stack}`,
        at: Date.now(),
        source: 'task',
      });
    }
    const state: FlowRunState = result.state === 'Paused' ? 'Failed' : result.state;
    const message = result.state === 'Paused' ? `paused tasks cannot be resumed in a deployed run: ${result.message}` : result.message;
    return this.finish(state, message, true);
  }

  /** The run was stopped (cancel, or taken away) before it finished. */
  private async finishStopped(result: FlowRunResult | null): Promise<FlowRunProcessResult> {
    const stop = this.stop!;
    if (stop.why === 'lost') return this.lost(stop.reason);
    if (result === null) this.say('warn', 'the cancelled run did not wind down in time; its remaining task code is left to the process exit');
    return this.finish('Cancelled', 'cancelled', result !== null);
  }

  /** Write the final state (task states first); a cancel that came in meanwhile is honoured. */
  private async finish(state: FlowRunState, message: string, ran = false): Promise<FlowRunProcessResult> {
    this.stopHeartbeat();
    if (this.writer !== null) {
      if (this.stop?.why === 'lost') this.writer.abandon();
      else await this.writer.close();
    }
    if (this.stop?.why === 'lost') return this.lost(this.stop.reason);
    this.say(state === 'Success' ? 'info' : 'error', `flow run ended ${state}: ${message}`);
    await this.logs.flush();
    let expect = this.run.stateVersion;
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        this.run = await this.backend.setFlowRunState(this.id, state, { message, expectVersion: expect });
        return { code: state === 'Success' ? 0 : 1, ran, state, message, processId: this.processId };
      } catch (err) {
        if (!isConflict(err) || attempt > 0) {
          this.say('error', `cannot write the final state ${state}: ${describe(err)}`);
          return { code: 1, ran, state: null, message, processId: this.processId };
        }
      }
      // Refused: a cancel (Running → Cancelling) is the one change that leaves the run ours.
      let fresh: FlowRun;
      try {
        fresh = await this.backend.getFlowRun(this.id);
      } catch (err) {
        this.say('error', `cannot write the final state ${state}: ${describe(err)}`);
        return { code: 1, ran, state: null, message, processId: this.processId };
      }
      if (fresh.state === state) return { code: state === 'Success' ? 0 : 1, ran, state, message, processId: this.processId };
      if (fresh.state !== 'Cancelling') return this.lost(`the run is ${fresh.state} (version ${fresh.stateVersion}) at its end`);
      expect = fresh.stateVersion;
    }
    return { code: 1, ran, state: null, message, processId: this.processId };
  }

  private async lost(reason: string): Promise<FlowRunProcessResult> {
    this.writer?.abandon();
    const message = `stopped without a final state: the run is no longer this process's (${reason})`;
    this.say('warn', message);
    await this.logs.flush();
    // 0: an agent watching this process must not fail a run that another process holds now.
    return { code: 0, ran: true, state: null, message, processId: this.processId };
  }

  private stopRun(stop: Stop): void {
    if (this.stop !== null) return;
    this.stop = stop;
    this.say(stop.why === 'cancel' ? 'info' : 'warn', stop.why === 'cancel' ? 'cancel requested: stopping the run' : `stopping: ${stop.reason}`);
    this.controller.abort();
    setTimeout(this.abandon, this.o.stopGraceMs ?? 1_500).unref();
  }

  // --- heartbeats -------------------------------------------------------------------

  private armHeartbeat(): void {
    this.heartbeatTimer = setTimeout(() => {
      this.heartbeatTimer = null;
      this.heartbeating = this.beat().finally(() => {
        this.heartbeating = null;
        if (this.stop === null && this.heartbeatTimer === null && !this.heartbeatStopped) this.armHeartbeat();
      });
    }, this.o.heartbeatMs ?? 2_000);
  }

  private heartbeatStopped = false;

  private stopHeartbeat(): void {
    this.heartbeatStopped = true;
    if (this.heartbeatTimer !== null) clearTimeout(this.heartbeatTimer);
    this.heartbeatTimer = null;
  }

  private async beat(): Promise<void> {
    let r: FlowRun;
    try {
      r = await this.backend.heartbeatFlowRun(this.id);
      if (this.heartbeatErrorShown) this.say('info', 'heartbeats reach the server again');
      this.heartbeatErrorShown = false;
    } catch (err) {
      if (err instanceof BackendError && err.status === 404) {
        this.stopRun({ why: 'lost', reason: 'the server no longer knows the run' });
      } else if (isConflict(err)) {
        // The server refuses heartbeats of a run that is not running: see what it is.
        try {
          this.judge(await this.backend.getFlowRun(this.id));
        } catch {
          // judged at the next beat
        }
      } else if (!this.heartbeatErrorShown) {
        this.heartbeatErrorShown = true;
        this.say('warn', `heartbeat failed (the run goes on; retrying): ${describe(err)}`);
      }
      return;
    }
    this.judge(r);
  }

  /** What the server says of the run, as seen by a heartbeat. */
  private judge(r: FlowRun): void {
    if (r.state === 'Cancelling' || r.state === 'Cancelled') {
      this.run = r;
      this.stopRun({ why: 'cancel' });
    } else if (r.state !== 'Running') {
      this.stopRun({ why: 'lost', reason: `the server has it ${r.state}${r.message !== null ? ` (${r.message})` : ''}` });
    } else if (r.stateVersion !== this.run.stateVersion) {
      this.stopRun({ why: 'lost', reason: 'another process moved it to Running since' });
    }
  }

  // --- executor mode -------------------------------------------------------------------

  /**
   * The executor the run uses, so that the server's task tag limits hold whatever the
   * executor: one that takes task calls is wrapped by a SlotGate when some task has tags.
   * One that runs the whole graph elsewhere (a cluster) keeps graph mode unless the server
   * limits one of those tags or the run restarts; then its call mode, gated.
   */
  private async gated(executor: Executor, spec: GraphSpec, restarting: boolean): Promise<Executor> {
    const tagged = taggedKeys(spec);
    const gate = (inner: Executor): Executor =>
      tagged.size === 0 ? inner : new SlotGate(inner, { backend: this.backend, flowRunId: this.id, tags: tagged, log: (l) => this.say('info', l) });
    if (executor.runGraph === undefined) return gate(executor);
    const limited = tagged.size > 0 ? await this.limitedTags(tagged) : [];
    const why: string[] = [];
    if (limited.length > 0) why.push(`the server limits the task tag(s) ${limited.join(', ')}`);
    if (restarting) why.push('the run restarts from checkpoints, which a scheduler-side run cannot');
    if (why.length === 0) {
      const reason = tagged.size === 0 ? 'no task has tags' : 'the server limits none of the task tags';
      this.say('info', `${executor.kind} executor in graph mode (the whole graph runs on its scheduler): ${reason}`);
      return executor;
    }
    if (executor.asCalls === undefined) {
      this.say('warn', `${executor.kind} executor in graph mode, though ${why.join(' and ')}: it cannot take task calls`);
      return executor;
    }
    this.say('info', `${executor.kind} executor in call mode (this process dispatches each task call): ${why.join(' and ')}`);
    return gate(executor.asCalls());
  }

  /**
   * The tags of `tagged` that have a limit on the server. A server that cannot be asked
   * counts as limiting every one: call mode is slower, never wrong.
   */
  private async limitedTags(tagged: ReadonlyMap<string, readonly string[]>): Promise<string[]> {
    const tags = new Set<string>();
    for (const ts of tagged.values()) for (const t of ts) tags.add(t);
    try {
      const limits = await this.backend.listConcurrencyLimits();
      return [...new Set(limits.filter((l) => l.kind === 'tag' && tags.has(l.name)).map((l) => l.name))].sort();
    } catch (err) {
      this.say('warn', `cannot read the server's concurrency limits (treating every task tag as limited): ${describe(err)}`);
      return [...tags].sort();
    }
  }

  // --- helpers ------------------------------------------------------------------------

  private say(level: LogLevel, message: string): void {
    this.logs.push({ flowRunId: this.id, level, message, at: Date.now(), source: 'flow-run' });
    // An agent forwarding the output would ship a printed copy a second time.
    if (this.o.outputForwarded !== true) {
      const line = `[weft flow-run ${this.id}] ${message}`;
      if (this.console.ships && this.o.captureConsole !== false) this.console.writeRaw('stderr', `${line}\n`);
      else this.print(line);
    }
  }

  private async makeExecutor(s: ExecutorSettings): Promise<Executor> {
    switch (s.kind) {
      case 'local':
        return new LocalExecutor();
      case 'pool':
        return new PoolExecutor(s.threads !== undefined ? { threads: s.threads } : {});
      case 'cluster': {
        let token = this.o.clusterToken;
        const tokenFile = process.env.WEFT_CLUSTER_TOKEN_FILE;
        if (token === undefined && tokenFile !== undefined && tokenFile !== '') token = await readTokenFile(tokenFile);
        return new ClusterExecutor({
          ...(s.address !== undefined ? { address: s.address } : {}),
          ...(s.address === undefined && s.workers !== undefined ? { workers: s.workers } : {}),
          ...(s.address === undefined && s.threads !== undefined ? { threads: s.threads } : {}),
          ...(token !== undefined ? { token } : {}),
          onLog: (r) => {
            this.logs.push({
              flowRunId: this.id,
              level: r.level,
              message: r.msg.endsWith('\n') ? r.msg.slice(0, -1) : r.msg,
              at: r.at,
              source: 'task',
              ...(r.key !== undefined ? { taskKey: r.key } : {}),
            });
          },
        });
      }
    }
  }
}

/** The runner's `runId` for a server flow-run id (ids are UUIDs; anything else is made path-safe). */
function runIdOf(flowRunId: string): string {
  const id = flowRunId.replace(/[^A-Za-z0-9._=-]/g, '_');
  return /^\.*$/.test(id) ? `run_${id}` : id;
}

/** A loader's module (a path or a file: URL) as a path for `loadFlow`. */
function modulePath(module: string): string {
  return module.startsWith('file:') ? fileURLToPath(module) : module;
}
