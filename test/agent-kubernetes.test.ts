/**
 * KubernetesAgent end to end against the Kubernetes API double (test/helpers/kube-api.ts:
 * batch/v1 Jobs and core/v1 Pods over HTTP, each pod a real container on a real dockerd
 * started for this file), with a real `weft server` (temp SQLite). No real cluster runs
 * here: what is faithful in the double and what is not is said in its header.
 *
 * - A KubernetesRun: the Job the agent sends (image, command, env, resources,
 *   serviceAccountName, imagePullSecrets, labels, backoffLimit, the template merged),
 *   its pod runs `weft execute flow-run` for real and the run ends Success with its task
 *   runs and logs; the finished Job is deleted with propagationPolicy Background.
 * - An image that does not exist: ErrImagePull in the run's logs, the run Failed, the
 *   Job deleted.
 * - A run cancelled while its pod cannot pull its image: the Job deleted.
 * - A flow-run process that exits 3: the Job fails (backoffLimit 0), the run Failed
 *   with the exit code and the pod's last log lines.
 * - `buildJob` alone: the template's container, env and resources merged.
 */
import { hostname } from 'node:os';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildJob, DEFAULT_WEFT_BIN, jobName, KubernetesAgent, type KubernetesAgentOptions } from '../src/agent/kubernetes.ts';
import { kubernetesRun, type RunConfig } from '../src/run-config/index.ts';
import type { BackendClient } from '../src/server/client.ts';
import type { RunningServer } from '../src/server/index.ts';
import type { ClaimedRun, FlowRun, FlowVersion } from '../src/server/model.ts';
import type { StorageRef } from '../src/storage/types.ts';
import { agentFlows, localFlow as local, logText, startTestServer, until, type TestServer } from './helpers/agent-fixture.ts';
import { dockerUnavailable, IMAGES, startDockerd, WEFT_ROOT, type TestDockerd } from './helpers/dockerd.ts';
import { dockerPodRuntime, startKubeApi, type KubeApiDouble } from './helpers/kube-api.ts';

const skip = dockerUnavailable();
const HOST = `host:${hostname()}`;
const NS = 'weft-runs';

/** The pod template part that gives the flow container weft (this checkout, read-only at its path). */
const WEFT_TEMPLATE = {
  spec: {
    template: {
      spec: {
        volumes: [{ name: 'weft', hostPath: { path: WEFT_ROOT } }],
        containers: [{ name: 'flow', volumeMounts: [{ name: 'weft', mountPath: WEFT_ROOT, readOnly: true }] }],
      },
    },
  },
};

let ts: TestServer;
let server: RunningServer;
let backend: BackendClient;
let d: TestDockerd;
let kube: KubeApiDouble;
const agents: KubernetesAgent[] = [];

const { runOf, finished } = agentFlows('agent-kubernetes', () => backend);

async function agent(labels: readonly string[], extra: Partial<KubernetesAgentOptions> = {}): Promise<KubernetesAgent> {
  const a = new KubernetesAgent({
    backend,
    serverUrl: server.url,
    kubeConfig: kube.kubeConfigOptions(NS),
    labels,
    pollMinMs: 100,
    pollMaxMs: 500,
    watchIntervalMs: 150,
    ...extra,
  });
  agents.push(a);
  await a.start();
  return a;
}

/** The Job bodies the agent POSTed, by name. */
const posted = (): Map<string, any> =>
  new Map(kube.requests.filter((r) => r.method === 'POST' && r.path === `/apis/batch/v1/namespaces/${NS}/jobs`).map((r) => [(r.body as any).metadata.name as string, r.body]));

