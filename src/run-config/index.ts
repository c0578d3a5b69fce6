/**
 * RunConfig: where and how a flow run's process starts. Each kind pairs with an agent
 * (`weft agent local|docker|kubernetes`); UniversalRun goes to any of them. A RunConfig
 * is plain JSON, recorded with the flow's version on the server.
 */

interface Common {
  /** Environment variables of the flow-run process. */
  readonly env?: Readonly<Record<string, string>>;
  /** Labels the run carries: only an agent holding all of them takes it. */
  readonly labels?: readonly string[];
}

export interface UniversalRun extends Common {
  readonly kind: 'universal';
}

export interface LocalRun extends Common {
  readonly kind: 'local';
  /** Working directory of the flow-run process. */
  readonly workingDir?: string;
}

export interface DockerRun extends Common {
  readonly kind: 'docker';
  /** Image to run (default: the DockerStorage image, else the agent's default image). */
  readonly image?: string;
  /** Container ports to publish, `{ "8080/tcp": 18080 }`. */
  readonly ports?: Readonly<Record<string, number>>;
  /** Docker Engine API HostConfig fields (Memory, NanoCpus, NetworkMode, Binds, ...). */
  readonly hostConfig?: Readonly<Record<string, unknown>>;
}

export interface KubernetesRun extends Common {
  readonly kind: 'kubernetes';
  readonly image?: string;
  /** A batch/v1 Job manifest to start from (the agent fills in the flow-run container). */
  readonly jobTemplate?: Readonly<Record<string, unknown>>;
  readonly cpuRequest?: string;
  readonly cpuLimit?: string;
  readonly memoryRequest?: string;
  readonly memoryLimit?: string;
  readonly serviceAccountName?: string;
  readonly imagePullSecrets?: readonly string[];
}

export type RunConfig = UniversalRun | LocalRun | DockerRun | KubernetesRun;
export type RunConfigKind = RunConfig['kind'];

export const RUN_CONFIG_KINDS: readonly RunConfigKind[] = ['universal', 'local', 'docker', 'kubernetes'];

type Opts<T> = Omit<T, 'kind'>;

export const universalRun = (o: Opts<UniversalRun> = {}): UniversalRun => ({ kind: 'universal', ...o });
export const localRun = (o: Opts<LocalRun> = {}): LocalRun => ({ kind: 'local', ...o });
export const dockerRun = (o: Opts<DockerRun> = {}): DockerRun => ({ kind: 'docker', ...o });
export const kubernetesRun = (o: Opts<KubernetesRun> = {}): KubernetesRun => ({ kind: 'kubernetes', ...o });

/** Which agent kinds may start a run of this config. */
export function agentKindsFor(rc: RunConfig): readonly ('local' | 'docker' | 'kubernetes')[] {
  return rc.kind === 'universal' ? ['local', 'docker', 'kubernetes'] : [rc.kind];
}

/**
 * Check a RunConfig read from JSON (the server, a file); throws a TypeError naming the
 * first field that is wrong.
 */
export function checkRunConfig(v: unknown, where = 'runConfig'): RunConfig {
  if (v === null || typeof v !== 'object') throw new TypeError(`${where}: expected an object, got ${v === null ? 'null' : typeof v}`);
  const o = v as Record<string, unknown>;
  if (typeof o.kind !== 'string' || !(RUN_CONFIG_KINDS as readonly string[]).includes(o.kind)) {
    throw new TypeError(`${where}.kind: expected one of ${RUN_CONFIG_KINDS.join(', ')}, got ${JSON.stringify(o.kind)}`);
  }
  if (o.env !== undefined) {
    if (o.env === null || typeof o.env !== 'object' || Array.isArray(o.env)) throw new TypeError(`${where}.env: expected an object of strings`);
    for (const [k, val] of Object.entries(o.env)) if (typeof val !== 'string') throw new TypeError(`${where}.env.${k}: expected a string, got ${typeof val}`);
  }
  if (o.labels !== undefined && (!Array.isArray(o.labels) || o.labels.some((l) => typeof l !== 'string' || l === ''))) {
    throw new TypeError(`${where}.labels: expected an array of non-empty strings`);
  }
  for (const f of ['workingDir', 'image', 'cpuRequest', 'cpuLimit', 'memoryRequest', 'memoryLimit', 'serviceAccountName'] as const) {
    if (o[f] !== undefined && typeof o[f] !== 'string') throw new TypeError(`${where}.${f}: expected a string, got ${typeof o[f]}`);
  }
  if (o.ports !== undefined) {
    if (o.ports === null || typeof o.ports !== 'object') throw new TypeError(`${where}.ports: expected an object of port numbers`);
    for (const [k, p] of Object.entries(o.ports)) {
      if (!Number.isInteger(p) || (p as number) < 0 || (p as number) > 65535) throw new TypeError(`${where}.ports.${k}: expected a port number, got ${JSON.stringify(p)}`);
    }
  }
  for (const f of ['hostConfig', 'jobTemplate'] as const) {
    if (o[f] !== undefined && (o[f] === null || typeof o[f] !== 'object' || Array.isArray(o[f]))) throw new TypeError(`${where}.${f}: expected an object`);
  }
  if (o.imagePullSecrets !== undefined && (!Array.isArray(o.imagePullSecrets) || o.imagePullSecrets.some((s) => typeof s !== 'string'))) {
    throw new TypeError(`${where}.imagePullSecrets: expected an array of strings`);
  }
  return o as unknown as RunConfig;
}
