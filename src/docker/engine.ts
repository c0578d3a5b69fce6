/**
 * A small typed client of the Docker Engine API (https://docs.docker.com/engine/api/v1.41/)
 * over the daemon's unix socket, or plain TCP: what DockerStorage builds and pushes
 * images with, and what the docker agent starts flow-run containers with.
 *
 * - Address: `host` option, else `$DOCKER_HOST` (`unix:///path`, `tcp://host:port`),
 *   else `unix:///var/run/docker.sock`. TLS (`$DOCKER_TLS_VERIFY`) is not spoken.
 * - API version: pinned, 1.41 by default (Docker 20.10; later daemons still accept it),
 *   else the `apiVersion` option or `$DOCKER_API_VERSION`. Every path is `/v<version>/…`.
 * - Errors: `DockerError` with a stable code — DOCKER_UNREACHABLE (no daemon at the
 *   address), DOCKER_TIMEOUT, DOCKER_API (the daemon refused: `status` and its message),
 *   DOCKER_BUILD (a build step failed: the step and its last output lines), DOCKER_PUSH
 *   and DOCKER_PULL (naming the image and the registry's answer).
 * - Streams (build, push, pull, import, logs with `follow`, events, wait) have no
 *   timeout; give them an AbortSignal. Other calls time out after `timeoutMs`.
 *
 * Connections are not kept alive: each call opens its own, so an idle client holds no
 * handle and needs no closing.
 */
import { request as httpRequest, type IncomingMessage, type OutgoingHttpHeaders } from 'node:http';
import { Readable } from 'node:stream';
import { WeftError } from '../errors.ts';
import { demuxLogs, jsonMessages, rawLogs, type LogFrame } from './streams.ts';

export const DEFAULT_API_VERSION = '1.41';
export const DEFAULT_DOCKER_HOST = 'unix:///var/run/docker.sock';

export type DockerErrorCode = 'DOCKER_UNREACHABLE' | 'DOCKER_TIMEOUT' | 'DOCKER_API' | 'DOCKER_BUILD' | 'DOCKER_PUSH' | 'DOCKER_PULL';

export class DockerError extends WeftError {
  declare readonly code: DockerErrorCode;
  constructor(
    code: DockerErrorCode,
    message: string,
    /** The daemon's HTTP status (DOCKER_API). */
    readonly status?: number,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
    this.name = 'DockerError';
  }
}

/** True for a DOCKER_API error with status 404 (no such image, container...). */
export function isNotFound(err: unknown): boolean {
  return err instanceof DockerError && err.status === 404;
}

export interface DockerEngineOptions {
  /** `unix:///path/docker.sock`, `tcp://host:port` or `http://host:port` (default: `$DOCKER_HOST`, else the standard socket). */
  readonly host?: string;
  /** API version, e.g. '1.41' (default: `$DOCKER_API_VERSION`, else 1.41). */
  readonly apiVersion?: string;
  /** Timeout of calls that are not streams, in ms (default 60 s). */
  readonly timeoutMs?: number;
}

/** Credentials for a registry (the X-Registry-Auth header). */
export interface RegistryAuth {
  readonly username?: string;
  readonly password?: string;
  readonly serveraddress?: string;
  readonly identitytoken?: string;
  readonly registrytoken?: string;
}

/** One JSON message of a build, push, pull or import stream. */
export interface ProgressMessage {
  readonly stream?: string;
  readonly status?: string;
  readonly id?: string;
  readonly progress?: string;
  readonly progressDetail?: { readonly current?: number; readonly total?: number };
  readonly aux?: Record<string, unknown>;
  readonly error?: string;
  readonly errorDetail?: { readonly code?: number; readonly message?: string };
}

export interface StreamOptions {
  /** Every message of the daemon's progress stream, as it arrives. */
  readonly onProgress?: (m: ProgressMessage) => void;
  readonly signal?: AbortSignal;
}

export interface BuildOptions extends StreamOptions {
  /** Names to tag the image with (`repo:tag`). */
  readonly tags?: readonly string[];
  /** Path of the Dockerfile inside the context (default `Dockerfile`). */
  readonly dockerfile?: string;
  readonly buildArgs?: Readonly<Record<string, string>>;
  readonly labels?: Readonly<Record<string, string>>;
  readonly noCache?: boolean;
  /** Pull a newer base image even when one is present. */
  readonly pull?: boolean;
  /** Network mode of RUN steps (`host`, `none`; the daemon's default otherwise). */
  readonly networkMode?: string;
  readonly target?: string;
  /** Credentials for the registries the FROM images come from, by registry host. */
  readonly registryConfig?: Readonly<Record<string, RegistryAuth>>;
  /** Each line of the build's output (steps, RUN output), without its newline. */
  readonly onLine?: (line: string) => void;
}

