/**
 * DockerAgent: starts each flow run as a container through the Docker Engine API
 * (Prefect 1's Docker agent), `node <weft bin> execute flow-run <id> --server <url>`.
 *
 * - Image: DockerRun.image, else the DockerStorage image (it carries the flow's code),
 *   else the agent's default image; a run with none is a deploy error. An image missing
 *   on the daemon is pulled (from its registry when the name has one, with the agent's
 *   credentials); one that cannot be pulled fails the run with the registry's answer.
 *   `pull: 'always'` pulls every time, `'never'` only uses what the daemon has.
 * - weft inside the container: DockerStorage links the image's bundle to weft's
 *   absolute path (`src/storage/docker.ts`), so by default this installation is
 *   bind-mounted read-only at its own path and the container runs its bin/weft.js
 *   (`mountWeft: false` and `weftBin` for images that carry weft themselves).
 * - Container: labels `weft.flow-run-id`, `weft.agent` (the agent's id), `weft.flow`;
 *   env = the agent's `env`, then the run config's, then WEFT_SERVER, WEFT_FLOW_RUN_ID,
 *   WEFT_AGENT_ID, WEFT_OUTPUT_FORWARDED; HostConfig = the agent's defaults (NetworkMode
 *   `host`, so a server on 127.0.0.1 is reachable as the agent reaches it; an init
 *   process, so signals reach node), then DockerRun.hostConfig (Memory, NanoCpus,
 *   NetworkMode, ...), with Binds added up (weft, the token file, the agent's
 *   `volumes`, the run config's) and PortBindings from DockerRun.ports. The server's
 *   token file, when the agent has one, is bind-mounted read-only at its path and passed
 *   with `--token-file`.
 * - Output: the agent follows the container's stdout and stderr, line by line, into the
 *   run's logs (source 'flow-run'; stdout at info, stderr at warn), batched with every
 *   other run's (WEFT_OUTPUT_FORWARDED=1 tells the process not to ship them itself).
 * - Exit: the agent waits for each container. One that exits non-zero while its run is
 *   still Submitted or Running did not finish its run (a crash, a bad image, the OOM
 *   killer): the run fails with the exit code (and OOMKilled when so) and its last 20
 *   output lines in its logs; a Cancelling run becomes Cancelled. Then the container is
 *   removed (`removeContainers: false` keeps it for inspection).
 * - Errors of the daemon (unreachable, image missing, create refused) are deploy errors:
 *   the run fails with the cause and the agent keeps polling (the base class).
 * - Stop: as the local agent, `stop()` leaves the containers running (their processes
 *   report to the server on their own; they are no longer followed or removed);
 *   `stop({ stopRuns: true })` stops them (SIGTERM, SIGKILL after 5 s) and removes them.
 */
import { randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { DockerEngine, DockerError, isNotFound, publishPorts, registryOf, type DockerEngineOptions, type HostConfig, type RegistryAuth } from '../docker/engine.ts';
import type { LogStream } from '../docker/streams.ts';
import type { ClaimedRun, FlowRunState } from '../server/model.ts';
import { Agent, describe, type AgentOptions, type AgentStopOptions } from './agent.ts';

/** This installation's root (no trailing slash): mounted into containers at the same path. */
export const WEFT_ROOT = fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '');

const TAIL_LINES = 20;
const MAX_LINE = 8_192;
const STOP_GRACE_S = 5;

export interface DockerAgentOptions extends AgentOptions {
  /** The server's base URL as the flow-run containers reach it. */
  readonly serverUrl: string;
  /** The daemon: a client, or options for one (default `$DOCKER_HOST`, else the standard socket). */
  readonly engine?: DockerEngine | DockerEngineOptions;
  /** Image of runs that name none (neither DockerRun.image nor DockerStorage). */
  readonly image?: string;
  /** `missing` (default): pull only images the daemon lacks; `always`; `never`. */
  readonly pull?: 'missing' | 'always' | 'never';
  /** Credentials for pulls. */
  readonly registryAuth?: RegistryAuth;
  /** Environment variables of every run (a run config's `env` overrides them). */
  readonly env?: Readonly<Record<string, string>>;
  /** HostConfig of every container (a run config's `hostConfig` overrides it field by field). Default `{ NetworkMode: 'host', Init: true }`. */
  readonly hostConfig?: HostConfig;
  /** Binds of every container, `host:container[:ro]`. */
  readonly volumes?: readonly string[];
  /** Bind this installation read-only at its own path (default true). */
  readonly mountWeft?: boolean;
  /** The weft command inside the container (default this installation's bin/weft.js). */
  readonly weftBin?: string;
  /** The server's API token file: bind-mounted read-only at its path and passed with `--token-file`. */
  readonly tokenFile?: string;
  /** Remove a container once it exited and its exit was handled (default true). */
  readonly removeContainers?: boolean;
}

