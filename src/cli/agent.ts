/**
 * `weft agent local|docker|kubernetes [options]`: run an agent until SIGINT/SIGTERM.
 *
 * Its first stdout line is `weft agent <name> (<kind>) polling <server> with labels [...]`
 * (plus ` health <url>` with --health-port); its log lines go to stderr. On a signal it
 * stops polling and exits; the flow-run processes it started run on unless --stop-runs.
 *
 * Each kind has its own flags (the options of LocalAgent, DockerAgent and
 * KubernetesAgent that Prefect 1's agents also took); a flag given to a kind it does not
 * apply to is a usage error naming it, as is a file (job template, kubeconfig) that
 * cannot be read.
 */
import { readFile } from 'node:fs/promises';
import { resolve } from 'node:path';
import type { AgentKind } from '../agent/agent.ts';
import { describe } from '../agent/errors.ts';
import { formatFlags, parseArgs, UsageError, type FlagSpec, type FlagValue } from './args.ts';
import type { CliIO } from './main.ts';
import { untilSignal } from './serving.ts';

const FLAGS: readonly FlagSpec[] = [
  { name: 'server', kind: 'string', value: 'URL', help: 'the weft server (default $WEFT_SERVER, else http://127.0.0.1:4200)' },
  { name: 'token-file', kind: 'string', value: 'FILE', help: "the server's API token (default $WEFT_TOKEN_FILE); local and docker flow runs get it too" },
  { name: 'label', short: 'l', kind: 'list', value: 'LABEL', help: 'a label of this agent (repeatable): it takes runs whose labels are all among its own' },
  { name: 'name', kind: 'string', value: 'NAME', help: 'agent name (default <kind>-agent@<hostname>)' },
  { name: 'env', short: 'e', kind: 'list', value: 'NAME=VALUE', help: "an environment variable of every flow run (repeatable; a run config's env overrides it)" },
  { name: 'max-runs', kind: 'count', value: 'N', help: 'runs started and not finished at most (default: no limit)' },
  { name: 'health-port', kind: 'string', value: 'PORT', help: 'serve GET /health on this port (0: any free port)' },
  { name: 'health-host', kind: 'string', value: 'HOST', help: 'address of the health endpoint (default 127.0.0.1)' },
  { name: 'stop-runs', kind: 'boolean', help: 'on exit, stop the flow runs this agent started (default: they run on)' },
  { name: 'no-hostname-label', kind: 'boolean', help: 'local: do not add the host:<hostname> label' },
  { name: 'result-dir', kind: 'string', value: 'DIR', help: "local: the flow-run processes' checkpoint directory (default .weft/results in their working directory)" },
  { name: 'run-heartbeat-ms', kind: 'count', value: 'MS', help: "local: the flow-run processes' heartbeat interval (default 2000)" },
  { name: 'on-signal-exit', kind: 'string', choices: ['leave', 'fail'], help: 'local: a flow-run process killed by a signal: leave its run to lazarus (default) or fail it' },
  { name: 'standby', kind: 'count', value: 'N', help: 'local: keep N flow-run processes started and loaded ahead of their runs (default 0: one process started per run)' },
  { name: 'image', kind: 'string', value: 'IMAGE', help: 'docker, kubernetes: image of runs whose run config, storage (and job template) name none' },
  { name: 'weft-bin', kind: 'string', value: 'PATH', help: "docker, kubernetes: weft's bin/weft.js inside the image (default: this installation's path)" },
  { name: 'docker-host', kind: 'string', value: 'HOST', help: 'docker: the daemon, a unix socket path, unix://PATH or tcp://HOST:PORT (default $DOCKER_HOST, else /var/run/docker.sock)' },
  { name: 'network', kind: 'string', value: 'NAME', help: "docker: network of the containers (default host; a run config's hostConfig.NetworkMode wins)" },
  { name: 'volume', short: 'v', kind: 'list', value: 'HOST:CONTAINER[:ro]', help: 'docker: a bind mount of every container (repeatable)' },
  { name: 'pull', kind: 'string', choices: ['missing', 'always', 'never'], help: 'docker: pull images the daemon lacks (default), every time, or never' },
  { name: 'no-mount-weft', kind: 'boolean', help: 'docker: do not mount this installation into the containers (images that carry weft; see --weft-bin)' },
  { name: 'keep-containers', kind: 'boolean', help: 'docker: leave exited containers for inspection (default: removed)' },
  { name: 'kubeconfig', kind: 'string', value: 'FILE', help: 'kubernetes: the kubeconfig (default $KUBECONFIG, else ~/.kube/config, else the in-cluster service account)' },
  { name: 'namespace', short: 'n', kind: 'string', value: 'NS', help: "kubernetes: namespace of the Jobs (default the kubeconfig context's, else default)" },
  { name: 'job-template', kind: 'string', value: 'FILE', help: 'kubernetes: Job template (JSON or YAML) of runs whose run config has none' },
  { name: 'service-account', kind: 'string', value: 'NAME', help: 'kubernetes: service account of the pods whose run config and template name none' },
  { name: 'image-pull-secret', kind: 'list', value: 'NAME', help: 'kubernetes: an image pull Secret of the pods whose run config and template name none (repeatable)' },
  { name: 'image-pull-policy', kind: 'string', choices: ['Always', 'IfNotPresent', 'Never'], help: 'kubernetes: imagePullPolicy of the flow container' },
  { name: 'token-secret', kind: 'string', value: 'NAME[:KEY]', help: "kubernetes: a Secret holding the server's API token (key default token), mounted into the pods" },
  { name: 'keep-finished-jobs', kind: 'boolean', help: 'kubernetes: leave finished Jobs (default: deleted once handled)' },
  { name: 'job-ttl', kind: 'string', value: 'SECONDS', help: 'kubernetes: ttlSecondsAfterFinished of every Job (the cluster deletes it that long after it finished)' },
  { name: 'help', short: 'h', kind: 'boolean', help: 'show this help' },
];

