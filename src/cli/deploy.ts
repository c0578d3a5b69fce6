/**
 * The deployment commands: `weft register`, `weft flows`, `weft runs` (list, show, logs,
 * cancel) and `weft run <flow name> --remote`.
 *
 * `register` loads the flow file, builds its Storage (copy, bundle, upload, image), and
 * records the flow on the server with its graph, storage reference, run config, executor
 * settings, parameters and schedule. The storage is built before anything is written to
 * the server, so a flow that fails to load or whose storage cannot be built leaves no
 * row behind; the server's fingerprint check keeps an unchanged flow at its version.
 *
 * The server is `--server URL`, else `$WEFT_SERVER`, else http://127.0.0.1:4200; its API
 * token `--token-file F`, else `$WEFT_TOKEN_FILE`.
 */
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { Executor } from '../executor/types.ts';
import type { GraphSpec } from '../flow/spec.ts';
import { checkRunConfig, type RunConfig } from '../run-config/index.ts';
import type { RunProgress } from '../runner/types.ts';
import {
  BackendError,
  FINAL_FLOW_RUN_STATES,
  FLOW_RUN_STATES,
  type Backend,
  type ExecutorSettings,
  type FlowRecord,
  type FlowRun,
  type FlowRunState,
  type ParameterInfo,
  type Schedule,
  type ServerEvent,
  type StoredLogEntry,
  type TaskRun,
} from '../server/model.ts';
import type { Storage } from '../storage/types.ts';
import { formatFlags, parseArgs, parseParams, UsageError, type FlagSpec, type FlagValue } from './args.ts';
import { describe, LoadError, loadFlow, parameterNodes } from './load.ts';
import type { CliIO } from './main.ts';
import { formatDuration, ProgressReporter } from './progress.ts';

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

export const DEFAULT_SERVER = 'http://127.0.0.1:4200';

const SERVER_FLAGS: readonly FlagSpec[] = [
  { name: 'server', kind: 'string', value: 'URL', help: `the weft server (default $WEFT_SERVER, else ${DEFAULT_SERVER})` },
  { name: 'token-file', kind: 'string', value: 'FILE', help: "the server's API token (default $WEFT_TOKEN_FILE)" },
];

