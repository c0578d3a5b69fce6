/**
 * Agent: the long-running process that turns scheduled flow runs into running ones
 * (Prefect 1's agent). One base class, one subclass per way of starting a flow-run
 * process: `LocalAgent` (a child process), `DockerAgent` (a container), `KubernetesAgent`
 * (a Job). A subclass supplies only `kind` and `deploy(claimed)`.
 *
 * The loop:
 * - `start()` registers the agent (`registerAgent`) and polls `claimFlowRuns` for runs due
 *   before now + 10 s (prefetch) whose labels are all among the agent's. The server
 *   claims atomically (Scheduled → Submitted), so two agents never get the same run.
 *   Registration is by name: an agent restarted under its name keeps its record (and
 *   id), with its kind and labels as they are now.
 * - Polls back off when there is no work: 0.25 s, doubling up to 10 s; a poll that found
 *   work is followed by the next one at once. Prefect 1's agent does the same.
 * - A claimed run whose scheduledStart is in the future starts at that time (a timer);
 *   before it starts, the run is read again, so one cancelled meanwhile is not started.
 * - The agent's polls are its heartbeat: each claim updates its `lastSeen`, and the
 *   server lists an agent not seen within its agent timeout (default 60 s, well above
 *   the longest poll interval) as `unhealthy`. An agent at its `maxRuns` does not claim;
 *   it still polls with `before: 0` (claims nothing, updates `lastSeen`) at the longest
 *   poll interval.
 *
 * Which agent takes a run is decided by labels, as in Prefect 1: a run carries its run
 * config's and its storage's labels, an agent holds its own labels (plus implicit ones:
 * a LocalAgent adds `host:<hostname>`, which LocalStorage refs carry), and it gets runs
 * whose labels are all among its own. The run config's kind is not a label: the agent
 * names its kind in the claim and the server hands out only runs of that kind or
 * universal ones. Should a run of another kind reach it anyway (a server that does not
 * filter by kind), the agent fails it with a message saying which agent kind it needs.

 * Failure: a deploy that throws fails the run (Failed, with `expectVersion`, so a run
 * that moved meanwhile is left alone) with the cause in the run's logs (source
 * 'agent'); the agent keeps polling. A run the agent claimed but will not start (it was
 * stopped while the run waited for its start time) goes back to Scheduled.
 *
 * Health: with `healthPort`, GET /health answers 200 and
 * `{agent, runsStarted, runsFailed, activeRuns, lastPoll, polls}` (liveness probes).
 */
import { createServer, type Server } from 'node:http';
import { hostname } from 'node:os';
import { agentKindsFor } from '../run-config/index.ts';
import type { AgentRecord, Backend, ClaimedRun, FlowRun } from '../server/model.ts';
import { describe, isConflict } from './errors.ts';

// What subclasses use to name errors and refused writes.
export { describe, isConflict };
import { LogBatcher } from './logs.ts';

export type AgentKind = 'local' | 'docker' | 'kubernetes';

export interface AgentOptions {
  readonly backend: Backend;
  /** Default `<kind>-agent@<hostname>`. Agents registering with the same name are the same agent. */
  readonly name?: string;
  /** Runs whose labels are all among these (and the implicit ones) are taken. */
  readonly labels?: readonly string[];
  /** Runs claimed per poll at most (default 10). */
  readonly claimLimit?: number;
  /** Claim runs due within this many ms (default 10,000). */
  readonly prefetchMs?: number;
  /** First backoff step (default 250 ms) and the longest wait between polls (default 10,000 ms). */
  readonly pollMinMs?: number;
  readonly pollMaxMs?: number;
  /** Runs started and not finished at most; no claims past it (default: no limit). */
  readonly maxRuns?: number;
  /** Serve GET /health on this port (0: any free port; see `healthUrl`). */
  readonly healthPort?: number;
  /** Default 127.0.0.1. */
  readonly healthHost?: string;
  /** The agent's own lines (default: none). */
  readonly log?: (line: string) => void;
}

