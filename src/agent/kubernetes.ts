/**
 * KubernetesAgent: starts each flow run as a Kubernetes Job (Prefect 1's Kubernetes
 * agent), through the Kubernetes API with `@kubernetes/client-node`.
 *
 * The Job (`buildJob`, a pure function of the claimed run and the agent's options):
 * - Starts from the run config's `jobTemplate`, else the agent's, else nothing. In it the
 *   container named `flow` (else the first one, renamed `flow`; else a new one) becomes
 *   the flow-run container: image = KubernetesRun.image, else the DockerStorage image,
 *   else the template container's, else the agent's default; command
 *   `node <weftBin> execute flow-run <id> --server <url>` (args removed); env = the
 *   template's, then the agent's `env`, then the run config's, then the WEFT_* variables;
 *   cpu/memory requests and limits from the run config over the template's.
 * - `serviceAccountName` and `imagePullSecrets` from the run config, else the template's,
 *   else the agent's (`weft agent kubernetes --service-account/--image-pull-secret`); labels
 *   `weft.flow-run-id`, `weft.agent` (the agent's id), `weft.flow` on the Job and on its
 *   pod template; `backoffLimit` 0 unless the template sets one (a second pod would run
 *   the flow again: reruns are the server's business, through lazarus); `restartPolicy`
 *   Never unless set; `ttlSecondsAfterFinished` when the agent has one.
 * - Name `weft-<run id>-<restarts>`: a deploy repeated for the same attempt meets 409
 *   AlreadyExists and adopts the Job instead of starting a second one.
 * - The server's token, when the agent has a `tokenSecret`, comes from that Secret,
 *   mounted read-only and passed with `--token-file`.
 *
 * Watching: one loop for all of the agent's Jobs (not a watch per Job): every
 * `watchIntervalMs` it lists the Jobs and the pods labelled with its id, two calls
 * whatever the number of runs, as Prefect 1's `manage_jobs` does. Per pod it reports into
 * the run's logs, once each: a container that cannot start (ErrImagePull,
 * ImagePullBackOff, InvalidImageName, CreateContainerConfigError, ...), and a container
 * that ended with a non-zero code (with its reason, e.g. OOMKilled, and the tail of the
 * pod's log). Decisions:
 * - A container that has been unable to start for `startTimeoutMs` (default 30 s: a
 *   registry hiccup heals, a missing image does not): the run fails with the cause (if
 *   it is still Submitted or Running) and the Job is deleted.
 * - A Job Failed (its pod failed past backoffLimit, or its deadline passed) while its run
 *   is still open: the run fails with the pod's exit code, reason and last log lines
 *   (Cancelling runs become Cancelled). A Job Complete needs nothing: its process ended
 *   its run itself.
 * - A finished Job is deleted (`propagationPolicy: Background`, so its pods go too)
 *   unless `deleteFinishedJobs` is false (then `ttlSecondsAfterFinished` can clean up).
 * - A run cancelled while its pod is still Pending: the Job is deleted, the run Cancelled.
 * - Jobs labelled with this agent's id that it does not track (an agent restarted with
 *   the same name) are adopted by the first pass of the loop.
 * `stop()` leaves the Jobs running (their processes report to the server on their own);
 * `stop({ stopRuns: true })` deletes them.
 *
 * Client: `@kubernetes/client-node`, as its users use it: a `KubeConfig` (any kubeconfig,
 * in-cluster service accounts, exec and OIDC auth) and `kc.makeApiClient(BatchV1Api)` /
 * `kc.makeApiClient(CoreV1Api)`, called with the object-parameter methods. The client's
 * fetch has no deadline of its own, so each call carries a per-call middleware that gives
 * the request an `AbortSignal.timeout` (`requestTimeoutMs`, default 30 s): an API server
 * that accepts the connection and never answers cannot hold up the watch loop.
 *
 * Tested against a double of the batch/v1 and core/v1 API that runs each Job's pod as a
 * real container through dockerd (test/helpers/kube-api.ts), with this same client; no
 * real cluster is involved in weft's tests.
 */
import { fileURLToPath } from 'node:url';
import type { BatchV1Api, ConfigurationOptions, CoreV1Api, KubeConfig, ObservableMiddleware, V1Container, V1EnvVar, V1Job, V1Pod } from '@kubernetes/client-node';
import { FINAL_FLOW_RUN_STATES, type ClaimedRun, type FlowRun } from '../server/model.ts';
import { Agent, describe, type AgentOptions, type AgentStopOptions } from './agent.ts';