/** The flags that apply to some kinds only (the others apply to all). */
const KINDS_OF: Readonly<Record<string, readonly AgentKind[]>> = {
  'no-hostname-label': ['local'],
  'result-dir': ['local'],
  'run-heartbeat-ms': ['local'],
  'on-signal-exit': ['local'],
  standby: ['local'],
  image: ['docker', 'kubernetes'],
  'weft-bin': ['docker', 'kubernetes'],
  'docker-host': ['docker'],
  network: ['docker'],
  volume: ['docker'],
  pull: ['docker'],
  'no-mount-weft': ['docker'],
  'keep-containers': ['docker'],
  kubeconfig: ['kubernetes'],
  namespace: ['kubernetes'],
  'job-template': ['kubernetes'],
  'service-account': ['kubernetes'],
  'image-pull-secret': ['kubernetes'],
  'image-pull-policy': ['kubernetes'],
  'token-secret': ['kubernetes'],
  'keep-finished-jobs': ['kubernetes'],
  'job-ttl': ['kubernetes'],
};

const USAGE = `Usage: weft agent local|docker|kubernetes [options]

Polls the server for flow runs whose labels are all among the agent's, claims them and
starts each per its run config: a local agent starts a child process
('weft execute flow-run <id>'), a docker agent a container, a kubernetes agent a Job.
A local agent also holds the label host:<hostname>, which flows kept in local storage
require. Runs until Ctrl-C or SIGTERM.

Options:
${formatFlags(FLAGS)}

Examples:
  weft agent local
  weft agent local --label etl --label gpu --server http://10.0.0.5:4200 --token-file ~/.weft/api-token
  weft agent local --health-port 8080 --max-runs 8
  weft agent local --standby 2
  weft agent docker --docker-host tcp://127.0.0.1:2375 --image node:20 --network weft-net
  weft agent docker --no-mount-weft --weft-bin /opt/weft/bin/weft.js -v /data:/data:ro
  weft agent kubernetes --kubeconfig ~/.kube/prod --namespace flows --image registry.example/weft-runner:1
  weft agent kubernetes --job-template job.yaml --service-account weft-runner --image-pull-secret regcred`;

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
  for (const name of Object.keys(flags)) {
    const kinds = KINDS_OF[name];
    if (kinds !== undefined && !kinds.includes(kind)) throw new UsageError(`--${name} applies to ${kinds.join(' and ')} agents only`);
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

  // Everything a kind needs from the command line is checked before the server is contacted.
  const docker = kind === 'docker' ? dockerOptions(flags, io) : undefined;
  const kube = kind === 'kubernetes' ? await kubernetesOptions(flags, io) : undefined;

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
  const { LocalAgent } = await import('../agent/local.ts');
  const agent =
    docker !== undefined
      ? new (await import('../agent/docker.ts')).DockerAgent({ ...common, ...docker, ...(tokenFile !== undefined ? { tokenFile } : {}) })
      : kube !== undefined
        ? new (await import('../agent/kubernetes.ts')).KubernetesAgent({ ...common, ...kube })
        : new LocalAgent({
          ...common,
          cwd: io.cwd,
          ...(tokenFile !== undefined ? { tokenFile } : {}),
          ...(flags['no-hostname-label'] === true ? { hostnameLabel: false } : {}),
          ...(typeof flags['result-dir'] === 'string' ? { resultDir: resolve(io.cwd, flags['result-dir']) } : {}),
          ...(typeof flags['run-heartbeat-ms'] === 'number' ? { runHeartbeatMs: flags['run-heartbeat-ms'] } : {}),
          ...(flags['on-signal-exit'] === 'fail' ? { onSignalExit: 'fail' as const } : {}),
          ...(typeof flags.standby === 'number' ? { standby: flags.standby } : {}),
        });
  try {
    await agent.start();
  } catch (err) {
    io.stderr.write(`weft agent: cannot register with the server at ${server}: ${describe(err)}\n`);
    return 1;
  }
  const health = agent.healthUrl !== null ? ` health ${agent.healthUrl}` : '';
  io.stdout.write(`weft agent ${agent.name} (${agent.kind}) polling ${server} with labels [${agent.labels.join(', ')}]${health}\n`);
  await untilSignal();
  await agent.stop({ stopRuns: flags['stop-runs'] === true });
  return 0;
}

