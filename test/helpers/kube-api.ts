/**
 * A double of the Kubernetes API server's batch/v1 Jobs and core/v1 Pods, for tests.
 *
 * No kube-apiserver can run on the machines weft is tested on, so the Kubernetes agent is
 * tested against this: an HTTP server on 127.0.0.1 that speaks the REST shapes the real
 * `@kubernetes/client-node` client sends and reads, with a small job controller and a
 * small kubelet behind it. Each Job's pod runs as a real container through a
 * `PodRuntime` (the local dockerd in the tests, see `dockerPodRuntime`), and the pod's
 * and the Job's status follow that container.
 *
 * Faithful (same paths, fields, codes and messages as the real server):
 * - Auth: every request needs `Authorization: Bearer <token>`, else 401 `Status`;
 *   `kubeConfigOptions()` gives a kubeconfig (cluster, token user, context) for it.
 * - Jobs: POST (201; `generateName`, uid, resourceVersion, generation, creationTimestamp;
 *   `dryRun=All`; 409 AlreadyExists; 422 Invalid for a missing name, bad names, no
 *   containers, a container without name or image, restartPolicy other than Never or
 *   OnFailure, negative backoffLimit, bad resource quantities, requests over limits;
 *   400 for a namespace that differs from the path's), GET, LIST (across namespaces
 *   too; labelSelector with =, ==, !=, in, notin, exists, !exists; fieldSelector on
 *   metadata.name/namespace; limit and continue), GET `/status`, DELETE with
 *   `propagationPolicy` Orphan (the default for Jobs), Background or Foreground, as a
 *   query parameter or in the DeleteOptions body (Background answers a `Status`;
 *   Orphan and Foreground answer the object with its deletionTimestamp and finalizer).
 *   404 NotFound `Status` for unknown jobs, pods and namespaces.
 * - Defaults on create: backoffLimit 6, completions and parallelism 1, completionMode,
 *   suspend, selector on `batch.kubernetes.io/controller-uid`, the pod template's labels
 *   (`controller-uid`, `job-name` and their `batch.kubernetes.io/` forms), restartPolicy,
 *   terminationGracePeriodSeconds, dnsPolicy, the containers' imagePullPolicy (Always
 *   for `:latest` or no tag, else IfNotPresent) and terminationMessagePath.
 * - The job controller: one pod at a time (`<job>-<5 chars>`, owned by the Job, with the
 *   template's labels and the controller's); status `active`/`ready`/`succeeded`/
 *   `failed`, `startTime`, `completionTime`; conditions `Complete`, or `Failed` with
 *   reason BackoffLimitExceeded (after `backoffLimit + 1` failed pods, each failure
 *   replaced by a new pod) or DeadlineExceeded (`activeDeadlineSeconds`);
 *   `ttlSecondsAfterFinished` deletes a finished Job (Background); `suspend` creates no pod.
 * - The kubelet: pull per imagePullPolicy (a failed pull sets `waiting.reason`
 *   ErrImagePull, then ImagePullBackOff, and is retried with backoff while the pod lives;
 *   such a pod stays Pending and the Job stays active, as in a real cluster; Never with
 *   no local image is ErrImageNeverPull), then the container from the first container of
 *   the pod spec: command → Entrypoint, args → Cmd, env (values, and `fieldRef` to the
 *   pod's name, namespace, uid, node and IP), workingDir, hostPath and emptyDir volumes
 *   as binds, `limits.memory` → Memory, `limits.cpu` → NanoCpus, `requests.cpu` →
 *   CpuShares (the kubelet's mapping). Pod phases Pending → Running → Succeeded or
 *   Failed; containerStatuses with `waiting` (ContainerCreating, ErrImagePull,
 *   ImagePullBackOff, CreateContainerConfigError, CreateContainerError), `running`,
 *   `terminated` (exitCode, reason Completed, Error, OOMKilled or StartError with exit
 *   128, startedAt, finishedAt, containerID `docker://…`).
 * - Pods: GET, LIST (as for jobs, fieldSelector also on status.phase and spec.nodeName),
 *   DELETE (graceful: deletionTimestamp, then the container is stopped and removed and
 *   the pod goes), GET `/log` (container, tailLines, timestamps, limitBytes; a container
 *   not yet started answers 400 `container "x" in pod "y" is waiting to start: …`).
 * - Watches: `?watch=true` on the list paths streams newline-delimited
 *   `{"type":"ADDED|MODIFIED|DELETED|ERROR","object":…}` (what `Watch` in client-node
 *   reads): from "now" with the current objects as ADDED when no resourceVersion is
 *   given, else the events after that resourceVersion (410 Expired when it is older than
 *   the history kept); label and field selectors apply, an object that stops matching
 *   arrives as DELETED; `timeoutSeconds` ends the stream.
 *
 * Simplified (said here so that no test relies on more):
 * - Only batch/v1 Jobs and core/v1 Pods exist, no discovery documents, no PATCH/PUT,
 *   no Secrets, ConfigMaps, ServiceAccounts or Events: `serviceAccountName` and
 *   `imagePullSecrets` are stored and shown, not checked; `secretKeyRef`,
 *   `configMapKeyRef`, `envFrom` and volumes other than hostPath and emptyDir end in
 *   CreateContainerConfigError. Namespaces are a fixed set (option `namespaces`).
 * - One node: every pod is scheduled at once onto `nodeName` and runs with the host's
 *   network (dockerd runs with `--bridge=none` here), so its IP is 127.0.0.1.
 * - `completions` other than 1 is refused (422): one pod per Job at a time.
 * - Only the first container of a pod runs; init containers and other containers are
 *   stored, not run. `restartPolicy: OnFailure` is run as Never (a failed container
 *   fails its pod and the controller's backoffLimit decides), requests other than cpu
 *   do nothing, there is no scheduler, quota or admission.
 * - Backoffs are short (options): a real cluster waits 10 s doubling between failed pods
 *   and between image pulls. Graceful termination waits at most `maxGraceSeconds`.
 * - Log `follow` answers what is there now and ends; `previous` is not kept.
 */
import { randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { isNotFound, type DockerEngine } from '../../src/docker/engine.ts';

// ---------------------------------------------------------------------------------------
// The container runtime behind the kubelet

/** What the kubelet asks of a container runtime (the local dockerd in the tests). */
export interface PodRuntime {
  hasImage(image: string): Promise<boolean>;
  /** Throws with the runtime's message when the pull fails. */
  pullImage(image: string): Promise<void>;
  /** Create (not start) a container; answers its id. */
  createContainer(spec: PodContainerSpec): Promise<string>;
  startContainer(id: string): Promise<void>;
  /** Resolves when the container has exited. */
  waitContainer(id: string): Promise<{ exitCode: number; oomKilled: boolean }>;
  /** stdout and stderr, interleaved as written. */
  containerLogs(id: string, opts: { tail?: number; timestamps?: boolean }): Promise<string>;
  /** SIGTERM, then SIGKILL after `graceSeconds`; no error when it is not running. */
  stopContainer(id: string, graceSeconds: number): Promise<void>;
  /** Remove it (forced); no error when it is gone already. */
  removeContainer(id: string): Promise<void>;
}

export interface PodContainerSpec {
  readonly name: string;
  readonly image: string;
  /** Replaces the image's entrypoint (k8s `command`). */
  readonly entrypoint?: readonly string[];
  /** Replaces the image's command (k8s `args`); `[]` when `command` was given alone. */
  readonly cmd?: readonly string[];
  readonly env: readonly string[];
  readonly workingDir?: string;
  readonly binds: readonly string[];
  readonly memory?: number;
  readonly nanoCpus?: number;
  readonly cpuShares?: number;
  readonly labels: Readonly<Record<string, string>>;
}

// ---------------------------------------------------------------------------------------
// Objects as stored (plain JSON, as the API server keeps them)

type Obj = Record<string, any>;
type Kind = 'jobs' | 'pods';

interface StoredPod {
  obj: Obj;
  containerId: string | null;
  /** emptyDir volumes made for it (removed with it). */
  scratch: string[];
  /** Set once deletion began: the kubelet stops working on it. */
  deleting: boolean;
  /** The kubelet's pull retry wait: its timer and how to end it early (deletion). */
  timer: NodeJS.Timeout | null;
  wake: (() => void) | null;
}

interface StoredJob {
  obj: Obj;
  /** The controller's timers: activeDeadlineSeconds, ttlSecondsAfterFinished, the next pod after a failure. */
  deadlineTimer: NodeJS.Timeout | null;
  ttlTimer: NodeJS.Timeout | null;
  replaceTimer: NodeJS.Timeout | null;
}

interface WatchEvent {
  readonly rv: number;
  readonly kind: Kind;
  readonly ns: string;
  readonly type: 'ADDED' | 'MODIFIED' | 'DELETED';
  readonly object: Obj;
  /** The object before a MODIFIED (decides ADDED/DELETED for selective watches). */
  readonly prev: Obj | null;
}

interface Watcher {
  readonly kind: Kind;
  readonly ns: string | null;
  readonly match: (o: Obj) => boolean;
  readonly res: ServerResponse;
}

/** One request as the double received it (for tests that check what a client sent). */
export interface RecordedRequest {
  readonly method: string;
  readonly path: string;
  readonly query: Readonly<Record<string, string>>;
  readonly body: unknown;
}

export interface KubeApiDoubleOptions {
  readonly runtime: PodRuntime;
  /** The bearer token every request must carry (default: a random one). */
  readonly token?: string;
  /** Namespaces that exist (default: `default`, `kube-system`). */
  readonly namespaces?: readonly string[];
  /** The one node's name. */
  readonly nodeName?: string;
  /** First wait between image pull attempts, doubled up to 8×. Default 500 ms. */
  readonly imagePullBackoffMs?: number;
  /** Wait before replacing a failed pod. Default 200 ms. */
  readonly podFailureBackoffMs?: number;
  /** Cap on terminationGracePeriodSeconds when stopping a container. Default 2 s. */
  readonly maxGraceSeconds?: number;
  /** Watch events kept for `resourceVersion` resumes. Default 2,000. */
  readonly historySize?: number;
}

const GROUP_OF: Record<Kind, string> = { jobs: 'batch', pods: '' };
const LIST_KIND: Record<Kind, [string, string]> = { jobs: ['JobList', 'batch/v1'], pods: ['PodList', 'v1'] };
const OBJ_KIND: Record<Kind, [string, string]> = { jobs: ['Job', 'batch/v1'], pods: ['Pod', 'v1'] };
const NAME_CHARS = 'bcdfghjklmnpqrstvwxz2456789';
const DNS_LABEL = /^[a-z0-9]([-a-z0-9]*[a-z0-9])?$/;
const QUANTITY = /^([+-]?[0-9.]+)(([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E))?$/;

/** RFC 3339 with whole seconds, as the API server writes times. */
const now = (): string => new Date().toISOString().replace(/\.\d{3}Z$/, 'Z');

const randomSuffix = (n = 5): string => Array.from({ length: n }, () => NAME_CHARS[Math.floor(Math.random() * NAME_CHARS.length)]).join('');

const clone = <T>(v: T): T => structuredClone(v);

/** A Kubernetes resource quantity as a number (cores for cpu, bytes for memory). */
export function parseQuantity(q: string | number): number {
  if (typeof q === 'number') return q;
  const m = QUANTITY.exec(q.trim());
  if (m === null || Number.isNaN(Number(m[1]))) throw new TypeError(`quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'`);
  const base = Number(m[1]);
  const suffix = m[2] ?? '';
  if (/^[eE]/.test(suffix)) return base * 10 ** Number(suffix.slice(1));
  const mult: Record<string, number> = {
    '': 1,
    n: 1e-9,
    u: 1e-6,
    m: 1e-3,
    k: 1e3,
    M: 1e6,
    G: 1e9,
    T: 1e12,
    P: 1e15,
    E: 1e18,
    Ki: 2 ** 10,
    Mi: 2 ** 20,
    Gi: 2 ** 30,
    Ti: 2 ** 40,
    Pi: 2 ** 50,
    Ei: 2 ** 60,
  };
  return base * mult[suffix]!;
}

// ---------------------------------------------------------------------------------------
// Selectors

type Req = { key: string; op: 'in' | 'notin' | 'exists' | '!exists'; values: string[] };

/** A label selector string (equality- and set-based) as a predicate on a labels map. */
export function parseLabelSelector(sel: string | undefined): (labels: Record<string, string> | undefined) => boolean {
  if (sel === undefined || sel.trim() === '') return () => true;
  const reqs: Req[] = [];
  // Split on commas outside parentheses.
  const parts: string[] = [];
  let depth = 0;
  let cur = '';
  for (const ch of sel) {
    if (ch === '(') depth++;
    if (ch === ')') depth--;
    if (ch === ',' && depth === 0) {
      parts.push(cur);
      cur = '';
    } else cur += ch;
  }
  parts.push(cur);
  for (const raw of parts) {
    const p = raw.trim();
    let m: RegExpExecArray | null;
    if ((m = /^([^\s!=]+)\s+(in|notin)\s+\(([^)]*)\)$/.exec(p)) !== null) {
      reqs.push({ key: m[1]!, op: m[2] as 'in' | 'notin', values: m[3]!.split(',').map((s) => s.trim()).filter((s) => s !== '') });
    } else if ((m = /^([^\s!=]+)\s*!=\s*(\S*)$/.exec(p)) !== null) {
      reqs.push({ key: m[1]!, op: 'notin', values: [m[2]!] });
    } else if ((m = /^([^\s!=]+)\s*==?\s*(\S*)$/.exec(p)) !== null) {
      reqs.push({ key: m[1]!, op: 'in', values: [m[2]!] });
    } else if ((m = /^!\s*([^\s!=]+)$/.exec(p)) !== null) {
      reqs.push({ key: m[1]!, op: '!exists', values: [] });
    } else if ((m = /^([^\s!=()]+)$/.exec(p)) !== null) {
      reqs.push({ key: m[1]!, op: 'exists', values: [] });
    } else {
      throw new BadSelector(`unable to parse requirement: ${JSON.stringify(p)}`);
    }
  }
  return (labels) => {
    const l = labels ?? {};
    return reqs.every((r) => {
      const has = Object.prototype.hasOwnProperty.call(l, r.key);
      switch (r.op) {
        case 'exists':
          return has;
        case '!exists':
          return !has;
        case 'in':
          return has && r.values.includes(l[r.key]!);
        case 'notin':
          return !has || !r.values.includes(l[r.key]!);
      }
    });
  };
}

class BadSelector extends Error {}

const FIELDS: Record<Kind, Record<string, (o: Obj) => string | undefined>> = {
  jobs: {
    'metadata.name': (o) => o.metadata?.name,
    'metadata.namespace': (o) => o.metadata?.namespace,
  },
  pods: {
    'metadata.name': (o) => o.metadata?.name,
    'metadata.namespace': (o) => o.metadata?.namespace,
    'status.phase': (o) => o.status?.phase,
    'spec.nodeName': (o) => o.spec?.nodeName,
  },
};

function parseFieldSelector(kind: Kind, sel: string | undefined): (o: Obj) => boolean {
  if (sel === undefined || sel.trim() === '') return () => true;
  const tests = sel.split(',').map((raw) => {
    const m = /^\s*([^!=\s]+)\s*(!=|==|=)\s*(\S*)\s*$/.exec(raw);
    if (m === null) throw new BadSelector(`invalid selector: '${sel}'; can't understand '${raw}'`);
    const get = FIELDS[kind][m[1]!];
    if (get === undefined) throw new BadSelector(`field label not supported: ${m[1]}`);
    const want = m[3]!;
    return m[2] === '!=' ? (o: Obj) => get(o) !== want : (o: Obj) => get(o) === want;
  });
  return (o) => tests.every((t) => t(o));
}

// ---------------------------------------------------------------------------------------
// Errors as `Status` objects

class ApiError extends Error {
  constructor(
    readonly code: number,
    readonly reason: string,
    message: string,
    readonly details?: Obj,
  ) {
    super(message);
  }
  status(): Obj {
    return {
      kind: 'Status',
      apiVersion: 'v1',
      metadata: {},
      status: 'Failure',
      message: this.message,
      reason: this.reason,
      ...(this.details !== undefined ? { details: this.details } : {}),
      code: this.code,
    };
  }
}

const resourceName = (kind: Kind): string => (kind === 'jobs' ? 'jobs.batch' : 'pods');

const notFound = (kind: Kind, name: string): ApiError =>
  new ApiError(404, 'NotFound', `${resourceName(kind)} "${name}" not found`, { name, ...(GROUP_OF[kind] !== '' ? { group: GROUP_OF[kind] } : {}), kind });

interface Cause {
  reason: string;
  message: string;
  field: string;
}

function invalid(name: string, causes: Cause[]): ApiError {
  const text = causes.map((c) => `${c.field}: ${c.message}`).join(', ');
  return new ApiError(422, 'Invalid', `Job.batch "${name}" is invalid: ${causes.length > 1 ? `[${text}]` : text}`, {
    name,
    group: 'batch',
    kind: 'Job',
    causes: causes.map((c) => ({ reason: c.reason, message: c.message, field: c.field })),
  });
}

// ---------------------------------------------------------------------------------------
// The double

export class KubeApiDouble {
  readonly token: string;
  /** Every request received, oldest first. */
  readonly requests: RecordedRequest[] = [];
  private readonly runtime: PodRuntime;
  private readonly namespaces: Set<string>;
  private readonly nodeName: string;
  private readonly pullBackoffMs: number;
  private readonly podFailureBackoffMs: number;
  private readonly maxGraceSeconds: number;
  private readonly historySize: number;
  private server: Server | null = null;
  private port = 0;
  /** The last resourceVersion handed out (one counter for all objects, as etcd's revision). */
  private rv = 0;
  private readonly jobsStore = new Map<string, StoredJob>(); // key: ns/name
  private readonly podsStore = new Map<string, StoredPod>();
  private readonly history: WatchEvent[] = [];
  private readonly watchers = new Set<Watcher>();
  /** Work in flight (kubelet steps, deletions): awaited by close(). */
  private readonly inflight = new Set<Promise<unknown>>();
  private closed = false;

  constructor(opts: KubeApiDoubleOptions) {
    this.runtime = opts.runtime;
    this.token = opts.token ?? randomUUID();
    this.namespaces = new Set(opts.namespaces ?? ['default', 'kube-system']);
    this.nodeName = opts.nodeName ?? 'weft-double-node';
    this.pullBackoffMs = opts.imagePullBackoffMs ?? 500;
    this.podFailureBackoffMs = opts.podFailureBackoffMs ?? 200;
    this.maxGraceSeconds = opts.maxGraceSeconds ?? 2;
    this.historySize = opts.historySize ?? 2_000;
  }

  /** Listen on 127.0.0.1 (an ephemeral port). */
  async start(): Promise<this> {
    const server = createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(0, '127.0.0.1', () => resolve());
    });
    this.server = server;
    this.port = (server.address() as AddressInfo).port;
    return this;
  }

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /**
   * A kubeconfig for this server (`KubeConfig.loadFromOptions` input): one cluster, a
   * user with the bearer token, `namespace` as the context's.
   */
  kubeConfigOptions(namespace = 'default', token = this.token) {
    return {
      clusters: [{ name: 'weft-double', server: this.url, skipTLSVerify: true }],
      users: [{ name: 'weft-agent', token }],
      contexts: [{ name: 'weft-double', cluster: 'weft-double', user: 'weft-agent', namespace }],
      currentContext: 'weft-double',
    };
  }

  /** The stored Job (a copy), or undefined. */
  job(namespace: string, name: string): Obj | undefined {
    const j = this.jobsStore.get(`${namespace}/${name}`);
    return j === undefined ? undefined : clone(j.obj);
  }

  jobs(namespace?: string): Obj[] {
    return [...this.jobsStore.values()].filter((j) => namespace === undefined || j.obj.metadata.namespace === namespace).map((j) => clone(j.obj));
  }

  pods(namespace?: string): Obj[] {
    return [...this.podsStore.values()].filter((p) => namespace === undefined || p.obj.metadata.namespace === namespace).map((p) => clone(p.obj));
  }

  /** Container ids of the pods that still have one. */
  containerIds(): string[] {
    return [...this.podsStore.values()].flatMap((p) => (p.containerId === null ? [] : [p.containerId]));
  }

  /** Every event of the watch history for `kind` (tests assert on what happened). */
  events(kind: Kind): readonly { type: string; name: string; rv: number }[] {
    return this.history.filter((e) => e.kind === kind).map((e) => ({ type: e.type, name: e.object.metadata.name as string, rv: e.rv }));
  }

  /** Stop serving, end watches, stop and remove every pod's container. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const w of this.watchers) w.res.end();
    this.watchers.clear();
    for (const j of this.jobsStore.values()) this.clearJobTimers(j);
    for (const p of this.podsStore.values()) {
      p.deleting = true;
      p.wake?.();
    }
    while (this.inflight.size > 0) await Promise.allSettled([...this.inflight]);
    await Promise.allSettled([...this.podsStore.values()].map((p) => this.destroyContainer(p, 0)));
    this.podsStore.clear();
    this.jobsStore.clear();
    const server = this.server;
    this.server = null;
    if (server !== null) {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    }
  }

  // -------------------------------------------------------------------------------------
  // HTTP

  private async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const url = new URL(req.url ?? '/', 'http://x');
    const query: Record<string, string> = {};
    for (const [k, v] of url.searchParams) query[k] = v;
    let body: unknown;
    try {
      const raw = await readBody(req);
      body = raw === '' ? undefined : JSON.parse(raw);
    } catch {
      return this.send(res, 400, new ApiError(400, 'BadRequest', 'the request body is not valid JSON').status());
    }
    this.requests.push({ method: req.method ?? 'GET', path: url.pathname, query, body });
    try {
      if (req.headers.authorization !== `Bearer ${this.token}`) throw new ApiError(401, 'Unauthorized', 'Unauthorized');
      await this.route(req.method ?? 'GET', url.pathname, query, body, res);
    } catch (err) {
      if (err instanceof ApiError) return this.send(res, err.code, err.status());
      if (err instanceof BadSelector) return this.send(res, 400, new ApiError(400, 'BadRequest', err.message).status());
      this.send(res, 500, new ApiError(500, 'InternalError', `Internal error occurred: ${(err as Error).message}`).status());
    }
  }

  private send(res: ServerResponse, code: number, body: unknown, type = 'application/json'): void {
    if (res.headersSent) return void res.end();
    const text = typeof body === 'string' ? body : JSON.stringify(body);
    res.writeHead(code, { 'content-type': type, 'content-length': Buffer.byteLength(text) });
    res.end(text);
  }

  private async route(method: string, path: string, q: Record<string, string>, body: unknown, res: ServerResponse): Promise<void> {
    if (method === 'GET' && path === '/version') {
      return this.send(res, 200, { major: '1', minor: '30', gitVersion: 'v1.30.0-weft-double', platform: 'linux/amd64' });
    }
    const seg = path.split('/').filter((s) => s !== '').map(decodeURIComponent);
    // /apis/batch/v1/jobs, /api/v1/pods: across namespaces (list and watch only).
    let kind: Kind | null = null;
    let rest: string[] = [];
    if (seg[0] === 'apis' && seg[1] === 'batch' && seg[2] === 'v1') {
      rest = seg.slice(3);
      if (rest[0] === 'jobs' || (rest[0] === 'namespaces' && rest[2] === 'jobs')) kind = 'jobs';
    } else if (seg[0] === 'api' && seg[1] === 'v1') {
      rest = seg.slice(2);
      if (rest[0] === 'pods' || (rest[0] === 'namespaces' && rest[2] === 'pods')) kind = 'pods';
    }
    if (kind === null) throw new ApiError(404, 'NotFound', 'the server could not find the requested resource');
    if (rest[0] === kind) {
      if (rest.length !== 1 || method !== 'GET') throw new ApiError(405, 'MethodNotAllowed', `the server does not allow this method on the requested resource`);
      return this.list(kind, null, q, res);
    }
    const ns = rest[1]!;
    if (!this.namespaces.has(ns)) throw new ApiError(404, 'NotFound', `namespaces "${ns}" not found`, { name: ns, kind: 'namespaces' });
    const name = rest[3];
    const sub = rest[4];
    if (rest.length > 5) throw new ApiError(404, 'NotFound', 'the server could not find the requested resource');
    if (name === undefined) {
      if (method === 'GET') return this.list(kind, ns, q, res);
      if (method === 'POST' && kind === 'jobs') return this.send(res, 201, this.createJob(ns, body, q.dryRun === 'All'));
      throw new ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource');
    }
    if (sub === undefined) {
      if (method === 'GET') return this.send(res, 200, this.get(kind, ns, name));
      if (method === 'DELETE') {
        const opts = (body ?? {}) as Obj;
        const policy = q.propagationPolicy ?? opts.propagationPolicy;
        const grace = q.gracePeriodSeconds ?? opts.gracePeriodSeconds;
        const r = kind === 'jobs' ? this.deleteJob(ns, name, policy) : this.deletePod(ns, name, grace === undefined ? undefined : Number(grace));
        return this.send(res, r.code, r.body);
      }
      throw new ApiError(405, 'MethodNotAllowed', 'the server does not allow this method on the requested resource');
    }
    if (kind === 'jobs' && sub === 'status' && method === 'GET') return this.send(res, 200, this.get(kind, ns, name));
    if (kind === 'pods' && sub === 'log' && method === 'GET') return this.send(res, 200, await this.podLog(ns, name, q), 'text/plain');
    throw new ApiError(404, 'NotFound', 'the server could not find the requested resource');
  }

  private store(kind: Kind): Map<string, { obj: Obj }> {
    return kind === 'jobs' ? this.jobsStore : this.podsStore;
  }

  private get(kind: Kind, ns: string, name: string): Obj {
    const s = this.store(kind).get(`${ns}/${name}`);
    if (s === undefined) throw notFound(kind, name);
    return { kind: OBJ_KIND[kind][0], apiVersion: OBJ_KIND[kind][1], ...clone(s.obj) };
  }

  private list(kind: Kind, ns: string | null, q: Record<string, string>, res: ServerResponse): void {
    const labels = parseLabelSelector(q.labelSelector);
    const fields = parseFieldSelector(kind, q.fieldSelector);
    const match = (o: Obj): boolean => (ns === null || o.metadata.namespace === ns) && labels(o.metadata.labels) && fields(o);
    if (q.watch === 'true' || q.watch === '1') return this.watch(kind, ns, match, q, res);
    // Items in creation order (resourceVersion of creation is not kept: uid order would be random).
    const all = [...this.store(kind).values()].map((s) => s.obj).filter(match);
    const offset = q.continue !== undefined && q.continue !== '' ? Number(Buffer.from(q.continue, 'base64url').toString()) : 0;
    const limit = q.limit !== undefined ? Number(q.limit) : 0;
    const page = limit > 0 ? all.slice(offset, offset + limit) : all.slice(offset);
    const next = limit > 0 && offset + limit < all.length ? Buffer.from(String(offset + limit)).toString('base64url') : undefined;
    this.send(res, 200, {
      kind: LIST_KIND[kind][0],
      apiVersion: LIST_KIND[kind][1],
      metadata: { resourceVersion: String(this.rv), ...(next !== undefined ? { continue: next, remainingItemCount: all.length - offset - limit } : {}) },
      items: page.map(clone),
    });
  }

  private watch(kind: Kind, ns: string | null, match: (o: Obj) => boolean, q: Record<string, string>, res: ServerResponse): void {
    res.writeHead(200, { 'content-type': 'application/json', 'transfer-encoding': 'chunked' });
    // The API server answers a watch at once, before any event.
    res.flushHeaders();
    const w: Watcher = { kind, ns, match, res };
    const from = q.resourceVersion;
    if (from === undefined || from === '' || from === '0') {
      for (const s of this.store(kind).values()) if (match(s.obj)) res.write(JSON.stringify({ type: 'ADDED', object: this.withKind(kind, s.obj) }) + '\n');
    } else {
      const since = Number(from);
      const oldest = this.history[0]?.rv ?? this.rv + 1;
      if (since < oldest - 1 && since < this.rv) {
        res.end(JSON.stringify({ type: 'ERROR', object: new ApiError(410, 'Expired', `too old resource version: ${since} (${oldest - 1})`).status() }) + '\n');
        return;
      }
      for (const e of this.history) if (e.kind === kind && e.rv > since) this.deliver(w, e);
    }
    this.watchers.add(w);
    const end = (): void => {
      this.watchers.delete(w);
      if (timer !== null) clearTimeout(timer);
    };
    const timer = q.timeoutSeconds !== undefined ? setTimeout(() => (end(), res.end()), Number(q.timeoutSeconds) * 1000) : null;
    res.on('close', end);
  }

  private withKind(kind: Kind, o: Obj): Obj {
    return { kind: OBJ_KIND[kind][0], apiVersion: OBJ_KIND[kind][1], ...clone(o) };
  }

  private deliver(w: Watcher, e: WatchEvent): void {
    if (w.kind !== e.kind || (w.ns !== null && w.ns !== e.ns)) return;
    const now = w.match(e.object);
    const before = e.prev !== null && w.match(e.prev);
    let type: string | null = e.type;
    if (e.type === 'MODIFIED') type = now && before ? 'MODIFIED' : now ? 'ADDED' : before ? 'DELETED' : null;
    else if (!now) type = null;
    if (type !== null) w.res.write(JSON.stringify({ type, object: this.withKind(e.kind, e.object) }) + '\n');
  }

  /** Record a change: bump the resourceVersion, keep it in the history, tell the watchers. */
  private emit(kind: Kind, type: WatchEvent['type'], obj: Obj, prev: Obj | null): void {
    if (type !== 'DELETED') obj.metadata.resourceVersion = String(++this.rv);
    else this.rv++;
    const e: WatchEvent = { rv: this.rv, kind, ns: obj.metadata.namespace, type, object: clone(obj), prev };
    this.history.push(e);
    if (this.history.length > this.historySize) this.history.splice(0, this.history.length - this.historySize);
    for (const w of this.watchers) this.deliver(w, e);
  }

  /** Change a stored object in place and record it. */
  private update(kind: Kind, s: { obj: Obj }, change: (o: Obj) => void): void {
    const prev = clone(s.obj);
    change(s.obj);
    this.emit(kind, 'MODIFIED', s.obj, prev);
  }

  // -------------------------------------------------------------------------------------
  // Jobs

  private createJob(ns: string, body: unknown, dryRun: boolean): Obj {
    if (body === null || typeof body !== 'object') throw new ApiError(400, 'BadRequest', 'the body of the request was in an unknown format');
    const job = clone(body as Obj);
    if (job.kind !== undefined && job.kind !== 'Job') throw new ApiError(400, 'BadRequest', `the API version in the data (${job.apiVersion}) does not match the expected API version (batch/v1)`);
    if (job.apiVersion !== undefined && job.apiVersion !== 'batch/v1') throw new ApiError(400, 'BadRequest', `the API version in the data (${job.apiVersion}) does not match the expected API version (batch/v1)`);
    delete job.kind;
    delete job.apiVersion;
    const md: Obj = (job.metadata ??= {});
    if (md.namespace !== undefined && md.namespace !== ns) {
      throw new ApiError(400, 'BadRequest', 'the namespace of the provided object does not match the namespace sent on the request');
    }
    if ((md.name === undefined || md.name === '') && typeof md.generateName === 'string' && md.generateName !== '') {
      md.name = `${md.generateName.slice(0, 58)}${randomSuffix()}`;
    }
    const name: string = md.name ?? '';
    this.validateJob(name, job);
    if (this.jobsStore.has(`${ns}/${name}`)) {
      throw new ApiError(409, 'AlreadyExists', `jobs.batch "${name}" already exists`, { name, group: 'batch', kind: 'jobs' });
    }
    const uid = randomUUID();
    Object.assign(md, { namespace: ns, uid, generation: 1, creationTimestamp: now() });
    delete md.resourceVersion;
    delete md.deletionTimestamp;
    const spec: Obj = job.spec;
    spec.parallelism ??= 1;
    spec.completions ??= 1;
    spec.backoffLimit ??= 6;
    spec.completionMode ??= 'NonIndexed';
    spec.suspend ??= false;
    spec.podReplacementPolicy ??= 'TerminatingOrFailed';
    const ctl = { 'batch.kubernetes.io/controller-uid': uid, 'batch.kubernetes.io/job-name': name, 'controller-uid': uid, 'job-name': name };
    spec.selector ??= { matchLabels: { 'batch.kubernetes.io/controller-uid': uid } };
    const tmd: Obj = (spec.template.metadata ??= {});
    tmd.labels = { ...(tmd.labels ?? {}), ...ctl };
    const pspec: Obj = spec.template.spec;
    pspec.terminationGracePeriodSeconds ??= 30;
    pspec.dnsPolicy ??= 'ClusterFirst';
    pspec.schedulerName ??= 'default-scheduler';
    pspec.securityContext ??= {};
    for (const c of pspec.containers as Obj[]) {
      c.imagePullPolicy ??= /:[^/]+$/.test(c.image) && !/:latest$/.test(c.image) ? 'IfNotPresent' : 'Always';
      c.terminationMessagePath ??= '/dev/termination-log';
      c.terminationMessagePolicy ??= 'File';
      c.resources ??= {};
    }
    job.status = {};
    if (dryRun) return { kind: 'Job', apiVersion: 'batch/v1', ...job };
    const s: StoredJob = { obj: job, deadlineTimer: null, ttlTimer: null, replaceTimer: null };
    this.jobsStore.set(`${ns}/${name}`, s);
    this.emit('jobs', 'ADDED', job, null);
    if (!spec.suspend) this.startJob(s);
    return this.withKind('jobs', job);
  }

  private validateJob(name: string, job: Obj): void {
    const causes: Cause[] = [];
    const req = (field: string): void => void causes.push({ reason: 'FieldValueRequired', message: 'Required value', field });
    const bad = (field: string, value: unknown, message: string): void =>
      void causes.push({ reason: 'FieldValueInvalid', message: `Invalid value: ${JSON.stringify(value)}: ${message}`, field });
    if (name === '') req('metadata.name');
    else if (name.length > 63 || !DNS_LABEL.test(name)) {
      bad('metadata.name', name, "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character");
    }
    const spec = job.spec as Obj | undefined;
    const pspec = spec?.template?.spec as Obj | undefined;
    if (spec === undefined) req('spec');
    else if (pspec === undefined) req('spec.template.spec');
    else {
      const containers = pspec.containers as Obj[] | undefined;
      if (!Array.isArray(containers) || containers.length === 0) req('spec.template.spec.containers');
      else {
        containers.forEach((c, i) => {
          const f = `spec.template.spec.containers[${i}]`;
          if (typeof c.name !== 'string' || c.name === '') req(`${f}.name`);
          else if (!DNS_LABEL.test(c.name)) bad(`${f}.name`, c.name, 'a lowercase RFC 1123 label must consist of lower case alphanumeric characters');
          if (typeof c.image !== 'string' || c.image === '') req(`${f}.image`);
          const res = (c.resources ?? {}) as Obj;
          const parsed: Record<string, Record<string, number>> = { limits: {}, requests: {} };
          for (const which of ['limits', 'requests'] as const) {
            for (const [r, v] of Object.entries((res[which] ?? {}) as Obj)) {
              try {
                parsed[which]![r] = parseQuantity(v as string);
              } catch (e) {
                bad(`${f}.resources.${which}[${r}]`, v, (e as Error).message);
              }
            }
          }
          for (const [r, v] of Object.entries(parsed.requests!)) {
            const lim = parsed.limits![r];
            if (lim !== undefined && v > lim) bad(`${f}.resources.requests`, res.requests[r], `must be less than or equal to ${r} limit of ${res.limits[r]}`);
          }
        });
      }
      const rp = pspec.restartPolicy;
      if (rp === undefined) {
        causes.push({ reason: 'FieldValueRequired', message: 'Required value: valid values: "OnFailure", "Never"', field: 'spec.template.spec.restartPolicy' });
      } else if (rp !== 'Never' && rp !== 'OnFailure') {
        causes.push({ reason: 'FieldValueNotSupported', message: `Unsupported value: "${rp}": supported values: "OnFailure", "Never"`, field: 'spec.template.spec.restartPolicy' });
      }
      if (spec.backoffLimit !== undefined && (!Number.isInteger(spec.backoffLimit) || spec.backoffLimit < 0)) {
        bad('spec.backoffLimit', spec.backoffLimit, 'must be greater than or equal to 0');
      }
      if (spec.completions !== undefined && spec.completions !== 1) bad('spec.completions', spec.completions, 'only 1 completion is supported by this API double');
    }
    if (causes.length > 0) throw invalid(name, causes);
  }

  private startJob(s: StoredJob): void {
    const spec = s.obj.spec as Obj;
    this.update('jobs', s, (o) => {
      o.status.startTime = now();
    });
    if (typeof spec.activeDeadlineSeconds === 'number') {
      s.deadlineTimer = setTimeout(() => this.jobDeadline(s), spec.activeDeadlineSeconds * 1000);
    }
    this.createPod(s);
  }

  private jobKey(s: StoredJob): string {
    return `${s.obj.metadata.namespace}/${s.obj.metadata.name}`;
  }

  private live(s: StoredJob): boolean {
    return this.jobsStore.get(this.jobKey(s)) === s && s.obj.metadata.deletionTimestamp === undefined && !this.closed;
  }

  private finished(job: Obj): boolean {
    return ((job.status.conditions ?? []) as Obj[]).some((c) => (c.type === 'Complete' || c.type === 'Failed') && c.status === 'True');
  }

  private podsOf(uid: string): StoredPod[] {
    return [...this.podsStore.values()].filter((p) => ((p.obj.metadata.ownerReferences ?? []) as Obj[]).some((r) => r.uid === uid));
  }

  private createPod(s: StoredJob): void {
    if (!this.live(s) || this.finished(s.obj)) return;
    const job = s.obj;
    const ns: string = job.metadata.namespace;
    const tpl = clone(job.spec.template) as Obj;
    let name = `${job.metadata.name}-${randomSuffix()}`;
    while (this.podsStore.has(`${ns}/${name}`)) name = `${job.metadata.name}-${randomSuffix()}`;
    const pod: Obj = {
      metadata: {
        name,
        generateName: `${job.metadata.name}-`,
        namespace: ns,
        uid: randomUUID(),
        creationTimestamp: now(),
        labels: tpl.metadata?.labels ?? {},
        ...(tpl.metadata?.annotations !== undefined ? { annotations: tpl.metadata.annotations } : {}),
        ownerReferences: [{ apiVersion: 'batch/v1', kind: 'Job', name: job.metadata.name, uid: job.metadata.uid, controller: true, blockOwnerDeletion: true }],
        finalizers: ['batch.kubernetes.io/job-tracking'],
      },
      spec: { ...tpl.spec, nodeName: this.nodeName, hostNetwork: true },
      status: {
        phase: 'Pending',
        conditions: [{ type: 'PodScheduled', status: 'True', lastTransitionTime: now() }],
        hostIP: '127.0.0.1',
        podIP: '127.0.0.1',
        podIPs: [{ ip: '127.0.0.1' }],
        startTime: now(),
        qosClass: qosClass(tpl.spec.containers as Obj[]),
        containerStatuses: [this.waitingStatus(tpl.spec.containers[0], 'ContainerCreating')],
      },
    };
    const p: StoredPod = { obj: pod, containerId: null, scratch: [], deleting: false, timer: null, wake: null };
    this.podsStore.set(`${ns}/${name}`, p);
    this.emit('pods', 'ADDED', pod, null);
    this.update('jobs', s, (o) => {
      o.status.active = (o.status.active ?? 0) + 1;
      o.status.ready = 0;
      o.status.uncountedTerminatedPods ??= {};
    });
    this.track(this.runPod(p, s));
  }

  private track<T>(work: Promise<T>): void {
    const w = work.catch(() => undefined).finally(() => this.inflight.delete(w));
    this.inflight.add(w);
  }

  private waitingStatus(c: Obj, reason: string, message?: string): Obj {
    return {
      name: c.name,
      image: c.image,
      imageID: '',
      ready: false,
      started: false,
      restartCount: 0,
      state: { waiting: { reason, ...(message !== undefined ? { message } : {}) } },
      lastState: {},
    };
  }

  /** Wait `ms` unless the pod is deleted first. */
  private podSleep(p: StoredPod, ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      p.wake = () => {
        if (p.timer !== null) clearTimeout(p.timer);
        p.timer = null;
        p.wake = null;
        resolve();
      };
      p.timer = setTimeout(p.wake, ms);
    });
  }

  private setContainerState(p: StoredPod, change: (cs: Obj, status: Obj) => void): void {
    this.update('pods', p, (o) => change(o.status.containerStatuses[0], o.status));
  }

  // -------------------------------------------------------------------------------------
  // The kubelet: one pod's container, from pull to exit

  private async runPod(p: StoredPod, s: StoredJob): Promise<void> {
    const c = p.obj.spec.containers[0] as Obj;
    const image: string = c.image;
    // Pull per imagePullPolicy, retried with backoff while the pod lives (a real kubelet
    // keeps trying: the pod stays Pending with ErrImagePull / ImagePullBackOff).
    for (let attempt = 0; ; attempt++) {
      if (p.deleting) return;
      let err: string | null = null;
      try {
        const present = await this.runtime.hasImage(image);
        if (c.imagePullPolicy === 'Never') {
          if (!present) {
            return this.setContainerState(p, (cs) => {
              cs.state = {
                waiting: { reason: 'ErrImageNeverPull', message: `Container image "${image}" is not present with pull policy of Never` },
              };
            });
          }
        } else if (c.imagePullPolicy === 'Always' || !present) {
          await this.runtime.pullImage(image);
        }
      } catch (e) {
        err = (e as Error).message;
      }
      if (p.deleting) return;
      if (err === null) break;
      const msg = `Failed to pull image "${image}": ${err}`;
      this.setContainerState(p, (cs) => {
        cs.state = { waiting: { reason: 'ErrImagePull', message: msg } };
      });
      const delay = this.pullBackoffMs * 2 ** Math.min(attempt, 3);
      await this.podSleep(p, delay);
      if (p.deleting) return;
      this.setContainerState(p, (cs) => {
        cs.state = { waiting: { reason: 'ImagePullBackOff', message: `Back-off pulling image "${image}"` } };
      });
      await this.podSleep(p, delay);
    }
    if (p.obj.status.containerStatuses[0].state.waiting?.reason !== 'ContainerCreating') {
      this.setContainerState(p, (cs) => {
        cs.state = { waiting: { reason: 'ContainerCreating' } };
      });
    }

    let spec: PodContainerSpec;
    try {
      spec = await this.containerSpec(p, c);
    } catch (e) {
      return this.setContainerState(p, (cs) => {
        cs.state = { waiting: { reason: 'CreateContainerConfigError', message: (e as Error).message } };
      });
    }
    if (p.deleting) return;
    try {
      p.containerId = await this.runtime.createContainer(spec);
    } catch (e) {
      return this.setContainerState(p, (cs) => {
        cs.state = { waiting: { reason: 'CreateContainerError', message: (e as Error).message } };
      });
    }
    if (p.deleting) return;
    const cid = p.containerId;
    const startedAt = now();
    try {
      await this.runtime.startContainer(cid);
    } catch (e) {
      // containerd reports a start failure (no such executable, ...) as exit 128.
      this.terminated(p, s, { exitCode: 128, reason: 'StartError', message: (e as Error).message, startedAt: '1970-01-01T00:00:00Z' });
      return;
    }
    if (p.deleting) return;
    this.setContainerState(p, (cs, st) => {
      cs.state = { running: { startedAt } };
      cs.ready = true;
      cs.started = true;
      cs.containerID = `docker://${cid}`;
      cs.imageID = `docker-pullable://${image}`;
      st.phase = 'Running';
      st.conditions = [
        { type: 'Initialized', status: 'True', lastTransitionTime: startedAt },
        { type: 'Ready', status: 'True', lastTransitionTime: startedAt },
        { type: 'ContainersReady', status: 'True', lastTransitionTime: startedAt },
        { type: 'PodScheduled', status: 'True', lastTransitionTime: p.obj.metadata.creationTimestamp },
      ];
    });
    if (this.live(s)) this.update('jobs', s, (o) => void (o.status.ready = 1));
    const exit = await this.runtime.waitContainer(cid);
    if (p.deleting) return;
    const reason = exit.oomKilled ? 'OOMKilled' : exit.exitCode === 0 ? 'Completed' : 'Error';
    this.terminated(p, s, { exitCode: exit.exitCode, reason, startedAt });
  }

  /** The container ended (or could not start): the pod's final phase, then the controller. */
  private terminated(p: StoredPod, s: StoredJob, t: { exitCode: number; reason: string; message?: string; startedAt: string }): void {
    const finishedAt = now();
    const phase = t.exitCode === 0 ? 'Succeeded' : 'Failed';
    this.setContainerState(p, (cs, st) => {
      cs.state = {
        terminated: {
          exitCode: t.exitCode,
          reason: t.reason,
          ...(t.message !== undefined ? { message: t.message } : {}),
          startedAt: t.startedAt,
          finishedAt,
          ...(p.containerId !== null ? { containerID: `docker://${p.containerId}` } : {}),
        },
      };
      cs.ready = false;
      cs.started = false;
      st.phase = phase;
      st.conditions = ((st.conditions ?? []) as Obj[]).map((c) => (c.type === 'Ready' || c.type === 'ContainersReady' ? { ...c, status: 'False', reason: 'PodCompleted', lastTransitionTime: finishedAt } : c));
    });
    this.podFinished(s, phase === 'Succeeded');
  }

  /** The job controller's step when one of its pods ended. */
  private podFinished(s: StoredJob, ok: boolean): void {
    if (!this.live(s) || this.finished(s.obj)) return;
    const t = now();
    if (ok) {
      this.update('jobs', s, (o) => {
        o.status.active = Math.max(0, (o.status.active ?? 1) - 1);
        o.status.ready = 0;
        o.status.succeeded = (o.status.succeeded ?? 0) + 1;
        o.status.completionTime = t;
        o.status.conditions = [
          ...((o.status.conditions ?? []) as Obj[]),
          { type: 'SuccessCriteriaMet', status: 'True', lastProbeTime: t, lastTransitionTime: t, reason: 'CompletionsReached', message: 'Reached expected number of succeeded pods' },
          { type: 'Complete', status: 'True', lastProbeTime: t, lastTransitionTime: t, reason: 'CompletionsReached', message: 'Reached expected number of succeeded pods' },
        ];
      });
      return this.jobFinished(s);
    }
    let failedNow = 0;
    this.update('jobs', s, (o) => {
      o.status.active = Math.max(0, (o.status.active ?? 1) - 1);
      o.status.ready = 0;
      o.status.failed = failedNow = (o.status.failed ?? 0) + 1;
    });
    if (failedNow > s.obj.spec.backoffLimit) {
      return this.failJob(s, 'BackoffLimitExceeded', 'Job has reached the specified backoff limit');
    }
    s.replaceTimer = setTimeout(() => {
      s.replaceTimer = null;
      this.createPod(s);
    }, this.podFailureBackoffMs * 2 ** Math.min(failedNow - 1, 5));
  }

  private failJob(s: StoredJob, reason: string, message: string): void {
    const t = now();
    this.update('jobs', s, (o) => {
      o.status.conditions = [
        ...((o.status.conditions ?? []) as Obj[]),
        { type: 'FailureTarget', status: 'True', lastProbeTime: t, lastTransitionTime: t, reason, message },
        { type: 'Failed', status: 'True', lastProbeTime: t, lastTransitionTime: t, reason, message },
      ];
    });
    this.jobFinished(s);
  }

  private jobDeadline(s: StoredJob): void {
    s.deadlineTimer = null;
    if (!this.live(s) || this.finished(s.obj)) return;
    // The controller deletes the Job's running pods and fails it.
    for (const p of this.podsOf(s.obj.metadata.uid)) {
      if (p.obj.status.phase === 'Pending' || p.obj.status.phase === 'Running') this.track(this.removePod(p, 0));
    }
    this.update('jobs', s, (o) => {
      o.status.failed = (o.status.failed ?? 0) + (o.status.active ?? 0);
      o.status.active = 0;
      o.status.ready = 0;
    });
    this.failJob(s, 'DeadlineExceeded', 'Job was active longer than specified deadline');
  }

  private jobFinished(s: StoredJob): void {
    this.clearJobTimers(s);
    const ttl = s.obj.spec.ttlSecondsAfterFinished;
    if (typeof ttl === 'number') {
      s.ttlTimer = setTimeout(() => {
        s.ttlTimer = null;
        if (this.live(s)) this.deleteJob(s.obj.metadata.namespace, s.obj.metadata.name, 'Background');
      }, ttl * 1000);
    }
  }

  private clearJobTimers(s: StoredJob): void {
    for (const k of ['deadlineTimer', 'ttlTimer', 'replaceTimer'] as const) {
      const t = s[k];
      if (t !== null) clearTimeout(t);
      s[k] = null;
    }
  }

  /** The runtime's view of the pod spec's first container. */
  private async containerSpec(p: StoredPod, c: Obj): Promise<PodContainerSpec> {
    const pod = p.obj;
    const field = (path: string): string => {
      const v: Record<string, string | undefined> = {
        'metadata.name': pod.metadata.name,
        'metadata.namespace': pod.metadata.namespace,
        'metadata.uid': pod.metadata.uid,
        'spec.nodeName': pod.spec.nodeName,
        'spec.serviceAccountName': pod.spec.serviceAccountName ?? 'default',
        'status.podIP': '127.0.0.1',
        'status.hostIP': '127.0.0.1',
      };
      const val = v[path];
      if (val === undefined) throw new Error(`unsupported fieldRef ${path}`);
      return val;
    };
    if (c.envFrom !== undefined && (c.envFrom as Obj[]).length > 0) throw new Error('envFrom: configmaps and secrets do not exist in this API double');
    const env = ((c.env ?? []) as Obj[]).map((e) => {
      if (e.valueFrom === undefined) return `${e.name}=${e.value ?? ''}`;
      if (e.valueFrom.fieldRef !== undefined) return `${e.name}=${field(e.valueFrom.fieldRef.fieldPath)}`;
      const ref = e.valueFrom.secretKeyRef ?? e.valueFrom.configMapKeyRef;
      const what = e.valueFrom.secretKeyRef !== undefined ? 'secret' : 'configmap';
      throw new Error(`${what} "${ref?.name}" not found`);
    });
    const volumes = new Map<string, string>();
    for (const v of (pod.spec.volumes ?? []) as Obj[]) {
      if (v.hostPath !== undefined) volumes.set(v.name, v.hostPath.path);
      else if (v.emptyDir !== undefined) {
        const dir = await mkdtemp(join(tmpdir(), 'weft-kube-emptydir-'));
        p.scratch.push(dir);
        volumes.set(v.name, dir);
      } else throw new Error(`volume "${v.name}": only hostPath and emptyDir volumes exist in this API double`);
    }
    const binds = ((c.volumeMounts ?? []) as Obj[]).map((m) => {
      const host = volumes.get(m.name);
      if (host === undefined) throw new Error(`volumeMount "${m.name}" names no volume of the pod`);
      return `${host}:${m.mountPath}${m.readOnly === true ? ':ro' : ''}`;
    });
    const limits = (c.resources?.limits ?? {}) as Obj;
    const requests = (c.resources?.requests ?? {}) as Obj;
    return {
      name: `k8s_${c.name}_${pod.metadata.name}_${pod.metadata.namespace}_${pod.metadata.uid}_0`,
      image: c.image,
      ...(c.command !== undefined ? { entrypoint: c.command, cmd: c.args ?? [] } : c.args !== undefined ? { cmd: c.args } : {}),
      env,
      ...(c.workingDir !== undefined ? { workingDir: c.workingDir } : {}),
      binds,
      ...(limits.memory !== undefined ? { memory: Math.round(parseQuantity(limits.memory)) } : {}),
      ...(limits.cpu !== undefined ? { nanoCpus: Math.round(parseQuantity(limits.cpu) * 1e9) } : {}),
      ...(requests.cpu !== undefined ? { cpuShares: Math.max(2, Math.round(parseQuantity(requests.cpu) * 1024)) } : {}),
      labels: {
        'io.kubernetes.pod.name': pod.metadata.name,
        'io.kubernetes.pod.namespace': pod.metadata.namespace,
        'io.kubernetes.pod.uid': pod.metadata.uid,
        'io.kubernetes.container.name': c.name,
        'weft.kube-double': String(this.port),
      },
    };
  }

  // -------------------------------------------------------------------------------------
  // Deletion

  private deleteJob(ns: string, name: string, policy: string | undefined): { code: number; body: Obj } {
    const s = this.jobsStore.get(`${ns}/${name}`);
    if (s === undefined) throw notFound('jobs', name);
    const p = policy ?? 'Orphan';
    if (p !== 'Orphan' && p !== 'Background' && p !== 'Foreground') {
      throw new ApiError(422, 'Invalid', `DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: "${p}": supported values: "Foreground", "Background", "Orphan"`);
    }
    this.clearJobTimers(s);
    const uid: string = s.obj.metadata.uid;
    const pods = this.podsOf(uid);
    const drop = (): void => {
      if (this.jobsStore.get(`${ns}/${name}`) !== s) return;
      this.jobsStore.delete(`${ns}/${name}`);
      this.emit('jobs', 'DELETED', s.obj, null);
    };
    if (p === 'Background') {
      drop();
      for (const pod of pods) this.track(this.removePod(pod, undefined));
      return { code: 200, body: { kind: 'Status', apiVersion: 'v1', metadata: {}, status: 'Success', details: { name, group: 'batch', kind: 'jobs', uid } } };
    }
    // Orphan and Foreground: the object stays (with a finalizer) until the garbage collector is done.
    this.update('jobs', s, (o) => {
      o.metadata.deletionTimestamp = now();
      o.metadata.deletionGracePeriodSeconds = 0;
      o.metadata.finalizers = [...(o.metadata.finalizers ?? []), p === 'Orphan' ? 'orphan' : 'foregroundDeletion'];
    });
    const body = this.withKind('jobs', s.obj);
    if (p === 'Orphan') {
      for (const pod of pods) {
        this.update('pods', pod, (o) => {
          o.metadata.ownerReferences = ((o.metadata.ownerReferences ?? []) as Obj[]).filter((r) => r.uid !== uid);
        });
      }
      setImmediate(drop);
    } else {
      this.track(Promise.allSettled(pods.map((pod) => this.removePod(pod, undefined))).then(drop));
    }
    return { code: 200, body };
  }

  private deletePod(ns: string, name: string, grace: number | undefined): { code: number; body: Obj } {
    const p = this.podsStore.get(`${ns}/${name}`);
    if (p === undefined) throw notFound('pods', name);
    const done = this.removePod(p, grace);
    this.track(done);
    return { code: 200, body: this.withKind('pods', p.obj) };
  }

  /**
   * Graceful pod deletion: deletionTimestamp, stop the container, then the pod goes. A pod
   * deleted while its Job still runs counts as failed (and is replaced per backoffLimit).
   */
  private async removePod(p: StoredPod, grace: number | undefined): Promise<void> {
    if (p.deleting && p.obj.metadata.deletionTimestamp !== undefined) return;
    const wasActive = p.obj.status.phase === 'Pending' || p.obj.status.phase === 'Running';
    p.deleting = true;
    p.wake?.();
    const g = Math.min(grace ?? p.obj.spec.terminationGracePeriodSeconds ?? 30, this.maxGraceSeconds);
    this.update('pods', p, (o) => {
      o.metadata.deletionTimestamp = now();
      o.metadata.deletionGracePeriodSeconds = g;
    });
    await this.destroyContainer(p, g);
    const key = `${p.obj.metadata.namespace}/${p.obj.metadata.name}`;
    if (this.podsStore.get(key) === p) {
      this.podsStore.delete(key);
      this.emit('pods', 'DELETED', p.obj, null);
    }
    if (wasActive) {
      const owner = ((p.obj.metadata.ownerReferences ?? []) as Obj[])[0];
      const s = owner === undefined ? undefined : [...this.jobsStore.values()].find((j) => j.obj.metadata.uid === owner.uid);
      if (s !== undefined) this.podFinished(s, false);
    }
  }

  private async destroyContainer(p: StoredPod, graceSeconds: number): Promise<void> {
    const id = p.containerId;
    p.containerId = null;
    if (id !== null) {
      await this.runtime.stopContainer(id, graceSeconds).catch(() => undefined);
      await this.runtime.removeContainer(id).catch(() => undefined);
    }
    for (const dir of p.scratch.splice(0)) await rm(dir, { recursive: true, force: true });
  }

  // -------------------------------------------------------------------------------------
  // Logs

  private async podLog(ns: string, name: string, q: Record<string, string>): Promise<string> {
    const p = this.podsStore.get(`${ns}/${name}`);
    if (p === undefined) throw notFound('pods', name);
    const containers = (p.obj.spec.containers as Obj[]).map((c) => c.name as string);
    const want = q.container ?? (containers.length === 1 ? containers[0] : undefined);
    if (want === undefined) {
      throw new ApiError(400, 'BadRequest', `a container name must be specified for pod ${name}, choose one of: [${containers.join(' ')}]`);
    }
    if (!containers.includes(want)) throw new ApiError(400, 'BadRequest', `container ${want} is not valid for pod ${name}`);
    const cs = p.obj.status.containerStatuses[0] as Obj;
    if (want !== cs.name) throw new ApiError(400, 'BadRequest', `container "${want}" in pod "${name}" is waiting to start: PodInitializing`);
    if (p.containerId === null || cs.state.waiting !== undefined) {
      const w = cs.state.waiting as Obj | undefined;
      const why = w?.reason === 'ErrImagePull' || w?.reason === 'ImagePullBackOff' ? 'trying and failing to pull image' : (w?.reason ?? 'ContainerCreating');
      throw new ApiError(400, 'BadRequest', `container "${want}" in pod "${name}" is waiting to start: ${why}`);
    }
    let text = await this.runtime.containerLogs(p.containerId, {
      ...(q.tailLines !== undefined ? { tail: Number(q.tailLines) } : {}),
      timestamps: q.timestamps === 'true',
    });
    if (q.limitBytes !== undefined) text = Buffer.from(text).subarray(0, Number(q.limitBytes)).toString();
    return text;
  }
}

