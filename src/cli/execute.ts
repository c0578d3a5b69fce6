/**
 * `weft execute flow-run <id> --server URL [--token-file F]`: the flow-run process
 * (src/deploy/flow-run.ts). Agents start it; it can be started by hand too (a Scheduled
 * run is taken the same way as a Submitted one).
 *
 * `weft execute flow-run --standby`: a process started before its run (LocalAgent's
 * `standby` option). It loads the flow-run machinery (the server client,
 * deploy/flow-run.ts and weft's API, not a flow), prints STANDBY_READY on stdout, and waits for one JSON
 * line on stdin (StandbyAssignment): the arguments a fresh process would have had, its
 * whole environment and its working directory. It replaces its environment with that
 * one and changes to that directory before anything of the run loads, then goes on as
 * `weft execute <args>`. Its stdin closing before a line came (the agent stopped or
 * died) ends it at once, exit 0.
 *
 * Exit codes: 0 the run succeeded, or it was not this process's to run (another process
 * has it, it is already finished); 1 it ended Failed or Cancelled, or the server could
 * not be reached; 2 a usage error. The process exits right after the run (task code that
 * could not be stopped does not keep it alive).
 */
import { resolve } from 'node:path';
import { formatFlags, parseArgs, UsageError, type FlagSpec } from './args.ts';
import type { CliIO } from './main.ts';

