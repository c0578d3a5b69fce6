/**
 * `storageFromSpec`: a Storage from its one-string form (`weft register --storage ...`).
 *
 *   local                                   the flow file where it is (runs only on this host)
 *   local:<directory>                       a bundled copy kept in <directory>/<flow>/<sha256>.mjs
 *                                           (`~/` is the home directory; runs only on this host)
 *   module:<specifier>[?cwd=<directory>]    an installed package's module, resolved from <directory>
 *                                           (default: the flow-run process's working directory)
 *   bundle                                  a bundle kept by the weft server
 *   s3://<bucket>[/<prefix>][?<option>=<value>[&...]]
 *                                           a bundle in an S3 bucket; options: endpoint=<url>,
 *                                           region=<name>, forcePathStyle=true|false,
 *                                           createBucket=true|false (URL-encode values with & or #)
 *   git+<url>#<ref>[:<path>]                a file in a git repository at a branch, tag or commit;
 *                                           <path> inside the repository, default the flow file's
 *                                           path in the checkout it is in (a ref never has a `:`)
 *   docker[:<registry>]                     an image built by the Docker Engine, pushed to
 *                                           <registry> (host[:port]) when given
 *
 * Examples: `local:~/.weft/flows`, `module:@acme/flows/etl?cwd=/srv/app`,
 * `s3://flows/prod?endpoint=http://127.0.0.1:7480&region=us-east-1`,
 * `git+https://github.com/acme/flows.git#v1.2:flows/etl.ts`, `git+file:///srv/repos/flows.git#main`.
 * A malformed spec is a StorageError STORAGE_INVALID that shows the expected form.
 */
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { BundleStorage } from './bundle.ts';
import { StorageError } from './common.ts';
import { GitStorage } from './git.ts';
import { LocalStorage } from './local.ts';
import { ModuleStorage } from './module.ts';
import { S3Storage } from './s3.ts';
import type { BuildContext, S3Credentials, Storage, StorageRef } from './types.ts';

export interface StorageSpecOptions {
  /** Base of relative directories in the spec (default: the process's working directory). */
  readonly cwd?: string;
  readonly s3?: { readonly credentials?: S3Credentials };
  readonly git?: { readonly depth?: number; readonly pin?: boolean };
}

export const STORAGE_SPEC_FORMS =
  'local, local:<directory>, module:<specifier>[?cwd=<dir>], bundle, s3://<bucket>[/<prefix>][?endpoint=<url>&region=<r>], git+<url>#<ref>[:<path>], docker[:<registry>]';

