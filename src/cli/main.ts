/**
 * The weft command: `weft run`, `weft scheduler`, `weft worker`, `weft bench`, `weft help`,
 * `weft --version`.
 *
 * `main(argv)` returns the exit code instead of exiting, so `bin/weft.js` lets the event
 * loop drain (worker threads shut down, files flushed) and tests can call it in-process.
 * Exit codes: 0 the flow succeeded (or help/version), 1 the flow ended in any other
 * state, 2 a usage or loading problem (bad flag, unknown parameter, file that does not
 * load or exports no flow), 130 a second Ctrl-C.
 */
import { readFileSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, relative, resolve } from 'node:path';
import type { Executor } from '../executor/types.ts';
import type { NodeSpec } from '../flow/spec.ts';
import type { FlowRunResult, RestartRecord, RunOptions } from '../runner/types.ts';
import { formatFlags, parseArgs, parseParams, UsageError, type FlagSpec } from './args.ts';
import { describe, LoadError, loadFlow, parameterNodes, type RunnableFlow } from './load.ts';
import { ProgressReporter, type ProgressSink } from './progress.ts';
import { renderFinalLine, renderOutputs, renderSummary, toRunJson } from './summary.ts';

/** Where the CLI writes; `process` by default, fakes in tests. */
export interface CliIO {
  stdout: ProgressSink;
  stderr: ProgressSink;
  cwd: string;
  /**
   * After a run, exit the process this long after `main` returns if something still keeps
   * it alive (set for the real process only, never in tests that call `main` in-process).
   */
  exitGraceMs?: number;
}

const EXIT_OK = 0;
const EXIT_FLOW_FAILED = 1;
const EXIT_USAGE = 2;
const EXIT_INTERRUPTED = 130;

const USAGE = `weft — run DAGs of TypeScript tasks (Prefect 1 flows, Dask-style scheduling)

Usage:
  weft run <flow file> [options]   run a flow, show its progress and a summary
  weft scheduler [options]         run a cluster scheduler (workers and clients connect to it)
  weft worker <address> [options]  run a cluster worker connected to the scheduler at <address>
  weft bench [options]             run the benchmarks
  weft server [options]            run the backend server (flows, runs, logs; SQLite or PostgreSQL)
  weft register <flow file> --project P   build the flow's storage and register it with the server
  weft flows | weft runs [...]     list registered flows and their runs; runs logs/cancel
  weft agent local|docker|kubernetes      start flow runs per their run config
  weft execute flow-run <id>       run one flow run (what agents start)
  weft help [command]              show help for a command
  weft --version                   print the version

Run 'weft help <command>' for the options of a command.`;