export interface BuildResult {
  /** `sha256:…` */
  readonly id: string;
}

export interface PushResult {
  /** The manifest digest the registry stored (`sha256:…`), when it said. */
  readonly digest?: string;
  readonly size?: number;
}

export interface ImageInspect {
  readonly Id: string;
  readonly RepoTags: readonly string[] | null;
  readonly RepoDigests: readonly string[] | null;
  readonly Created: string;
  readonly Size: number;
  readonly Config: {
    readonly Labels?: Readonly<Record<string, string>> | null;
    readonly Env?: readonly string[] | null;
    readonly Cmd?: readonly string[] | null;
    readonly Entrypoint?: readonly string[] | null;
    readonly WorkingDir?: string;
  } | null;
  readonly [field: string]: unknown;
}

export interface ImageSummary {
  readonly Id: string;
  readonly RepoTags: readonly string[] | null;
  readonly Labels: Readonly<Record<string, string>> | null;
  readonly Created: number;
  readonly Size: number;
}

export interface PortBinding {
  readonly HostIp?: string;
  readonly HostPort: string;
}

/** The HostConfig of a container: the usual fields typed, any other Engine API field passed through. */
export interface HostConfig {
  /** `host`, `none`, `bridge` or a network's name. */
  readonly NetworkMode?: string;
  /** `host-path:container-path[:ro]` */
  readonly Binds?: readonly string[];
  /** Bytes. */
  readonly Memory?: number;
  readonly MemorySwap?: number;
  /** CPUs × 1e9. */
  readonly NanoCpus?: number;
  readonly PortBindings?: Readonly<Record<string, readonly PortBinding[]>>;
  /** Remove the container when it exits (wait with condition `removed` before starting it). */
  readonly AutoRemove?: boolean;
  readonly ExtraHosts?: readonly string[];
  /** Run an init process as PID 1 (reaps zombies, forwards signals). */
  readonly Init?: boolean;
  readonly ReadonlyRootfs?: boolean;
  readonly Tmpfs?: Readonly<Record<string, string>>;
  readonly [field: string]: unknown;
}

export interface ContainerSpec {
  readonly image: string;
  /** Container name (the daemon picks one when absent). */
  readonly name?: string;
  readonly cmd?: readonly string[];
  readonly entrypoint?: readonly string[];
  readonly env?: Readonly<Record<string, string>>;
  readonly labels?: Readonly<Record<string, string>>;
  readonly workingDir?: string;
  readonly user?: string;
  /** A TTY merges stdout and stderr into one raw stream (logs are then all stdout). */
  readonly tty?: boolean;
  /** Signal `stop` sends first (default SIGTERM). */
  readonly stopSignal?: string;
  /** Seconds `stop` waits before SIGKILL. */
  readonly stopTimeout?: number;
  readonly hostConfig?: HostConfig;
  /** Other fields of the create body (Engine API names), merged last. */
  readonly extra?: Readonly<Record<string, unknown>>;
}

export interface ContainerState {
  readonly Status: 'created' | 'running' | 'paused' | 'restarting' | 'removing' | 'exited' | 'dead';
  readonly Running: boolean;
  readonly ExitCode: number;
  readonly OOMKilled: boolean;
  readonly Error: string;
  readonly Pid: number;
  readonly StartedAt: string;
  readonly FinishedAt: string;
}

export interface ContainerInspect {
  readonly Id: string;
  readonly Name: string;
  readonly Image: string;
  readonly State: ContainerState;
  readonly Config: {
    readonly Image: string;
    readonly Tty: boolean;
    readonly Labels: Readonly<Record<string, string>> | null;
    readonly Env: readonly string[] | null;
    readonly Cmd: readonly string[] | null;
  };
  readonly HostConfig: HostConfig;
  readonly [field: string]: unknown;
}

export interface ContainerSummary {
  readonly Id: string;
  readonly Names: readonly string[];
  readonly Image: string;
  readonly State: string;
  readonly Status: string;
  readonly Labels: Readonly<Record<string, string>> | null;
  readonly Created: number;
}

export interface WaitResult {
  readonly exitCode: number;
  /** Set when the daemon could not wait (not when the process failed). */
  readonly error?: string;
}