describe.skipIf(skip !== null)('KubernetesAgent against the Kubernetes API double (pods in real containers)', () => {
  beforeAll(async () => {
    ts = await startTestServer('weft-agent-k8s-');
    ({ server, backend } = ts);
    d = await startDockerd({ images: ['node'] });
    kube = await startKubeApi({ runtime: dockerPodRuntime(d.engine), namespaces: ['default', NS], imagePullBackoffMs: 200 });
  }, 90_000);

  afterAll(async () => {
    for (const a of agents) await a.stop({ stopRuns: true });
    await kube?.close();
    await d?.stop();
    await ts?.close();
  }, 60_000);

  it('creates the Job from the KubernetesRun; its pod runs the flow and the run ends Success; the Job is deleted', async () => {
    const labels = ['k8s-a', HOST];
    const rc = kubernetesRun({
      image: IMAGES.node,
      env: { GREETING: 'hallo' },
      cpuRequest: '100m',
      cpuLimit: '1',
      memoryRequest: '128Mi',
      memoryLimit: '1Gi',
      serviceAccountName: 'weft-runner',
      imagePullSecrets: ['regcred'],
      jobTemplate: { metadata: { labels: { team: 'data' } }, ...WEFT_TEMPLATE },
    });
    const id = await runOf(local('hello.ts', 'agents-hello'), rc, labels, { n: 4 });
    const a = await agent(labels, { env: { GREETING: 'agent-default', EXTRA: 'x' } });
    expect(a.jobNamespace).toBe(NS);
    const run = await finished(id);
    const logs = await backend.getLogs(id);
    expect(run.state, logText(logs)).toBe('Success');
    const tasks = await backend.getTaskRuns(id);
    expect(tasks.map((t) => `${t.key}:${t.state}`).sort()).toEqual(['greet:Success', 'n:Success', 'total:Success']);
    await until('the task output in the logs', () => backend.getLogs(id), (l) => l.some((e) => e.message.includes(`greet: hallo n=4 run=${id}`)));

    const name = `weft-${id}-0`;
    const job = posted().get(name);
    expect(job).toBeDefined();
    expect(job.metadata.labels).toEqual({ team: 'data', 'weft.flow-run-id': id, 'weft.agent': a.id, 'weft.flow': run.flowName, 'app.kubernetes.io/managed-by': 'weft' });
    expect(job.spec.backoffLimit).toBe(0);
    const pod = job.spec.template;
    expect(pod.metadata.labels).toMatchObject({ 'weft.flow-run-id': id, 'weft.agent': a.id });
    expect(pod.spec).toMatchObject({ restartPolicy: 'Never', serviceAccountName: 'weft-runner', imagePullSecrets: [{ name: 'regcred' }] });
    expect(pod.spec.containers).toHaveLength(1);
    const c = pod.spec.containers[0];
    expect(c.name).toBe('flow');
    expect(c.image).toBe(IMAGES.node);
    expect(c.command).toEqual(['node', DEFAULT_WEFT_BIN, 'execute', 'flow-run', id, '--server', server.url]);
    expect(c.args).toBeUndefined();
    expect(c.resources).toEqual({ requests: { cpu: '100m', memory: '128Mi' }, limits: { cpu: '1', memory: '1Gi' } });
    expect(c.volumeMounts).toEqual([{ name: 'weft', mountPath: WEFT_ROOT, readOnly: true }]);
    const env = Object.fromEntries((c.env as { name: string; value: string }[]).map((e) => [e.name, e.value]));
    expect(env).toMatchObject({ GREETING: 'hallo', EXTRA: 'x', WEFT_SERVER: server.url, WEFT_FLOW_RUN_ID: id, WEFT_AGENT_ID: a.id });

    // Its pod ran (and went, with the Job).
    const events = kube.events('pods').filter((e) => e.name.startsWith(`${name}-`));
    expect(events.length).toBeGreaterThan(0);
    // Finished and handled: deleted with its pods.
    await until('the Job to be deleted', () => kube.job(NS, name), (j) => j === undefined);
    const del = kube.requests.find((r) => r.method === 'DELETE' && r.path === `/apis/batch/v1/namespaces/${NS}/jobs/${name}`);
    expect(del?.query.propagationPolicy).toBe('Background');
    await until('its pods to go', () => kube.pods(NS).filter((p) => p.metadata.labels['job-name'] === name), (ps) => ps.length === 0);
    expect(a.jobs).toEqual([]);
    await a.stop();
  });

  it('reports ErrImagePull into the run logs, fails the run and deletes the Job', async () => {
    const labels = ['k8s-b', HOST];
    const image = '127.0.0.1:1/weft/does-not-exist:1';
    const id = await runOf(local('hello.ts', 'agents-hello'), kubernetesRun({ image, jobTemplate: WEFT_TEMPLATE }), labels);
    const a = await agent(labels, { startTimeoutMs: 1_000 });
    const run = await finished(id);
    const logs = logText(await backend.getLogs(id));
    expect(run.state, logs).toBe('Failed');
    expect(run.message).toMatch(/^pod weft-\S+ container flow cannot start: (ErrImagePull|ImagePullBackOff)/);
    expect(logs).toMatch(/\[agent\/warn\] pod weft-\S+: container flow cannot start: ErrImagePull \(Failed to pull image "127\.0\.0\.1:1\/weft\/does-not-exist:1"/);
    const name = `weft-${id}-0`;
    await until('the Job to be deleted', () => kube.job(NS, name), (j) => j === undefined);
    await until('its pod to go', () => kube.pods(NS).filter((p) => p.metadata.labels['job-name'] === name), (ps) => ps.length === 0);
    await a.stop();
  });

  it('deletes the Job of a run cancelled while its pod cannot start', async () => {
    const labels = ['k8s-d', HOST];
    const id = await runOf(local('hello.ts', 'agents-hello'), kubernetesRun({ image: '127.0.0.1:1/weft/never:1', jobTemplate: WEFT_TEMPLATE }), labels);
    const a = await agent(labels, { startTimeoutMs: 60_000 });
    const name = `weft-${id}-0`;
    await until('the pod to report ErrImagePull', () => kube.pods(NS).filter((p) => p.metadata.labels['job-name'] === name), (ps) => ps[0]?.status.containerStatuses[0].state.waiting?.reason === 'ErrImagePull');
    expect((await backend.cancelFlowRun(id)).state).toBe('Cancelled');
    await until('the Job to be deleted', () => kube.job(NS, name), (j) => j === undefined);
    expect((await backend.getFlowRun(id)).state).toBe('Cancelled');
    await until('the report in the logs', () => backend.getLogs(id), (l) => l.some((e) => e.message === `run is Cancelled before its pod started: deleting Job ${name}`));
    await a.stop();
  });

  it('fails the run when its pod exits non-zero, with the exit code and the pod log tail', async () => {
    const labels = ['k8s-c', HOST];
    const id = await runOf(local('crash.ts', 'agents-crash'), kubernetesRun({ image: IMAGES.node, jobTemplate: WEFT_TEMPLATE }), labels);
    const a = await agent(labels);
    const run = await finished(id);
    const logs = logText(await backend.getLogs(id));
    expect(run.state, logs).toBe('Failed');
    expect(run.message).toMatch(/^Job weft-\S+ failed \(BackoffLimitExceeded: Job has reached the specified backoff limit\); pod weft-\S+: container flow exited with code 3 \(Error\)$/);
    expect(logs).toMatch(/exited with code 3 \(Error\); its last output:\n[\s\S]*crash: about to exit the flow-run process with code 3/);
    await until('the Job to be deleted', () => kube.job(NS, `weft-${id}-0`), (j) => j === undefined);
    await a.stop();
  });
});

describe('buildJob', () => {
  const claimed = (runConfig: RunConfig, storage: StorageRef = { kind: 'local', path: '/f.ts', host: 'h', flow: 'My Flow!' }): ClaimedRun => ({
    run: { id: '0b8f5c4e-1d2a-4c3b-9e8f-7a6b5c4d3e2f', restarts: 2, flowName: 'My Flow!' } as FlowRun,
    version: { runConfig, storage } as FlowVersion,
  });

  it('merges the template: the container named flow, its env and resources, the other containers kept', () => {
    const job = buildJob(
      claimed(
        kubernetesRun({
          env: { A: 'run' },
          memoryLimit: '2Gi',
          jobTemplate: {
            metadata: { name: 'ignored', annotations: { x: 'y' } },
            spec: {
              backoffLimit: 2,
              template: {
                spec: {
                  containers: [
                    { name: 'sidecar', image: 'proxy:1' },
                    { name: 'flow', image: 'template:1', args: ['x'], env: [{ name: 'A', value: 'template' }, { name: 'B', value: 'template' }], resources: { limits: { cpu: '2' } } },
                  ],
                },
              },
            },
          },
        }),
      ),
      { serverUrl: 'http://s:4200', agentId: 'agent-1', namespace: 'ns', env: { B: 'agent', C: 'agent' } },
    );
    expect(job.metadata).toMatchObject({ name: 'weft-0b8f5c4e-1d2a-4c3b-9e8f-7a6b5c4d3e2f-2', namespace: 'ns', annotations: { x: 'y' } });
    expect(job.metadata?.labels?.['weft.flow']).toBe('My-Flow');
    expect(job.spec?.backoffLimit).toBe(2);
    const [side, flow] = job.spec!.template.spec!.containers;
    expect(side).toEqual({ name: 'sidecar', image: 'proxy:1' });
    expect(flow!.image).toBe('template:1');
    expect(flow!.args).toBeUndefined();
    expect(flow!.env?.map((e) => `${e.name}=${e.value}`)).toEqual(['A=run', 'B=agent', 'C=agent', 'WEFT_SERVER=http://s:4200', 'WEFT_FLOW_RUN_ID=0b8f5c4e-1d2a-4c3b-9e8f-7a6b5c4d3e2f', 'WEFT_AGENT_ID=agent-1']);
    expect(flow!.resources).toEqual({ limits: { cpu: '2', memory: '2Gi' } });
  });

  it('takes the DockerStorage image, then the agent default; mounts a token secret; no image is an error', () => {
    const dockerRef: StorageRef = { kind: 'docker', image: 'reg:5000/weft/f:abc', path: '/opt/weft/f.mjs', flow: 'f' };
    const j = buildJob(claimed(kubernetesRun(), dockerRef), { serverUrl: 'http://s', agentId: 'a', namespace: 'n', image: 'default:1', tokenSecret: { name: 'weft-token' }, ttlSecondsAfterFinished: 60 });
    const c = j.spec!.template.spec!.containers[0]!;
    expect(c.image).toBe('reg:5000/weft/f:abc');
    expect(c.command?.slice(-2)).toEqual(['--token-file', '/var/run/secrets/weft/token']);
    expect(j.spec!.template.spec!.volumes).toEqual([{ name: 'weft-token', secret: { secretName: 'weft-token', items: [{ key: 'token', path: 'token' }] } }]);
    expect(j.spec!.ttlSecondsAfterFinished).toBe(60);
    expect(buildJob(claimed({ kind: 'universal' }), { serverUrl: 'http://s', agentId: 'a', namespace: 'n', image: 'default:1' }).spec!.template.spec!.containers[0]!.image).toBe('default:1');
    expect(() => buildJob(claimed({ kind: 'universal' }), { serverUrl: 'http://s', agentId: 'a', namespace: 'n' })).toThrow(/no image for the flow-run container/);
    expect(jobName({ id: 'ABC', restarts: 0 } as FlowRun)).toBe('weft-abc-0');
  });

  it("uses the agent's service account and image pull secrets only where the run config and the template name none", () => {
    const agentDefaults = { serverUrl: 'http://s', agentId: 'a', namespace: 'n', image: 'i:1', serviceAccountName: 'agent-sa', imagePullSecrets: ['agent-cred'] };
    const pod = (rc: RunConfig) => buildJob(claimed(rc), agentDefaults).spec!.template.spec!;
    expect(pod(kubernetesRun())).toMatchObject({ serviceAccountName: 'agent-sa', imagePullSecrets: [{ name: 'agent-cred' }] });
    expect(pod(kubernetesRun({ serviceAccountName: 'run-sa', imagePullSecrets: ['run-cred'] }))).toMatchObject({ serviceAccountName: 'run-sa', imagePullSecrets: [{ name: 'run-cred' }] });
    const fromTemplate = pod(kubernetesRun({ jobTemplate: { spec: { template: { spec: { serviceAccountName: 'tpl-sa', imagePullSecrets: [{ name: 'tpl-cred' }], containers: [] } } } } }));
    expect(fromTemplate).toMatchObject({ serviceAccountName: 'tpl-sa', imagePullSecrets: [{ name: 'tpl-cred' }] });
    const none = buildJob(claimed(kubernetesRun()), { serverUrl: 'http://s', agentId: 'a', namespace: 'n', image: 'i:1' }).spec!.template.spec!;
    expect(none.serviceAccountName).toBeUndefined();
    expect(none.imagePullSecrets).toBeUndefined();
  });
});
