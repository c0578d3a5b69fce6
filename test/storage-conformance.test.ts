/**
 * Storage conformance: for every kind, build → ref → JSON round trip → load in a fresh
 * Node process (`fixtures/storage/load-ref.ts`, as a flow-run process would) → the same
 * graph as the flow file has here, and a run of it that succeeds there.
 *
 * "The same graph" is `graphShape` (`fixtures/storage/shape.ts`): node keys and kinds,
 * task names, argument bindings and constants, ordering edges, mapping, parameters,
 * reference tasks, task options. Module URLs are compared separately, by what they must
 * be: the original files for local and module storage, the one file the loader wrote for
 * the bundled kinds (bundle, s3, git, a kept local copy).
 *
 * Real services: a Ceph RADOS Gateway (`helpers/rgw.ts`, started at once and awaited by
 * the S3 tests only, so it boots while the others run), a bare git repository served by
 * `file://` URL (`helpers/git-repo.ts`) and the weft server (SQLite) for BundleStorage. The bad-input cases that need those services are here too:
 * a missing bucket or object, a wrong secret, an unknown access key, tampered bytes, an
 * unknown git ref or commit, a missing file, an unreachable repository. Docker storage
 * runs against a real dockerd (`helpers/dockerd.ts`): the loader runs in a container from
 * the image, with this checkout bind-mounted at its own path (as the docker agent does).
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { CreateBucketCommand, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildBundle } from '../src/cluster/bundle.ts';
import type { Flow } from '../src/flow/flow.ts';
import { BackendClient } from '../src/server/client.ts';
import { startServer } from '../src/server/index.ts';
import {
  bundleStorage,
  gitStorage,
  loadFromStorage,
  localStorage,
  moduleStorage,
  s3Storage,
  storageFromSpec,
  type BuildContext,
  type StorageRef,
} from '../src/storage/index.ts';
import { graphShape } from './fixtures/storage/shape.ts';
import { DockerStorage } from '../src/storage/docker.ts';
import { dockerUnavailable, IMAGES, startDockerd, weftBind, type TestDockerd } from './helpers/dockerd.ts';
import { GitRepo } from './helpers/git-repo.ts';
import { freePort, startRgw, type Rgw } from './helpers/rgw.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const FIXTURES = join(ROOT, 'test', 'fixtures', 'storage');
const FLOW_FILE = join(FIXTURES, 'flows', 'etl.ts');
const NEXT_FILE = join(FIXTURES, 'flows', 'etl-next.ts');
const STEPS_FILE = join(FIXTURES, 'flows', 'lib', 'steps.ts');
const LOAD_SCRIPT = join(FIXTURES, 'load-ref.ts');
const TSX = pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href;
const FLOW = 'storage-etl';
/** What the fixture flows compute with their default parameters. */
const V1_OUT = 'fast: 70';
const NEXT_OUT = 'next: 194';

let tmp = '';
let v1Shape: unknown;
let nextShape: unknown;
let rgwP: Promise<Rgw>;
let rgw: Rgw | null = null;
let repo: GitRepo;
let shaV1 = '';
let shaNext = '';
/** A directory whose node_modules has the fixture package and a `weft` link to this installation. */
let appDir = '';

const ctx = (flowFile = FLOW_FILE, extra: Partial<BuildContext> = {}): BuildContext => ({ flowFile, flowName: FLOW, ...extra });
const roundTrip = (ref: StorageRef): StorageRef => JSON.parse(JSON.stringify(ref)) as StorageRef;

interface ChildResult {
  module?: string;
  shape?: unknown;
  modules?: string[];
  state?: string;
  message?: string;
  out?: unknown;
  error?: string;
}