export interface LogOptions {
  readonly stdout?: boolean;
  readonly stderr?: boolean;
  /** Unix seconds. */
  readonly since?: number;
  /** Last N lines only. */
  readonly tail?: number;
  readonly timestamps?: boolean;
  /** Whether the container has a TTY (read from the container when not given). */
  readonly tty?: boolean;
  readonly signal?: AbortSignal;
}

/** A container lifecycle or image event (`GET /events`). */
export interface EngineEvent {
  readonly Type: string;
  readonly Action: string;
  readonly Actor: { readonly ID: string; readonly Attributes: Readonly<Record<string, string>> };
  readonly time: number;
  readonly timeNano: number;
}

/** A `repo[:tag][@digest]` reference split; the registry host (with its port) stays in `repository`. */
export function parseImageRef(ref: string): { repository: string; tag?: string; digest?: string } {
  let rest = ref;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at !== -1) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
  }
  // A colon after the last slash is a tag; one before it is a registry port.
  const colon = rest.lastIndexOf(':');
  const tag = colon > rest.lastIndexOf('/') ? rest.slice(colon + 1) : undefined;
  const repository = tag !== undefined ? rest.slice(0, colon) : rest;
  return { repository, ...(tag !== undefined ? { tag } : {}), ...(digest !== undefined ? { digest } : {}) };
}

/** The registry host of an image reference (`127.0.0.1:5000/a/b:1` → `127.0.0.1:5000`; Docker Hub → `docker.io`). */
export function registryOf(ref: string): string {
  const { repository } = parseImageRef(ref);
  const slash = repository.indexOf('/');
  if (slash === -1) return 'docker.io';
  const first = repository.slice(0, slash);
  return first.includes('.') || first.includes(':') || first === 'localhost' ? first : 'docker.io';
}

/** DockerRun-style `{ "8080/tcp": 18080 }` as HostConfig.PortBindings (a port without a protocol is TCP). */
export function publishPorts(ports: Readonly<Record<string, number>>): Record<string, PortBinding[]> {
  const out: Record<string, PortBinding[]> = {};
  for (const [port, host] of Object.entries(ports)) out[port.includes('/') ? port : `${port}/tcp`] = [{ HostPort: String(host) }];
  return out;
}