const RUN_FLAGS: readonly FlagSpec[] = [
  { name: 'param', short: 'p', kind: 'list', value: 'NAME=VALUE', help: 'set a flow parameter (repeatable); VALUE is parsed as JSON when it parses, else taken as a string' },
  { name: 'executor', short: 'e', kind: 'string', choices: ['local', 'pool', 'cluster'], help: 'where tasks run: in this thread (local, default), on a pool of worker threads, or on a weft cluster' },
  { name: 'threads', short: 't', kind: 'count', value: 'N', help: 'worker threads for --executor pool (implies it; default: one per core), or task slots per worker of a temporary cluster (default 1)' },
  { name: 'address', short: 'a', kind: 'string', value: 'ws://HOST:PORT', help: 'the scheduler of a running cluster (implies --executor cluster); without it a temporary local cluster runs the flow' },
  { name: 'workers', short: 'w', kind: 'count', value: 'N', help: 'worker processes of a temporary local cluster (implies --executor cluster; default 2)' },
  { name: 'token-file', kind: 'string', value: 'FILE', help: "the cluster's shared token (file mode 600), for --executor cluster" },
  { name: 'bundle', kind: 'boolean', help: 'ship the flow to the cluster as a code bundle (implies --executor cluster), for workers without the code on disk' },
  { name: 'json', kind: 'string', value: 'OUT', help: 'write {state, durationMs, tasks} as JSON to the file OUT' },
  { name: 'restart', kind: 'string', value: 'RUN.json', help: 'restart an earlier run from its --json file: tasks that succeeded there load their checkpointed results instead of running' },
  { name: 'flow', short: 'f', kind: 'string', value: 'NAME', help: 'which flow to run when the file exports several (export or flow name)' },
  { name: 'quiet', short: 'q', kind: 'boolean', help: 'no progress and no table: print only the final line' },
  { name: 'remote', kind: 'boolean', help: 'run a registered flow (by name) on the server: an agent starts it; follow its progress here' },
  { name: 'project', short: 'P', kind: 'string', value: 'NAME', help: "with --remote: the flow's project (when names repeat)" },
  { name: 'label', short: 'l', kind: 'list', value: 'LABEL', help: 'with --remote: a label the run carries (repeatable)' },
  { name: 'server', kind: 'string', value: 'URL', help: 'with --remote: the weft server (default $WEFT_SERVER, else http://127.0.0.1:4200); --token-file is then its API token' },
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

const REMOTE_ONLY = ['project', 'label', 'server'];
const LOCAL_ONLY = ['executor', 'threads', 'address', 'workers', 'bundle', 'json', 'restart', 'flow'];

const RUN_USAGE = `Usage: weft run <flow file> [options]
       weft run <flow name> --remote [--project P] [--param NAME=VALUE] [--label L]

Loads the file (TypeScript or JavaScript), finds the flow it exports (the default export,
else the only exported flow) and runs it. Progress goes to stderr, the summary to stdout.
Exit code: 0 when the flow ends Success, 1 when it ends in any other state, 2 when the
file does not load or the arguments are wrong. Ctrl-C cancels the run; a second Ctrl-C
exits at once.

Options:
${formatFlags(RUN_FLAGS)}

Examples:
  weft run examples/etl.ts
  weft run examples/etl.ts --param records=5000 --param dryRun=true
  weft run flows.ts --flow nightly --executor pool --threads 4 --json run.json
  weft run examples/etl.ts --executor cluster --workers 4
  weft run examples/etl.ts --address ws://10.0.0.5:8786 --token-file ~/.weft/token
  weft run etl --remote --project data --param records=5000`;

export async function main(argv: string[], io: CliIO = processIO()): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case undefined:
        io.stderr.write(`${USAGE}\n`);
        return EXIT_USAGE;
      case '--help':
      case '-h':
        io.stdout.write(`${USAGE}\n`);
        return EXIT_OK;
      case 'help':
        return await helpCommand(rest, io);
      case '--version':
      case '-v':
      case 'version':
        if (rest.length > 0) throw new UsageError(`${command} takes no arguments`);
        io.stdout.write(`weft ${version()}\n`);
        return EXIT_OK;
      case 'run':
        return await runCommand(rest, io);
      case 'scheduler':
        return await schedulerCommand(rest);
      case 'worker':
        return await workerCommand(rest);
      case 'bench':
        return await benchCommand(rest);
      case 'server':
        return await (await import('./server.ts')).serverCommand(rest, io);
      case 'agent':
        return await (await import('./agent.ts')).agentCommand(rest, io);
      case 'execute':
        return await (await import('./execute.ts')).executeCommand(rest, io);
      case 'register':
      case 'flows':
      case 'runs':
        return await (await import('./deploy.ts')).deployCommand(command, rest, io);
      default:
        io.stderr.write(
          `weft: ${command.startsWith('-') ? `unknown flag ${command}` : `unknown command '${command}'`}\n\n${USAGE}\n`,
        );
        return EXIT_USAGE;
    }
  } catch (err) {
    if (err instanceof UsageError) {
      const cmd = command === 'run' ? 'weft run' : 'weft';
      io.stderr.write(`${cmd}: ${err.message} (see 'weft help${command === 'run' ? ' run' : ''}')\n`);
      return EXIT_USAGE;
    }
    throw err;
  }
}

async function helpCommand(args: readonly string[], io: CliIO): Promise<number> {
  const [topic, ...extra] = args;
  if (extra.length > 0) throw new UsageError(`help takes one command, got ${args.join(' ')}`);
  switch (topic) {
    case undefined:
      io.stdout.write(`${USAGE}\n`);
      return EXIT_OK;
    case 'run':
      io.stdout.write(`${RUN_USAGE}\n`);
      return EXIT_OK;
    case 'scheduler':
      return schedulerCommand(['--help']);
    case 'worker':
      return workerCommand(['--help']);
    case 'bench':
      return benchCommand(['--help']);
    case 'server':
    case 'agent':
    case 'execute':
    case 'register':
    case 'flows':
    case 'runs':
      return main([topic, '--help'], io);
    default:
      io.stderr.write(`weft: no help for unknown command '${topic}'\n\n${USAGE}\n`);
      return EXIT_USAGE;
  }
}