const FLAGS: readonly FlagSpec[] = [
  { name: 'server', kind: 'string', value: 'URL', help: 'the weft server (default $WEFT_SERVER, else http://127.0.0.1:4200)' },
  { name: 'token-file', kind: 'string', value: 'FILE', help: "the server's API token (default $WEFT_TOKEN_FILE)" },
  { name: 'result-dir', kind: 'string', value: 'DIR', help: 'checkpointed results, shared by the attempts of a run (default .weft/results)' },
  { name: 'heartbeat-ms', kind: 'count', value: 'MS', help: 'heartbeat interval; also how soon a cancel is noticed (default 2000)' },
  { name: 'work-dir', kind: 'string', value: 'DIR', help: "scratch space for the flow's code (default: the OS temp directory)" },
  { name: 'standby', kind: 'boolean', help: 'start ahead of the run: load, then wait for the run on stdin (what agents with standby processes start)' },
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

/** What an agent writes to a standby process: one line of JSON on its stdin. */
export interface StandbyAssignment {
  /** The arguments of `weft execute` a fresh process would have had (`flow-run <id> --server URL ...`). */
  readonly args: readonly string[];
  /** The run's whole environment: it replaces the standby's. */
  readonly env: Readonly<Record<string, string>>;
  /** The run's working directory (absolute). */
  readonly cwd: string;
}

/** A standby process's first stdout line once it has loaded (not run output: its agent drops it). */
export const STANDBY_READY = 'weft-standby-ready';

/** Longest assignment line read (an environment is a few KiB). */
const MAX_ASSIGNMENT = 4 * 1024 * 1024;

const USAGE = `Usage: weft execute flow-run <id> [options]
       weft execute flow-run --standby

Runs one flow run of a registered flow: moves it to Running, loads the flow from its
storage, runs it with its executor, reports task states, logs and heartbeats to the
server, stops on cancel, and writes the final state. Agents start this command; a run
that another process has already started is left alone (exit 0).

Options:
${formatFlags(FLAGS)}

Environment: WEFT_SERVER, WEFT_TOKEN_FILE, WEFT_FLOW_RUN_ID (when <id> is not given),
WEFT_OUTPUT_FORWARDED=1 (an agent ships this process's output: it does not ship its
console itself), WEFT_CLUSTER_TOKEN_FILE (token of a cluster the flow's executor names).`;

export async function executeCommand(args: readonly string[], io: CliIO): Promise<number> {
  // Usage errors end here, named like the other commands' (the dispatcher does not await this promise inside its catch).
  try {
    return await execute(args, io);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    io.stderr.write(`weft execute: ${err.message} (see 'weft help execute')\n`);
    return 2;
  }
}

async function execute(args: readonly string[], io: CliIO, assigned = false): Promise<number> {
  const { flags, positionals } = parseArgs(args, FLAGS);
  if (flags.help === true) {
    io.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const [what, idArg, ...extra] = positionals;
  if (what !== 'flow-run') throw new UsageError(what === undefined ? 'missing what to execute: flow-run <id>' : `cannot execute '${what}' (only: flow-run <id>)`);
  if (flags.standby === true) {
    if (assigned) throw new UsageError('a standby assignment cannot start another standby');
    const other = Object.keys(flags).find((k) => k !== 'standby');
    if (idArg !== undefined || other !== undefined) throw new UsageError(`--standby takes no ${idArg !== undefined ? 'run id' : `--${other}`}: the run comes on stdin`);
    return standby(io);
  }
  const id = idArg ?? process.env.WEFT_FLOW_RUN_ID;
  if (id === undefined || id === '') throw new UsageError('missing the flow run id');
  if (extra.length > 0) throw new UsageError(`unexpected argument '${extra[0]}'`);
  const { connectBackend } = await import('./deploy.ts');
  const { backend } = await connectBackend(flags, io);
  const { executeFlowRun } = await import('../deploy/flow-run.ts');
  const result = await executeFlowRun({
    backend,
    flowRunId: id,
    cwd: io.cwd,
    ...(typeof flags['result-dir'] === 'string' ? { resultDir: resolve(io.cwd, flags['result-dir']) } : {}),
    ...(typeof flags['heartbeat-ms'] === 'number' ? { heartbeatMs: flags['heartbeat-ms'] } : {}),
    ...(typeof flags['work-dir'] === 'string' ? { workDir: resolve(io.cwd, flags['work-dir']) } : {}),
    outputForwarded: process.env.WEFT_OUTPUT_FORWARDED === '1',
    print: (line) => io.stderr.write(`${line}\n`),
  });
  if (io.exitGraceMs !== undefined) {
    // A cancelled or abandoned run may leave task code behind (timers, sockets): exit anyway.
    const grace = result.state === 'Success' ? io.exitGraceMs : Math.min(io.exitGraceMs, 200);
    setTimeout(() => process.exit(result.code), grace).unref();
  }
  return result.code;
}

/**
 * The standby's life: load while no run waits, then take the run from stdin and run it
 * exactly as a fresh process would (same arguments, environment and directory).
 */
async function standby(io: CliIO): Promise<number> {
  const assignment = readAssignment();
  assignment.catch(() => {}); // awaited below, after loading
  // What a run loads before its flow: the CLI's server connection, the server client (a
  // dynamic import of connectBackend), the flow-run machinery, weft's API (what flow files
  // import), and fetch (Node loads its HTTP client on first use; a data: URL needs no network).
  await import('./deploy.ts');
  await import('../server/client.ts');
  await import('../deploy/flow-run.ts');
  await import('../index.ts');
  await (await fetch('data:,')).text();
  io.stdout.write(`${STANDBY_READY}\n`);
  const a = await assignment;
  // Before anything of the run loads: the flow's module-level code sees the run's env and cwd.
  for (const k of Object.keys(process.env)) if (!Object.hasOwn(a.env, k)) delete process.env[k];
  Object.assign(process.env, a.env);
  try {
    process.chdir(a.cwd);
  } catch (err) {
    throw new UsageError(`cannot change to the run's working directory ${a.cwd}: ${(err as Error).message}`);
  }
  process.argv = [process.argv[0] ?? process.execPath, process.argv[1] ?? '', 'execute', ...a.args];
  return execute(a.args, { ...io, cwd: a.cwd }, true);
}

/** The first line of stdin as an assignment; stdin ending first (the agent is gone) exits the process. */
function readAssignment(): Promise<StandbyAssignment> {
  const stdin = process.stdin;
  return new Promise<StandbyAssignment>((resolve, reject) => {
    let buf = '';
    const gone = (): void => process.exit(0);
    const onData = (chunk: string): void => {
      buf += chunk;
      const nl = buf.indexOf('\n');
      if (nl < 0 && buf.length <= MAX_ASSIGNMENT) return;
      stdin.off('data', onData);
      stdin.off('end', gone);
      stdin.off('error', gone);
      // Nothing more comes on stdin: it must not keep the process alive, nor end it.
      stdin.on('error', () => {});
      stdin.destroy();
      try {
        if (nl < 0) throw new Error(`no end of line in the first ${MAX_ASSIGNMENT} bytes`);
        resolve(checkAssignment(JSON.parse(buf.slice(0, nl))));
      } catch (err) {
        reject(new UsageError(`bad standby assignment on stdin: ${(err as Error).message}`));
      }
    };
    stdin.setEncoding('utf8');
    stdin.on('data', onData);
    stdin.once('end', gone);
    stdin.once('error', gone);
  });
}

function checkAssignment(v: unknown): StandbyAssignment {
  const o = v as Partial<Record<keyof StandbyAssignment, unknown>> | null;
  if (o === null || typeof o !== 'object') throw new Error('expected an object');
  if (!Array.isArray(o.args) || o.args.some((x) => typeof x !== 'string')) throw new Error('args: expected an array of strings');
  if (o.env === null || typeof o.env !== 'object' || Array.isArray(o.env) || Object.values(o.env).some((x) => typeof x !== 'string')) {
    throw new Error('env: expected an object of strings');
  }
  if (typeof o.cwd !== 'string' || o.cwd === '') throw new Error('cwd: expected a directory');
  return { args: o.args as string[], env: o.env as Record<string, string>, cwd: o.cwd };
}