type KubeClient = typeof import('@kubernetes/client-node');

/** The weft command inside the flow-run image (default: this installation's path, as DockerStorage links bundles to it). */
export const DEFAULT_WEFT_BIN = fileURLToPath(new URL('../../bin/weft.js', import.meta.url));
/** Where a `tokenSecret` is mounted in the flow-run container. */
export const TOKEN_MOUNT_DIR = '/var/run/secrets/weft';

/** Waiting reasons of a container that will not start by itself soon. */
const START_FAILURES = new Set([
  'ErrImagePull',
  'ImagePullBackOff',
  'InvalidImageName',
  'ErrImageNeverPull',
  'CreateContainerConfigError',
  'CreateContainerError',
  'RunContainerError',
]);
const LOG_TAIL_LINES = 20;

let client: Promise<KubeClient> | null = null;

/** `@kubernetes/client-node`, loaded once, on first use (the CLI's other commands do not pay for it). */
export function loadKubeClient(): Promise<KubeClient> {
  client ??= import('@kubernetes/client-node');
  return client;
}

/** `KubeConfig.loadFromOptions` input: clusters, users, contexts, currentContext. */
export interface KubeConfigOptions {
  readonly clusters: readonly Record<string, unknown>[];
  readonly users: readonly Record<string, unknown>[];
  readonly contexts: readonly Record<string, unknown>[];
  readonly currentContext: string;
}

/**
 * A KubeConfig from a loaded one, from options, from a kubeconfig file, or (undefined)
 * the default (client-node's `loadFromDefault`): $KUBECONFIG, else ~/.kube/config, else the in-cluster service account.
 */
export async function kubeConfigFrom(from?: KubeConfig | KubeConfigOptions | string): Promise<KubeConfig> {
  const k = await loadKubeClient();
  if (from instanceof k.KubeConfig) return from;
  const kc = new k.KubeConfig();
  if (from === undefined) kc.loadFromDefault();
  else if (typeof from === 'string') kc.loadFromFile(from);
  else if (typeof (from as unknown as KubeConfig).getCurrentCluster === 'function') return from as unknown as KubeConfig;
  else kc.loadFromOptions(from as never);
  if (kc.getCurrentCluster() === null) throw new Error('the kubeconfig names no current cluster');
  return kc;
}

export interface KubeApis {
  readonly batch: BatchV1Api;
  readonly core: CoreV1Api;
  readonly kc: KubeConfig;
  /** The second argument of every call: its request timeout (see the module comment). */
  readonly call: ConfigurationOptions;
  readonly timeoutMs: number;
}

/** Default deadline of one Kubernetes API request. */
export const DEFAULT_REQUEST_TIMEOUT_MS = 30_000;

/** client-node's typed APIs for `kc`, and the per-call options that bound each request by `timeoutMs`. */
export async function kubeApis(kc: KubeConfig, opts: { timeoutMs?: number } = {}): Promise<KubeApis> {
  const k = await loadKubeClient();
  if (kc.getCurrentCluster() === null) throw new Error('the kubeconfig names no current cluster');
  const timeoutMs = opts.timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
  // A fresh signal per request: the middleware runs after the client applied the kubeconfig's auth.
  const deadline: ObservableMiddleware = {
    pre: (ctx) => {
      ctx.setSignal(AbortSignal.timeout(timeoutMs));
      return new k.Observable(Promise.resolve(ctx));
    },
    post: (res) => new k.Observable(Promise.resolve(res)),
  };
  return {
    batch: kc.makeApiClient(k.BatchV1Api),
    core: kc.makeApiClient(k.CoreV1Api),
    kc,
    call: { middleware: [deadline], middlewareMergeStrategy: 'append' },
    timeoutMs,
  };
}

/** The status, reason and message of a client-node ApiException (the API's `Status` body), as one line. */
export function kubeErrorText(err: unknown, timeoutMs?: number): string {
  const e = err as { code?: unknown; body?: unknown; name?: unknown };
  // node-fetch's AbortError: the per-call deadline of `kubeApis` passed.
  if (e?.name === 'AbortError') return `no answer from the Kubernetes API${timeoutMs !== undefined ? ` within ${timeoutMs} ms` : ' in time'}`;
  if (typeof e?.code !== 'number') return describe(err);
  let status: { reason?: string; message?: string } = {};
  try {
    status = typeof e.body === 'string' ? (JSON.parse(e.body) as typeof status) : ((e.body ?? {}) as typeof status);
  } catch {
    status = { message: String(e.body) };
  }
  return `${e.code}${status.reason !== undefined ? ` ${status.reason}` : ''}: ${status.message ?? 'no message'}`;
}

