/**
 * `weft agent local|docker|kubernetes`: the command line.
 *
 * - Flags given to a kind they do not apply to, bad values and unreadable files end with
 *   exit 2 and a message naming the flag, before the server is contacted.
 * - End to end, with `node bin/weft.js agent ...` as a child process (stopped by PID):
 *   `weft agent kubernetes --kubeconfig FILE --job-template FILE --image ...` against the
 *   Kubernetes API double (pods as real containers), and `weft agent docker
 *   --docker-host PATH --image ... --pull never -v ... --keep-containers` against a real
 *   dockerd; each run ends Success, and what the flags set is in the Job / container.
 */
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { agentCommand, dockerHostOf } from '../src/cli/agent.ts';
import type { CliIO } from '../src/cli/main.ts';
import { dockerRun, kubernetesRun } from '../src/run-config/index.ts';
import type { BackendClient } from '../src/server/client.ts';
import { agentFlows, localFlow, logText, startTestServer, until, type TestServer } from './helpers/agent-fixture.ts';
import { dockerUnavailable, IMAGES, startDockerd, WEFT_ROOT, type TestDockerd } from './helpers/dockerd.ts';
import { dockerPodRuntime, startKubeApi, type KubeApiDouble } from './helpers/kube-api.ts';
import { killAll, startWeft, type WeftChild } from './fixtures/cli-spawn.ts';

const HOST = `host:${hostname()}`;
let tmp: string;

beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'weft-cli-agent-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

async function cli(...args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '';
  let err = '';
  const io: CliIO = { stdout: { write: (s: string) => (out += s) }, stderr: { write: (s: string) => (err += s) }, cwd: tmp };
  const code = await agentCommand(args, io);
  return { code, out, err };
}

/** A kubeconfig file (the format `kubectl` writes) for `server` with a bearer token. */
async function kubeconfigFile(name: string, server: string, token: string, namespace: string): Promise<string> {
  const file = join(tmp, name);
  const config = {
    apiVersion: 'v1',
    kind: 'Config',
    // client-node talks plain HTTP only to a cluster marked insecure-skip-tls-verify.
    clusters: [{ name: 'c', cluster: { server, ...(server.startsWith('http:') ? { 'insecure-skip-tls-verify': true } : {}) } }],
    users: [{ name: 'u', user: { token } }],
    contexts: [{ name: 'ctx', context: { cluster: 'c', user: 'u', namespace } }],
    'current-context': 'ctx',
  };
  await writeFile(file, JSON.stringify(config));
  return file;
}