/** What GET /health answers. */
export interface AgentHealth {
  readonly agent: { readonly id: string | null; readonly name: string; readonly kind: AgentKind; readonly labels: readonly string[] };
  readonly runsStarted: number;
  readonly runsFailed: number;
  readonly activeRuns: number;
  /** When the last poll answered (ms since the epoch), null before the first. */
  readonly lastPoll: number | null;
  readonly polls: number;
}

export interface AgentStopOptions {
  /** Stop the runs this agent started, where the agent kind can (default false: they run on). */
  readonly stopRuns?: boolean;
}

/** The first polls' waits double from `pollMinMs`; this many steps reach far past any `pollMaxMs`. */
const MAX_BACKOFF_STEP = 16;

export abstract class Agent {
  abstract readonly kind: AgentKind;
  protected readonly backend: Backend;
  protected readonly opts: AgentOptions;
  /** Entries for the runs' logs (deploy errors, the output of started processes). */
  protected readonly logs: LogBatcher;
  /** Invariant: null until `start()` registered the agent. */
  private record: AgentRecord | null = null;
  private labelSet: readonly string[] | null = null;
  private running = false;
  private stopping = false;
  /** The next poll (at most one waiting). */
  private pollTimer: NodeJS.Timeout | null = null;
  /** The poll in flight; `stop()` waits for it. */
  private polling: Promise<void> | null = null;
  /** Consecutive polls that found nothing: the next wait is pollMinMs × 2^step (capped). */
  private backoffStep = 0;
  /** Claimed runs waiting for their start time, by run id. */
  private readonly timed = new Map<string, { timer: NodeJS.Timeout; claimed: ClaimedRun }>();
  /** `deploy` calls in flight (their starts); `stop()` waits for them. */
  private readonly deploying = new Set<Promise<void>>();
  private lastPoll: number | null = null;
  private polls = 0;
  private pollErrorShown = false;
  private runsStartedCount = 0;
  private runsFailedCount = 0;
  private health: Server | null = null;

  constructor(opts: AgentOptions) {
    this.opts = opts;
    this.backend = opts.backend;
    this.logs = new LogBatcher((entries) => this.backend.writeLogs(entries), {
      intervalMs: 250,
      onError: (err, dropped) => this.say(`cannot write logs to the server${dropped ? ' (batch refused, dropped)' : ''}: ${describe(err)}`),
    });
  }

  /** Start the flow run of a claimed run (a process, a container, a Job); resolves once it is started. */
  protected abstract deploy(claimed: ClaimedRun): Promise<void>;

  /** Labels the agent holds without being told (LocalAgent: `host:<hostname>`). */
  protected implicitLabels(): readonly string[] {
    return [];
  }

  /** Runs this agent started that have not finished (subclasses that track them add theirs). */
  protected activeRuns(): number {
    return this.timed.size + this.deploying.size;
  }

  /** Called by `stop()` after polling ended; stop what the agent kind keeps (processes, watches). */
  protected async onStop(_opts: AgentStopOptions): Promise<void> {}

  get name(): string {
    return this.opts.name ?? `${this.kind}-agent@${hostname()}`;
  }

  /** The agent's record id (null before `start()`). */
  get id(): string | null {
    return this.record?.id ?? null;
  }

  /** Its labels: the given ones and the implicit ones, each once. */
  get labels(): readonly string[] {
    this.labelSet ??= [...new Set([...(this.opts.labels ?? []), ...this.implicitLabels()])];
    return this.labelSet;
  }

  get runsStarted(): number {
    return this.runsStartedCount;
  }

  /** The health endpoint's URL (null without `healthPort`). */
  get healthUrl(): string | null {
    const a = this.health?.address();
    if (a === undefined || a === null || typeof a === 'string') return null;
    const host = a.family === 'IPv6' ? `[${a.address}]` : a.address;
    return `http://${host}:${a.port}/health`;
  }