const kubeCode = (err: unknown): number | undefined => {
  const c = (err as { code?: unknown })?.code;
  return typeof c === 'number' ? c : undefined;
};

export interface KubernetesAgentOptions extends AgentOptions {
  /** The server's base URL as the flow-run pods reach it. */
  readonly serverUrl: string;
  /** A KubeConfig, `loadFromOptions` input, or a kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else in-cluster). */
  readonly kubeConfig?: KubeConfig | KubeConfigOptions | string;
  /** Namespace of the Jobs (default: the kubeconfig context's, else `default`). */
  readonly namespace?: string;
  /** Image of runs that name none (neither run config, storage nor job template). */
  readonly image?: string;
  /** Job template of runs whose run config has none. */
  readonly jobTemplate?: Readonly<Record<string, unknown>>;
  /** Service account of the pods whose run config and template name none. */
  readonly serviceAccountName?: string;
  /** Image pull Secrets of the pods whose run config and template name none. */
  readonly imagePullSecrets?: readonly string[];
  /** Environment variables of every run (a run config's `env` overrides them). */
  readonly env?: Readonly<Record<string, string>>;
  /** Path of weft's bin/weft.js inside the image (default: this installation's path). */
  readonly weftBin?: string;
  /** imagePullPolicy of the flow container (default: the template's, else the API's default). */
  readonly imagePullPolicy?: 'Always' | 'IfNotPresent' | 'Never';
  /** A Secret holding the server's API token (`key` default `token`): mounted and passed with `--token-file`. */
  readonly tokenSecret?: { readonly name: string; readonly key?: string };
  /** Set on every Job (the cluster's TTL controller deletes it that long after it finished). */
  readonly ttlSecondsAfterFinished?: number;
  /** Delete a Job once it finished and its outcome was handled (default true). */
  readonly deleteFinishedJobs?: boolean;
  /** Between two passes over the agent's Jobs and pods (default 2,000 ms). */
  readonly watchIntervalMs?: number;
  /** How long a flow container may be unable to start (image pull, config) before its run fails (default 30,000 ms). */
  readonly startTimeoutMs?: number;
  /** Deadline of each Kubernetes API request (default 30,000 ms). */
  readonly requestTimeoutMs?: number;
}

/** What the agent builds a Job from, besides the claimed run (for `buildJob`). */
export interface JobInputs {
  readonly serverUrl: string;
  readonly agentId: string;
  readonly namespace: string;
  readonly image?: string;
  readonly jobTemplate?: Readonly<Record<string, unknown>>;
  readonly serviceAccountName?: string;
  readonly imagePullSecrets?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  readonly weftBin?: string;
  readonly imagePullPolicy?: string;
  readonly tokenSecret?: { readonly name: string; readonly key?: string };
  readonly ttlSecondsAfterFinished?: number;
}

/** A label value Kubernetes accepts: at most 63 of [A-Za-z0-9._-], alphanumeric at both ends. */
export function labelValue(s: string): string {
  const v = s
    .replace(/[^A-Za-z0-9._-]+/g, '-')
    .slice(0, 63)
    .replace(/^[^A-Za-z0-9]+|[^A-Za-z0-9]+$/g, '');
  return v;
}

/** The Job name of a run's attempt (`restarts` counts lazarus's reruns). */
export function jobName(run: FlowRun): string {
  return `weft-${run.id}-${run.restarts}`.toLowerCase();
}