/** Registry credentials as the daemon reads them: base64url JSON, padded. */
function encodeAuth(auth: unknown): string {
  return Buffer.from(JSON.stringify(auth ?? {}))
    .toString('base64')
    .replace(/\+/g, '-')
    .replace(/\//g, '_');
}

type Query = Record<string, string | number | boolean | readonly string[] | undefined>;
type Body = Uint8Array | string | Readable | Record<string, unknown>;

interface RequestOptions {
  readonly query?: Query;
  readonly body?: Body;
  readonly headers?: OutgoingHttpHeaders;
  readonly signal?: AbortSignal;
  /** A stream: no timeout. */
  readonly stream?: boolean;
  /** Statuses that are not errors besides 2xx (304 Not Modified for start/stop). */
  readonly okStatus?: readonly number[];
}

type Address = { readonly socketPath: string } | { readonly host: string; readonly port: number };

export class DockerEngine {
  /** The daemon's address as given (`unix:///…`, `tcp://…`). */
  readonly host: string;
  readonly apiVersion: string;
  private readonly address: Address;
  private readonly timeoutMs: number;

  constructor(opts: DockerEngineOptions = {}) {
    this.host = opts.host ?? (process.env.DOCKER_HOST || DEFAULT_DOCKER_HOST);
    this.address = parseHost(this.host);
    this.apiVersion = (opts.apiVersion ?? (process.env.DOCKER_API_VERSION || DEFAULT_API_VERSION)).replace(/^v/, '');
    this.timeoutMs = opts.timeoutMs ?? 60_000;
  }

  // ---------------------------------------------------------------------------------
  // System

  /** Resolves when the daemon answers `GET /_ping`. */
  async ping(signal?: AbortSignal): Promise<void> {
    await this.text('GET', '/_ping', { signal });
  }

  /** `GET /version`: the daemon's version, API version and platform. */
  version(): Promise<{ Version: string; ApiVersion: string; MinAPIVersion?: string; Os: string; Arch: string; [field: string]: unknown }> {
    return this.json('GET', '/version');
  }

  /**
   * `GET /events` as they happen, until `signal` aborts (then the iteration just ends).
   * `filters`: e.g. `{ type: ['container'], label: ['weft.flow-run=…'] }`.
   */
  async *events(opts: { since?: number; until?: number; filters?: Readonly<Record<string, readonly string[]>>; signal?: AbortSignal } = {}): AsyncGenerator<EngineEvent> {
    const res = await this.request('GET', '/events', {
      query: { since: opts.since, until: opts.until, filters: opts.filters !== undefined ? JSON.stringify(opts.filters) : undefined },
      signal: opts.signal,
      stream: true,
    });
    try {
      yield* jsonMessages<EngineEvent>(res);
    } catch (err) {
      if (opts.signal?.aborted !== true) throw err;
    } finally {
      res.destroy();
    }
  }

  // ---------------------------------------------------------------------------------
  // Images

  /**
   * `POST /build` from a tar of the build context (see `tarBytes`/`tarStream`), with the
   * classic builder. Rejects with DOCKER_BUILD naming the failing step, the daemon's
   * message and the step's last output lines.
   */
  async buildImage(context: Uint8Array | Readable, opts: BuildOptions = {}): Promise<BuildResult> {
    const headers: OutgoingHttpHeaders = { 'Content-Type': 'application/x-tar' };
    if (opts.registryConfig !== undefined) headers['X-Registry-Config'] = encodeAuth(opts.registryConfig);
    let res: IncomingMessage;
    try {
      res = await this.request('POST', '/build', {
        query: {
          t: opts.tags ?? [],
          dockerfile: opts.dockerfile,
          buildargs: opts.buildArgs !== undefined ? JSON.stringify(opts.buildArgs) : undefined,
          labels: opts.labels !== undefined ? JSON.stringify(opts.labels) : undefined,
          nocache: opts.noCache,
          pull: opts.pull,
          networkmode: opts.networkMode,
          target: opts.target,
          rm: true,
          forcerm: true,
        },
        body: context,
        headers,
        signal: opts.signal,
        stream: true,
      });
    } catch (err) {
      // The daemon refuses some builds before the first step (a Dockerfile that does not parse).
      if (err instanceof DockerError && err.code === 'DOCKER_API') throw new DockerError('DOCKER_BUILD', `docker build failed: ${err.message}`, err.status, { cause: err });
      throw err;
    }

    let step: string | undefined;
    let stepOutput: string[] = [];
    let partial = '';
    let id: string | undefined;
    const line = (raw: string): void => {
      // The classic builder colours a RUN step's stderr with ANSI escapes.
      const l = raw.replace(/\x1b\[[0-9;]*m/g, '');
      const m = /^Step \d+\/\d+ : /.exec(l);
      if (m !== null) {
        step = l;
        stepOutput = [];
      } else if (l.trim() !== '' && !/^ ---> /.test(l) && !/^Removing intermediate container /.test(l)) {
        stepOutput.push(l);
        if (stepOutput.length > 20) stepOutput.shift();
      }
      opts.onLine?.(l);
    };
    for await (const m of this.progress(res, opts)) {
      if (m.stream !== undefined) {
        // Lines come in pieces ("Step 2/3 : RUN x", then "\n"): join them before reading them.
        partial += m.stream;
        let nl: number;
        while ((nl = partial.indexOf('\n')) !== -1) {
          line(partial.slice(0, nl).replace(/\r$/, ''));
          partial = partial.slice(nl + 1);
        }
      }
      if (typeof m.aux?.ID === 'string') id = m.aux.ID;
      if (m.error !== undefined || m.errorDetail !== undefined) {
        if (partial !== '') line(partial);
        const msg = (m.errorDetail?.message ?? m.error ?? 'unknown error').trim();
        const where = step !== undefined ? ` at step ${step.replace(/^Step /, '').replace(' : ', ' (')})` : '';
        const tail = stepOutput.slice(-5);
        throw new DockerError('DOCKER_BUILD', `docker build failed${where}: ${msg}${tail.length > 0 ? `; last output: ${tail.join(' | ')}` : ''}`);
      }
    }
    if (partial !== '') line(partial);
    if (id === undefined) {
      // Older daemons report the id only as "Successfully built <short id>".
      const tag = opts.tags?.[0];
      if (tag === undefined) throw new DockerError('DOCKER_BUILD', 'docker build ended without reporting an image id');
      id = (await this.inspectImage(tag)).Id;
    }
    return { id };
  }

  /**
   * `POST /images/create?fromSrc=-`: an image from a tar of a root filesystem
   * (`docker import`). `changes`: Dockerfile instructions to apply (`CMD ["/bin/sh"]`, `ENV K=V`).
   */
  async importImage(rootfs: Uint8Array | Readable, opts: { repository: string; tag?: string; changes?: readonly string[]; message?: string; signal?: AbortSignal }): Promise<string> {
    const res = await this.request('POST', '/images/create', {
      query: { fromSrc: '-', repo: opts.repository, tag: opts.tag ?? 'latest', changes: opts.changes ?? [], message: opts.message },
      body: rootfs,
      headers: { 'Content-Type': 'application/x-tar' },
      signal: opts.signal,
      stream: true,
    });
    let id = '';
    for await (const m of this.progress(res, { signal: opts.signal })) {
      if (m.error !== undefined || m.errorDetail !== undefined) {
        throw new DockerError('DOCKER_API', `docker import of ${opts.repository}:${opts.tag ?? 'latest'} failed: ${m.errorDetail?.message ?? m.error}`);
      }
      if (typeof m.status === 'string' && m.status.startsWith('sha256:')) id = m.status;
    }
    return id;
  }

  /** `POST /images/{name}/tag`: `source` also named `repository:tag`. */
  async tagImage(source: string, repository: string, tag = 'latest'): Promise<void> {
    await this.text('POST', `/images/${encodeURIComponent(source)}/tag`, { query: { repo: repository, tag } });
  }

  /**
   * `POST /images/{name}/push`: pushes `image` (`registry/repo:tag`; every tag of the
   * repository when it has none). Rejects with DOCKER_PUSH naming the image, its registry
   * and the registry's answer (unreachable, refused, unauthorised).
   */
  async pushImage(image: string, opts: StreamOptions & { auth?: RegistryAuth } = {}): Promise<PushResult> {
    const { repository, tag } = parseImageRef(image);
    const fail = (why: string, cause?: unknown): DockerError =>
      new DockerError('DOCKER_PUSH', `cannot push ${image} to registry ${registryOf(image)}: ${why}`, undefined, cause !== undefined ? { cause } : undefined);
    let res: IncomingMessage;
    try {
      res = await this.request('POST', `/images/${encodeURIComponent(repository)}/push`, {
        query: { tag },
        headers: { 'X-Registry-Auth': encodeAuth(opts.auth) },
        signal: opts.signal,
        stream: true,
      });
    } catch (err) {
      if (err instanceof DockerError && err.code === 'DOCKER_API') throw fail(err.message, err);
      throw err;
    }
    let result: PushResult = {};
    for await (const m of this.progress(res, opts)) {
      if (m.error !== undefined || m.errorDetail !== undefined) throw fail((m.errorDetail?.message ?? m.error ?? 'unknown error').trim());
      if (m.aux !== undefined && typeof m.aux.Digest === 'string') result = { digest: m.aux.Digest, ...(typeof m.aux.Size === 'number' ? { size: m.aux.Size } : {}) };
    }
    return result;
  }

  /** `POST /images/create?fromImage=…`: pulls `image` (tag `latest` when it has none). Rejects with DOCKER_PULL. */
  async pullImage(image: string, opts: StreamOptions & { auth?: RegistryAuth; platform?: string } = {}): Promise<void> {
    const { repository, tag, digest } = parseImageRef(image);
    const fail = (why: string, cause?: unknown): DockerError =>
      new DockerError('DOCKER_PULL', `cannot pull ${image} from registry ${registryOf(image)}: ${why}`, undefined, cause !== undefined ? { cause } : undefined);
    let res: IncomingMessage;
    try {
      res = await this.request('POST', '/images/create', {
        query: { fromImage: repository, tag: digest ?? tag ?? 'latest', platform: opts.platform },
        headers: { 'X-Registry-Auth': encodeAuth(opts.auth) },
        signal: opts.signal,
        stream: true,
      });
    } catch (err) {
      if (err instanceof DockerError && err.code === 'DOCKER_API') throw fail(err.message, err);
      throw err;
    }
    for await (const m of this.progress(res, opts)) {
      if (m.error !== undefined || m.errorDetail !== undefined) throw fail((m.errorDetail?.message ?? m.error ?? 'unknown error').trim());
    }
  }

  /** `GET /images/{name}/json`; rejects with a 404 DOCKER_API error when there is no such image (see `isNotFound`). */
  inspectImage(image: string): Promise<ImageInspect> {
    return this.json('GET', `/images/${encodeURIComponent(image)}/json`);
  }

  async imageExists(image: string): Promise<boolean> {
    try {
      await this.inspectImage(image);
      return true;
    } catch (err) {
      if (isNotFound(err)) return false;
      throw err;
    }
  }

  /** `GET /images/json`, optionally only those matching `reference` (`repo`, `repo:tag`, wildcards) or labels. */
  listImages(opts: { reference?: string; labels?: readonly string[] } = {}): Promise<ImageSummary[]> {
    const filters: Record<string, readonly string[]> = {};
    if (opts.reference !== undefined) filters.reference = [opts.reference];
    if (opts.labels !== undefined) filters.label = opts.labels;
    return this.json('GET', '/images/json', { query: { filters: JSON.stringify(filters) } });
  }

  /** `DELETE /images/{name}`: untags it, and deletes its layers when nothing else uses them. */
  async removeImage(image: string, opts: { force?: boolean; noprune?: boolean } = {}): Promise<void> {
    await this.text('DELETE', `/images/${encodeURIComponent(image)}`, { query: { force: opts.force, noprune: opts.noprune } });
  }

  // ---------------------------------------------------------------------------------
  // Containers

  /** `POST /containers/create`. Exposed ports follow from `hostConfig.PortBindings`. */
  async createContainer(spec: ContainerSpec): Promise<{ id: string; warnings: string[] }> {
    const exposed: Record<string, object> = {};
    for (const p of Object.keys(spec.hostConfig?.PortBindings ?? {})) exposed[p] = {};
    const body: Record<string, unknown> = {
      Image: spec.image,
      Cmd: spec.cmd,
      Entrypoint: spec.entrypoint,
      Env: spec.env !== undefined ? Object.entries(spec.env).map(([k, v]) => `${k}=${v}`) : undefined,
      Labels: spec.labels,
      WorkingDir: spec.workingDir,
      User: spec.user,
      Tty: spec.tty ?? false,
      AttachStdout: false,
      AttachStderr: false,
      StopSignal: spec.stopSignal,
      StopTimeout: spec.stopTimeout,
      ExposedPorts: Object.keys(exposed).length > 0 ? exposed : undefined,
      HostConfig: spec.hostConfig ?? {},
      ...spec.extra,
    };
    const r = await this.json<{ Id: string; Warnings: string[] | null }>('POST', '/containers/create', { query: { name: spec.name }, body });
    return { id: r.Id, warnings: r.Warnings ?? [] };
  }

  /** `POST /containers/{id}/start` (a container already running is left as it is). */
  async startContainer(id: string): Promise<void> {
    await this.text('POST', `/containers/${encodeURIComponent(id)}/start`, { okStatus: [304] });
  }

  /**
   * `POST /containers/{id}/wait`: resolves with the exit code once the container stops.
   * Condition `not-running` (default) returns at once for a container that is not
   * running; `next-exit` waits for the next exit; for an AutoRemove container, wait with
   * `removed` *before* starting it.
   */
  async waitContainer(id: string, opts: { condition?: 'not-running' | 'next-exit' | 'removed'; signal?: AbortSignal } = {}): Promise<WaitResult> {
    const res = await this.request('POST', `/containers/${encodeURIComponent(id)}/wait`, { query: { condition: opts.condition }, signal: opts.signal, stream: true });
    const r = JSON.parse(await readText(res)) as { StatusCode: number; Error?: { Message?: string } | null };
    return { exitCode: r.StatusCode, ...(r.Error?.Message ? { error: r.Error.Message } : {}) };
  }

  /** A container's output so far, as text per stream. */
  async logs(id: string, opts: Omit<LogOptions, 'signal'> & { signal?: AbortSignal } = {}): Promise<{ stdout: string; stderr: string }> {
    const out = { stdout: [] as Buffer[], stderr: [] as Buffer[] };
    for await (const f of this.logFrames(id, { ...opts, follow: false })) if (f.stream !== 'stdin') out[f.stream].push(f.data);
    return { stdout: Buffer.concat(out.stdout).toString('utf8'), stderr: Buffer.concat(out.stderr).toString('utf8') };
  }

  /**
   * A container's output as frames (stdout/stderr chunks, not lines), until the container
   * stops or `signal` aborts (the iteration then ends without an error).
   */
  followLogs(id: string, opts: LogOptions = {}): AsyncGenerator<LogFrame> {
    return this.logFrames(id, { ...opts, follow: true });
  }

  private async *logFrames(id: string, opts: LogOptions & { follow: boolean }): AsyncGenerator<LogFrame> {
    const tty = opts.tty ?? (await this.inspectContainer(id)).Config.Tty;
    const res = await this.request('GET', `/containers/${encodeURIComponent(id)}/logs`, {
      query: {
        follow: opts.follow,
        stdout: opts.stdout ?? true,
        stderr: opts.stderr ?? true,
        since: opts.since,
        tail: opts.tail,
        timestamps: opts.timestamps,
      },
      signal: opts.signal,
      stream: true,
    });
    try {
      yield* tty ? rawLogs(res) : demuxLogs(res);
    } catch (err) {
      if (opts.signal?.aborted !== true) throw err;
    } finally {
      res.destroy();
    }
  }

  inspectContainer(id: string): Promise<ContainerInspect> {
    return this.json('GET', `/containers/${encodeURIComponent(id)}/json`);
  }

  /** `POST /containers/{id}/stop`: its stop signal, then SIGKILL after `timeoutSec` (a stopped container is left as it is). */
  async stopContainer(id: string, opts: { timeoutSec?: number } = {}): Promise<void> {
    const t = opts.timeoutSec;
    // The daemon answers after the container stopped: a grace period longer than the call timeout is waited for in full.
    await this.text('POST', `/containers/${encodeURIComponent(id)}/stop`, { query: { t }, okStatus: [304], stream: t !== undefined && t * 1000 + 5_000 > this.timeoutMs });
  }

  /** `POST /containers/{id}/kill` (default SIGKILL); a container that is not running is left as it is. */
  async killContainer(id: string, signal = 'SIGKILL'): Promise<void> {
    try {
      await this.text('POST', `/containers/${encodeURIComponent(id)}/kill`, { query: { signal } });
    } catch (err) {
      if (err instanceof DockerError && err.status === 409) return;
      throw err;
    }
  }

  /** `DELETE /containers/{id}`; with `missingOk`, a container that is already gone is no error. */
  async removeContainer(id: string, opts: { force?: boolean; volumes?: boolean; missingOk?: boolean } = {}): Promise<void> {
    try {
      await this.text('DELETE', `/containers/${encodeURIComponent(id)}`, { query: { force: opts.force, v: opts.volumes } });
    } catch (err) {
      if (opts.missingOk === true && isNotFound(err)) return;
      throw err;
    }
  }

  /**
   * `GET /containers/json`: running containers (all with `all`), optionally only those
   * carrying `labels` (`key` or `key=value`; a record means `key=value` for each entry).
   */
  listContainers(opts: { all?: boolean; labels?: readonly string[] | Readonly<Record<string, string>>; filters?: Readonly<Record<string, readonly string[]>> } = {}): Promise<ContainerSummary[]> {
    const filters: Record<string, readonly string[]> = { ...opts.filters };
    if (opts.labels !== undefined) {
      const labels = Array.isArray(opts.labels) ? (opts.labels as readonly string[]) : Object.entries(opts.labels).map(([k, v]) => `${k}=${v}`);
      filters.label = [...(filters.label ?? []), ...labels];
    }
    return this.json('GET', '/containers/json', { query: { all: opts.all, filters: JSON.stringify(filters) } });
  }

  // ---------------------------------------------------------------------------------
  // Transport

  /** A progress stream's messages, each handed to `onProgress` too. */
  private async *progress(res: IncomingMessage, opts: StreamOptions): AsyncGenerator<ProgressMessage> {
    try {
      for await (const m of jsonMessages<ProgressMessage>(res)) {
        opts.onProgress?.(m);
        yield m;
      }
    } finally {
      res.destroy();
    }
  }

  private async json<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const text = await this.text(method, path, opts);
    try {
      return JSON.parse(text) as T;
    } catch (err) {
      throw new DockerError('DOCKER_API', `${method} ${path}: the daemon's answer is not JSON: ${text.slice(0, 200)}`, undefined, { cause: err });
    }
  }

  private async text(method: string, path: string, opts: RequestOptions = {}): Promise<string> {
    return readText(await this.request(method, path, opts));
  }

  /**
   * One API call: resolves with the response once its status is known and acceptable
   * (2xx or `okStatus`), else rejects with the daemon's message. Calls that are not
   * streams are bounded by `timeoutMs`, response body included.
   */
  private request(method: string, path: string, opts: RequestOptions = {}): Promise<IncomingMessage> {
    const url = `/v${this.apiVersion}${path}${queryString(opts.query)}`;
    const what = `${method} ${path}`;
    const signals: AbortSignal[] = [];
    if (opts.signal !== undefined) signals.push(opts.signal);
    const timeout = opts.stream === true ? undefined : AbortSignal.timeout(this.timeoutMs);
    if (timeout !== undefined) signals.push(timeout);
    const signal = signals.length === 0 ? undefined : signals.length === 1 ? signals[0] : AbortSignal.any(signals);

    const headers: OutgoingHttpHeaders = { Host: 'docker', ...opts.headers };
    let payload: Uint8Array | Readable | undefined;
    const body = opts.body;
    if (body instanceof Readable) payload = body;
    else if (body instanceof Uint8Array) payload = body;
    else if (typeof body === 'string') payload = Buffer.from(body);
    else if (body !== undefined) {
      payload = Buffer.from(JSON.stringify(body));
      headers['Content-Type'] = 'application/json';
    }
    if (payload instanceof Uint8Array) headers['Content-Length'] = payload.byteLength;

    return new Promise<IncomingMessage>((resolve, reject) => {
      let answered = false;
      const req = httpRequest({ ...this.address, method, path: url, headers, agent: false, ...(signal !== undefined ? { signal } : {}) }, (res) => {
        answered = true;
        const status = res.statusCode ?? 0;
        if ((status >= 200 && status < 300) || opts.okStatus?.includes(status) === true) {
          resolve(res);
          return;
        }
        readText(res).then(
          (text) => reject(new DockerError('DOCKER_API', `${what}: ${daemonMessage(text) || `HTTP ${status}`}`, status)),
          (err: unknown) => reject(this.transportError(what, err, timeout)),
        );
      });
      req.on('error', (err) => {
        // After the answer, a request body the daemon stopped reading (EPIPE) is not the call's failure.
        if (!answered) reject(this.transportError(what, err, timeout));
      });
      if (payload instanceof Readable) {
        const source = payload;
        source.on('error', (err) => req.destroy(err));
        // A daemon that answers before reading the whole body (a refused build): stop reading the source's files.
        req.on('close', () => {
          if (!source.readableEnded) source.destroy();
        });
        source.pipe(req);
      } else {
        req.end(payload);
      }
    });
  }

  private transportError(what: string, err: unknown, timeout: AbortSignal | undefined): Error {
    if (timeout?.aborted === true) return new DockerError('DOCKER_TIMEOUT', `${what}: the Docker daemon at ${this.host} did not answer within ${this.timeoutMs} ms`, undefined, { cause: err });
    const code = (err as { code?: unknown }).code;
    if (code === 'ENOENT' || code === 'ECONNREFUSED' || code === 'EACCES' || code === 'ENOTFOUND' || code === 'EHOSTUNREACH') {
      return new DockerError('DOCKER_UNREACHABLE', `cannot reach the Docker daemon at ${this.host}: ${(err as Error).message}`, undefined, { cause: err });
    }
    if (err instanceof Error && err.name === 'AbortError') return err;
    return new DockerError('DOCKER_API', `${what}: ${(err as Error).message}`, undefined, { cause: err });
  }
}

function parseHost(host: string): Address {
  if (host.startsWith('unix://')) return { socketPath: host.slice('unix://'.length) };
  if (host.startsWith('/')) return { socketPath: host };
  const m = /^(?:tcp|http):\/\/\[?([^\]/]+?)\]?:(\d+)\/?$/.exec(host);
  if (m !== null) return { host: m[1]!, port: Number(m[2]) };
  throw new DockerError('DOCKER_UNREACHABLE', `unsupported Docker host ${JSON.stringify(host)} (expected unix:///path or tcp://host:port)`);
}

function queryString(q: Query | undefined): string {
  if (q === undefined) return '';
  const p = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) {
    if (v === undefined) continue;
    if (Array.isArray(v)) for (const item of v as readonly string[]) p.append(k, item);
    else p.append(k, typeof v === 'boolean' ? (v ? '1' : '0') : String(v));
  }
  const s = p.toString();
  return s === '' ? '' : `?${s}`;
}

/** The `message` of the daemon's JSON error body, else the body itself. */
function daemonMessage(text: string): string {
  try {
    const o = JSON.parse(text) as { message?: unknown };
    if (typeof o.message === 'string') return o.message.trim();
  } catch {
    // not JSON
  }
  return text.trim().slice(0, 500);
}

async function readText(res: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}