describe('weft agent: flags per kind and bad values (exit 2, naming the flag)', () => {
  it.each([
    [['docker', '--namespace', 'x'], '--namespace applies to kubernetes agents only'],
    [['local', '--kubeconfig', 'k'], '--kubeconfig applies to kubernetes agents only'],
    [['kubernetes', '--network', 'n'], '--network applies to docker agents only'],
    [['kubernetes', '--docker-host', '/s.sock'], '--docker-host applies to docker agents only'],
    [['kubernetes', '--pull', 'never'], '--pull applies to docker agents only'],
    [['local', '--image', 'node:20'], '--image applies to docker and kubernetes agents only'],
    [['local', '--keep-finished-jobs'], '--keep-finished-jobs applies to kubernetes agents only'],
    [['docker', '--image-pull-secret', 'regcred'], '--image-pull-secret applies to kubernetes agents only'],
    [['kubernetes', '--result-dir', 'd'], '--result-dir applies to local agents only'],
    [['docker', '--keep-containers', '--on-signal-exit', 'fail'], '--on-signal-exit applies to local agents only'],
    [['docker', '--docker-host', 'ssh://me@box'], "--docker-host takes a socket path, unix://PATH or tcp://HOST:PORT, got 'ssh://me@box'"],
    [['docker', '--volume', 'no-colon'], "--volume expects HOST:CONTAINER[:ro], got 'no-colon'"],
    [['docker', '--weft-bin', 'bin/weft.js'], "--weft-bin must be an absolute path inside the image, got 'bin/weft.js'"],
    [['kubernetes', '--kubeconfig', '/nonexistent/kubeconfig'], 'cannot load the kubeconfig --kubeconfig /nonexistent/kubeconfig'],
  ])('weft agent %j', async (args, message) => {
    const r = await cli(...args);
    expect(r.code).toBe(2);
    expect(r.err).toContain(`weft agent: ${message}`);
    expect(r.out).toBe('');
  });

  it('refuses a --pull value outside its choices, and a bad --job-ttl, --namespace and --token-secret', async () => {
    const kc = await kubeconfigFile('flags.kubeconfig', 'http://127.0.0.1:1', 't', 'default');
    expect((await cli('docker', '--pull', 'sometimes')).err).toMatch(/--pull.*sometimes/);
    for (const [flag, value, text] of [
      ['--job-ttl', '-1', "--job-ttl must be a whole number of seconds, got '-1'"],
      ['--namespace', 'Not_A_Namespace', "--namespace must be a Kubernetes namespace name, got 'Not_A_Namespace'"],
      ['--token-secret', ':key', "--token-secret expects NAME[:KEY], got ':key'"],
    ] as const) {
      const r = await cli('kubernetes', '--kubeconfig', kc, flag, value);
      expect(r.code, r.err).toBe(2);
      expect(r.err).toContain(text);
    }
  });

  it('reads --job-template as JSON or YAML and refuses one that is not a Job or cannot be read', async () => {
    const kc = await kubeconfigFile('tpl.kubeconfig', 'http://127.0.0.1:1', 't', 'default');
    await writeFile(join(tmp, 'pod.yaml'), 'apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\n');
    await writeFile(join(tmp, 'list.json'), '[1, 2]');
    await writeFile(join(tmp, 'broken.yaml'), 'spec: [unclosed\n');
    const notJob = await cli('kubernetes', '--kubeconfig', kc, '--job-template', 'pod.yaml');
    expect(notJob.code).toBe(2);
    expect(notJob.err).toContain(`--job-template ${join(tmp, 'pod.yaml')} is a Pod, not a Job`);
    expect((await cli('kubernetes', '--kubeconfig', kc, '--job-template', 'list.json')).err).toContain('must hold one object (a batch/v1 Job)');
    expect((await cli('kubernetes', '--kubeconfig', kc, '--job-template', 'broken.yaml')).err).toContain('is neither JSON nor YAML');
    expect((await cli('kubernetes', '--kubeconfig', kc, '--job-template', 'missing.yaml')).err).toContain(`cannot read --job-template ${join(tmp, 'missing.yaml')}`);
  });

  it('takes a socket path, unix:// or tcp:// for --docker-host', () => {
    expect(dockerHostOf('/var/run/docker.sock', '/x')).toBe('unix:///var/run/docker.sock');
    expect(dockerHostOf('run/d.sock', '/x')).toBe('unix:///x/run/d.sock');
    expect(dockerHostOf('tcp://127.0.0.1:2375', '/x')).toBe('tcp://127.0.0.1:2375');
    expect(dockerHostOf('unix:///s.sock', '/x')).toBe('unix:///s.sock');
  });

  it('lists the flags of every kind in its help', async () => {
    const r = await cli('--help');
    expect(r.code).toBe(0);
    for (const flag of ['--docker-host', '--network', '--image', '--pull', '--volume', '--kubeconfig', '--namespace', '--job-template', '--service-account', '--image-pull-secret', '--keep-finished-jobs']) {
      expect(r.out).toContain(flag);
    }
    expect(r.out).toContain('weft agent kubernetes --job-template job.yaml');
  });
});

const skip = dockerUnavailable();