const REGISTER_FLAGS: readonly FlagSpec[] = [
  { name: 'project', short: 'P', kind: 'string', value: 'NAME', help: 'the project to register the flow in (created when missing; required)' },
  { name: 'flow', short: 'f', kind: 'string', value: 'NAME', help: 'which flow, when the file exports several (export or flow name)' },
  {
    name: 'storage',
    kind: 'string',
    value: 'KIND',
    help: "where the code is kept: local (default), bundle (on the server), module:<specifier>, s3://bucket/prefix, git+<url>#<ref>[:path], docker[:registry]; default the flow's own storage, else local",
  },
  { name: 'run-config', kind: 'string', choices: ['universal', 'local', 'docker', 'kubernetes'], help: "where runs start; default the flow's own run config, else universal (any agent)" },
  { name: 'image', kind: 'string', value: 'IMAGE', help: 'the image of a docker or kubernetes run config' },
  { name: 'label', short: 'l', kind: 'list', value: 'LABEL', help: 'a label every run carries (repeatable): only agents with all of them take the runs' },
  { name: 'json', kind: 'boolean', help: 'print the registered flow and version as JSON' },
  ...SERVER_FLAGS,
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

const REGISTER_USAGE = `Usage: weft register <flow file> --project P [options]

Builds the flow's storage and records the flow on the server: its graph, storage
reference, run config, executor settings, parameters and schedule. Registering code
that did not change keeps the flow's version.

Options:
${formatFlags(REGISTER_FLAGS)}

Examples:
  weft register flows/etl.ts --project data
  weft register flows/etl.ts --project data --storage bundle --run-config local --label gpu
  weft register flows/etl.ts --project data --storage s3://flows/etl?endpoint=http://127.0.0.1:7480`;

const FLOWS_FLAGS: readonly FlagSpec[] = [
  { name: 'project', short: 'P', kind: 'string', value: 'NAME', help: 'only this project' },
  { name: 'json', kind: 'boolean', help: 'print JSON' },
  ...SERVER_FLAGS,
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

const FLOWS_USAGE = `Usage: weft flows [--project P] [--json]

Lists the registered flows: project, name, newest version, schedule.

Options:
${formatFlags(FLOWS_FLAGS)}`;

const RUNS_FLAGS: readonly FlagSpec[] = [
  { name: 'project', short: 'P', kind: 'string', value: 'NAME', help: 'only runs of flows in this project' },
  { name: 'flow', short: 'f', kind: 'string', value: 'NAME', help: 'only runs of this flow (with --project when names repeat)' },
  { name: 'state', short: 's', kind: 'list', value: 'STATE', help: 'only runs in this state (repeatable)' },
  { name: 'limit', short: 'n', kind: 'count', value: 'N', help: 'at most N runs, newest first (default 20)' },
  { name: 'follow', kind: 'boolean', help: 'runs logs: keep printing new lines until the run ends (there -f means --follow)' },
  { name: 'json', kind: 'boolean', help: 'print JSON' },
  ...SERVER_FLAGS,
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

const RUNS_USAGE = `Usage: weft runs [list] [options]
       weft runs show <run id>         a run, its state history and its task runs
       weft runs logs <run id> [-f]    its logs; -f/--follow: then new lines as they come, until
                                       the run ends (exit 0 on Success, 1 otherwise)
       weft runs cancel <run id>

Options:
${formatFlags(RUNS_FLAGS)}`;

export async function deployCommand(command: string, args: readonly string[], io: CliIO): Promise<number> {
  try {
    switch (command) {
      case 'register':
        return await registerCommand(args, io);
      case 'flows':
        return await flowsCommand(args, io);
      case 'runs':
        return await runsCommand(args, io);
      default:
        throw new UsageError(`unknown command '${command}'`);
    }
  } catch (err) {
    if (err instanceof UsageError) {
      io.stderr.write(`weft ${command}: ${err.message} (see 'weft help ${command}')\n`);
      return EXIT_USAGE;
    }
    if (err instanceof BackendError || isConnectionError(err)) {
      io.stderr.write(`weft ${command}: ${describeBackendError(err)}\n`);
      return EXIT_FAILED;
    }
    throw err;
  }
}

// ---- the server --------------------------------------------------------------------

export async function connectBackend(flags: Readonly<Record<string, FlagValue>>, io: CliIO): Promise<{ backend: Backend; url: string }> {
  const url = typeof flags.server === 'string' ? flags.server : (process.env.WEFT_SERVER ?? DEFAULT_SERVER);
  if (!/^https?:\/\/[^/\s]+/.test(url)) throw new UsageError(`--server must be http(s)://HOST:PORT, got '${url}'`);
  const tokenFile = typeof flags['token-file'] === 'string' ? resolve(io.cwd, flags['token-file']) : process.env.WEFT_TOKEN_FILE;
  let token: string | undefined;
  if (tokenFile !== undefined && tokenFile !== '') {
    try {
      token = (await readFile(tokenFile, 'utf8')).trim();
    } catch (err) {
      throw new UsageError(`cannot read the token file ${tokenFile}: ${describe(err)}`);
    }
    if (token === '') throw new UsageError(`the token file ${tokenFile} is empty`);
  }
  const { BackendClient } = await import('../server/client.ts');
  return { backend: new BackendClient(url, token === undefined ? {} : { token }), url };
}

function isConnectionError(err: unknown): boolean {
  // fetch() rejects with a TypeError whose cause is the socket's error.
  return err instanceof TypeError && (err as { cause?: unknown }).cause instanceof Error;
}

function describeBackendError(err: unknown): string {
  if (err instanceof BackendError) return `the server answered ${err.status} ${err.code}: ${err.message}`;
  const cause = (err as { cause?: { code?: string; message?: string } }).cause;
  return `cannot reach the server (${[cause?.code, cause?.message].filter((x) => x !== undefined).join(': ')})`;
}

// ---- weft register -----------------------------------------------------------------

async function registerCommand(args: readonly string[], io: CliIO): Promise<number> {
  const { flags, positionals } = parseArgs(args, REGISTER_FLAGS);
  if (flags.help === true) {
    io.stdout.write(`${REGISTER_USAGE}\n`);
    return EXIT_OK;
  }
  const [file, ...extra] = positionals;
  if (file === undefined) throw new UsageError('missing the flow file');
  if (extra.length > 0) throw new UsageError(`expected one flow file, also got '${extra.join(' ')}'`);
  if (typeof flags.project !== 'string' || flags.project === '') throw new UsageError('--project is required');
  const project = flags.project;
  const { backend } = await connectBackend(flags, io);

  let loaded;
  try {
    loaded = await loadFlow(file, { cwd: io.cwd, ...(typeof flags.flow === 'string' ? { flowName: flags.flow } : {}) });
  } catch (err) {
    io.stderr.write(`weft register: ${err instanceof LoadError ? err.message : `cannot load ${file}: ${describe(err)}`}\n`);
    return EXIT_USAGE;
  }
  const f = loaded.flow as typeof loaded.flow & { storage?: Storage; runConfig?: RunConfig; schedule?: Schedule; executor?: Executor };
  let spec: GraphSpec;
  try {
    spec = f.spec();
  } catch (err) {
    io.stderr.write(`weft register: cannot load ${file}: invalid flow: ${describe(err)}\n`);
    return EXIT_USAGE;
  }

  let storage: Storage;
  let runConfig: RunConfig;
  try {
    storage = typeof flags.storage === 'string' ? await storageFromFlag(flags.storage) : (f.storage ?? (await storageFromFlag('local')));
    runConfig = runConfigFrom(flags, f.runConfig);
  } catch (err) {
    if (err instanceof UsageError) throw err;
    io.stderr.write(`weft register: ${describe(err)}\n`);
    return EXIT_USAGE;
  }

  let ref;
  try {
    ref = await storage.build({ flowFile: loaded.path, flowName: f.name, backend, log: (line) => io.stderr.write(`${line}\n`) });
  } catch (err) {
    io.stderr.write(`weft register: cannot build ${storage.kind} storage for ${f.name}: ${describe(err)}\n`);
    return EXIT_FAILED;
  }

  const labels = uniq([...(Array.isArray(flags.label) ? flags.label : []), ...(runConfig.labels ?? []), ...storage.labels(ref)]);
  const result = await backend.registerFlow({
    project,
    name: f.name,
    graph: graphSummary(spec),
    storage: ref,
    runConfig,
    executor: executorSettings(f.executor),
    parameters: parameterInfo(spec),
    labels,
    schedule: f.schedule ?? null,
  });
  if (flags.json === true) {
    io.stdout.write(`${JSON.stringify({ flow: result.flow, version: result.version, created: result.created }, null, 2)}\n`);
  } else {
    const v = result.version;
    io.stdout.write(
      `${result.created ? 'registered' : 'unchanged:'} ${project}/${f.name} version ${v.version} (${ref.kind} storage, ${runConfig.kind} run config` +
        `${labels.length > 0 ? `, labels ${labels.join(', ')}` : ''}) id ${result.flow.id}\n`,
    );
  }
  return EXIT_OK;
}

async function storageFromFlag(spec: string): Promise<Storage> {
  const mod = (await import('../storage/index.ts')) as { storageFromSpec(spec: string): Storage | Promise<Storage> };
  try {
    return await mod.storageFromSpec(spec);
  } catch (err) {
    throw new UsageError(`--storage ${spec}: ${describe(err)}`);
  }
}

function runConfigFrom(flags: Readonly<Record<string, FlagValue>>, own: RunConfig | undefined): RunConfig {
  const kind = typeof flags['run-config'] === 'string' ? flags['run-config'] : undefined;
  const image = typeof flags.image === 'string' ? flags.image : undefined;
  let rc: RunConfig = own ?? { kind: 'universal' };
  if (kind !== undefined && kind !== rc.kind) rc = { kind } as RunConfig;
  if (image !== undefined) {
    if (rc.kind !== 'docker' && rc.kind !== 'kubernetes') throw new UsageError('--image applies to a docker or kubernetes run config');
    rc = { ...rc, image };
  }
  return checkRunConfig(rc);
}

/** What the server keeps of a flow's graph: stable across machines and storage places (no module URLs). */
export function graphSummary(spec: GraphSpec): unknown {
  return {
    name: spec.name,
    referenceTasks: spec.referenceTasks,
    nodes: spec.nodes.map((n) => ({
      id: n.id,
      key: n.key,
      kind: n.kind,
      task: n.taskKey === '' ? '' : n.taskKey.slice(n.taskKey.lastIndexOf('#') + 1),
      args: n.args.map((a) => (a.kind === 'ref' ? { node: a.node, mode: a.mode } : { value: jsonOrType(a.value), mode: a.mode })),
      upstream: n.upstream,
      mapped: n.mapped,
      tags: n.options.tags,
      maxRetries: n.options.maxRetries,
      timeoutMs: n.options.timeoutMs,
      checkpoint: n.options.checkpoint,
      trigger: typeof n.options.trigger === 'function' ? 'custom' : n.options.trigger,
      ...(Object.keys(n.options.resources).length > 0 ? { resources: n.options.resources } : {}),
      ...(n.parameter !== undefined ? { parameter: { name: n.parameter.name, required: n.parameter.required, default: jsonOrType(n.parameter.default) } } : {}),
    })),
  };
}

function jsonOrType(v: unknown): unknown {
  if (v === undefined) return null;
  try {
    const s = JSON.stringify(v);
    return s === undefined || s.length > 10_000 ? `<${typeof v}>` : (JSON.parse(s) as unknown);
  } catch {
    return `<${typeof v}>`;
  }
}

export function parameterInfo(spec: GraphSpec): ParameterInfo[] {
  return parameterNodes(spec).map((n) => {
    const p = n.parameter!;
    return p.required ? { name: p.name, required: true } : { name: p.name, required: false, default: jsonOrType(p.default) };
  });
}

/** The settings a flow-run process rebuilds the flow's executor from. */
export function executorSettings(e: Executor | undefined): ExecutorSettings {
  if (e === undefined || e.kind === 'local') return { kind: 'local' };
  if (e.kind === 'pool') return { kind: 'pool', threads: e.workers };
  if (e.kind === 'cluster') {
    const s = (e as Executor & { settings?: { address?: string; workers?: number; threads?: number } }).settings ?? {};
    return { kind: 'cluster', ...s };
  }
  throw new Error(`the flow's executor (${e.kind}) cannot be recorded for remote runs: use a local, pool or cluster executor`);
}

function uniq(xs: readonly string[]): string[] {
  return [...new Set(xs)];
}

// ---- weft flows --------------------------------------------------------------------

async function flowsCommand(args: readonly string[], io: CliIO): Promise<number> {
  const { flags, positionals } = parseArgs(args, FLOWS_FLAGS);
  if (flags.help === true) {
    io.stdout.write(`${FLOWS_USAGE}\n`);
    return EXIT_OK;
  }
  if (positionals.length > 0) throw new UsageError(`unexpected '${positionals.join(' ')}'`);
  const { backend } = await connectBackend(flags, io);
  const flows = await backend.listFlows(typeof flags.project === 'string' ? { project: flags.project } : {});
  printList(io, flags.json === true, flows, 'no flows registered', ['PROJECT', 'FLOW', 'VERSION', 'SCHEDULE', 'UPDATED', 'ID'], (f) => [
    f.project,
    f.name,
    String(f.version),
    scheduleText(f.schedule),
    new Date(f.updatedAt).toISOString(),
    f.id,
  ]);
  return EXIT_OK;
}

function scheduleText(s: Schedule | null): string {
  if (s === null || s.clocks.length === 0) return '-';
  const clocks = s.clocks.map((c) => (c.kind === 'cron' ? `cron ${c.cron}` : `every ${formatDuration(c.everyMs)}`)).join(', ');
  return s.paused === true ? `${clocks} (paused)` : clocks;
}

// ---- weft runs ---------------------------------------------------------------------

/**
 * `weft runs logs` takes `-f` for `--follow` (as `tail -f` does), while the other runs
 * commands keep `-f` for `--flow`: so the logs subcommand is tried first with its own flags.
 */
const RUNS_LOGS_FLAGS: readonly FlagSpec[] = [
  { name: 'follow', short: 'f', kind: 'boolean', help: 'keep printing new lines until the run ends' },
  ...SERVER_FLAGS,
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

function parseRunsArgs(args: readonly string[]): ReturnType<typeof parseArgs> {
  try {
    const logs = parseArgs(args, RUNS_LOGS_FLAGS);
    if (logs.positionals[0] === 'logs') return logs;
  } catch {
    // Not a logs command with logs flags: the general flags decide (and name any error).
  }
  return parseArgs(args, RUNS_FLAGS);
}

async function runsCommand(args: readonly string[], io: CliIO): Promise<number> {
  const { flags, positionals } = parseRunsArgs(args);
  if (flags.help === true) {
    io.stdout.write(`${RUNS_USAGE}\n`);
    return EXIT_OK;
  }
  const [sub = 'list', id, ...extra] = positionals;
  if (extra.length > 0) throw new UsageError(`unexpected '${extra.join(' ')}'`);
  if (sub !== 'list' && id === undefined) throw new UsageError(`runs ${sub} needs a run id`);
  const { backend } = await connectBackend(flags, io);
  switch (sub) {
    case 'list':
      return listRuns(backend, flags, io);
    case 'show':
      return showRun(backend, id!, flags, io);
    case 'logs':
      return printLogs(backend, id!, flags.follow === true, io);
    case 'cancel': {
      const run = await backend.cancelFlowRun(id!);
      io.stdout.write(`run ${run.id} (${run.flowName}): ${run.state}\n`);
      return EXIT_OK;
    }
    default:
      throw new UsageError(`unknown runs command '${sub}' (list, show, logs, cancel)`);
  }
}

async function listRuns(backend: Backend, flags: Readonly<Record<string, FlagValue>>, io: CliIO): Promise<number> {
  const states = Array.isArray(flags.state) ? flags.state : [];
  for (const s of states) if (!(FLOW_RUN_STATES as readonly string[]).includes(s)) throw new UsageError(`--state must be one of ${FLOW_RUN_STATES.join(', ')}, got '${s}'`);
  let flowId: string | undefined;
  if (typeof flags.flow === 'string') {
    const project = typeof flags.project === 'string' ? flags.project : undefined;
    const flows = await flowsNamed(backend, flags.flow, project);
    if (flows.length === 0) throw new UsageError(`no flow named '${flags.flow}'${project !== undefined ? ` in project ${project}` : ''}`);
    if (flows.length > 1) throw new UsageError(severalProjects(flags.flow, flows));
    flowId = flows[0]!.id;
  }
  const runs = await backend.listFlowRuns({
    ...(flowId !== undefined ? { flowId } : typeof flags.project === 'string' ? { project: flags.project } : {}),
    ...(states.length > 0 ? { states: states as FlowRunState[] } : {}),
    limit: typeof flags.limit === 'number' ? flags.limit : 20,
  });
  printList(io, flags.json === true, runs, 'no runs', ['ID', 'FLOW', 'VERSION', 'STATE', 'SCHEDULED', 'DURATION', 'MESSAGE'], (r) => [
    r.id,
    `${r.project}/${r.flowName}`,
    `v${r.version}`,
    r.state,
    new Date(r.scheduledStart).toISOString(),
    runDuration(r),
    r.message ?? '',
  ]);
  return EXIT_OK;
}

function runDuration(r: FlowRun): string {
  if (r.startedAt === null) return '-';
  return formatDuration((r.endedAt ?? Date.now()) - r.startedAt);
}

async function showRun(backend: Backend, id: string, flags: Readonly<Record<string, FlagValue>>, io: CliIO): Promise<number> {
  const [run, history, tasks] = await Promise.all([backend.getFlowRun(id), backend.getFlowRunHistory(id), backend.getTaskRuns(id)]);
  if (flags.json === true) {
    io.stdout.write(`${JSON.stringify({ run, history, tasks }, null, 2)}\n`);
    return EXIT_OK;
  }
  io.stdout.write(`run ${run.id}: ${run.project}/${run.flowName} v${run.version}, ${run.state}${run.message !== null ? ` (${run.message})` : ''}\n`);
  io.stdout.write(`parameters ${JSON.stringify(run.parameters)}; labels ${run.labels.join(', ') || '-'}; restarts ${run.restarts}\n`);
  for (const h of history) io.stdout.write(`  ${new Date(h.at).toISOString()}  ${h.state}${h.message !== null ? `  ${h.message}` : ''}\n`);
  if (tasks.length > 0) {
    const rows = tasks.map((t) => [t.mapIndex >= 0 ? `${t.key}[${t.mapIndex}]` : t.key, t.state, String(t.attempts), taskDuration(t), t.message ?? '']);
    io.stdout.write(table(['TASK', 'STATE', 'ATTEMPTS', 'DURATION', 'MESSAGE'], rows));
  }
  return EXIT_OK;
}

function taskDuration(t: TaskRun): string {
  return t.startedAt === null || t.endedAt === null ? '-' : formatDuration(t.endedAt - t.startedAt);
}

function logLine(e: StoredLogEntry): string {
  const where = e.taskKey !== undefined ? ` ${e.taskKey}${e.mapIndex !== undefined && e.mapIndex >= 0 ? `[${e.mapIndex}]` : ''}` : '';
  return `${new Date(e.at).toISOString()} ${e.level.toUpperCase().padEnd(5)} ${e.source}${where}: ${e.message}\n`;
}

/**
 * `weft runs logs <id>`: the run's logs so far. With `follow`, then the lines the live
 * feed brings as they are written, until the run reaches a final state (exit 0 on
 * Success, 1 otherwise); polling when the feed is refused or drops. Ctrl-C stops.
 */
async function printLogs(backend: Backend, id: string, follow: boolean, io: CliIO): Promise<number> {
  /** Highest seq read back: the next read pages on from it. */
  let after = 0;
  /**
   * Every seq printed, so a line is printed once whether read or fed. Not just a high-water
   * mark: on PostgreSQL two writers may commit their seqs out of order, and the feed
   * brings the lower one after the higher.
   */
  const printed = new Set<number>();
  const print = (entries: readonly StoredLogEntry[]): void => {
    for (const e of entries) {
      if (printed.has(e.seq)) continue;
      printed.add(e.seq);
      io.stdout.write(logLine(e));
    }
  };
  const catchUp = async (): Promise<void> => {
    for (;;) {
      const entries = await backend.getLogs(id, { after, limit: 1000 });
      print(entries);
      for (const e of entries) after = Math.max(after, e.seq);
      if (entries.length < 1000) return;
    }
  };
  if (!follow) {
    await catchUp();
    return EXIT_OK;
  }

  const wake = new Wakeup();
  let stop = false;
  const onSigint = (): void => {
    stop = true;
    wake.poke();
  };
  process.once('SIGINT', onSigint);
  const note = (line: string): void => void io.stderr.write(`weft runs logs: ${line}\n`);
  // Subscribe before the first read, so a line written in between is not missed (seq dedups).
  const feed = await RunFeed.open(backend, id, wake);
  let polling = feed.refused !== null;
  if (feed.refused !== null) note(`no live feed (${feed.refused}); polling every 500ms`);
  try {
    await catchUp();
    let run = await backend.getFlowRun(id);
    for (;;) {
      if (!polling) {
        const events = feed.take();
        const fedLogs: StoredLogEntry[] = [];
        for (const e of events) {
          if (e.type === 'log') fedLogs.push(e.entry);
          else if (e.type === 'flowRun' && e.run.stateVersion >= run.stateVersion) run = e.run;
        }
        print(fedLogs.sort((a, b) => a.seq - b.seq));
        if (feed.dropped !== null) {
          note(`the live feed closed (${feed.dropped}); polling every 500ms`);
          polling = true;
        }
      }
      if (polling) {
        await catchUp();
        run = await backend.getFlowRun(id);
      }
      if (FINAL_FLOW_RUN_STATES.includes(run.state)) {
        // One last read: lines written just before the end, and any the feed did not bring.
        await catchUp();
        return run.state === 'Success' ? EXIT_OK : EXIT_FAILED;
      }
      if (stop) {
        io.stderr.write(`stopped following run ${id} (still ${run.state})\n`);
        return EXIT_FAILED;
      }
      await wake.wait(polling ? 500 : 1000);
    }
  } finally {
    feed.close();
    process.removeListener('SIGINT', onSigint);
  }
}

// ---- following a run: the live feed, else polling ----------------------------------

/** A wait that a feed event or Ctrl-C ends early; a poke with nobody waiting ends the next wait at once. */
class Wakeup {
  private resolve: (() => void) | null = null;
  private poked = false;

  poke(): void {
    const r = this.resolve;
    this.resolve = null;
    if (r !== null) r();
    else this.poked = true;
  }

  wait(ms: number): Promise<void> {
    if (this.poked) {
      this.poked = false;
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.resolve = null;
        resolve();
      }, ms);
      this.resolve = () => {
        clearTimeout(t);
        resolve();
      };
    });
  }
}

/** The live feed as `BackendClient` has it (the `Backend` interface has no feed). */
interface LiveFeedSource {
  subscribe(onEvent: (e: ServerEvent) => void, opts: { flowRun?: string; onClose?: (code: number, reason: string) => void }): Promise<() => void>;
}

/** How long a feed may take to open before the follower polls instead (a proxy may hold an upgrade forever). */
const FEED_OPEN_TIMEOUT_MS = 5000;

/**
 * The live feed of one flow run as a queue the follower drains between waits. Events are
 * only queued here (the follower's loop applies them), so state changes in one place.
 */
class RunFeed {
  /** Events received and not yet taken. */
  private queue: ServerEvent[] = [];
  private closeFeed: (() => void) | null = null;
  private closedByUs = false;
  /** Why the feed could not be opened; null when it opened. */
  refused: string | null = null;
  /** Why an opened feed stopped (the server closed it, the network dropped); null while it delivers. */
  dropped: string | null = null;

  private constructor(private readonly wake: Wakeup) {}

  static async open(backend: Backend, flowRun: string, wake: Wakeup): Promise<RunFeed> {
    const feed = new RunFeed(wake);
    const source = backend as Backend & Partial<LiveFeedSource>;
    if (typeof source.subscribe !== 'function') {
      feed.refused = 'this client has none';
      return feed;
    }
    const opening = source.subscribe(
      (e) => {
        feed.queue.push(e);
        wake.poke();
      },
      {
        flowRun,
        onClose: (code, reason) => {
          if (feed.closedByUs) return;
          feed.dropped = `${code}${reason !== '' ? ` ${reason}` : ''}`;
          wake.poke();
        },
      },
    );
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), FEED_OPEN_TIMEOUT_MS)));
    try {
      const opened = await Promise.race([opening, timeout]);
      if (opened === 'timeout') {
        feed.refused = `no answer in ${FEED_OPEN_TIMEOUT_MS / 1000}s`;
        feed.closedByUs = true;
        // Should it open later, close it: the follower polls by then.
        opening.then((close) => close(), () => undefined);
      } else {
        feed.closeFeed = opened;
      }
    } catch (err) {
      feed.refused = err instanceof BackendError ? `the server answered ${err.status} ${err.code}` : describeFeedError(err);
    } finally {
      clearTimeout(timer);
    }
    return feed;
  }

  /** The events received since the last take, in arrival order. */
  take(): ServerEvent[] {
    const events = this.queue;
    this.queue = [];
    return events;
  }

  close(): void {
    this.closedByUs = true;
    this.closeFeed?.();
    this.closeFeed = null;
  }
}