async function schedulerCommand(args: string[]): Promise<number> {
  // Loaded on demand, like bench: `weft run` never needs the server.
  const scheduler = await import('./scheduler.ts');
  return scheduler.schedulerCommand(args);
}

async function workerCommand(args: string[]): Promise<number> {
  const worker = await import('./worker.ts');
  return worker.workerCommand(args);
}

async function benchCommand(args: string[]): Promise<number> {
  // Loaded on demand: the bench harness pulls in benchmark code `weft run` never needs.
  const bench = await import('./bench.ts');
  return bench.benchCommand(args);
}

// ---------------------------------------------------------------------------------
// weft run

async function runCommand(args: readonly string[], io: CliIO): Promise<number> {
  const { flags, positionals } = parseArgs(args, RUN_FLAGS);
  if (flags.help === true) {
    io.stdout.write(`${RUN_USAGE}\n`);
    return EXIT_OK;
  }
  const [file, ...extra] = positionals;
  if (flags.remote === true) {
    if (file === undefined) throw new UsageError('missing the name of a registered flow');
    if (extra.length > 0) throw new UsageError(`expected one flow name, also got '${extra.join(' ')}'`);
    const local = LOCAL_ONLY.find((f) => flags[f] !== undefined);
    if (local !== undefined) throw new UsageError(`--${local} applies to a local run, not --remote (the flow's registered settings apply)`);
    const { remoteRun } = await import('./deploy.ts');
    return await remoteRun(
      flags,
      {
        flowName: file,
        ...(typeof flags.project === 'string' ? { project: flags.project } : {}),
        parameters: parseParams(Array.isArray(flags.param) ? flags.param : []),
        labels: Array.isArray(flags.label) ? flags.label : [],
        quiet: flags.quiet === true,
      },
      io,
    );
  }
  const remoteFlag = REMOTE_ONLY.find((f) => flags[f] !== undefined);
  if (remoteFlag !== undefined) throw new UsageError(`--${remoteFlag} applies to --remote runs only`);
  if (file === undefined) throw new UsageError('missing the flow file');
  if (extra.length > 0) throw new UsageError(`expected one flow file, also got '${extra.join(' ')}'`);

  const threads = typeof flags.threads === 'number' ? flags.threads : undefined;
  const cluster: ClusterFlags = {
    ...(typeof flags.address === 'string' ? { address: flags.address } : {}),
    ...(typeof flags.workers === 'number' ? { workers: flags.workers } : {}),
    ...(typeof flags['token-file'] === 'string' ? { tokenFile: resolve(io.cwd, flags['token-file']) } : {}),
    ...(flags.bundle === true ? { bundle: true } : {}),
  };
  const clusterFlag = ['address', 'workers', 'token-file', 'bundle'].find((f) => flags[f] !== undefined);
  const executorKind =
    typeof flags.executor === 'string' ? flags.executor : clusterFlag !== undefined ? 'cluster' : threads !== undefined ? 'pool' : undefined;
  if (threads !== undefined && executorKind !== 'pool' && executorKind !== 'cluster') {
    throw new UsageError('--threads applies to --executor pool or cluster only');
  }
  if (clusterFlag !== undefined && executorKind !== 'cluster') throw new UsageError(`--${clusterFlag} applies to --executor cluster only`);
  if (cluster.address !== undefined) {
    if (!/^wss?:\/\/[^/\s]+/.test(cluster.address)) throw new UsageError(`--address must be ws://HOST:PORT or wss://HOST:PORT, got '${cluster.address}'`);
    if (cluster.workers !== undefined || threads !== undefined) {
      throw new UsageError(`--${cluster.workers !== undefined ? 'workers' : 'threads'} sizes a temporary cluster; a cluster at --address has its own workers`);
    }
  }
  const given = parseParams(Array.isArray(flags.param) ? flags.param : []);
  const quiet = flags.quiet === true;
  const jsonOut = typeof flags.json === 'string' ? resolve(io.cwd, flags.json) : undefined;

  let restart: RestartRecord | undefined;
  if (typeof flags.restart === 'string') {
    try {
      restart = parseRestart(await readFile(resolve(io.cwd, flags.restart), 'utf8'));
    } catch (err) {
      io.stderr.write(`weft: cannot restart from ${flags.restart}: ${describe(err)}\n`);
      return EXIT_USAGE;
    }
  }

  let flow: RunnableFlow;
  let paramNodes: NodeSpec[];
  try {
    const loaded = await loadFlow(file, { cwd: io.cwd, ...(typeof flags.flow === 'string' ? { flowName: flags.flow } : {}) });
    flow = loaded.flow;
    paramNodes = parameterNodes(flow.spec());
  } catch (err) {
    const msg = err instanceof LoadError ? err.message : `cannot load ${file}: invalid flow: ${describe(err)}`;
    io.stderr.write(`weft: ${msg}\n`);
    return EXIT_USAGE;
  }

  // A restart runs with the earlier run's parameters unless --param overrides them.
  const parameters = { ...(restart?.parameters ?? {}), ...given };
  const paramError = checkParameters(flow.name, paramNodes, parameters);
  if (paramError !== null) {
    io.stderr.write(`weft run: ${paramError}\n`);
    return EXIT_USAGE;
  }

  let executor: Executor | undefined;
  if (executorKind !== undefined) {
    try {
      executor = await makeExecutor(executorKind, threads, cluster);
    } catch (err) {
      io.stderr.write(`weft: cannot create the ${executorKind} executor: ${describe(err)}\n`);
      return EXIT_FLOW_FAILED;
    }
  }

  const reporter = quiet ? null : new ProgressReporter(io.stderr);
  const controller = new AbortController();
  let interrupts = 0;
  const onSigint = (): void => {
    interrupts++;
    if (interrupts === 1) {
      const line = 'weft: interrupted: cancelling the run (Ctrl-C again to exit now)';
      if (reporter !== null) reporter.log(line);
      else io.stderr.write(`${line}\n`);
      controller.abort();
      return;
    }
    reporter?.finish();
    io.stderr.write('weft: interrupted twice: exiting now\n');
    process.exit(EXIT_INTERRUPTED);
  };
  // Installed before the start line: a Ctrl-C from then on cancels rather than kills.
  process.on('SIGINT', onSigint);
  const where = relative(io.cwd, resolve(io.cwd, file)) || file;
  const sizing = [cluster.workers !== undefined ? `${cluster.workers} workers` : '', threads !== undefined ? `${threads} threads` : ''].filter((x) => x !== '');
  const at = cluster.address !== undefined ? ` at ${cluster.address}` : '';
  reporter?.start(`weft: running flow '${flow.name}' from ${where} (executor: ${executorKind ?? 'local'}${at}${sizing.map((x) => `, ${x}`).join('')})`);

  const opts: RunOptions = { parameters, signal: controller.signal };
  if (restart !== undefined) opts.restartFrom = restart;
  if (executor !== undefined) opts.executor = executor;
  if (reporter !== null) opts.onProgress = (p) => reporter.update(p);

  let result: FlowRunResult;
  try {
    result = await flow.run(opts);
  } catch (err) {
    reporter?.finish();
    io.stderr.write(`weft: flow '${flow.name}' could not run: ${describe(err)}\n`);
    // Raised before any task ran: the flow file is at fault, like a load error.
    const name = err instanceof Error ? err.name : '';
    return name === 'FlowValidationError' || name === 'TaskResolutionError' ? EXIT_USAGE : EXIT_FLOW_FAILED;
  } finally {
    process.off('SIGINT', onSigint);
  }
  reporter?.finish();

  if (jsonOut !== undefined) {
    try {
      await mkdir(dirname(jsonOut), { recursive: true });
      await writeFile(jsonOut, `${JSON.stringify(toRunJson(result), null, 2)}\n`);
    } catch (err) {
      io.stderr.write(`weft: cannot write --json ${flags.json as string}: ${describe(err)}\n`);
      return EXIT_USAGE;
    }
  }

  if (quiet) {
    io.stdout.write(`${renderFinalLine(result)}\n`);
  } else {
    const exclude = new Set(paramNodes.map((n) => n.key));
    io.stdout.write(`\n${renderSummary(result, exclude, renderOutputs(flow.outputs, result))}\n`);
  }
  const code = result.state === 'Success' ? EXIT_OK : EXIT_FLOW_FAILED;
  if (io.exitGraceMs !== undefined) armExit(code, result.state, io);
  return code;
}