/** Load `ref` in a fresh `node` (tsx registered as the CLI does) and read its one JSON line. */
function loadInChild(
  ref: StorageRef,
  o: { server?: string; executor?: 'local' | 'pool'; env?: Record<string, string>; cwd?: string } = {},
): Promise<ChildResult & { code: number | null; stderr: string }> {
  const input = JSON.stringify({ ref: roundTrip(ref), workDir: join(tmp, 'work'), ...(o.server !== undefined ? { server: o.server } : {}), ...(o.executor !== undefined ? { executor: o.executor } : {}) });
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['--import', TSX, LOAD_SCRIPT, input], {
      cwd: o.cwd ?? ROOT,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, NO_COLOR: '1', ...o.env },
    });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => process.kill(child.pid!, 'SIGKILL'), 45_000);
    child.once('error', reject);
    child.once('close', (code) => {
      clearTimeout(timer);
      const line = stdout.trim().split('\n').pop() ?? '';
      try {
        resolve({ ...(JSON.parse(line) as ChildResult), code, stderr });
      } catch {
        reject(new Error(`the loader printed no JSON (exit ${code}): ${stdout}\n${stderr}`));
      }
    });
  });
}

async function expectConforms(r: ChildResult & { code: number | null; stderr: string }, shape: unknown, out: string): Promise<void> {
  expect(r.error, r.stderr).toBeUndefined();
  expect(r.code).toBe(0);
  expect(r.shape).toEqual(shape);
  expect({ state: r.state, out: r.out }).toEqual({ state: 'Success', out });
}

function bundledModules(r: ChildResult): void {
  // Every task comes from the one file the loader wrote, which the process could import.
  expect(r.modules).toEqual([pathToFileURL(r.module!).href]);
}

beforeAll(async () => {
  rgwP = startRgw();
  rgwP.then(
    (r) => (rgw = r),
    () => undefined,
  );
  tmp = await mkdtemp(join(tmpdir(), 'weft-storage-'));
  v1Shape = graphShape(((await import(FLOW_FILE)) as { default: Flow }).default.spec());
  nextShape = graphShape(((await import(NEXT_FILE)) as { default: Flow }).default.spec());

  const [etl, next, steps] = await Promise.all([readFile(FLOW_FILE, 'utf8'), readFile(NEXT_FILE, 'utf8'), readFile(STEPS_FILE, 'utf8')]);
  repo = await GitRepo.create();
  shaV1 = await repo.commit({ 'flows/etl.ts': etl, 'flows/lib/steps.ts': steps, 'README.md': 'flows\n' }, 'v1');
  await repo.tag('v1');
  await repo.branch('stable');
  shaNext = await repo.commit({ 'flows/etl.ts': next }, 'next');
  await repo.push();

  appDir = join(tmp, 'app');
  const pkg = join(appDir, 'node_modules', '@weft-fixture', 'flows');
  await mkdir(join(pkg, 'lib'), { recursive: true });
  await writeFile(join(pkg, 'package.json'), JSON.stringify({ name: '@weft-fixture/flows', type: 'module', exports: { './etl': './etl.ts' } }));
  await writeFile(join(pkg, 'etl.ts'), etl);
  await writeFile(join(pkg, 'lib', 'steps.ts'), steps);
  await symlink(ROOT, join(appDir, 'node_modules', 'weft'), 'dir');
});

afterAll(async () => {
  await rgwP?.catch(() => undefined);
  await rgw?.stop();
  await repo?.remove();
  if (tmp !== '') await rm(tmp, { recursive: true, force: true });
});