/** The batch/v1 Job that runs `claimed` (see the module comment for each field's source). */
export function buildJob(claimed: ClaimedRun, o: JobInputs): V1Job {
  const { run, version } = claimed;
  const rc = version.runConfig;
  const k = rc.kind === 'kubernetes' ? rc : undefined;
  const job = structuredClone((k?.jobTemplate ?? o.jobTemplate ?? {}) as Record<string, any>) as V1Job & Record<string, any>;
  job.apiVersion = 'batch/v1';
  job.kind = 'Job';
  const labels = {
    'weft.flow-run-id': run.id,
    'weft.agent': labelValue(o.agentId),
    'weft.flow': labelValue(run.flowName),
    'app.kubernetes.io/managed-by': 'weft',
  };
  job.metadata = { ...job.metadata, name: jobName(run), namespace: o.namespace, labels: { ...job.metadata?.labels, ...labels } };
  delete job.metadata.generateName;
  const spec = (job.spec ??= {} as NonNullable<V1Job['spec']>);
  spec.backoffLimit ??= 0;
  if (o.ttlSecondsAfterFinished !== undefined) spec.ttlSecondsAfterFinished ??= o.ttlSecondsAfterFinished;
  const template = (spec.template ??= {});
  template.metadata = { ...template.metadata, labels: { ...template.metadata?.labels, ...labels } };
  const pod = (template.spec ??= { containers: [] });
  pod.restartPolicy ??= 'Never';
  pod.containers ??= [];
  let c: V1Container | undefined = pod.containers.find((x) => x.name === 'flow') ?? pod.containers[0];
  if (c === undefined) {
    c = { name: 'flow' };
    pod.containers.push(c);
  }
  c.name = 'flow';

  const image = k?.image ?? (version.storage.kind === 'docker' ? version.storage.image : undefined) ?? c.image ?? o.image;
  if (image === undefined || image === '') {
    throw new Error('no image for the flow-run container: give the KubernetesRun an image, use DockerStorage, or start the agent with a default image');
  }
  c.image = image;
  if (o.imagePullPolicy !== undefined) c.imagePullPolicy = o.imagePullPolicy;
  const command = ['node', o.weftBin ?? DEFAULT_WEFT_BIN, 'execute', 'flow-run', run.id, '--server', o.serverUrl];
  if (o.tokenSecret !== undefined) {
    command.push('--token-file', `${TOKEN_MOUNT_DIR}/token`);
    pod.volumes = [...(pod.volumes ?? []), { name: 'weft-token', secret: { secretName: o.tokenSecret.name, items: [{ key: o.tokenSecret.key ?? 'token', path: 'token' }] } }];
    c.volumeMounts = [...(c.volumeMounts ?? []), { name: 'weft-token', mountPath: TOKEN_MOUNT_DIR, readOnly: true }];
  }
  c.command = command;
  delete c.args;

  const env = new Map<string, V1EnvVar>();
  for (const e of c.env ?? []) env.set(e.name, e);
  const put = (vars: Readonly<Record<string, string>> | undefined): void => {
    for (const [name, value] of Object.entries(vars ?? {})) env.set(name, { name, value });
  };
  put(o.env);
  put(rc.env);
  put({ WEFT_SERVER: o.serverUrl, WEFT_FLOW_RUN_ID: run.id, WEFT_AGENT_ID: o.agentId });
  c.env = [...env.values()];

  if (k !== undefined) {
    const req: Record<string, string> = { ...(c.resources?.requests as Record<string, string> | undefined) };
    const lim: Record<string, string> = { ...(c.resources?.limits as Record<string, string> | undefined) };
    if (k.cpuRequest !== undefined) req.cpu = k.cpuRequest;
    if (k.memoryRequest !== undefined) req.memory = k.memoryRequest;
    if (k.cpuLimit !== undefined) lim.cpu = k.cpuLimit;
    if (k.memoryLimit !== undefined) lim.memory = k.memoryLimit;
    c.resources = { ...c.resources, ...(Object.keys(req).length > 0 ? { requests: req } : {}), ...(Object.keys(lim).length > 0 ? { limits: lim } : {}) };
    if (k.serviceAccountName !== undefined) pod.serviceAccountName = k.serviceAccountName;
    if (k.imagePullSecrets !== undefined) pod.imagePullSecrets = k.imagePullSecrets.map((name) => ({ name }));
  }
  if (pod.serviceAccountName === undefined && o.serviceAccountName !== undefined) pod.serviceAccountName = o.serviceAccountName;
  if (pod.imagePullSecrets === undefined && o.imagePullSecrets !== undefined && o.imagePullSecrets.length > 0) pod.imagePullSecrets = o.imagePullSecrets.map((name) => ({ name }));
  return job;
}