function describeFeedError(err: unknown): string {
  if (isConnectionError(err)) return describeBackendError(err);
  const code = (err as { code?: unknown } | null)?.code;
  const message = err instanceof Error ? err.message : String(err);
  return typeof code === 'string' && !message.includes(code) ? `${code}: ${message}` : message;
}

// ---- weft run <flow name> --remote -------------------------------------------------

/**
 * The flow a user names: `project/name`, an id, or a bare name, which must be unique
 * across projects unless `project` is given. A string when it names none or several.
 */
async function findFlow(backend: Backend, name: string, project: string | undefined): Promise<FlowRecord | string> {
  if (project !== undefined) return backend.getFlow({ project, name });
  const flows = await flowsNamed(backend, name);
  if (flows.length === 1) return flows[0]!;
  if (flows.length > 1) return severalProjects(name, flows);
  return `no flow named '${name}' is registered (see 'weft flows')`;
}

/** The registered flows `name` picks (a name, an id or `project/name`), within `project` when given. */
async function flowsNamed(backend: Backend, name: string, project?: string): Promise<FlowRecord[]> {
  const flows = await backend.listFlows(project === undefined ? {} : { project });
  return flows.filter((f) => f.name === name || f.id === name || `${f.project}/${f.name}` === name);
}

const severalProjects = (name: string, flows: readonly FlowRecord[]): string =>
  `flow '${name}' is in several projects (${flows.map((f) => f.project).join(', ')}): add --project`;

