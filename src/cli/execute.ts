/**
 * `weft execute flow-run <id> --server URL [--token-file F]`: the flow-run process
 * (src/deploy/flow-run.ts). Agents start it; it can be started by hand too (a Scheduled
 * run is taken the same way as a Submitted one).
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
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

const USAGE = `Usage: weft execute flow-run <id> [options]

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

async function execute(args: readonly string[], io: CliIO): Promise<number> {
  const { flags, positionals } = parseArgs(args, FLAGS);
  if (flags.help === true) {
    io.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const [what, idArg, ...extra] = positionals;
  if (what !== 'flow-run') throw new UsageError(what === undefined ? 'missing what to execute: flow-run <id>' : `cannot execute '${what}' (only: flow-run <id>)`);
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