/**
 * The run is over but the process may not be: an in-process task that was cancelled or
 * timed out cannot be stopped (its timers and sockets live on), and user code may leave
 * handles open. The timer is unref'd, so it fires only when something else keeps the
 * process alive; then it exits with the run's code instead of hanging.
 */
function armExit(code: number, state: FlowRunResult['state'], io: CliIO): void {
  setTimeout(() => {
    // After a cancel this is expected; otherwise say why the exit was forced.
    if (state !== 'Cancelled') io.stderr.write('weft: exiting although task code left work pending in this process (open handles or timers)\n');
    process.exit(code);
  }, io.exitGraceMs).unref();
}

/**
 * Unknown names, missing required parameters and values of the wrong declared type are
 * usage errors, caught here with a clear line rather than as a failed run.
 */
export function checkParameters(flowName: string, nodes: readonly NodeSpec[], given: Readonly<Record<string, unknown>>): string | null {
  const byName = new Map<string, NonNullable<NodeSpec['parameter']>>();
  for (const n of nodes) if (n.parameter !== undefined) byName.set(n.parameter.name, n.parameter);
  const known = [...byName.keys()];
  for (const name of Object.keys(given)) {
    const p = byName.get(name);
    if (p === undefined) {
      return `unknown parameter '${name}' for flow '${flowName}' (${known.length === 0 ? 'it takes no parameters' : `its parameters: ${known.join(', ')}`})`;
    }
    const value = given[name];
    if (p.type !== undefined && typeOf(value) !== p.type) {
      return `parameter '${name}' of flow '${flowName}' expects ${p.type === 'array' || p.type === 'object' ? 'an' : 'a'} ${p.type}, got ${JSON.stringify(value)}`;
    }
  }
  for (const [name, p] of byName) {
    if (p.required && !Object.prototype.hasOwnProperty.call(given, name)) {
      return `flow '${flowName}' needs parameter '${name}': give it with --param ${name}=VALUE`;
    }
  }
  return null;
}