export interface RemoteRunArgs {
  readonly flowName: string;
  readonly project?: string;
  readonly parameters: Record<string, unknown>;
  readonly labels: readonly string[];
  readonly quiet: boolean;
  /** Return once the run is created, without following it. */
  readonly noWait?: boolean;
}

/**
 * Create a run of a registered flow and follow it with the same progress as a local run,
 * from the server's live feed (polling when there is none); exit 0 when it ends Success, 1 otherwise. Ctrl-C stops following
 * (the run goes on; `weft runs cancel` cancels it).
 */
export async function remoteRun(flags: Readonly<Record<string, FlagValue>>, a: RemoteRunArgs, io: CliIO): Promise<number> {
  let backend: Backend;
  try {
    ({ backend } = await connectBackend(flags, io));
  } catch (err) {
    if (err instanceof UsageError) throw err;
    io.stderr.write(`weft run: ${describe(err)}\n`);
    return EXIT_USAGE;
  }
  try {
    const flow = await findFlow(backend, a.flowName, a.project);
    if (typeof flow === 'string') {
      io.stderr.write(`weft run: ${flow}\n`);
      return EXIT_USAGE;
    }
    const version = await backend.getFlowVersion(flow.versionId);
    const missing = version.parameters.filter((p) => p.required && !(p.name in a.parameters)).map((p) => p.name);
    if (missing.length > 0) {
      io.stderr.write(`weft run: flow ${flow.name} needs parameter${missing.length > 1 ? 's' : ''} ${missing.join(', ')} (--param NAME=VALUE)\n`);
      return EXIT_USAGE;
    }
    const unknown = Object.keys(a.parameters).filter((k) => !version.parameters.some((p) => p.name === k));
    if (unknown.length > 0) {
      io.stderr.write(`weft run: flow ${flow.name} has no parameter ${unknown.join(', ')} (it has: ${version.parameters.map((p) => p.name).join(', ') || 'none'})\n`);
      return EXIT_USAGE;
    }
    const run = await backend.createFlowRun({ flowId: flow.id, parameters: a.parameters, labels: a.labels });
    const reporter = a.quiet ? null : new ProgressReporter(io.stderr);
    reporter?.start(`run ${run.id}: ${flow.project}/${flow.name} v${run.version} created (${run.state}); waiting for an agent`);
    if (a.noWait === true) return EXIT_OK;
    return await followRun(backend, run, graphTaskCount(version.graph), reporter, io);
  } catch (err) {
    if (err instanceof BackendError || isConnectionError(err)) {
      io.stderr.write(`weft run: ${describeBackendError(err)}\n`);
      return EXIT_FAILED;
    }
    throw err;
  }
}

