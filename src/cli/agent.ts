/**
 * `weft agent local|docker|kubernetes [--label L]...`: run an agent until SIGINT/SIGTERM.
 *
 * Its first stdout line is `weft agent <name> (<kind>) polling <server> with labels [...]`
 * (plus ` health <url>` with --health-port); its log lines go to stderr. On a signal it
 * stops polling and exits; the flow-run processes it started run on unless --stop-runs.
 */
import { resolve } from 'node:path';
import { describe } from '../agent/errors.ts';
import { formatFlags, parseArgs, UsageError, type FlagSpec } from './args.ts';
import type { CliIO } from './main.ts';

const FLAGS: readonly FlagSpec[] = [
  { name: 'server', kind: 'string', value: 'URL', help: 'the weft server (default $WEFT_SERVER, else http://127.0.0.1:4200)' },
  { name: 'token-file', kind: 'string', value: 'FILE', help: "the server's API token (default $WEFT_TOKEN_FILE); the flow-run processes get it too" },
  { name: 'label', short: 'l', kind: 'list', value: 'LABEL', help: 'a label of this agent (repeatable): it takes runs whose labels are all among its own' },
  { name: 'name', kind: 'string', value: 'NAME', help: 'agent name (default <kind>-agent@<hostname>)' },
  { name: 'env', short: 'e', kind: 'list', value: 'NAME=VALUE', help: "an environment variable of every flow run (repeatable; a run config's env overrides it)" },
  { name: 'max-runs', kind: 'count', value: 'N', help: 'runs started and not finished at most (default: no limit)' },
  { name: 'health-port', kind: 'string', value: 'PORT', help: 'serve GET /health on this port (0: any free port)' },
  { name: 'health-host', kind: 'string', value: 'HOST', help: 'address of the health endpoint (default 127.0.0.1)' },
  { name: 'no-hostname-label', kind: 'boolean', help: 'local: do not add the host:<hostname> label' },
  { name: 'result-dir', kind: 'string', value: 'DIR', help: "local: the flow-run processes' checkpoint directory (default .weft/results in their working directory)" },
  { name: 'run-heartbeat-ms', kind: 'count', value: 'MS', help: "local: the flow-run processes' heartbeat interval (default 2000)" },
  { name: 'on-signal-exit', kind: 'string', choices: ['leave', 'fail'], help: 'local: a flow-run process killed by a signal: leave its run to lazarus (default) or fail it' },
  { name: 'stop-runs', kind: 'boolean', help: 'on exit, stop the flow-run processes this agent started (default: they run on)' },
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

const USAGE = `Usage: weft agent local|docker|kubernetes [options]

Polls the server for flow runs whose labels are all among the agent's, claims them and
starts each per its run config: a local agent starts a child process
('weft execute flow-run <id>'). A local agent also holds the label host:<hostname>, which
flows kept in local storage require. Runs until Ctrl-C or SIGTERM.

Options:
${formatFlags(FLAGS)}

Examples:
  weft agent local
  weft agent local --label etl --label gpu --server http://10.0.0.5:4200 --token-file ~/.weft/api-token
  weft agent local --health-port 8080 --max-runs 8`;

export async function agentCommand(args: readonly string[], io: CliIO): Promise<number> {
  // Usage errors end here, named like the other commands' (the dispatcher does not await this promise inside its catch).
  try {
    return await agent(args, io);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    io.stderr.write(`weft agent: ${err.message} (see 'weft help agent')\n`);
    return 2;
  }
}

async function agent(args: readonly string[], io: CliIO): Promise<number> {
  const { flags, positionals } = parseArgs(args, FLAGS);
  if (flags.help === true) {
    io.stdout.write(`${USAGE}\n`);
    return 0;
  }
  const [kind, ...extra] = positionals;
  if (kind === undefined) throw new UsageError('missing the agent kind: local, docker or kubernetes');
  if (extra.length > 0) throw new UsageError(`unexpected argument '${extra[0]}'`);
  if (kind !== 'local' && kind !== 'docker' && kind !== 'kubernetes') throw new UsageError(`unknown agent kind '${kind}' (local, docker or kubernetes)`);
  if (kind !== 'local') {
    const localOnly = ['no-hostname-label', 'result-dir', 'run-heartbeat-ms', 'on-signal-exit'].find((f) => flags[f] !== undefined);
    if (localOnly !== undefined) throw new UsageError(`--${localOnly} applies to local agents only`);
  }
  const env: Record<string, string> = {};
  for (const pair of Array.isArray(flags.env) ? flags.env : []) {
    const eq = pair.indexOf('=');
    if (eq <= 0) throw new UsageError(`--env expects NAME=VALUE, got '${pair}'`);
    env[pair.slice(0, eq)] = pair.slice(eq + 1);
  }
  let healthPort: number | undefined;
  if (flags['health-port'] !== undefined) {
    healthPort = Number(flags['health-port']);
    if (!Number.isInteger(healthPort) || healthPort < 0 || healthPort > 65535) throw new UsageError(`--health-port must be a port number, got '${String(flags['health-port'])}'`);
  }
  const labels = Array.isArray(flags.label) ? flags.label : [];
  if (labels.some((l) => l.trim() === '')) throw new UsageError('--label needs a non-empty value');

  const { connectBackend } = await import('./deploy.ts');
  const { backend, url: server } = await connectBackend(flags, io);
  const tokenFile = typeof flags['token-file'] === 'string' ? resolve(io.cwd, flags['token-file']) : undefined;
  const common = {
    backend,
    serverUrl: server,
    labels,
    env,
    log: (line: string) => io.stderr.write(`[weft agent] ${line}\n`),
    ...(typeof flags.name === 'string' ? { name: flags.name } : {}),
    ...(typeof flags['max-runs'] === 'number' ? { maxRuns: flags['max-runs'] } : {}),
    ...(healthPort !== undefined ? { healthPort } : {}),
    ...(typeof flags['health-host'] === 'string' ? { healthHost: flags['health-host'] } : {}),
  };
  // Docker: $DOCKER_HOST; Kubernetes: the default kubeconfig (in-cluster, $KUBECONFIG, ~/.kube/config) and its namespace.
  const { LocalAgent } = await import('../agent/local.ts');
  const agent =
    kind === 'docker'
      ? new (await import('../agent/docker.ts')).DockerAgent({ ...common, ...(tokenFile !== undefined ? { tokenFile } : {}) })
      : kind === 'kubernetes'
        ? new (await import('../agent/kubernetes.ts')).KubernetesAgent(common)
        : new LocalAgent({
          ...common,
          cwd: io.cwd,
          ...(tokenFile !== undefined ? { tokenFile } : {}),
          ...(flags['no-hostname-label'] === true ? { hostnameLabel: false } : {}),
          ...(typeof flags['result-dir'] === 'string' ? { resultDir: resolve(io.cwd, flags['result-dir']) } : {}),
          ...(typeof flags['run-heartbeat-ms'] === 'number' ? { runHeartbeatMs: flags['run-heartbeat-ms'] } : {}),
          ...(flags['on-signal-exit'] === 'fail' ? { onSignalExit: 'fail' as const } : {}),
        });
  try {
    await agent.start();
  } catch (err) {
    io.stderr.write(`weft agent: cannot register with the server at ${server}: ${describe(err)}\n`);
    return 1;
  }
  const health = agent.healthUrl !== null ? ` health ${agent.healthUrl}` : '';
  io.stdout.write(`weft agent ${agent.name} (${agent.kind}) polling ${server} with labels [${agent.labels.join(', ')}]${health}\n`);
  await new Promise<void>((done) => {
    const stop = (): void => {
      process.off('SIGINT', stop);
      process.off('SIGTERM', stop);
      done();
    };
    process.on('SIGINT', stop);
    process.on('SIGTERM', stop);
  });
  await agent.stop({ stopRuns: flags['stop-runs'] === true });
  return 0;
}