  healthReport(): AgentHealth {
    return {
      agent: { id: this.id, name: this.name, kind: this.kind, labels: this.labels },
      runsStarted: this.runsStartedCount,
      runsFailed: this.runsFailedCount,
      activeRuns: this.activeRuns(),
      lastPoll: this.lastPoll,
      polls: this.polls,
    };
  }

  /** Register, open the health endpoint, start polling. Rejects when the server cannot be reached. */
  async start(): Promise<void> {
    if (this.running) throw new Error(`agent ${this.name} is already started`);
    this.record = await this.backend.registerAgent({ name: this.name, kind: this.kind, labels: this.labels });
    this.running = true;
    if (this.opts.healthPort !== undefined) await this.openHealth(this.opts.healthPort, this.opts.healthHost ?? '127.0.0.1');
    this.say(`agent ${this.name} (${this.kind}) started with labels [${this.labels.join(', ')}]`);
    this.schedulePoll(0);
  }

  /**
   * Stop polling; runs waiting for their start time go back to Scheduled; starts in
   * flight finish. What happens to started runs is the agent kind's (`stopRuns`).
   */
  async stop(opts: AgentStopOptions = {}): Promise<void> {
    if (!this.running || this.stopping) return;
    this.stopping = true;
    if (this.pollTimer !== null) clearTimeout(this.pollTimer);
    this.pollTimer = null;
    if (this.polling !== null) await this.polling;
    const waiting = [...this.timed.values()];
    this.timed.clear();
    for (const w of waiting) clearTimeout(w.timer);
    await Promise.all(waiting.map((w) => this.release(w.claimed.run, 'the agent stopped before its start time')));
    await Promise.all([...this.deploying]);
    await this.onStop(opts);
    await this.logs.close();
    if (this.health !== null) {
      const h = this.health;
      this.health = null;
      h.closeAllConnections();
      await new Promise<void>((resolve) => h.close(() => resolve()));
    }
    this.running = false;
    this.say(`agent ${this.name} stopped`);
  }

  /** Poll now (after a run finished and freed room under `maxRuns`). */
  protected wake(): void {
    if (!this.running || this.stopping || this.polling !== null) return;
    this.schedulePoll(0);
  }

  protected say(line: string): void {
    this.opts.log?.(line);
  }

  protected get isStopping(): boolean {
    return this.stopping;
  }

  /**
   * Fail a run the agent could not start or lost: the cause goes to its logs first (so a
   * reader who sees Failed finds why), then the state, guarded by the version read.
   * `details` (an output tail) goes to the logs only, not into the run's message.
   */
  protected async failRun(run: FlowRun, message: string, details?: string): Promise<void> {
    this.runsFailedCount++;
    this.say(`run ${run.id} (${run.flowName}): ${message}`);
    try {
      const text = details === undefined ? message : `${message}\n${details}`;
      await this.backend.writeLogs([{ flowRunId: run.id, level: 'error', message: text, at: Date.now(), source: 'agent' }]);
    } catch (err) {
      this.say(`cannot write the logs of run ${run.id}: ${describe(err)}`);
    }
    try {
      await this.backend.setFlowRunState(run.id, 'Failed', { message, expectVersion: run.stateVersion });
    } catch (err) {
      if (isConflict(err)) this.say(`run ${run.id} moved on meanwhile; not marked Failed`);
      else this.say(`cannot mark run ${run.id} Failed: ${describe(err)}`);
    }
  }

  // --- polling ------------------------------------------------------------------

  private schedulePoll(delayMs: number): void {
    if (this.pollTimer !== null) clearTimeout(this.pollTimer);
    this.pollTimer = setTimeout(() => {
      this.pollTimer = null;
      this.polling = this.poll().finally(() => {
        this.polling = null;
      });
    }, delayMs);
  }