describe('local storage', () => {
  it('names the flow file on this host; a fresh process imports it and gets the same graph', async () => {
    const s = localStorage();
    const ref = await s.build(ctx());
    expect(ref).toEqual({ kind: 'local', path: FLOW_FILE, host: hostname(), flow: FLOW });
    expect(s.labels(ref)).toEqual([`host:${hostname()}`]);
    const r = await loadInChild(ref);
    await expectConforms(r, v1Shape, V1_OUT);
    expect(r.module).toBe(FLOW_FILE);
    // The tasks are defined in the flow file's relative import (the flow file has only inline nodes of its own).
    expect(r.modules).toEqual([pathToFileURL(STEPS_FILE).href]);
  });

  it('with a directory keeps a bundled copy that later edits do not change, and runs it on a pool', async () => {
    // A flow of its own to edit: the fixture files, next to a `weft` link to this installation.
    const src = join(tmp, 'editable');
    await mkdir(join(src, 'flows', 'lib'), { recursive: true });
    await mkdir(join(src, 'node_modules'));
    await symlink(ROOT, join(src, 'node_modules', 'weft'), 'dir');
    await writeFile(join(src, 'package.json'), '{"type":"module"}');
    await writeFile(join(src, 'flows', 'etl.ts'), await readFile(FLOW_FILE, 'utf8'));
    await writeFile(join(src, 'flows', 'lib', 'steps.ts'), await readFile(STEPS_FILE, 'utf8'));
    const dir = join(tmp, 'kept');
    const ref = await localStorage({ directory: dir }).build(ctx(join(src, 'flows', 'etl.ts')));
    if (ref.kind !== 'local' || ref.hash === undefined) throw new Error('not a kept local ref');
    expect(ref.path).toBe(join(dir, FLOW, `${ref.hash}.mjs`));
    await writeFile(join(src, 'flows', 'etl.ts'), await readFile(NEXT_FILE, 'utf8'));
    const r = await loadInChild(ref, { executor: 'pool' });
    await expectConforms(r, v1Shape, V1_OUT);
    bundledModules(r);
    expect(existsSync(r.module!)).toBe(false); // the load's copy was cleaned up
    expect(existsSync(ref.path)).toBe(true); // the kept one stays
  });
});

describe('module storage', () => {
  it('resolves an installed package from its cwd; a fresh process gets the same graph', async () => {
    const ref = await moduleStorage({ specifier: '@weft-fixture/flows/etl', cwd: appDir }).build(ctx());
    expect(ref).toEqual({ kind: 'module', specifier: '@weft-fixture/flows/etl', cwd: appDir, flow: FLOW });
    const r = await loadInChild(ref);
    await expectConforms(r, v1Shape, V1_OUT);
    expect(r.module).toBe(join(appDir, 'node_modules', '@weft-fixture', 'flows', 'etl.ts'));
  });

  it('without a cwd resolves from the flow-run process\'s working directory', async () => {
    const ref = storageFromSpec('module:@weft-fixture/flows/etl');
    const built = await ref.build(ctx());
    expect(built).toEqual({ kind: 'module', specifier: '@weft-fixture/flows/etl', flow: FLOW });
    const r = await loadInChild(built, { cwd: appDir });
    await expectConforms(r, v1Shape, V1_OUT);
    const elsewhere = await loadInChild(built, { cwd: tmp });
    expect(elsewhere.error).toMatch(/^module storage: cannot resolve "@weft-fixture\/flows\/etl" from .*: Could not resolve/);
  });
});