export function storageFromSpec(spec: string, opts: StorageSpecOptions = {}): Storage {
  const bad = (why: string): StorageError => new StorageError('STORAGE_INVALID', `storage "${spec}": ${why}`);
  if (typeof spec !== 'string' || spec.trim() === '') throw new StorageError('STORAGE_INVALID', `storage: empty spec (one of ${STORAGE_SPEC_FORMS})`);
  const s = spec.trim();
  const base = opts.cwd ?? process.cwd();

  if (s === 'local') return new LocalStorage();
  if (s.startsWith('local:')) {
    const dir = s.slice('local:'.length);
    if (dir === '') throw bad('expected local:<directory>');
    return new LocalStorage({ directory: expandHome(dir, base) });
  }

  if (s === 'bundle') return new BundleStorage();

  if (s.startsWith('module:')) {
    const rest = s.slice('module:'.length);
    const q = rest.indexOf('?');
    const specifier = q < 0 ? rest : rest.slice(0, q);
    if (specifier === '') throw bad('expected module:<specifier>[?cwd=<directory>]');
    let cwd: string | undefined;
    if (q >= 0) {
      const params = new URLSearchParams(rest.slice(q + 1));
      for (const k of params.keys()) if (k !== 'cwd') throw bad(`unknown option "${k}" (module storage takes cwd)`);
      const c = params.get('cwd');
      if (c === null || c === '') throw bad('cwd=<directory> needs a directory');
      cwd = expandHome(c, base);
    }
    return new ModuleStorage({ specifier, ...(cwd !== undefined ? { cwd } : {}) });
  }

  if (s.startsWith('s3://')) return s3FromSpec(s, opts, bad);

  if (s.startsWith('git+')) {
    const rest = s.slice('git+'.length);
    const hash = rest.indexOf('#');
    if (hash <= 0) throw bad('expected git+<url>#<ref>[:<path>]');
    const url = rest.slice(0, hash);
    const after = rest.slice(hash + 1);
    const colon = after.indexOf(':');
    const ref = colon < 0 ? after : after.slice(0, colon);
    const path = colon < 0 ? undefined : after.slice(colon + 1);
    if (ref === '') throw bad('expected a branch, tag or commit after #');
    if (path === '') throw bad('expected a path after the ref\'s ":"');
    return new GitStorage({
      url,
      ref,
      ...(path !== undefined ? { path } : {}),
      ...(opts.git?.depth !== undefined ? { depth: opts.git.depth } : {}),
      ...(opts.git?.pin !== undefined ? { pin: opts.git.pin } : {}),
    });
  }

  if (s === 'docker') return new DockerSpecStorage(undefined);
  if (s.startsWith('docker:')) {
    const registry = s.slice('docker:'.length);
    if (!/^[A-Za-z0-9.-]+(?::\d+)?$/.test(registry)) throw bad('expected docker[:<registry host[:port]>]');
    return new DockerSpecStorage(registry);
  }

  throw bad(`unknown storage (expected one of ${STORAGE_SPEC_FORMS})`);
}

function s3FromSpec(s: string, opts: StorageSpecOptions, bad: (why: string) => StorageError): Storage {
  const rest = s.slice('s3://'.length);
  const q = rest.indexOf('?');
  const path = q < 0 ? rest : rest.slice(0, q);
  const slash = path.indexOf('/');
  const bucket = slash < 0 ? path : path.slice(0, slash);
  const prefix = slash < 0 ? '' : path.slice(slash + 1);
  if (bucket === '') throw bad('expected s3://<bucket>[/<prefix>]');
  const o: { endpoint?: string; region?: string; forcePathStyle?: boolean; createBucket?: boolean } = {};
  if (q >= 0) {
    const params = new URLSearchParams(rest.slice(q + 1));
    for (const [k, v] of params) {
      if (k === 'endpoint' || k === 'region') {
        if (v === '') throw bad(`${k}= needs a value`);
        o[k] = v;
      } else if (k === 'forcePathStyle' || k === 'createBucket') {
        if (v !== 'true' && v !== 'false') throw bad(`${k} must be true or false, not "${v}"`);
        o[k] = v === 'true';
      } else {
        throw bad(`unknown option "${k}" (s3 storage takes endpoint, region, forcePathStyle, createBucket)`);
      }
    }
  }
  return new S3Storage({ bucket, prefix, ...o, ...(opts.s3?.credentials !== undefined ? { credentials: opts.s3.credentials } : {}) });
}

function expandHome(p: string, base: string): string {
  if (p === '~') return homedir();
  if (p.startsWith('~/')) return join(homedir(), p.slice(2));
  return resolve(base, p);
}

/**
 * `docker[:<registry>]`: the docker storage builds an image through the Docker Engine; its
 * module (and the engine client) is loaded only when a docker storage is built.
 */
class DockerSpecStorage implements Storage {
  readonly kind = 'docker' as const;
  #inner: Storage | null = null;

  constructor(private readonly registry: string | undefined) {}

  async build(ctx: BuildContext): Promise<StorageRef> {
    if (this.#inner === null) {
      const { DockerStorage } = await import('./docker.ts');
      this.#inner = new DockerStorage(this.registry !== undefined ? { registry: this.registry } : {});
    }
    return this.#inner.build(ctx);
  }

  labels(ref: StorageRef): readonly string[] {
    return this.#inner?.labels(ref) ?? [];
  }
}