type Flags = Readonly<Record<string, FlagValue>>;
const str = (flags: Flags, name: string): string | undefined => (typeof flags[name] === 'string' ? flags[name] : undefined);
const list = (flags: Flags, name: string): string[] => (Array.isArray(flags[name]) ? flags[name] : []);

/** The daemon address of --docker-host: a bare path is a unix socket (relative to the working directory). */
export function dockerHostOf(value: string, cwd: string): string {
  if (/^(unix|tcp|http):\/\//.test(value)) return value;
  if (/^[a-z][a-z0-9+.-]*:\/\//i.test(value)) throw new UsageError(`--docker-host takes a socket path, unix://PATH or tcp://HOST:PORT, got '${value}'`);
  return `unix://${resolve(cwd, value)}`;
}

function dockerOptions(flags: Flags, io: CliIO) {
  const host = str(flags, 'docker-host');
  const network = str(flags, 'network');
  const pull = str(flags, 'pull') as 'missing' | 'always' | 'never' | undefined;
  const volumes = list(flags, 'volume');
  const bad = volumes.find((v) => !/^[^:]+:\/[^:]*(:(ro|rw))?$/.test(v));
  if (bad !== undefined) throw new UsageError(`--volume expects HOST:CONTAINER[:ro], got '${bad}'`);
  if (network === '') throw new UsageError('--network needs a non-empty value');
  return {
    ...(host !== undefined ? { engine: { host: dockerHostOf(host, io.cwd) } } : {}),
    ...(network !== undefined ? { hostConfig: { NetworkMode: network } } : {}),
    ...(pull !== undefined ? { pull } : {}),
    ...(volumes.length > 0 ? { volumes: volumes.map((v) => (v.startsWith('/') ? v : `${resolve(io.cwd, v.slice(0, v.indexOf(':')))}${v.slice(v.indexOf(':'))}`)) } : {}),
    ...imageOptions(flags),
    ...(flags['no-mount-weft'] === true ? { mountWeft: false } : {}),
    ...(flags['keep-containers'] === true ? { removeContainers: false } : {}),
  };
}

function imageOptions(flags: Flags): { image?: string; weftBin?: string } {
  const image = str(flags, 'image');
  const weftBin = str(flags, 'weft-bin');
  if (image === '') throw new UsageError('--image needs a non-empty value');
  if (weftBin !== undefined && !weftBin.startsWith('/')) throw new UsageError(`--weft-bin must be an absolute path inside the image, got '${weftBin}'`);
  return { ...(image !== undefined ? { image } : {}), ...(weftBin !== undefined ? { weftBin } : {}) };
}

async function kubernetesOptions(flags: Flags, io: CliIO) {
  const k = await import('../agent/kubernetes.ts');
  const file = str(flags, 'kubeconfig');
  let kubeConfig;
  try {
    kubeConfig = await k.kubeConfigFrom(file !== undefined ? resolve(io.cwd, file) : undefined);
  } catch (err) {
    throw new UsageError(`cannot load the kubeconfig ${file !== undefined ? `--kubeconfig ${file}` : '($KUBECONFIG, ~/.kube/config or in-cluster)'}: ${describe(err)}`);
  }
  const templateFile = str(flags, 'job-template');
  const jobTemplate = templateFile !== undefined ? await readJobTemplate(resolve(io.cwd, templateFile)) : undefined;
  const namespace = str(flags, 'namespace');
  if (namespace !== undefined && !/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(namespace)) throw new UsageError(`--namespace must be a Kubernetes namespace name, got '${namespace}'`);
  const sa = str(flags, 'service-account');
  const secrets = list(flags, 'image-pull-secret');
  if (sa === '' || secrets.includes('')) throw new UsageError(`--${sa === '' ? 'service-account' : 'image-pull-secret'} needs a non-empty value`);
  const tokenSecret = str(flags, 'token-secret');
  const [secretName, secretKey] = tokenSecret?.split(':', 2) ?? [];
  if (tokenSecret !== undefined && (secretName === undefined || secretName === '' || secretKey === '')) throw new UsageError(`--token-secret expects NAME[:KEY], got '${tokenSecret}'`);
  const ttl = str(flags, 'job-ttl');
  const ttlSeconds = ttl === undefined ? undefined : Number(ttl);
  if (ttlSeconds !== undefined && !(Number.isInteger(ttlSeconds) && ttlSeconds >= 0)) throw new UsageError(`--job-ttl must be a whole number of seconds, got '${ttl}'`);
  const policy = str(flags, 'image-pull-policy') as 'Always' | 'IfNotPresent' | 'Never' | undefined;
  return {
    kubeConfig,
    ...(namespace !== undefined ? { namespace } : {}),
    ...(jobTemplate !== undefined ? { jobTemplate } : {}),
    ...(sa !== undefined ? { serviceAccountName: sa } : {}),
    ...(secrets.length > 0 ? { imagePullSecrets: secrets } : {}),
    ...(policy !== undefined ? { imagePullPolicy: policy } : {}),
    ...(secretName !== undefined ? { tokenSecret: { name: secretName, ...(secretKey !== undefined ? { key: secretKey } : {}) } } : {}),
    ...(ttlSeconds !== undefined ? { ttlSecondsAfterFinished: ttlSeconds } : {}),
    ...(flags['keep-finished-jobs'] === true ? { deleteFinishedJobs: false } : {}),
    ...imageOptions(flags),
  };
}

/** A Job template file: JSON, else YAML (client-node's `loadYaml`); it must be one object, a Job if it names a kind. */
async function readJobTemplate(path: string): Promise<Record<string, unknown>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (err) {
    throw new UsageError(`cannot read --job-template ${path}: ${describe(err)}`);
  }
  let t: unknown;
  try {
    t = text.trimStart().startsWith('{') ? JSON.parse(text) : (await import('@kubernetes/client-node')).loadYaml(text);
  } catch (err) {
    throw new UsageError(`--job-template ${path} is neither JSON nor YAML: ${describe(err)}`);
  }
  if (t === null || typeof t !== 'object' || Array.isArray(t)) throw new UsageError(`--job-template ${path} must hold one object (a batch/v1 Job)`);
  const kind = (t as { kind?: unknown }).kind;
  if (kind !== undefined && kind !== 'Job') throw new UsageError(`--job-template ${path} is a ${String(kind)}, not a Job`);
  return t as Record<string, unknown>;
}
