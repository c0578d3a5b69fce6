/**
 * DockerStorage: the flow's code built into a Docker image at registration, pushed to a
 * registry when one is named; the flow-run container loads it from a fixed path inside
 * the image (Prefect 1's `Docker` storage).
 *
 * What goes into the image: one file, the flow file's bundle as every storage that ships
 * code makes it (`bundleFlow`: the flow module and everything it imports except weft, its
 * exports kept, no source map), at `/opt/weft/flows/<flow slug>/<bundle sha256>.mjs`.
 * That file *is* the flow's module inside the container: its `task()` calls key the tasks
 * by its own URL, and `spec().modules` names it, so the threads or processes of a
 * PoolExecutor import it from there. (A source map would make the stack frames, and so
 * the task keys, name the files on the machine that registered the flow, which the
 * container does not have: pool workers could not import them.)
 *
 * weft is not copied into the image. The bundle's imports of weft's own files are linked
 * at build time to `weftPath` (default: this installation's absolute path), so the
 * container must have weft there: installed in the base image at that path, or, as the
 * docker agent does on one machine, this installation bind-mounted read-only at the same
 * path. The base image must have `node` (and weft's dependencies, under `weftPath`).
 *
 * The tag defaults to a hash of the build context (Dockerfile and bundle), so the same
 * code gives the same image name and a change gives a new one.
 */
import { createHash } from 'node:crypto';
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { linkBundle } from '../cluster/bundle.ts';
import { DockerEngine, type DockerEngineOptions, type RegistryAuth } from '../docker/engine.ts';
import { tarBytes } from '../docker/tar.ts';
import { WeftError } from '../errors.ts';
import { bundleFlow } from './bundler.ts';
import type { BuildContext, LoadedCode, Storage, StorageRef } from './types.ts';

export type DockerRef = Extract<StorageRef, { kind: 'docker' }>;

/** Where flow bundles live inside an image. */
export const IMAGE_BUNDLE_DIR = '/opt/weft/flows';
/** This installation's root, without a trailing slash: the default `weftPath`. */
export const WEFT_INSTALL_PATH = fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '');

export interface DockerStorageOptions {
  /** Registry to push to, `host[:port]` (e.g. `127.0.0.1:5000`); without one the image stays on the daemon that built it. */
  readonly registry?: string;
  /** Repository name without the registry (default `weft/<flow slug>`). */
  readonly imageName?: string;
  /** Tag (default: the first 16 hex digits of the sha256 of the build context). */
  readonly imageTag?: string;
  /** Image to build FROM; it must have `node`, and weft at `weftPath` unless the agent mounts it (default `node:<this node's major>-slim`). */
  readonly baseImage?: string;
  /** Absolute path of weft inside the container (default: this installation's path, see the module comment). */
  readonly weftPath?: string;
  /** Environment variables set in the image. */
  readonly env?: Readonly<Record<string, string>>;
  /** Docker labels on the image, besides the `weft.*` ones. */
  readonly imageLabels?: Readonly<Record<string, string>>;
  /** Dockerfile instructions appended to the generated ones (`RUN …`; the context holds only the bundle). */
  readonly extraCommands?: readonly string[];
  /** The daemon that builds (and pushes): a client, or options for one (default: `$DOCKER_HOST`). */
  readonly engine?: DockerEngine | DockerEngineOptions;
  /** Credentials for the registry. */
  readonly registryAuth?: RegistryAuth;
}

export interface DockerfileInput {
  readonly baseImage: string;
  readonly flowName: string;
  /** Absolute path of the bundle inside the image. */
  readonly bundlePath: string;
  /** sha256 of the bundle. */
  readonly bundleHash: string;
  readonly weftPath: string;
  readonly env?: Readonly<Record<string, string>>;
  readonly imageLabels?: Readonly<Record<string, string>>;
  readonly extraCommands?: readonly string[];
}

/** Name of the bundle file in the build context. */
const CONTEXT_BUNDLE = 'flow.mjs';