function typeOf(v: unknown): string {
  if (Array.isArray(v)) return 'array';
  if (v === null) return 'null';
  return typeof v;
}

/** `weft run` flags for --executor cluster. */
interface ClusterFlags {
  address?: string;
  workers?: number;
  /** Absolute path. */
  tokenFile?: string;
  /** Ship the flow as a code bundle. */
  bundle?: boolean;
}

async function makeExecutor(kind: string, threads: number | undefined, cluster: ClusterFlags): Promise<Executor> {
  // Loaded on demand: a plain `weft run` (default executor) does not start the pool code.
  const { LocalExecutor, PoolExecutor, ClusterExecutor } = await import('../executor/index.ts');
  if (kind === 'pool') return new PoolExecutor(threads !== undefined ? { threads } : {});
  if (kind === 'cluster') {
    const { readTokenFile } = await import('../cluster/auth.ts');
    return new ClusterExecutor({
      ...(cluster.address !== undefined ? { address: cluster.address } : {}),
      ...(cluster.workers !== undefined ? { workers: cluster.workers } : {}),
      ...(threads !== undefined ? { threads } : {}),
      ...(cluster.tokenFile !== undefined ? { token: await readTokenFile(cluster.tokenFile) } : {}),
      ...(cluster.bundle === true ? { bundle: true } : {}),
    });
  }
  return new LocalExecutor();
}

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../package.json', import.meta.url), 'utf8')) as { version?: unknown };
  return typeof pkg.version === 'string' ? pkg.version : 'unknown';
}

function processIO(): CliIO {
  return { stdout: process.stdout, stderr: process.stderr, cwd: process.cwd(), exitGraceMs: 1000 };
}

/** A `weft run --json` document as a restart record; names what is wrong with it. */
export function parseRestart(text: string): RestartRecord {
  const doc = JSON.parse(text) as unknown;
  if (typeof doc !== 'object' || doc === null) throw new Error('not a JSON object');
  const d = doc as Record<string, unknown>;
  if (!Array.isArray(d.tasks)) throw new Error('no "tasks" array (is it a weft run --json file?)');
  d.tasks.forEach((t: unknown, i: number) => {
    const r = t as Record<string, unknown> | null;
    if (typeof r?.key !== 'string' || !Number.isInteger(r.mapIndex) || typeof r.state !== 'string') {
      throw new Error(`tasks[${i}] needs key (string), mapIndex (integer) and state (string)`);
    }
  });
  const out: { runId?: string; parameters?: Record<string, unknown>; tasks: RestartRecord['tasks'] } = {
    tasks: d.tasks as RestartRecord['tasks'],
  };
  if (typeof d.runId === 'string') out.runId = d.runId;
  if (typeof d.parameters === 'object' && d.parameters !== null) out.parameters = d.parameters as Record<string, unknown>;
  return out;
}