/** A Job the agent started (or adopted) and watches until it finished. */
interface Tracked {
  readonly runId: string;
  readonly name: string;
  /** Pod events already written to the run's logs (`<pod>:<what>`). */
  readonly reported: Set<string>;
  /** Since when each pod's container has been unable to start (ms). */
  readonly stuckSince: Map<string, number>;
  /** The last line that explains a failure (for the run's message). */
  cause: string | null;
  /** The last pod log tail read (for the failure's details). */
  tail: string | null;
}

export class KubernetesAgent extends Agent {
  readonly kind = 'kubernetes' as const;
  private readonly k8s: KubernetesAgentOptions;
  private apis: KubeApis | null = null;
  private namespace = 'default';
  /** Watched Jobs by name. */
  private readonly tracked = new Map<string, Tracked>();
  private timer: NodeJS.Timeout | null = null;
  /** The pass in flight; `stop()` waits for it. */
  private pass: Promise<void> | null = null;
  private adopted = false;
  private passErrorShown = false;

  constructor(opts: KubernetesAgentOptions) {
    super(opts);
    this.k8s = opts;
  }

  /** Names of the Jobs being watched. */
  get jobs(): readonly string[] {
    return [...this.tracked.keys()];
  }

  /** The namespace the Jobs go to (known after `start()`). */
  get jobNamespace(): string {
    return this.namespace;
  }

  override async start(): Promise<void> {
    let kc: KubeConfig;
    try {
      kc = await kubeConfigFrom(this.k8s.kubeConfig);
    } catch (err) {
      const from = typeof this.k8s.kubeConfig === 'string' ? this.k8s.kubeConfig : this.k8s.kubeConfig === undefined ? '$KUBECONFIG, ~/.kube/config or in-cluster' : 'the given options';
      throw new Error(`cannot load the kubeconfig (${from}): ${describe(err)}`, { cause: err });
    }
    this.apis = await kubeApis(kc, this.k8s.requestTimeoutMs !== undefined ? { timeoutMs: this.k8s.requestTimeoutMs } : {});
    const ctx = kc.getContextObject(kc.getCurrentContext());
    this.namespace = this.k8s.namespace ?? ctx?.namespace ?? 'default';
    await super.start();
    this.arm(0);
  }

  protected override activeRuns(): number {
    return super.activeRuns() + this.tracked.size;
  }

  protected override async deploy(claimed: ClaimedRun): Promise<void> {
    const apis = this.apis!;
    const o = this.k8s;
    const body = buildJob(claimed, {
      serverUrl: o.serverUrl,
      agentId: this.id ?? this.name,
      namespace: this.namespace,
      ...(o.image !== undefined ? { image: o.image } : {}),
      ...(o.jobTemplate !== undefined ? { jobTemplate: o.jobTemplate } : {}),
      ...(o.serviceAccountName !== undefined ? { serviceAccountName: o.serviceAccountName } : {}),
      ...(o.imagePullSecrets !== undefined ? { imagePullSecrets: o.imagePullSecrets } : {}),
      ...(o.env !== undefined ? { env: o.env } : {}),
      ...(o.weftBin !== undefined ? { weftBin: o.weftBin } : {}),
      ...(o.imagePullPolicy !== undefined ? { imagePullPolicy: o.imagePullPolicy } : {}),
      ...(o.tokenSecret !== undefined ? { tokenSecret: o.tokenSecret } : {}),
      ...(o.ttlSecondsAfterFinished !== undefined ? { ttlSecondsAfterFinished: o.ttlSecondsAfterFinished } : {}),
    });
    const name = body.metadata!.name!;
    try {
      await apis.batch.createNamespacedJob({ namespace: this.namespace, body }, apis.call);
    } catch (err) {
      if (kubeCode(err) !== 409) throw new Error(`the Kubernetes API refused Job ${name} in namespace ${this.namespace}: ${kubeErrorText(err, apis.timeoutMs)}`);
      // Created by an earlier deploy of this same attempt: watch that one.
      this.say(`Job ${name} exists already; watching it`);
    }
    this.watchJob(claimed.run.id, name);
    this.logs.push({ flowRunId: claimed.run.id, level: 'info', source: 'agent', at: Date.now(), message: `created Job ${name} in namespace ${this.namespace} (image ${body.spec!.template.spec!.containers[0]!.image})` });
    this.arm(0);
  }

