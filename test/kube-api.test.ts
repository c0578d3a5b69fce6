/**
 * The Kubernetes API double (test/helpers/kube-api.ts) through the real
 * `@kubernetes/client-node` client (its typed APIs and its `Watch`), with each Job's pod
 * run as a real container by a real dockerd: the shapes, codes and status transitions
 * the Kubernetes agent relies on. Also: the per-request deadline of `kubeApis`.
 */
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { BatchV1Api, CoreV1Api, V1Job } from '@kubernetes/client-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IMAGES, dockerUnavailable, startDockerd, type TestDockerd } from './helpers/dockerd.ts';
import { kubeApis, kubeConfigFrom, kubeErrorText, loadKubeClient } from '../src/agent/kubernetes.ts';
import { dockerPodRuntime, parseLabelSelector, parseQuantity, startKubeApi, type KubeApiDouble } from './helpers/kube-api.ts';

const skip = dockerUnavailable();
const NS = 'default';
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, get: () => Promise<T> | T, ok: (v: T) => boolean, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await get();
    if (ok(v)) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${JSON.stringify(v)?.slice(0, 1500)}`);
    await sleep(50);
  }
}

/** The ApiException a call rejects with. */
async function apiError(p: Promise<unknown>): Promise<{ code: number; body: any }> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf((await loadKubeClient()).ApiException);
    const e = err as { code: number; body: unknown };
    return { code: e.code, body: typeof e.body === 'string' && e.body !== '' ? JSON.parse(e.body) : e.body };
  }
  throw new Error('expected the call to fail');
}

const job = (name: string, container: Record<string, unknown>, spec: Record<string, unknown> = {}): V1Job => ({
  apiVersion: 'batch/v1',
  kind: 'Job',
  metadata: { name, labels: { app: 'kube-api-test' } },
  spec: {
    backoffLimit: 0,
    ...spec,
    template: {
      metadata: { labels: { role: 'flow' } },
      spec: {
        restartPolicy: 'Never',
        containers: [{ name: 'main', image: IMAGES.busybox, imagePullPolicy: 'IfNotPresent', ...container }],
      },
    },
  },
});

describe.skipIf(skip !== null)('Kubernetes API double (real client, pods in real containers)', () => {
  let dockerd: TestDockerd;
  let kube: KubeApiDouble;
  let batch: BatchV1Api;
  let core: CoreV1Api;

  beforeAll(async () => {
    dockerd = await startDockerd({ images: ['busybox'] });
    kube = await startKubeApi({ runtime: dockerPodRuntime(dockerd.engine), imagePullBackoffMs: 200 });
    ({ batch, core } = await kubeApis(await kubeConfigFrom(kube.kubeConfigOptions(NS))));
  }, 60_000);

  afterAll(async () => {
    await kube?.close();
    await dockerd?.stop();
  }, 60_000);

  /** A watch through client-node's `Watch` (GET with watch=true, one JSON event per line); resolves once the stream is open. */
  const watchStream = async (path: string, query: Record<string, string>, onEvent: (type: string, obj: any) => void): Promise<{ abort(): void }> => {
    const k = await loadKubeClient();
    let failed: unknown = null;
    const ctl = await new k.Watch(await kubeConfigFrom(kube.kubeConfigOptions(NS))).watch(path, query, onEvent, (err: unknown) => {
      failed ??= err;
    });
    if (failed !== null) throw new Error(`the watch of ${path} failed: ${String(failed)}`);
    return { abort: () => ctl.abort() };
  };

  const podsOf = async (jobName: string) => (await core.listNamespacedPod({ namespace: NS, labelSelector: `job-name=${jobName}` })).items;

  it('answers 401 without the bearer token, and 404 Status objects for unknown things', async () => {
    const bad = await kubeApis(await kubeConfigFrom(kube.kubeConfigOptions(NS, 'wrong')));
    const e401 = await apiError(bad.batch.listNamespacedJob({ namespace: NS }));
    expect(e401.code).toBe(401);
    expect(kube.requests.at(-1)?.path).toBe('/apis/batch/v1/namespaces/default/jobs');

    const e404 = await apiError(batch.readNamespacedJob({ name: 'nope', namespace: NS }));
    expect(e404.code).toBe(404);
    expect(e404.body).toMatchObject({ kind: 'Status', status: 'Failure', reason: 'NotFound', code: 404, message: 'jobs.batch "nope" not found', details: { name: 'nope', group: 'batch', kind: 'jobs' } });
    const ens = await apiError(batch.listNamespacedJob({ namespace: 'elsewhere' }));
    expect(ens.body).toMatchObject({ reason: 'NotFound', message: 'namespaces "elsewhere" not found' });
    const epod = await apiError(core.readNamespacedPodLog({ name: 'nope', namespace: NS }));
    expect(epod.body).toMatchObject({ reason: 'NotFound', message: 'pods "nope" not found' });
  });

  it('creates Jobs with the server-side fields and defaults; 409 on a second create; 422 for invalid specs', async () => {
    const body = job('', { command: ['true'] });
    body.metadata = { generateName: 'gen-', labels: { app: 'kube-api-test' } };
    const dry = await batch.createNamespacedJob({ namespace: NS, body, dryRun: 'All' });
    expect(dry.metadata?.name).toMatch(/^gen-[a-z0-9]{5}$/);
    expect(kube.job(NS, dry.metadata!.name!)).toBeUndefined();

    const created = await batch.createNamespacedJob({ namespace: NS, body });
    const name = created.metadata!.name!;
    expect(name).toMatch(/^gen-[bcdfghjklmnpqrstvwxz2456789]{5}$/);
    expect(created.metadata?.uid).toMatch(/^[0-9a-f-]{36}$/);
    expect(Number(created.metadata?.resourceVersion)).toBeGreaterThan(0);
    expect(created.metadata?.creationTimestamp).toBeInstanceOf(Date);
    expect(created.metadata?.namespace).toBe(NS);
    expect(created.spec).toMatchObject({ backoffLimit: 0, completions: 1, parallelism: 1, completionMode: 'NonIndexed', suspend: false });
    expect(created.spec?.selector?.matchLabels).toEqual({ 'batch.kubernetes.io/controller-uid': created.metadata?.uid });
    expect(created.spec?.template.metadata?.labels).toMatchObject({ role: 'flow', 'job-name': name, 'controller-uid': created.metadata?.uid });
    expect(created.spec?.template.spec?.containers[0]).toMatchObject({ imagePullPolicy: 'IfNotPresent', terminationMessagePath: '/dev/termination-log' });

    const again = job(name, { command: ['true'] });
    const e409 = await apiError(batch.createNamespacedJob({ namespace: NS, body: again }));
    expect(e409.code).toBe(409);
    expect(e409.body).toMatchObject({ reason: 'AlreadyExists', message: `jobs.batch "${name}" already exists`, details: { name, group: 'batch', kind: 'jobs' } });

    const noPolicy = job('bad-one', {});
    delete noPolicy.spec!.template.spec!.restartPolicy;
    noPolicy.spec!.template.spec!.containers[0]!.image = '';
    const e422 = await apiError(batch.createNamespacedJob({ namespace: NS, body: noPolicy }));
    expect(e422.code).toBe(422);
    expect(e422.body.reason).toBe('Invalid');
    expect(e422.body.message).toMatch(/^Job\.batch "bad-one" is invalid: \[/);
    expect(e422.body.details.causes.map((c: { field: string }) => c.field).sort()).toEqual(['spec.template.spec.containers[0].image', 'spec.template.spec.restartPolicy']);
    const always = job('bad-two', {});
    always.spec!.template.spec!.restartPolicy = 'Always';
    expect((await apiError(batch.createNamespacedJob({ namespace: NS, body: always }))).body.message).toContain('Unsupported value: "Always"');
    const overLimit = job('bad-three', { resources: { requests: { cpu: '2' }, limits: { cpu: '500m' } } });
    expect((await apiError(batch.createNamespacedJob({ namespace: NS, body: overLimit }))).body.message).toContain('must be less than or equal to cpu limit');

    await until('the job to complete', () => batch.readNamespacedJobStatus({ name, namespace: NS }), (j) => j.status?.succeeded === 1);
    await batch.deleteNamespacedJob({ name, namespace: NS, propagationPolicy: 'Background' });
  });

  it('runs the pod as a container: env, command, resources and volumes mapped; the Job fails on a non-zero exit; Background delete removes pod and container', async () => {
    const name = 'fails';
    const data = await mkdtemp(join(tmpdir(), 'weft-kube-vol-'));
    await writeFile(join(data, 'marker.txt'), 'x');
    const body = job(name, {
        command: ['sh', '-c'],
        args: ['echo "out $GREETING $MY_POD"; echo err >&2; ls /data; exit 3'],
        env: [
          { name: 'GREETING', value: 'hello' },
          { name: 'MY_POD', valueFrom: { fieldRef: { fieldPath: 'metadata.name' } } },
        ],
        resources: { limits: { memory: '64Mi', cpu: '500m' }, requests: { cpu: '250m', memory: '32Mi' } },
        volumeMounts: [{ name: 'data', mountPath: '/data', readOnly: true }],
    });
    body.spec!.template.spec!.volumes = [{ name: 'data', hostPath: { path: data } }];
    await batch.createNamespacedJob({ namespace: NS, body });
    const j = kube.job(NS, name)!;
    expect(j.spec.template.spec.containers[0].resources.limits).toEqual({ memory: '64Mi', cpu: '500m' });

    const done = await until('the job to fail', () => batch.readNamespacedJob({ name, namespace: NS }), (x) => (x.status?.conditions ?? []).some((c) => c.type === 'Failed'));
    expect(done.status).toMatchObject({ failed: 1, active: 0 });
    expect(done.status?.startTime).toBeInstanceOf(Date);
    expect(done.status?.completionTime).toBeUndefined();
    expect(done.status?.conditions?.find((c) => c.type === 'Failed')).toMatchObject({ status: 'True', reason: 'BackoffLimitExceeded', message: 'Job has reached the specified backoff limit' });

    const [pod, ...more] = await podsOf(name);
    expect(more).toEqual([]);
    expect(pod!.metadata?.ownerReferences?.[0]).toMatchObject({ kind: 'Job', name, controller: true });
    expect(pod!.status?.phase).toBe('Failed');
    const term = pod!.status?.containerStatuses?.[0]?.state?.terminated;
    expect(term).toMatchObject({ exitCode: 3, reason: 'Error' });
    expect(term?.containerID).toMatch(/^docker:\/\/[0-9a-f]{64}$/);
    const log = await core.readNamespacedPodLog({ name: pod!.metadata!.name!, namespace: NS });
    expect(log).toContain(`out hello ${pod!.metadata!.name}`);
    expect(log).toContain('err');
    expect(log).toContain('marker.txt');
    const tail = await core.readNamespacedPodLog({ name: pod!.metadata!.name!, namespace: NS, container: 'main', tailLines: 1 });
    expect(tail.trim().split('\n')).toHaveLength(1);

    const cid = term!.containerID!.slice('docker://'.length);
    const inspect = await dockerd.engine.inspectContainer(cid);
    expect(inspect.HostConfig).toMatchObject({ NetworkMode: 'host', Memory: 64 * 2 ** 20, NanoCpus: 5e8, CpuShares: 256 });
    expect(inspect.Config.Env).toContain('GREETING=hello');
    expect(inspect.HostConfig.Binds).toEqual([`${data}:/data:ro`]);

    const st = await batch.deleteNamespacedJob({ name, namespace: NS, propagationPolicy: 'Background' });
    expect(st).toMatchObject({ kind: 'Status', status: 'Success', details: { name, group: 'batch', kind: 'jobs' } });
    await expect(batch.readNamespacedJob({ name, namespace: NS })).rejects.toMatchObject({ code: 404 });
    await until('the pod to go', () => podsOf(name), (ps) => ps.length === 0);
    await until('the container to be removed', () => dockerd.engine.listContainers({ all: true, labels: { 'io.kubernetes.pod.name': pod!.metadata!.name! } }), (cs) => cs.length === 0);
    await rm(data, { recursive: true, force: true });
  });

  it('completes a Job, reports Running then Succeeded to a watch, and replaces failed pods up to backoffLimit', async () => {
    const events: string[] = [];
    const ctl = await watchStream(`/api/v1/namespaces/${NS}/pods`, { labelSelector: 'job-name in (ok-job)' }, (type, obj) => events.push(`${type}:${obj.status?.phase}`));
    try {
      await batch.createNamespacedJob({ namespace: NS, body: job('ok-job', { command: ['sh', '-c', 'sleep 0.3; echo done'] }) });
      const ok = await until('completion', () => batch.readNamespacedJob({ name: 'ok-job', namespace: NS }), (j) => j.status?.succeeded === 1);
      expect(ok.status?.completionTime).toBeInstanceOf(Date);
      expect(ok.status?.conditions?.find((c) => c.type === 'Complete')?.status).toBe('True');
      await until('the watch to see Succeeded', () => events, (e) => e.includes('MODIFIED:Succeeded'));
      expect(events[0]).toBe('ADDED:Pending');
      expect(events).toContain('MODIFIED:Running');
      await batch.deleteNamespacedJob({ name: 'ok-job', namespace: NS, propagationPolicy: 'Background' });
      await until('the watch to see the pod deleted', () => events, (e) => e.some((x) => x.startsWith('DELETED')));
    } finally {
      ctl.abort();
    }

    await batch.createNamespacedJob({ namespace: NS, body: job('retry-job', { command: ['sh', '-c', 'exit 1'] }, { backoffLimit: 1 }) });
    const failed = await until('two failed pods', () => batch.readNamespacedJob({ name: 'retry-job', namespace: NS }), (j) => (j.status?.conditions ?? []).some((c) => c.type === 'Failed'));
    expect(failed.status?.failed).toBe(2);
    const pods = await podsOf('retry-job');
    expect(pods.map((p) => p.status?.phase)).toEqual(['Failed', 'Failed']);
    // Resume from a resourceVersion: the events after it.
    const w2: string[] = [];
    const rv = (await core.listNamespacedPod({ namespace: NS })).metadata!.resourceVersion!;
    const ctl2 = await watchStream(`/api/v1/namespaces/${NS}/pods`, { resourceVersion: rv, labelSelector: 'job-name=retry-job' }, (type) => w2.push(type));
    try {
      await batch.deleteNamespacedJob({ name: 'retry-job', namespace: NS, propagationPolicy: 'Foreground' });
      await until('the job to go', () => batch.listNamespacedJob({ namespace: NS, fieldSelector: 'metadata.name=retry-job' }), (l) => l.items.length === 0);
      expect(await podsOf('retry-job')).toEqual([]);
      await until('two DELETED events', () => w2, (e) => e.filter((t) => t === 'DELETED').length === 2);
      // Foreground: the Job stays (with its finalizer, deletionTimestamp set) until its pods are gone.
      const jobEvents = kube.events('jobs').filter((e) => e.name === 'retry-job').map((e) => e.type);
      expect(jobEvents.slice(-2)).toEqual(['MODIFIED', 'DELETED']);
      const podDeletes = kube.events('pods').filter((e) => e.name.startsWith('retry-job-') && e.type === 'DELETED');
      expect(Math.max(...podDeletes.map((e) => e.rv))).toBeLessThan(kube.events('jobs').filter((e) => e.name === 'retry-job').at(-1)!.rv);
    } finally {
      ctl2.abort();
    }
  });

  it('reports a container killed for going over its memory limit as OOMKilled', async () => {
    const body = job('oom', { command: ['sh', '-c', 'x=$(head -c 200000000 /dev/zero | tr "\\0" a); echo ${#x}'], resources: { limits: { memory: '16Mi' } } });
    await batch.createNamespacedJob({ namespace: NS, body });
    const [pod] = await until('the pod to fail', () => podsOf('oom'), (ps) => ps[0]?.status?.phase === 'Failed');
    expect(pod!.status?.containerStatuses?.[0]?.state?.terminated).toMatchObject({ exitCode: 137, reason: 'OOMKilled' });
    await batch.deleteNamespacedJob({ name: 'oom', namespace: NS, propagationPolicy: 'Background' });
  });

  it('reports an image that cannot be pulled as ErrImagePull / ImagePullBackOff; the pod stays Pending and the Job active', async () => {
    const name = 'no-image';
    await batch.createNamespacedJob({ namespace: NS, body: job(name, { image: '127.0.0.1:1/weft/none:1', imagePullPolicy: 'IfNotPresent' }) });
    const [pod] = await until('ErrImagePull', () => podsOf(name), (ps) => ps[0]?.status?.containerStatuses?.[0]?.state?.waiting?.reason === 'ErrImagePull');
    const waiting = pod!.status!.containerStatuses![0]!.state!.waiting!;
    expect(waiting.message).toContain('Failed to pull image "127.0.0.1:1/weft/none:1"');
    expect(pod!.status?.phase).toBe('Pending');
    await until('ImagePullBackOff', () => podsOf(name), (ps) => ps[0]?.status?.containerStatuses?.[0]?.state?.waiting?.reason === 'ImagePullBackOff');
    const e = await apiError(core.readNamespacedPodLog({ name: pod!.metadata!.name!, namespace: NS }));
    expect(e.code).toBe(400);
    expect(e.body.message).toBe(`container "main" in pod "${pod!.metadata!.name}" is waiting to start: trying and failing to pull image`);
    expect((await batch.readNamespacedJob({ name, namespace: NS })).status?.active).toBe(1);
    await batch.deleteNamespacedJob({ name, namespace: NS, propagationPolicy: 'Background' });
    await until('the pod to go', () => podsOf(name), (ps) => ps.length === 0);
  });

  it('fails a Job past activeDeadlineSeconds and deletes a finished one after ttlSecondsAfterFinished; Orphan leaves the pods', async () => {
    await batch.createNamespacedJob({ namespace: NS, body: job('slow', { command: ['sleep', '60'] }, { activeDeadlineSeconds: 1 }) });
    const j = await until('DeadlineExceeded', () => batch.readNamespacedJob({ name: 'slow', namespace: NS }), (x) => (x.status?.conditions ?? []).some((c) => c.reason === 'DeadlineExceeded'), 15_000);
    expect(j.status?.active).toBe(0);
    await until('its pod to be deleted', () => podsOf('slow'), (ps) => ps.length === 0);
    await batch.deleteNamespacedJob({ name: 'slow', namespace: NS, propagationPolicy: 'Background' });

    await batch.createNamespacedJob({ namespace: NS, body: job('ttl', { command: ['true'] }, { ttlSecondsAfterFinished: 0 }) });
    await until('the TTL controller to delete it', () => kube.events('jobs').filter((e) => e.name === 'ttl').map((e) => e.type), (t) => t.includes('DELETED'));
    await until('its pods to go', () => podsOf('ttl'), (ps) => ps.length === 0);

    await batch.createNamespacedJob({ namespace: NS, body: job('orphan', { command: ['true'] }) });
    await until('completion', () => batch.readNamespacedJob({ name: 'orphan', namespace: NS }), (x) => x.status?.succeeded === 1);
    await batch.deleteNamespacedJob({ name: 'orphan', namespace: NS }); // the default policy for Jobs: Orphan
    expect(kube.requests.at(-1)?.query.propagationPolicy).toBeUndefined();
    await until('the job to go', () => kube.job(NS, 'orphan'), (x) => x === undefined);
    const left = await podsOf('orphan');
    expect(left).toHaveLength(1);
    expect(left[0]!.metadata?.ownerReferences ?? []).toEqual([]);
    await core.deleteNamespacedPod({ name: left[0]!.metadata!.name!, namespace: NS, gracePeriodSeconds: 0 });
    await until('the orphan pod to go', () => podsOf('orphan'), (ps) => ps.length === 0);
  });
});

describe('request deadline', () => {
  let silent: Server;
  afterAll(() => {
    silent?.closeAllConnections();
    silent?.close();
  });

  it('aborts a request the API server accepts and never answers, after timeoutMs, with a message that says so', async () => {
    // Accepts every request and never answers.
    silent = createServer(() => undefined);
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const url = `http://127.0.0.1:${(silent.address() as AddressInfo).port}`;
    const kc = await kubeConfigFrom({
      clusters: [{ name: 'c', server: url, skipTLSVerify: true }],
      users: [{ name: 'u', token: 't' }],
      contexts: [{ name: 'c', cluster: 'c', user: 'u' }],
      currentContext: 'c',
    });
    const apis = await kubeApis(kc, { timeoutMs: 300 });
    const started = Date.now();
    const err = await apis.batch.listNamespacedJob({ namespace: 'default' }, apis.call).then(
      () => null,
      (e: unknown) => e,
    );
    const took = Date.now() - started;
    expect(err).not.toBeNull();
    expect(kubeErrorText(err, apis.timeoutMs)).toBe('no answer from the Kubernetes API within 300 ms');
    expect(took).toBeGreaterThanOrEqual(250);
    expect(took).toBeLessThan(10_000);
  });
});

describe('selectors and quantities', () => {
  it('parses label selectors', () => {
    const m = parseLabelSelector('a=1,b!=2,c in (x, y),!d,e');
    expect(m({ a: '1', c: 'x', e: '' })).toBe(true);
    expect(m({ a: '1', b: '2', c: 'x', e: '' })).toBe(false);
    expect(m({ a: '1', c: 'z', e: '' })).toBe(false);
    expect(m({ a: '1', c: 'y', d: '', e: '' })).toBe(false);
    expect(m({ a: '1', c: 'y' })).toBe(false);
    expect(parseLabelSelector('k notin (a)')({})).toBe(true);
    expect(parseLabelSelector('')(undefined)).toBe(true);
  });

  it('parses quantities', () => {
    expect(parseQuantity('500m')).toBe(0.5);
    expect(parseQuantity('2')).toBe(2);
    expect(parseQuantity('128Mi')).toBe(128 * 2 ** 20);
    expect(parseQuantity('1G')).toBe(1e9);
    expect(parseQuantity('1e3')).toBe(1000);
    expect(() => parseQuantity('12 apples')).toThrow(/quantities must match/);
  });
});