  private async poll(): Promise<void> {
    const o = this.opts;
    const room = (o.maxRuns ?? Infinity) - this.activeRuns();
    let found = 0;
    try {
      const claimed = await this.backend.claimFlowRuns({
        agentId: this.record!.id,
        labels: this.labels,
        kind: this.kind,
        // At capacity: a claim of nothing (due before the epoch), which still says the agent is alive.
        before: room > 0 ? Date.now() + (o.prefetchMs ?? 10_000) : 0,
        limit: Math.max(1, Math.min(o.claimLimit ?? 10, room)),
      });
      this.lastPoll = Date.now();
      this.polls++;
      if (this.pollErrorShown) this.say('the server answers again');
      this.pollErrorShown = false;
      found = claimed.length;
      for (const c of claimed) this.accept(c);
    } catch (err) {
      // One line per outage, not one per poll.
      if (!this.pollErrorShown) this.say(`cannot poll the server (retrying with backoff): ${describe(err)}`);
      this.pollErrorShown = true;
    }
    if (this.stopping) return;
    if (found > 0) {
      this.backoffStep = 0;
      this.schedulePoll(0);
      return;
    }
    const min = o.pollMinMs ?? 250;
    const max = o.pollMaxMs ?? 10_000;
    // At capacity `wake()` polls as soon as a run ends; until then only the liveness claim.
    const wait = room > 0 ? Math.min(min * 2 ** this.backoffStep, max) : max;
    if (room > 0 && this.backoffStep < MAX_BACKOFF_STEP) this.backoffStep++;
    this.schedulePoll(wait);
  }

  private accept(claimed: ClaimedRun): void {
    const { run, version } = claimed;
    if (this.stopping) {
      void this.release(run, 'the agent is stopping');
      return;
    }
    if (!agentKindsFor(version.runConfig).includes(this.kind)) {
      this.track(
        this.failRun(
          run,
          `a ${this.kind} agent cannot start a run whose run config is ${version.runConfig.kind}: ` +
            `give the flow's runs a label that only ${version.runConfig.kind} agents hold`,
        ),
      );
      return;
    }
    const delay = run.scheduledStart - Date.now();
    if (delay <= 0) {
      this.track(this.startRun(claimed, false));
      return;
    }
    const timer = setTimeout(() => {
      this.timed.delete(run.id);
      this.track(this.startRun(claimed, true));
    }, delay);
    this.timed.set(run.id, { timer, claimed });
  }

  private track(p: Promise<void>): void {
    this.deploying.add(p);
    void p.finally(() => this.deploying.delete(p));
  }

  private async startRun(claimed: ClaimedRun, waited: boolean): Promise<void> {
    let run = claimed.run;
    try {
      if (waited) {
        // It waited for its start time: a cancel (or anything else) may have moved it meanwhile.
        run = await this.backend.getFlowRun(run.id);
        if (run.state !== 'Submitted') {
          this.say(`run ${run.id} is ${run.state} at its start time; not starting it`);
          return;
        }
        claimed = { run, version: claimed.version };
      }
      await this.deploy(claimed);
      this.runsStartedCount++;
      this.say(`started run ${run.id} of ${run.project}/${run.flowName}`);
    } catch (err) {
      await this.failRun(run, `${this.kind} agent ${this.name} could not start the run: ${describe(err)}`);
    }
  }

  /** Give a claimed run back (Submitted → Scheduled) so another agent starts it. */
  private async release(run: FlowRun, why: string): Promise<void> {
    try {
      await this.backend.setFlowRunState(run.id, 'Scheduled', { message: `released: ${why}`, expectVersion: run.stateVersion });
    } catch (err) {
      // Lazarus puts a Submitted run that never started back to Scheduled in time.
      this.say(`cannot release run ${run.id} (${describe(err)}); it stays Submitted until lazarus reschedules it`);
    }
  }

  private async openHealth(port: number, host: string): Promise<void> {
    const server = createServer((req, res) => {
      const path = (req.url ?? '/').split('?')[0];
      if (req.method === 'GET' && path === '/health') {
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(this.healthReport()));
        return;
      }
      res.writeHead(404, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ error: 'not found: GET /health' }));
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, host, () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.health = server;
  }
}