/** A container the agent started and follows. */
interface Running {
  readonly id: string;
  readonly name: string;
  readonly runId: string;
  /** Last output lines (both streams), at most TAIL_LINES. */
  readonly tail: string[];
  /** Ends the log follow and the wait (stop without stopRuns). */
  readonly abort: AbortController;
  /** The agent stopped it: its exit is not a crash. */
  stoppedByAgent: boolean;
  /** Resolves when the exit was handled (or the agent let go of it). */
  done: Promise<void>;
}

export class DockerAgent extends Agent {
  readonly kind = 'docker' as const;
  readonly engine: DockerEngine;
  private readonly docker: DockerAgentOptions;
  /** Containers started and not yet handled, by id. */
  private readonly started = new Map<string, Running>();

  constructor(opts: DockerAgentOptions) {
    super(opts);
    this.docker = opts;
    this.engine = opts.engine instanceof DockerEngine ? opts.engine : new DockerEngine(opts.engine);
  }

  /** Ids of the containers running now, with their run ids. */
  get containers(): ReadonlyMap<string, string> {
    return new Map([...this.started.values()].map((r) => [r.id, r.runId]));
  }

  protected override activeRuns(): number {
    return super.activeRuns() + this.started.size;
  }

  protected override async deploy(claimed: ClaimedRun): Promise<void> {
    const { run, version } = claimed;
    const rc = version.runConfig;
    const o = this.docker;
    const dr = rc.kind === 'docker' ? rc : undefined;
    const image = dr?.image ?? (version.storage.kind === 'docker' ? version.storage.image : undefined) ?? o.image;
    if (image === undefined || image === '') {
      throw new Error('no image to run: give the DockerRun an image, keep the flow in DockerStorage, or start the agent with a default image');
    }
    await this.ensureImage(image);

    const weftBin = o.weftBin ?? `${WEFT_ROOT}/bin/weft.js`;
    const cmd = [weftBin, 'execute', 'flow-run', run.id, '--server', o.serverUrl];
    const binds: string[] = [];
    if (o.mountWeft !== false) binds.push(`${WEFT_ROOT}:${WEFT_ROOT}:ro`);
    if (o.tokenFile !== undefined) {
      binds.push(`${o.tokenFile}:${o.tokenFile}:ro`);
      cmd.push('--token-file', o.tokenFile);
    }
    binds.push(...(o.volumes ?? []));
    const rcHost = (dr?.hostConfig ?? {}) as HostConfig;
    binds.push(...((rcHost.Binds as readonly string[] | undefined) ?? []));
    const hostConfig: HostConfig = {
      NetworkMode: 'host',
      Init: true,
      ...o.hostConfig,
      ...rcHost,
      Binds: [...((o.hostConfig?.Binds as readonly string[] | undefined) ?? []), ...binds],
      ...(dr?.ports !== undefined ? { PortBindings: { ...rcHost.PortBindings, ...publishPorts(dr.ports) } } : {}),
    };
    const name = `weft-${run.id.slice(0, 8)}-${run.restarts}-${randomBytes(3).toString('hex')}`;
    const { id } = await this.engine.createContainer({
      image,
      name,
      entrypoint: ['node'],
      cmd,
      env: {
        ...o.env,
        ...rc.env,
        WEFT_SERVER: o.serverUrl,
        WEFT_FLOW_RUN_ID: run.id,
        WEFT_AGENT_ID: this.id ?? '',
        WEFT_OUTPUT_FORWARDED: '1',
      },
      labels: { 'weft.flow-run-id': run.id, 'weft.agent': this.id ?? this.name, 'weft.flow': run.flowName },
      hostConfig,
    });
    try {
      await this.engine.startContainer(id);
    } catch (err) {
      await this.engine.removeContainer(id, { force: true, missingOk: true }).catch(() => undefined);
      throw err;
    }
    const r: Running = { id, name, runId: run.id, tail: [], abort: new AbortController(), stoppedByAgent: false, done: Promise.resolve() };
    this.started.set(id, r);
    this.logs.push({ flowRunId: run.id, level: 'info', source: 'agent', at: Date.now(), message: `started container ${name} (${id.slice(0, 12)}) from image ${image}` });
    r.done = this.follow(r).catch((err: unknown) => this.say(`following container ${name}: ${describe(err)}`));
  }

  protected override async onStop(opts: AgentStopOptions): Promise<void> {
    const all = [...this.started.values()];
    if (opts.stopRuns === true) {
      for (const r of all) r.stoppedByAgent = true;
      await Promise.all(all.map((r) => this.engine.stopContainer(r.id, { timeoutSec: STOP_GRACE_S }).catch(() => undefined)));
    } else {
      for (const r of all) r.abort.abort();
      if (all.length > 0) this.say(`left ${all.length} container(s) running: ${all.map((r) => r.name).join(', ')}`);
    }
    await Promise.all(all.map((r) => r.done));
  }