describe('git storage', () => {
  it('a tag pins its (peeled) commit; a fresh process fetches it, bundles it and gets the same graph', async () => {
    const ref = await gitStorage({ url: repo.url, ref: 'v1', path: 'flows/etl.ts' }).build(ctx());
    expect(ref).toEqual({ kind: 'git', url: repo.url, ref: 'v1', path: 'flows/etl.ts', commit: shaV1, flow: FLOW });
    const r = await loadInChild(ref, { executor: 'pool' });
    await expectConforms(r, v1Shape, V1_OUT);
    bundledModules(r);
  });

  it('a branch, and a commit by sha, from the CLI form', async () => {
    const branch = await storageFromSpec(`git+${repo.url}#main:flows/etl.ts`).build(ctx(NEXT_FILE));
    expect(branch).toMatchObject({ kind: 'git', ref: 'main', commit: shaNext });
    const bySha = await storageFromSpec(`git+${repo.url}#${shaV1}:flows/etl.ts`).build(ctx());
    expect(bySha).toMatchObject({ kind: 'git', ref: shaV1, commit: shaV1 });
    const [a, b] = await Promise.all([loadInChild(branch), loadInChild(bySha)]);
    await expectConforms(a, nextShape, NEXT_OUT);
    await expectConforms(b, v1Shape, V1_OUT);
  });

  it('a pinned branch loads the registered commit after the branch moves on; pin: false follows it', async () => {
    const other = await GitRepo.create();
    try {
      const [etl, next, steps] = await Promise.all([readFile(FLOW_FILE, 'utf8'), readFile(NEXT_FILE, 'utf8'), readFile(STEPS_FILE, 'utf8')]);
      await other.commit({ 'flows/etl.ts': etl, 'flows/lib/steps.ts': steps }, 'one');
      await other.push();
      const pinned = await gitStorage({ url: other.url, ref: 'main', path: 'flows/etl.ts' }).build(ctx());
      const floating = await gitStorage({ url: other.url, ref: 'main', path: 'flows/etl.ts', pin: false }).build(ctx());
      expect(floating).not.toHaveProperty('commit');
      await other.commit({ 'flows/etl.ts': next }, 'two');
      await other.push();
      const [p, f] = await Promise.all([loadInChild(pinned), loadInChild(floating)]);
      await expectConforms(p, v1Shape, V1_OUT);
      await expectConforms(f, nextShape, NEXT_OUT);
    } finally {
      await other.remove();
    }
  });

  it('the path defaults to the flow file\'s place in its checkout', async () => {
    const ref = await gitStorage({ url: repo.url, ref: 'stable' }).build(ctx(join(repo.work, 'flows', 'etl.ts')));
    expect(ref).toMatchObject({ path: 'flows/etl.ts', commit: shaV1 });
  });

  it('bad input: unknown ref or commit, missing file, unreachable repository, a flow that does not compile', async () => {
    await expect(gitStorage({ url: repo.url, ref: 'nope', path: 'flows/etl.ts' }).build(ctx())).rejects.toThrow(
      `git storage: there is no branch or tag "nope" in ${repo.url}`,
    );
    const work = join(tmp, 'work-bad');
    const base = { kind: 'git', url: repo.url, path: 'flows/etl.ts', flow: FLOW } as const;
    await expect(loadFromStorage({ ...base, ref: 'nope' }, { workDir: work })).rejects.toThrow(/^git storage: .*#nope: there is no branch or tag "nope" in file:/);
    await expect(loadFromStorage({ ...base, ref: 'a'.repeat(40) }, { workDir: work })).rejects.toThrow(/there is no commit a{40} in file:/);
    await expect(loadFromStorage({ ...base, ref: 'v1', path: 'flows/missing.ts' }, { workDir: work })).rejects.toThrow(
      new RegExp(`^git storage: there is no file flows/missing.ts in ${repo.url} at v1 \\(commit ${shaV1.slice(0, 12)}\\)$`),
    );
    const gone = pathToFileURL(join(tmp, 'no-such-repo.git')).href;
    await expect(loadFromStorage({ ...base, url: gone, ref: 'main' }, { workDir: work })).rejects.toThrow(/^git storage: .*: cannot reach the repository file:.*no-such-repo\.git: .*does not appear to be a git repository/);
    // Registering against a repository this machine cannot reach only warns (the agents may reach it).
    const log: string[] = [];
    const ref = await gitStorage({ url: gone, ref: 'main', path: 'flows/etl.ts' }).build(ctx(FLOW_FILE, { log: (l) => log.push(l) }));
    expect(ref).not.toHaveProperty('commit');
    expect(log.join('\n')).toMatch(/warning: .*cannot reach the repository/);

    await repo.commit({ 'flows/broken.ts': 'import { flow } from "weft";\nexport default flow("broken", () => { return ;;; ) });\n' }, 'broken');
    await repo.push();
    await expect(loadFromStorage({ ...base, ref: 'main', path: 'flows/broken.ts' }, { workDir: work })).rejects.toThrow(/^git storage: cannot compile flows\/broken\.ts of .*#main: flows\/broken\.ts:2: /);
    // Every failed load removed what it made.
    expect(existsSync(work) ? await readdirOf(work) : []).toEqual([]);
  });
});

async function readdirOf(dir: string): Promise<string[]> {
  const { readdir } = await import('node:fs/promises');
  return readdir(dir);
}

describe('bundle storage (weft server)', () => {
  it('uploads the bundle to the weft server; a fresh process fetches, verifies and links it', async () => {
    const server = await startServer({ db: `sqlite:${join(tmp, 'server.db')}`, port: 0, services: false });
    try {
      const backend = new BackendClient(server.url);
      const ref = await bundleStorage().build(ctx(FLOW_FILE, { backend }));
      expect(ref).toMatchObject({ kind: 'bundle', flow: FLOW });
      const r = await loadInChild(ref, { server: server.url, executor: 'pool' });
      await expectConforms(r, v1Shape, V1_OUT);
      bundledModules(r);
      const missing = await loadInChild({ kind: 'bundle', hash: 'f'.repeat(64), flow: FLOW }, { server: server.url });
      expect(missing.error).toMatch(/^bundle storage: cannot fetch bundle f{64} from the server: /);
    } finally {
      await server.close();
    }
  });
});

describe('s3 storage (Ceph RADOS Gateway)', () => {
  let r: Rgw;
  let creds: { accessKeyId: string; secretAccessKey: string };
  let admin: S3Client;
  beforeAll(async () => {
    r = await rgwP;
    creds = { accessKeyId: r.accessKeyId, secretAccessKey: r.secretAccessKey };
    admin = new S3Client({ region: r.region, endpoint: r.endpoint, forcePathStyle: true, credentials: creds, requestChecksumCalculation: 'WHEN_REQUIRED' });
    await admin.send(new CreateBucketCommand({ Bucket: 'weft-flows' }));
  }, 60_000);
  afterAll(() => admin?.destroy());

  it('uploads to s3://bucket/prefix/<flow>/<hash>.mjs; the ref holds no keys; a fresh process with keys in its env loads the same graph', async () => {
    const s = storageFromSpec(`s3://weft-flows/team/prod?endpoint=${r.endpoint}&region=${r.region}`, { s3: { credentials: creds } });
    const ref = await s.build(ctx());
    expect(ref).toMatchObject({ kind: 's3', bucket: 'weft-flows', endpoint: r.endpoint, region: r.region, flow: FLOW });
    expect(ref.kind === 's3' && ref.key).toBe(`team/prod/${FLOW}/${ref.kind === 's3' ? ref.hash : ''}.mjs`);
    expect(JSON.stringify(ref)).not.toContain(creds.secretAccessKey);
    expect(JSON.stringify(ref)).not.toContain(creds.accessKeyId);
    const res = await loadInChild(ref, { env: { AWS_ACCESS_KEY_ID: creds.accessKeyId, AWS_SECRET_ACCESS_KEY: creds.secretAccessKey } });
    await expectConforms(res, v1Shape, V1_OUT);
    bundledModules(res);
  });

  it('creates the bucket only when asked to', async () => {
    const opts = { bucket: 'weft-new-bucket', endpoint: r.endpoint, region: r.region, credentials: creds };
    await expect(s3Storage(opts).build(ctx())).rejects.toThrow(/^s3 storage: cannot upload s3:\/\/weft-new-bucket\/storage-etl\/[0-9a-f]{64}\.mjs at http:\/\/127\.0\.0\.1:\d+: NoSuchBucket: the bucket "weft-new-bucket" does not exist$/);
    const ref = await s3Storage({ ...opts, createBucket: true }).build(ctx());
    const code = await loadFromStorage(ref, { workDir: join(tmp, 'work'), s3: { credentials: creds } });
    await code.cleanup();
  });

  it('bad input: wrong secret, unknown key id, missing object, tampered object, unreachable endpoint', async () => {
    const at = { bucket: 'weft-flows', endpoint: r.endpoint, region: r.region };
    await expect(s3Storage({ ...at, credentials: { ...creds, secretAccessKey: 'wrong' } }).build(ctx())).rejects.toThrow(
      /^s3 storage: cannot upload s3:\/\/weft-flows\/storage-etl\/[0-9a-f]{64}\.mjs at http:\S+: SignatureDoesNotMatch: the secret access key is wrong$/,
    );
    await expect(s3Storage({ ...at, credentials: { accessKeyId: 'NOBODY', secretAccessKey: 'x' } }).build(ctx())).rejects.toThrow(/: InvalidAccessKeyId: /);

    const ref = await s3Storage({ ...at, credentials: creds }).build(ctx());
    if (ref.kind !== 's3') throw new Error('not an s3 ref');
    const work = join(tmp, 'work-s3');
    await expect(loadFromStorage({ ...ref, key: 'nothing/here.mjs' }, { workDir: work, s3: { credentials: creds } })).rejects.toThrow(
      /^s3 storage: cannot download s3:\/\/weft-flows\/nothing\/here\.mjs at http:\S+: NoSuchKey: there is no object "nothing\/here\.mjs" in the bucket$/,
    );
    await expect(loadFromStorage({ ...ref, bucket: 'no-such-bucket' }, { workDir: work, s3: { credentials: creds } })).rejects.toThrow(/NoSuchBucket: the bucket "no-such-bucket" does not exist$/);
    await expect(loadFromStorage(ref, { workDir: work, s3: { credentials: { ...creds, secretAccessKey: 'wrong' } } })).rejects.toThrow(/SignatureDoesNotMatch/);

    // Someone replaced the object: its bytes no longer hash to the registered sha256.
    const other = await buildBundle([pathToFileURL(NEXT_FILE).href]);
    await admin.send(new PutObjectCommand({ Bucket: ref.bucket, Key: ref.key, Body: other.code }));
    await expect(loadFromStorage(ref, { workDir: work, s3: { credentials: creds } })).rejects.toThrow(
      new RegExp(`^s3 storage: s3://weft-flows/${ref.key}: the bytes hash to ${other.hash}, not to the registered ${ref.hash}`),
    );

    const port = await freePort();
    await expect(loadFromStorage({ ...ref, endpoint: `http://127.0.0.1:${port}` }, { workDir: work, s3: { credentials: creds } })).rejects.toThrow(
      new RegExp(`^s3 storage: cannot download s3://weft-flows/${ref.key} at http://127.0.0.1:${port}: the endpoint is unreachable \\(ECONNREFUSED`),
    );
    expect(existsSync(work) ? await readdirOf(work) : []).toEqual([]);
  });
});

describe.skipIf(dockerUnavailable() !== null)('docker storage (real dockerd)', () => {
  let d: TestDockerd | undefined;
  beforeAll(async () => {
    d = await startDockerd({ images: ['node'] });
  }, 120_000);
  afterAll(async () => {
    if (d === undefined) return;
    await d.stop();
    expect(() => process.kill(d!.pid, 0)).toThrow();
  });

  /** `loadInChild`, in a container from `ref.image` (no network; this checkout mounted read-only at its path). */
  async function loadInContainer(ref: StorageRef, executor: 'local' | 'pool'): Promise<ChildResult & { code: number | null; stderr: string }> {
    const e = d!.engine;
    const input = JSON.stringify({ ref: roundTrip(ref), workDir: '/tmp/weft-work', executor });
    const { id } = await e.createContainer({
      image: (ref as Extract<StorageRef, { kind: 'docker' }>).image,
      cmd: ['node', '--import', TSX, LOAD_SCRIPT, input],
      workingDir: ROOT,
      env: { NO_COLOR: '1' },
      labels: { 'weft.test': 'storage-conformance' },
      hostConfig: { NetworkMode: 'none', Binds: [weftBind] },
    });
    try {
      await e.startContainer(id);
      const { exitCode } = await e.waitContainer(id);
      const logs = await e.logs(id);
      const line = logs.stdout.trim().split('\n').pop() ?? '';
      try {
        return { ...(JSON.parse(line) as ChildResult), code: exitCode, stderr: logs.stderr };
      } catch {
        throw new Error(`the loader printed no JSON (exit ${exitCode}): ${logs.stdout}\n${logs.stderr}`);
      }
    } finally {
      await e.removeContainer(id, { force: true });
    }
  }

  it('builds an image holding the bundle; a flow-run process in a container from it gets the same graph and runs it on a pool', async () => {
    const ref = await new DockerStorage({ baseImage: IMAGES.node, engine: d!.engine }).build(ctx());
    expect(ref).toMatchObject({ kind: 'docker', flow: FLOW, image: expect.stringMatching(/^weft\/storage-etl:[0-9a-f]{16}$/) });
    expect(ref.path).toMatch(/^\/opt\/weft\/flows\/storage-etl\/[0-9a-f]{64}\.mjs$/);
    const r = await loadInContainer(ref, 'pool');
    await expectConforms(r, v1Shape, V1_OUT);
    expect(r.module).toBe(ref.path);
    bundledModules(r);
  }, 120_000);
});