/**
 * Follow a run to its end. From the live feed when the server gives one: subscribed to
 * the run before its state is read, so no change falls between the read and the feed;
 * the task runs' states are kept from the feed's events (newest version wins, so an
 * event older than a read changes nothing). When the feed is refused or drops, the run
 * and its task runs are polled every 250 ms instead (said once on stderr).
 */
async function followRun(backend: Backend, created: FlowRun, graphTasks: number, reporter: ProgressReporter | null, io: CliIO): Promise<number> {
  const t0 = Date.now();
  let run = created;
  let lastState: FlowRunState = run.state;
  /** The newest state seen of each task run, by key and map index. */
  const tasks = new Map<string, TaskRun>();
  const putTask = (t: TaskRun): void => {
    const k = `${t.key}\u0000${t.mapIndex}`;
    const had = tasks.get(k);
    if (had === undefined || t.version >= had.version) tasks.set(k, t);
  };
  const putRun = (r: FlowRun): void => {
    if (r.stateVersion >= run.stateVersion) run = r;
  };
  const wake = new Wakeup();
  let stop = false;
  const onSigint = (): void => {
    stop = true;
    wake.poke();
  };
  process.once('SIGINT', onSigint);
  const note = (line: string): void => (reporter !== null ? reporter.log(line) : void io.stderr.write(`${line}\n`));
  const feed = await RunFeed.open(backend, run.id, wake);
  let polling = feed.refused !== null;
  if (feed.refused !== null) note(`weft run: no live feed (${feed.refused}); polling the run every 250ms`);
  /** Whether the task runs were read once since the run started (the feed brings the rest). */
  let tasksRead = false;
  try {
    putRun(await backend.getFlowRun(run.id));
    for (;;) {
      if (!polling) {
        for (const e of feed.take()) {
          if (e.type === 'flowRun') putRun(e.run);
          else if (e.type === 'taskRun') putTask(e.task);
        }
        if (feed.dropped !== null) {
          note(`weft run: the live feed closed (${feed.dropped}); polling the run every 250ms`);
          polling = true;
        }
      }
      if (polling) putRun(await backend.getFlowRun(run.id));
      if (run.state !== lastState) {
        reporter?.log(`run ${run.id}: ${run.state}${run.message !== null ? ` (${run.message})` : ''}`);
        lastState = run.state;
      }
      // No progress line while the run waits for an agent: it has no task runs yet.
      const started = run.state !== 'Scheduled' && run.state !== 'Submitted';
      if (started && (polling || !tasksRead)) {
        for (const t of await backend.getTaskRuns(run.id)) putTask(t);
        tasksRead = true;
      }
      const final = FINAL_FLOW_RUN_STATES.includes(run.state);
      // At the end, one read of the task runs settles the summary whatever the feed carried.
      if (final && !polling) for (const t of await backend.getTaskRuns(run.id)) putTask(t);
      const seen = [...tasks.values()];
      const p = progressOf(seen, run.startedAt ?? t0, graphTasks);
      if (started) reporter?.update(p);
      if (final) {
        reporter?.finish(p);
        const failed = seen
          .filter((t) => t.state === 'Failed' || t.state === 'TimedOut' || t.state === 'TriggerFailed')
          .sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : a.mapIndex - b.mapIndex));
        for (const t of failed.slice(0, 10)) io.stdout.write(`  ${t.key}${t.mapIndex >= 0 ? `[${t.mapIndex}]` : ''}: ${t.state}${t.message !== null ? ` — ${t.message}` : ''}\n`);
        const took = run.startedAt !== null && run.endedAt !== null ? ` in ${formatDuration(run.endedAt - run.startedAt)}` : '';
        io.stdout.write(`${run.flowName}: ${run.state}${took}${run.message !== null ? ` — ${run.message}` : ''} (run ${run.id})\n`);
        return run.state === 'Success' ? EXIT_OK : EXIT_FAILED;
      }
      if (stop) {
        reporter?.finish();
        io.stderr.write(`stopped following run ${run.id} (still ${run.state}); cancel it with: weft runs cancel ${run.id}\n`);
        return EXIT_FAILED;
      }
      // From the feed, the wait ends at the next event; the timeout keeps the elapsed time moving.
      await wake.wait(250);
    }
  } finally {
    feed.close();
    process.removeListener('SIGINT', onSigint);
  }
}