describe.skipIf(skip !== null)('weft agent docker|kubernetes as processes, end to end', () => {
  const NS = 'cli-runs';
  let ts: TestServer;
  let backend: BackendClient;
  let d: TestDockerd;
  let kube: KubeApiDouble;
  const { runOf, finished } = agentFlows('cli-agent', () => backend);

  beforeAll(async () => {
    ts = await startTestServer('weft-cli-agent-server-');
    backend = ts.backend;
    d = await startDockerd({ images: ['node'] });
    kube = await startKubeApi({ runtime: dockerPodRuntime(d.engine), namespaces: ['default', NS] });
  }, 120_000);

  /** Stops the agent by its PID (SIGTERM: it stops polling and exits 0). */
  async function stopAgent(a: WeftChild): Promise<void> {
    if (a.child.exitCode === null && a.child.pid !== undefined) process.kill(a.child.pid, 'SIGTERM');
    const r = await a.done;
    expect(r.code, r.stderr).toBe(0);
  }

  afterEach(() => {
    killAll();
  });

  afterAll(async () => {
    killAll();
    await kube?.close();
    await d?.stop();
    await ts?.close();
  }, 60_000);

  it('weft agent kubernetes --kubeconfig FILE --job-template YAML --image ...: the run ends Success', async () => {
    const kc = await kubeconfigFile('double.kubeconfig', kube.url, kube.token, 'default');
    // The template gives the flow container this checkout (read-only at its path).
    const tpl = join(tmp, 'job.yaml');
    await writeFile(
      tpl,
      [
        'apiVersion: batch/v1',
        'kind: Job',
        'metadata:',
        '  labels: {team: cli}',
        'spec:',
        '  template:',
        '    spec:',
        `      volumes: [{name: weft, hostPath: {path: ${WEFT_ROOT}}}]`,
        '      containers:',
        '        - name: flow',
        `          volumeMounts: [{name: weft, mountPath: ${WEFT_ROOT}, readOnly: true}]`,
        '',
      ].join('\n'),
    );
    const labels = ['cli-k8s', HOST];
    const id = await runOf(localFlow('hello.ts', 'agents-hello'), kubernetesRun({ env: { GREETING: 'cli' } }), labels, { n: 3 });
    const a = startWeft([
      'agent', 'kubernetes', '--server', ts.server.url, '--name', 'cli-k8s-agent', '--label', 'cli-k8s', '--label', HOST,
      '--kubeconfig', kc, '--namespace', NS, '--job-template', tpl, '--image', IMAGES.node,
      '--service-account', 'weft-runner', '--image-pull-secret', 'regcred', '--image-pull-secret', 'other',
    ]);
    await a.waitFor('weft agent cli-k8s-agent (kubernetes) polling', 30_000);
    const run = await finished(id);
    expect(run.state, `${logText(await backend.getLogs(id))}\n${a.stderr()}`).toBe('Success');
    await until('the task output in the logs', () => backend.getLogs(id), (l) => l.some((e) => e.message.includes(`greet: cli n=3 run=${id}`)));

    const name = `weft-${id}-0`;
    const post = kube.requests.find((r) => r.method === 'POST' && r.path === `/apis/batch/v1/namespaces/${NS}/jobs`);
    const job = post?.body as any;
    expect(job.metadata).toMatchObject({ name, namespace: NS, labels: { team: 'cli', 'weft.flow-run-id': id } });
    const pod = job.spec.template.spec;
    expect(pod).toMatchObject({ serviceAccountName: 'weft-runner', imagePullSecrets: [{ name: 'regcred' }, { name: 'other' }] });
    expect(pod.containers[0]).toMatchObject({ name: 'flow', image: IMAGES.node });
    // Finished Jobs are deleted by default.
    await until('the Job to be deleted', () => kube.job(NS, name), (j) => j === undefined);
    await stopAgent(a);
  }, 120_000);

  it('weft agent docker --docker-host PATH --image ... --pull never -v ... --keep-containers: the run ends Success', async () => {
    const data = join(tmp, 'data');
    await mkdir(data, { recursive: true });
    const labels = ['cli-docker', HOST];
    const id = await runOf(localFlow('hello.ts', 'agents-hello'), dockerRun({ env: { GREETING: 'docker-cli' } }), labels, { n: 2 });
    const socket = d.host.slice('unix://'.length);
    const a = startWeft([
      'agent', 'docker', '--server', ts.server.url, '--name', 'cli-docker-agent', '--label', 'cli-docker', '--label', HOST,
      '--docker-host', socket, '--image', IMAGES.node, '--pull', 'never', '-v', `${data}:/data:ro`, '--keep-containers', '--network', 'host',
    ]);
    await a.waitFor('weft agent cli-docker-agent (docker) polling', 30_000);
    const run = await finished(id);
    expect(run.state, `${logText(await backend.getLogs(id))}\n${a.stderr()}`).toBe('Success');
    await until('the forwarded output', () => backend.getLogs(id), (l) => l.some((e) => e.source === 'flow-run' && e.message.includes(`greet: docker-cli n=2 run=${id}`)));
    const [c] = await until('the kept container', () => d.engine.listContainers({ all: true, labels: { 'weft.flow-run-id': id } }), (cs) => cs.length === 1);
    const info = await d.engine.inspectContainer(c!.Id);
    expect(info.Config.Image).toBe(IMAGES.node);
    expect(info.HostConfig.Binds).toContain(`${data}:/data:ro`);
    expect(info.HostConfig).toMatchObject({ NetworkMode: 'host', Init: true });
    await d.engine.removeContainer(c!.Id, { force: true });
    await stopAgent(a);
  }, 120_000);
});