function qosClass(containers: Obj[]): string {
  const rs = containers.map((c) => (c.resources ?? {}) as Obj);
  if (rs.every((r) => r.limits === undefined && r.requests === undefined)) return 'BestEffort';
  const guaranteed = rs.every((r) => {
    const l = (r.limits ?? {}) as Obj;
    const q = (r.requests ?? l) as Obj;
    return l.cpu !== undefined && l.memory !== undefined && parseQuantity(q.cpu ?? l.cpu) === parseQuantity(l.cpu) && parseQuantity(q.memory ?? l.memory) === parseQuantity(l.memory);
  });
  return guaranteed ? 'Guaranteed' : 'Burstable';
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

/**
 * The kubelet's runtime on a Docker daemon: containers on the host network (the only
 * network besides `none` when dockerd runs with `--bridge=none`), logs merged from
 * stdout and stderr in time order (the daemon keeps both in one timestamped log).
 */
export function dockerPodRuntime(engine: DockerEngine): PodRuntime {
  return {
    hasImage: (image) => engine.imageExists(image),
    pullImage: (image) => engine.pullImage(image),
    async createContainer(spec) {
      const { id } = await engine.createContainer({
        name: spec.name,
        image: spec.image,
        ...(spec.entrypoint !== undefined ? { entrypoint: spec.entrypoint } : {}),
        ...(spec.cmd !== undefined ? { cmd: spec.cmd } : {}),
        env: Object.fromEntries(spec.env.map((e) => [e.slice(0, e.indexOf('=')), e.slice(e.indexOf('=') + 1)])),
        labels: spec.labels,
        ...(spec.workingDir !== undefined ? { workingDir: spec.workingDir } : {}),
        hostConfig: {
          NetworkMode: 'host',
          Binds: spec.binds,
          ...(spec.memory !== undefined ? { Memory: spec.memory, MemorySwap: spec.memory } : {}),
          ...(spec.nanoCpus !== undefined ? { NanoCpus: spec.nanoCpus } : {}),
          ...(spec.cpuShares !== undefined ? { CpuShares: spec.cpuShares } : {}),
        },
      });
      return id;
    },
    startContainer: (id) => engine.startContainer(id),
    async waitContainer(id) {
      const r = await engine.waitContainer(id);
      const st = await engine.inspectContainer(id).then((c) => c.State, () => null);
      return { exitCode: r.exitCode, oomKilled: st?.OOMKilled === true };
    },
    async containerLogs(id, opts) {
      const { stdout, stderr } = await engine.logs(id, { timestamps: true, ...(opts.tail !== undefined ? { tail: opts.tail } : {}) });
      const lines = [...splitLines(stdout), ...splitLines(stderr)].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
      return lines.map((l) => (opts.timestamps === true ? l : l.slice(l.indexOf(' ') + 1))).join('');
    },
    async stopContainer(id, graceSeconds) {
      try {
        await engine.stopContainer(id, { timeoutSec: graceSeconds });
      } catch (err) {
        if (!isNotFound(err)) throw err;
      }
    },
    removeContainer: (id) => engine.removeContainer(id, { force: true, missingOk: true }),
  };
}

/** Lines with their newline kept (a last line without one gets one). */
function splitLines(text: string): string[] {
  if (text === '') return [];
  const parts = text.split(/(?<=\n)/);
  return parts.map((l) => (l.endsWith('\n') ? l : `${l}\n`));
}

/** Start a double on 127.0.0.1 with `runtime` behind its kubelet. */
export async function startKubeApi(opts: KubeApiDoubleOptions): Promise<KubeApiDouble> {
  return new KubeApiDouble(opts).start();
}