/** The Dockerfile DockerStorage builds from: the base, the bundle, ENV and LABELs naming the flow. */
export function dockerfileFor(d: DockerfileInput): string {
  const env: Record<string, string> = { WEFT_FLOW_NAME: d.flowName, WEFT_FLOW_PATH: d.bundlePath, WEFT_PATH: d.weftPath, ...d.env };
  const labels: Record<string, string> = { ...d.imageLabels, 'weft.flow': d.flowName, 'weft.bundle': d.bundleHash, 'weft.flow-path': d.bundlePath };
  const pairs = (o: Record<string, string>): string =>
    Object.entries(o)
      .map(([k, v]) => `${checkKey(k)}=${quote(v)}`)
      .join(' \\\n    ');
  const lines = [
    `# Built by weft's DockerStorage for flow ${quote(d.flowName)}.`,
    `FROM ${checkImage(d.baseImage)}`,
    `COPY ${CONTEXT_BUNDLE} ${d.bundlePath}`,
    `ENV ${pairs(env)}`,
    `LABEL ${pairs(labels)}`,
    ...(d.extraCommands ?? []).map((c) => {
      if (/[\r\n]/.test(c)) throw new TypeError(`DockerStorage: an extra Dockerfile command must be one line: ${JSON.stringify(c)}`);
      return c;
    }),
  ];
  return lines.join('\n') + '\n';
}

/** A Dockerfile double-quoted word: backslash, quote and `$` (variable expansion) escaped. */
function quote(s: string): string {
  if (/[\r\n]/.test(s)) throw new TypeError(`DockerStorage: ${JSON.stringify(s)} has a line break; Dockerfile values must be one line`);
  return `"${s.replace(/[\\"$]/g, '\\$&')}"`;
}

function checkKey(k: string): string {
  if (!/^[A-Za-z_][\w.-]*$/.test(k)) throw new TypeError(`DockerStorage: ${JSON.stringify(k)} is not a valid ENV or LABEL name`);
  return k;
}

function checkImage(ref: string): string {
  if (!/^[\w.:/@-]+$/.test(ref)) throw new TypeError(`DockerStorage: ${JSON.stringify(ref)} is not an image reference`);
  return ref;
}

/** A flow name as a repository path component: lowercase letters, digits and single dashes. */
export function flowSlug(name: string): string {
  const s = name
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, '-')
    .replace(/^-+|-+$/g, '')
    .slice(0, 64)
    .replace(/-+$/, '');
  return s === '' ? 'flow' : s;
}

// Docker's reference grammar: path components of [a-z0-9] separated by `.`, `_`, `__` or dashes; tags of [\w.-].
const REPO_RE = /^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:\/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*$/;
const TAG_RE = /^\w[\w.-]{0,127}$/;
const REGISTRY_RE = /^[A-Za-z0-9.-]+(?::\d+)?$/;

/** The code a DockerStorage image carries: the bundle, its weft imports linked to the weft at `weftPath` in the image. */
export function imageModule(code: Uint8Array, weftPath: string): string {
  return linkBundle(code, pathToFileURL(weftPath.replace(/\/?$/, '/')).href);
}

export class DockerStorage implements Storage {
  readonly kind = 'docker' as const;
  private readonly opts: DockerStorageOptions;
  private engine: DockerEngine | undefined;

  constructor(opts: DockerStorageOptions = {}) {
    if (opts.registry !== undefined && !REGISTRY_RE.test(opts.registry)) throw new TypeError(`DockerStorage: registry ${JSON.stringify(opts.registry)} is not host[:port]`);
    if (opts.imageName !== undefined && !REPO_RE.test(opts.imageName)) {
      throw new TypeError(`DockerStorage: image name ${JSON.stringify(opts.imageName)} is not a valid repository name (lowercase letters, digits, separators . _ -, slashes)`);
    }
    if (opts.imageTag !== undefined && !TAG_RE.test(opts.imageTag)) throw new TypeError(`DockerStorage: image tag ${JSON.stringify(opts.imageTag)} is not a valid tag`);
    if (opts.weftPath !== undefined && !opts.weftPath.startsWith('/')) throw new TypeError(`DockerStorage: weftPath must be an absolute path, got ${JSON.stringify(opts.weftPath)}`);
    this.opts = opts;
    if (opts.engine instanceof DockerEngine) this.engine = opts.engine;
  }