  protected override async onStop(opts: AgentStopOptions): Promise<void> {
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    if (this.pass !== null) await this.pass;
    if (opts.stopRuns === true) {
      await Promise.all([...this.tracked.values()].map((t) => this.deleteJob(t)));
    } else if (this.tracked.size > 0) {
      this.say(`left ${this.tracked.size} Job(s) running: ${[...this.tracked.keys()].join(', ')}`);
    }
    this.tracked.clear();
  }

  private watchJob(runId: string, name: string): void {
    if (!this.tracked.has(name)) this.tracked.set(name, { runId, name, reported: new Set(), stuckSince: new Map(), cause: null, tail: null });
  }

  /** The next pass in `ms` (sooner replaces later). */
  private arm(ms: number): void {
    if (this.isStopping || this.apis === null) return;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.pass !== null) return this.arm(50);
      this.pass = this.runPass().finally(() => {
        this.pass = null;
        if (this.tracked.size > 0 || !this.adopted) this.arm(this.k8s.watchIntervalMs ?? 2_000);
      });
    }, ms);
  }

  /** One look at every Job and pod of this agent. */
  private async runPass(): Promise<void> {
    const apis = this.apis!;
    const selector = `weft.agent=${labelValue(this.id ?? this.name)}`;
    let jobs: V1Job[];
    let pods: V1Pod[];
    try {
      [jobs, pods] = await Promise.all([
        apis.batch.listNamespacedJob({ namespace: this.namespace, labelSelector: selector }, apis.call).then((l) => l.items),
        apis.core.listNamespacedPod({ namespace: this.namespace, labelSelector: selector }, apis.call).then((l) => l.items),
      ]);
      if (this.passErrorShown) this.say('the Kubernetes API answers again');
      this.passErrorShown = false;
    } catch (err) {
      if (!this.passErrorShown) this.say(`cannot list the agent's Jobs (retrying): ${kubeErrorText(err, apis.timeoutMs)}`);
      this.passErrorShown = true;
      return;
    }
    if (!this.adopted) {
      this.adopted = true;
      for (const j of jobs) {
        const runId = j.metadata?.labels?.['weft.flow-run-id'];
        const name = j.metadata?.name;
        if (runId !== undefined && name !== undefined && !this.tracked.has(name)) {
          this.say(`adopting Job ${name} of run ${runId}`);
          this.watchJob(runId, name);
        }
      }
    }
    const byName = new Map(jobs.map((j) => [j.metadata?.name ?? '', j]));
    await Promise.all(
      [...this.tracked.values()].map((t) =>
        this.check(t, byName.get(t.name), pods.filter((p) => p.metadata?.labels?.['job-name'] === t.name)).catch((err: unknown) =>
          this.say(`watching Job ${t.name}: ${describe(err)}`),
        ),
      ),
    );
  }

  private async check(t: Tracked, job: V1Job | undefined, pods: V1Pod[]): Promise<void> {
    if (job === undefined) {
      this.tracked.delete(t.name);
      await this.settle(t, `its Job ${t.name} was deleted before the run finished`);
      return;
    }
    const now = Date.now();
    let fatal: string | null = null;
    let started = false;
    for (const pod of pods) {
      const podName = pod.metadata?.name ?? '?';
      const cs = pod.status?.containerStatuses?.find((s) => s.name === 'flow') ?? pod.status?.containerStatuses?.[0];
      const waiting = cs?.state?.waiting;
      const term = cs?.state?.terminated;
      if (cs?.state?.running !== undefined || term !== undefined) started = true;
      if (waiting?.reason !== undefined && START_FAILURES.has(waiting.reason)) {
        const line = `pod ${podName}: container ${cs!.name} cannot start: ${waiting.reason}${waiting.message !== undefined ? ` (${waiting.message})` : ''}`;
        this.report(t, `${podName}:${waiting.reason}`, 'warn', line);
        t.cause = line;
        const since = t.stuckSince.get(podName) ?? now;
        t.stuckSince.set(podName, since);
        if (now - since >= (this.k8s.startTimeoutMs ?? 30_000)) fatal = line;
      } else {
        t.stuckSince.delete(podName);
      }
      if (term !== undefined && !t.reported.has(`${podName}:terminated`)) {
        const how = `pod ${podName}: container ${cs!.name} exited with code ${term.exitCode}${term.reason !== undefined ? ` (${term.reason})` : ''}${term.message !== undefined ? `: ${term.message}` : ''}`;
        if (term.exitCode !== 0) {
          t.cause = how;
          t.tail = await this.podTail(podName);
        }
        this.report(t, `${podName}:terminated`, term.exitCode === 0 ? 'info' : 'error', t.tail !== null && term.exitCode !== 0 ? `${how}; its last output:\n${t.tail}` : how);
      }
      if (pod.status?.phase === 'Failed' && term === undefined && pod.status.reason !== undefined) {
        const line = `pod ${podName} failed: ${pod.status.reason}${pod.status.message !== undefined ? ` (${pod.status.message})` : ''}`;
        t.cause = line;
        this.report(t, `${podName}:failed`, 'error', line);
      }
    }

    const conditions = job.status?.conditions ?? [];
    const failed = conditions.find((c) => c.type === 'Failed' && c.status === 'True');
    const complete = conditions.some((c) => c.type === 'Complete' && c.status === 'True');
    if (fatal !== null) {
      this.tracked.delete(t.name);
      await this.settle(t, fatal);
      await this.deleteJob(t);
    } else if (failed !== undefined) {
      this.tracked.delete(t.name);
      const why = `Job ${t.name} failed (${failed.reason ?? 'no reason'}${failed.message !== undefined ? `: ${failed.message}` : ''})`;
      await this.settle(t, t.cause !== null ? `${why}; ${t.cause}` : why);
      if (this.k8s.deleteFinishedJobs !== false) await this.deleteJob(t);
    } else if (complete) {
      this.tracked.delete(t.name);
      if (this.k8s.deleteFinishedJobs !== false) await this.deleteJob(t);
    } else if (!started) {
      // Not started yet: a run cancelled meanwhile has no process to notice it.
      const run = await this.backend.getFlowRun(t.runId);
      if (run.state === 'Cancelling' || FINAL_FLOW_RUN_STATES.includes(run.state)) {
        this.tracked.delete(t.name);
        this.report(t, 'cancelled', 'info', `run is ${run.state} before its pod started: deleting Job ${t.name}`);
        if (run.state === 'Cancelling') await this.setCancelled(run, 'cancelled before its pod started');
        await this.deleteJob(t);
      }
    }
    if (!this.tracked.has(t.name)) this.wake();
  }

  /** Write one line to the run's logs, once per key. */
  private report(t: Tracked, key: string, level: 'info' | 'warn' | 'error', message: string): void {
    if (t.reported.has(key)) return;
    t.reported.add(key);
    this.logs.push({ flowRunId: t.runId, level, source: 'agent', at: Date.now(), message });
  }

  private async podTail(pod: string): Promise<string | null> {
    const apis = this.apis!;
    try {
      const text = await apis.core.readNamespacedPodLog({ name: pod, namespace: this.namespace, container: 'flow', tailLines: LOG_TAIL_LINES }, apis.call);
      const t = text.trimEnd();
      return t === '' ? null : t;
    } catch (err) {
      return `(its log cannot be read: ${kubeErrorText(err, apis.timeoutMs)})`;
    }
  }

  /** The Job is done with: fail its run if the run is still open (Cancelling → Cancelled). */
  private async settle(t: Tracked, message: string): Promise<void> {
    await this.logs.flush();
    let run: FlowRun;
    try {
      run = await this.backend.getFlowRun(t.runId);
    } catch (err) {
      this.say(`run ${t.runId}: ${message}; cannot read the run: ${describe(err)}`);
      return;
    }
    if (run.state === 'Cancelling') return this.setCancelled(run, `cancelled (${message})`);
    if (run.state !== 'Submitted' && run.state !== 'Running') return;
    await this.failRun(run, message, t.tail !== null ? `its last output:\n${t.tail}` : undefined);
  }

  private async setCancelled(run: FlowRun, message: string): Promise<void> {
    try {
      await this.backend.setFlowRunState(run.id, 'Cancelled', { message, expectVersion: run.stateVersion });
    } catch (err) {
      this.say(`cannot mark run ${run.id} Cancelled: ${describe(err)}`);
    }
  }

  private async deleteJob(t: Tracked): Promise<void> {
    const apis = this.apis!;
    try {
      await apis.batch.deleteNamespacedJob({ name: t.name, namespace: this.namespace, propagationPolicy: 'Background' }, apis.call);
      this.say(`deleted Job ${t.name}`);
    } catch (err) {
      if (kubeCode(err) !== 404) this.say(`cannot delete Job ${t.name}: ${kubeErrorText(err, apis.timeoutMs)}`);
    }
  }
}