/** How many task nodes a registered graph has (0 when the graph is not one `graphSummary` wrote). */
function graphTaskCount(graph: unknown): number {
  const nodes = (graph as { nodes?: unknown } | null)?.nodes;
  return Array.isArray(nodes) ? nodes.length : 0;
}

/** `knownTotal`: the graph's task count; mapped tasks add task runs as they run, so the larger count wins. */
function progressOf(tasks: readonly TaskRun[], since: number, knownTotal: number): RunProgress {
  let done = 0;
  let running = 0;
  let failed = 0;
  let skipped = 0;
  for (const t of tasks) {
    switch (t.state) {
      case 'Running':
      case 'Retrying':
        running++;
        break;
      case 'Failed':
      case 'TimedOut':
      case 'TriggerFailed':
        failed++;
        done++;
        break;
      case 'Skipped':
        skipped++;
        done++;
        break;
      case 'Success':
      case 'Cached':
      case 'Mapped':
      case 'Cancelled':
        done++;
        break;
      default:
        break;
    }
  }
  const elapsedMs = Date.now() - since;
  return { total: Math.max(knownTotal, tasks.length), done, running, failed, skipped, rate: elapsedMs > 0 ? (done * 1000) / elapsedMs : 0, elapsedMs };
}

// ---- output ------------------------------------------------------------------------

/** A listing: JSON with --json, else a table, or `empty` when there is nothing. */
function printList<T>(io: CliIO, json: boolean, items: readonly T[], empty: string, header: readonly string[], row: (item: T) => readonly string[]): void {
  if (json) io.stdout.write(`${JSON.stringify(items, null, 2)}\n`);
  else if (items.length === 0) io.stdout.write(`${empty}\n`);
  else io.stdout.write(table(header, items.map(row)));
}

function table(header: readonly string[], rows: readonly (readonly string[])[]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: readonly string[]): string =>
    cells
      .map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return `${[line(header), ...rows.map(line)].join('\n')}\n`;
}

/** `--param` pairs for `weft run --remote` (the same grammar as a local run). */
export { parseParams };