  private client(): DockerEngine {
    this.engine ??= new DockerEngine(this.opts.engine as DockerEngineOptions | undefined);
    return this.engine;
  }

  /** Bundle the flow, build its image, push it when a registry is set. */
  async build(ctx: BuildContext): Promise<DockerRef> {
    const log = ctx.log ?? (() => undefined);
    const flowFile = resolve(ctx.flowFile);
    try {
      if (!(await stat(flowFile)).isFile()) throw new Error('not a file');
    } catch (err) {
      throw new WeftError('STORAGE_BUILD', `DockerStorage: cannot read flow file ${flowFile}: ${(err as Error).message}`, { cause: err });
    }
    const bundle = await bundleFlow(flowFile);
    const weftPath = this.opts.weftPath ?? WEFT_INSTALL_PATH;
    const slug = flowSlug(ctx.flowName);
    const bundlePath = `${IMAGE_BUNDLE_DIR}/${slug}/${bundle.hash}.mjs`;
    const dockerfile = dockerfileFor({
      baseImage: this.opts.baseImage ?? `node:${process.versions.node.split('.')[0]}-slim`,
      flowName: ctx.flowName,
      bundlePath,
      bundleHash: bundle.hash,
      weftPath,
      ...(this.opts.env !== undefined ? { env: this.opts.env } : {}),
      ...(this.opts.imageLabels !== undefined ? { imageLabels: this.opts.imageLabels } : {}),
      ...(this.opts.extraCommands !== undefined ? { extraCommands: this.opts.extraCommands } : {}),
    });
    const context = tarBytes([
      { type: 'file', name: 'Dockerfile', data: dockerfile },
      { type: 'file', name: CONTEXT_BUNDLE, data: imageModule(bundle.code, weftPath) },
    ]);
    const tag = this.opts.imageTag ?? createHash('sha256').update(context).digest('hex').slice(0, 16);
    const repository = (this.opts.registry !== undefined ? `${this.opts.registry}/` : '') + (this.opts.imageName ?? `weft/${slug}`);
    const image = `${repository}:${tag}`;
    const engine = this.client();

    log(`building image ${image} for flow ${ctx.flowName} (FROM ${this.opts.baseImage ?? 'node'}, bundle ${bundle.hash.slice(0, 12)})`);
    const { id } = await engine.buildImage(context, { tags: [image], onLine: (l) => log(l) });
    if (this.opts.registry !== undefined) {
      log(`pushing ${image}`);
      const pushed = await engine.pushImage(image, this.opts.registryAuth !== undefined ? { auth: this.opts.registryAuth } : {});
      log(`pushed ${image}${pushed.digest !== undefined ? ` (${pushed.digest})` : ''}`);
    } else {
      log(`built ${image} (${id.slice(0, 19)}); no registry: only this daemon has it`);
    }
    return { kind: 'docker', image, path: bundlePath, flow: ctx.flowName };
  }

  /** Any docker agent can run it: the image carries the code. */
  labels(_ref: StorageRef): readonly string[] {
    return [];
  }
}

/**
 * The flow-run process's side, inside the container: the module is the file at
 * `ref.path` (its tasks are keyed by that path, which pool workers in the container
 * import too). Fails clearly when that file is missing (the process is not running in
 * the flow's image).
 */
export async function loadDockerCode(ref: DockerRef): Promise<LoadedCode> {
  try {
    await stat(ref.path);
  } catch {
    throw new WeftError('STORAGE_LOAD', `flow ${ref.flow}: ${ref.path} is not here; this process must run in image ${ref.image}`);
  }
  return { module: ref.path, flow: ref.flow, cleanup: async () => undefined };
}