  /** Make sure the daemon has `image`, pulling it per the pull policy. */
  private async ensureImage(image: string): Promise<void> {
    const policy = this.docker.pull ?? 'missing';
    const present = policy === 'always' ? false : await this.engine.imageExists(image);
    if (present) return;
    if (policy === 'never') throw new Error(`image ${image} is not on the Docker host at ${this.engine.host} and the agent does not pull (pull: never)`);
    this.say(`pulling ${image} from ${registryOf(image)}`);
    try {
      await this.engine.pullImage(image, this.docker.registryAuth !== undefined ? { auth: this.docker.registryAuth } : {});
    } catch (err) {
      if (err instanceof DockerError && err.code === 'DOCKER_PULL') {
        throw new Error(`image ${image} is not on the Docker host at ${this.engine.host} and cannot be pulled: ${err.message}`, { cause: err });
      }
      throw err;
    }
  }

  /** Forward the container's output, wait for its exit, judge it, remove the container. */
  private async follow(r: Running): Promise<void> {
    const signal = r.abort.signal;
    const partial: Record<LogStream, string> = { stdin: '', stdout: '', stderr: '' };
    const line = (stream: LogStream, raw: string): void => {
      const text = raw.length > MAX_LINE ? `${raw.slice(0, MAX_LINE)}… (${raw.length - MAX_LINE} more characters)` : raw;
      r.tail.push(text);
      if (r.tail.length > TAIL_LINES) r.tail.shift();
      this.logs.push({ flowRunId: r.runId, level: stream === 'stderr' ? 'warn' : 'info', message: text, at: Date.now(), source: 'flow-run' });
    };
    const logs = (async () => {
      try {
        for await (const f of this.engine.followLogs(r.id, { signal, tty: false })) {
          const text = partial[f.stream] + f.data.toString('utf8');
          const lines = text.split('\n');
          partial[f.stream] = lines.pop() ?? '';
          for (const l of lines) line(f.stream, l.replace(/\r$/, ''));
        }
        for (const s of ['stdout', 'stderr'] as const) if (partial[s] !== '') line(s, partial[s]);
      } catch (err) {
        if (!signal.aborted) this.say(`cannot follow the output of container ${r.name}: ${describe(err)}`);
      }
    })();
    let exitCode: number | null = null;
    try {
      exitCode = (await this.engine.waitContainer(r.id, { signal })).exitCode;
    } catch (err) {
      if (!signal.aborted) this.say(`cannot wait for container ${r.name}: ${describe(err)}`);
    }
    await logs;
    if (signal.aborted) {
      // Let go (stop without stopRuns): the container runs on, unwatched.
      this.started.delete(r.id);
      return;
    }
    let oom = false;
    if (exitCode === null) {
      // The wait broke (the daemon restarted?): look at the container instead.
      try {
        const st = (await this.engine.inspectContainer(r.id)).State;
        if (!st.Running) exitCode = st.ExitCode;
        oom = st.OOMKilled;
      } catch (err) {
        if (isNotFound(err)) exitCode = -1;
      }
    } else if (exitCode !== 0) {
      oom = await this.engine.inspectContainer(r.id).then(
        (c) => c.State.OOMKilled,
        () => false,
      );
    }
    this.started.delete(r.id);
    try {
      if (exitCode !== null && exitCode !== 0 && !r.stoppedByAgent) await this.onCrash(r, exitCode, oom);
    } finally {
      if (this.docker.removeContainers !== false && exitCode !== null) {
        await this.engine.removeContainer(r.id, { force: true, missingOk: true }).catch((err: unknown) => this.say(`cannot remove container ${r.name}: ${describe(err)}`));
      }
      this.wake();
    }
  }

  /** A container exited non-zero: if its run is still in its hands, fail it (or finish its cancel). */
  private async onCrash(r: Running, exitCode: number, oom: boolean): Promise<void> {
    const how = exitCode === -1 ? 'disappeared' : `exited with code ${exitCode}${oom ? ' (OOMKilled: it went over its memory limit)' : ''}`;
    await this.logs.flush();
    let run;
    try {
      run = await this.backend.getFlowRun(r.runId);
    } catch (err) {
      this.say(`container ${r.name} of run ${r.runId} ${how}; cannot read the run: ${describe(err)}`);
      return;
    }
    const open: readonly FlowRunState[] = ['Submitted', 'Running', 'Cancelling'];
    if (!open.includes(run.state)) return;
    if (run.state === 'Cancelling') {
      try {
        await this.backend.setFlowRunState(run.id, 'Cancelled', { message: `cancelled (its container ${how})`, expectVersion: run.stateVersion });
      } catch (err) {
        this.say(`cannot mark run ${run.id} Cancelled: ${describe(err)}`);
      }
      return;
    }
    const tail = r.tail.length > 0 ? `its last output:\n${r.tail.join('\n')}` : undefined;
    await this.failRun(run, `container ${r.name} ${how} before finishing the run`, tail);
  }
}
