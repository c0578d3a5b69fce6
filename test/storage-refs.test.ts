/**
 * Storage without services: the CLI's one-string forms (`storageFromSpec`), ref
 * validation (`checkStorageRef`), labels, and the failures a flow-run process must report
 * in one clear line — another host's file, a missing file, tampered bytes, a module that
 * does not resolve, a bundle with no server or the wrong bytes, an S3 endpoint nobody
 * listens on. Bundle storage is also loaded in-process here, against a backend in memory.
 */
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { hostname, homedir, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadFlow } from '../src/cli/load.ts';
import type { Flow } from '../src/flow/flow.ts';
import type { Backend } from '../src/server/model.ts';
import {
  BundleStorage,
  checkStorageRef,
  defaultFlowsDirectory,
  GitStorage,
  loadFromStorage,
  LocalStorage,
  localStorage,
  ModuleStorage,
  S3Storage,
  s3Storage,
  storageFromSpec,
  storageLabels,
  StorageError,
  type StorageRef,
} from '../src/storage/index.ts';
import { graphShape } from './fixtures/storage/shape.ts';
import { freePort } from './helpers/rgw.ts';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const FLOW_FILE = join(ROOT, 'test', 'fixtures', 'storage', 'flows', 'etl.ts');
const FLOW = 'storage-etl';
const HASH = 'a'.repeat(64);

let tmp = '';
beforeAll(async () => {
  tmp = await mkdtemp(join(tmpdir(), 'weft-storage-refs-'));
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** Only the two bundle operations of a backend, in memory. */
function memoryBackend(tamper?: (code: Uint8Array) => Uint8Array): Backend & { bundles: Map<string, Uint8Array> } {
  const bundles = new Map<string, Uint8Array>();
  const b = {
    bundles,
    putBundle: async (hash: string, code: Uint8Array) => void bundles.set(hash, code),
    getBundle: async (hash: string) => {
      const code = bundles.get(hash);
      if (code === undefined) throw new Error(`bundle ${hash} not found`);
      return tamper !== undefined ? tamper(code) : code;
    },
  };
  return b as unknown as Backend & { bundles: Map<string, Uint8Array> };
}

describe('storageFromSpec', () => {
  it('parses every form', () => {
    expect(storageFromSpec('local')).toMatchObject({ kind: 'local', directory: null });
    expect(storageFromSpec('local:kept', { cwd: '/srv' })).toMatchObject({ kind: 'local', directory: '/srv/kept' });
    expect(storageFromSpec('local:~/.weft/flows')).toMatchObject({ kind: 'local', directory: defaultFlowsDirectory() });
    expect(storageFromSpec('module:@acme/flows/etl')).toMatchObject({ kind: 'module', specifier: '@acme/flows/etl', cwd: undefined });
    expect(storageFromSpec('module:@acme/flows/etl?cwd=app', { cwd: '/srv' })).toMatchObject({ specifier: '@acme/flows/etl', cwd: '/srv/app' });
    expect(storageFromSpec('bundle')).toBeInstanceOf(BundleStorage);
    expect(storageFromSpec('s3://flows')).toMatchObject({ kind: 's3', bucket: 'flows', prefix: '', createBucket: false });
    const s3 = storageFromSpec('s3://flows/team/prod/?endpoint=http://127.0.0.1:7480&region=eu-west-1&forcePathStyle=true&createBucket=true');
    expect(s3).toMatchObject({ bucket: 'flows', prefix: 'team/prod', endpoint: 'http://127.0.0.1:7480', region: 'eu-west-1', forcePathStyle: true, createBucket: true });
    expect((s3 as S3Storage).keyOf('my flow', HASH)).toBe(`team/prod/my_flow/${HASH}.mjs`);
    expect(storageFromSpec('git+https://example.com/acme/flows.git#v1.2:flows/etl.ts')).toMatchObject({
      kind: 'git',
      url: 'https://example.com/acme/flows.git',
      ref: 'v1.2',
      path: 'flows/etl.ts',
      depth: 1,
      pin: true,
    });
    expect(storageFromSpec('git+git@example.com:acme/flows.git#main', { git: { depth: 5, pin: false } })).toMatchObject({
      url: 'git@example.com:acme/flows.git',
      ref: 'main',
      path: undefined,
      depth: 5,
      pin: false,
    });
    expect(storageFromSpec('docker').kind).toBe('docker');
    expect(storageFromSpec('docker:127.0.0.1:5000').kind).toBe('docker');
  });

  it.each([
    ['', /empty spec/],
    ['ftp://x', /unknown storage \(expected one of local, /],
    ['local:', /expected local:<directory>/],
    ['module:', /expected module:<specifier>/],
    ['module:x?dir=/a', /unknown option "dir"/],
    ['s3://', /expected s3:\/\/<bucket>/],
    ['s3://Bad_Bucket', /"Bad_Bucket" is not a bucket name/],
    ['s3://flows?endpoint=ftp://x', /endpoint "ftp:\/\/x" is not an http\(s\) URL/],
    ['s3://flows?forcePathStyle=maybe', /forcePathStyle must be true or false, not "maybe"/],
    ['s3://flows?secret=x', /unknown option "secret"/],
    ['git+https://example.com/r.git', /expected git\+<url>#<ref>/],
    ['git+#main', /expected git\+<url>#<ref>/],
    ['git+https://example.com/r.git#', /expected a branch, tag or commit after #/],
    ['git+https://example.com/r.git#main:', /expected a path after/],
    ['git+https://example.com/r.git#ma..in', /"ma\.\.in" is not a git ref name/],
    ['git+https://example.com/r.git#main:../etc/passwd', /is outside the repository/],
    ['git+-uhack#main', /is not a repository URL/],
    ['git+ext::sh -c id#main', /is not a repository URL|ext:: transport/],
    ['docker:not a registry', /expected docker\[:<registry/],
  ])('refuses %j in one line', (spec, message) => {
    let err: unknown;
    try {
      storageFromSpec(spec);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(StorageError);
    expect((err as StorageError).code).toBe('STORAGE_INVALID');
    expect((err as Error).message).toMatch(message);
    expect((err as Error).message).not.toContain('\n');
  });
});

describe('checkStorageRef', () => {
  const good: StorageRef[] = [
    { kind: 'local', path: '/srv/flows/etl.ts', host: 'box', flow: 'etl' },
    { kind: 'local', path: `/root/.weft/flows/etl/${HASH}.mjs`, host: 'box', flow: 'etl', hash: HASH },
    { kind: 'module', specifier: '@acme/flows/etl', flow: 'etl' },
    { kind: 'module', specifier: 'pkg', cwd: '/srv/app', flow: 'etl' },
    { kind: 'bundle', hash: HASH, flow: 'etl' },
    { kind: 's3', bucket: 'flows', key: `etl/${HASH}.mjs`, hash: HASH, flow: 'etl' },
    { kind: 's3', bucket: 'flows', key: 'k', hash: HASH, endpoint: 'http://127.0.0.1:7480', region: 'us-east-1', forcePathStyle: true, flow: 'etl' },
    { kind: 'git', url: 'https://example.com/r.git', ref: 'main', path: 'flows/etl.ts', flow: 'etl' },
    { kind: 'git', url: 'file:///srv/r.git', ref: 'v1', path: 'etl.ts', commit: 'b'.repeat(40), depth: 3, flow: 'etl' },
    { kind: 'docker', image: '127.0.0.1:5000/weft/etl:abc', path: '/opt/weft/etl.mjs', flow: 'etl' },
  ];

  it('accepts every kind, through a JSON round trip', () => {
    for (const ref of good) expect(checkStorageRef(JSON.parse(JSON.stringify(ref)))).toEqual(ref);
  });

  it('keeps fields it does not know', () => {
    expect(checkStorageRef({ kind: 'bundle', hash: HASH, flow: 'etl', future: 1 })).toHaveProperty('future', 1);
  });

  it.each([
    [null, /expected an object, got null/],
    [[], /expected an object, got an array/],
    ['local', /expected an object, got string/],
    [{ path: '/x' }, /"kind" must be one of local, module, bundle, s3, git, docker, not undefined/],
    [{ kind: 'ftp' }, /"kind" must be one of .*, not "ftp"/],
    [{ kind: 'local', path: 'flows/etl.ts', host: 'box', flow: 'etl' }, /invalid local storage ref: "path": must be an absolute path, not "flows\/etl.ts"/],
    [{ kind: 'local', path: '/x.ts', host: '', flow: 'etl' }, /invalid local storage ref: "host": must be a non-empty string/],
    [{ kind: 'local', path: '/x.mjs', host: 'box', flow: 'etl', hash: 'abc' }, /"hash": must be a sha256 hash/],
    [{ kind: 'module', specifier: 'x', cwd: 'rel', flow: 'etl' }, /invalid module storage ref: "cwd": must be an absolute path/],
    [{ kind: 'bundle', hash: HASH }, /invalid bundle storage ref: "flow": must be a non-empty string/],
    [{ kind: 'bundle', hash: HASH.toUpperCase(), flow: 'etl' }, /invalid bundle storage ref: "hash": must be a sha256 hash/],
    [{ kind: 's3', bucket: 'A', key: 'k', hash: HASH, flow: 'etl' }, /invalid s3 storage ref: "bucket": must be a bucket name/],
    [{ kind: 's3', bucket: 'flows', key: '', hash: HASH, flow: 'etl' }, /invalid s3 storage ref: "key": must be a non-empty string/],
    [{ kind: 's3', bucket: 'flows', key: 'k', hash: HASH, endpoint: 'nope', flow: 'etl' }, /"endpoint": must be a URL, not "nope"/],
    [{ kind: 's3', bucket: 'flows', key: 'k', hash: HASH, forcePathStyle: 'yes', flow: 'etl' }, /"forcePathStyle": must be true or false/],
    [{ kind: 'git', url: '', ref: 'main', path: 'a.ts', flow: 'etl' }, /invalid git storage ref: "url": must be a non-empty repository URL/],
    [{ kind: 'git', url: 'u', ref: 'a b', path: 'a.ts', flow: 'etl' }, /invalid git storage ref: "ref": "a b" is not a git ref name/],
    [{ kind: 'git', url: 'u', ref: 'main', path: '/etc/passwd', flow: 'etl' }, /"path": "\/etc\/passwd" must be relative to the repository's root/],
    [{ kind: 'git', url: 'u', ref: 'main', path: 'a.ts', commit: 'abc123', flow: 'etl' }, /"commit": must be a full commit sha/],
    [{ kind: 'git', url: 'u', ref: 'main', path: 'a.ts', depth: 0, flow: 'etl' }, /"depth": must be a positive integer/],
    [{ kind: 'docker', image: 'img', path: 'rel.mjs', flow: 'etl' }, /invalid docker storage ref: "path": must be an absolute path/],
  ])('refuses %j, naming the field', async (ref, message) => {
    expect(() => checkStorageRef(ref)).toThrow(message);
    // loadFromStorage checks first: nothing is fetched for a malformed ref.
    await expect(loadFromStorage(ref as StorageRef, { workDir: join(tmp, 'never') })).rejects.toThrow(message);
  });
});

describe('labels', () => {
  it('a local flow needs an agent on its host; the others need nothing', () => {
    const ref: StorageRef = { kind: 'local', path: '/x.ts', host: 'box-1', flow: 'etl' };
    expect(new LocalStorage().labels(ref)).toEqual(['host:box-1']);
    expect(storageLabels(ref)).toEqual(['host:box-1']);
    expect(storageLabels({ kind: 'bundle', hash: HASH, flow: 'etl' })).toEqual([]);
    expect(new BundleStorage().labels()).toEqual([]);
  });
});

describe('local storage', () => {
  it('refuses another host\'s file, and a file that is gone', async () => {
    await expect(loadFromStorage({ kind: 'local', path: FLOW_FILE, host: 'elsewhere', flow: FLOW }, { workDir: tmp })).rejects.toThrow(
      `local storage: flow "${FLOW}" is kept on host "elsewhere", and this is "${hostname()}" (only an agent labelled host:elsewhere can run it)`,
    );
    await expect(loadFromStorage({ kind: 'local', path: join(tmp, 'gone.ts'), host: hostname(), flow: FLOW }, { workDir: tmp })).rejects.toThrow(
      `local storage: flow file ${join(tmp, 'gone.ts')} does not exist`,
    );
    await expect(localStorage().build({ flowFile: join(tmp, 'gone.ts'), flowName: FLOW })).rejects.toThrow(/does not exist$/);
  });

  it('refuses a kept copy whose bytes changed', async () => {
    const ref = await localStorage({ directory: join(tmp, 'kept') }).build({ flowFile: FLOW_FILE, flowName: FLOW });
    if (ref.kind !== 'local') throw new Error('not local');
    await writeFile(ref.path, '// changed\n', { flag: 'a' });
    await expect(loadFromStorage(ref, { workDir: join(tmp, 'work-local') })).rejects.toThrow(
      new RegExp(`^local storage: ${ref.path}: the bytes hash to [0-9a-f]{64}, not to the registered ${ref.hash}`),
    );
  });

  it('the default directory is ~/.weft/flows', () => {
    expect(new LocalStorage({ copy: true }).directory).toBe(join(homedir(), '.weft', 'flows'));
    expect(new LocalStorage().directory).toBeNull();
  });
});

describe('module storage', () => {
  it('a specifier that does not resolve, a built-in module, a missing directory', async () => {
    const w = { workDir: tmp };
    await expect(loadFromStorage({ kind: 'module', specifier: '@nobody/nothing', cwd: tmp, flow: FLOW }, w)).rejects.toThrow(
      `module storage: cannot resolve "@nobody/nothing" from ${tmp}: Could not resolve "@nobody/nothing"`,
    );
    await expect(loadFromStorage({ kind: 'module', specifier: 'node:fs', cwd: tmp, flow: FLOW }, w)).rejects.toThrow(/it is not a module file/);
    await expect(loadFromStorage({ kind: 'module', specifier: 'x', cwd: join(tmp, 'nope'), flow: FLOW }, w)).rejects.toThrow(/from .*nope: no such directory$/);
    expect(() => new ModuleStorage({ specifier: ' ' })).toThrow(/"specifier" must be a non-empty import specifier/);
  });

  it('resolves a package subpath through its exports', async () => {
    // weft itself, from its own root: `weft/executors` is an export of its package.json.
    const code = await loadFromStorage({ kind: 'module', specifier: 'weft/executors', cwd: ROOT, flow: FLOW }, { workDir: tmp });
    expect(code.module).toBe(join(ROOT, 'src', 'executor', 'index.ts'));
  });
});

describe('bundle storage', () => {
  it('builds, uploads, and loads in this process against a backend in memory', async () => {
    const backend = memoryBackend();
    const ref = await new BundleStorage().build({ flowFile: FLOW_FILE, flowName: FLOW, backend });
    expect(ref).toEqual({ kind: 'bundle', hash: expect.stringMatching(/^[0-9a-f]{64}$/) as unknown as string, flow: FLOW });
    expect(backend.bundles.size).toBe(1);
    const workDir = join(tmp, 'work-bundle');
    const code = await loadFromStorage(JSON.parse(JSON.stringify(ref)) as StorageRef, { workDir, backend });
    const { flow } = await loadFlow(code.module, { flowName: code.flow });
    const original = ((await import(FLOW_FILE)) as { default: Flow }).default;
    expect(graphShape(flow.spec())).toEqual(graphShape(original.spec()));
    // Its tasks belong to the loaded file, not to the sources it was built from.
    expect(flow.spec().modules).toEqual([pathToFileURL(code.module).href]);
    await code.cleanup();
    expect(await readdir(workDir)).toEqual([]);
  });

  it('no server, a server that fails, the wrong bytes', async () => {
    const ctx = { flowFile: FLOW_FILE, flowName: FLOW };
    await expect(new BundleStorage().build(ctx)).rejects.toThrow('bundle storage: no server to upload the bundle to (register with a server)');
    const ref: StorageRef = { kind: 'bundle', hash: HASH, flow: FLOW };
    await expect(loadFromStorage(ref, { workDir: tmp })).rejects.toThrow(`bundle storage: no server to fetch bundle ${HASH} from`);
    await expect(loadFromStorage(ref, { workDir: tmp, backend: memoryBackend() })).rejects.toThrow(
      `bundle storage: cannot fetch bundle ${HASH} from the server: bundle ${HASH} not found`,
    );
    const bad = memoryBackend((c) => new Uint8Array([...c, 10]));
    const built = await new BundleStorage().build({ ...ctx, backend: bad });
    await expect(loadFromStorage(built, { workDir: tmp, backend: bad })).rejects.toThrow(/the bytes hash to [0-9a-f]{64}, not to the registered/);
    const failing = { putBundle: () => Promise.reject(new Error('HTTP 503 unavailable')) } as unknown as Backend;
    await expect(new BundleStorage().build({ ...ctx, backend: failing })).rejects.toThrow(/^bundle storage: cannot upload bundle [0-9a-f]{64} to the server: HTTP 503 unavailable$/);
  });
});

describe('s3 storage', () => {
  it('an endpoint nobody listens on fails the upload in one line', async () => {
    const port = await freePort();
    const s = s3Storage({ bucket: 'flows', endpoint: `http://127.0.0.1:${port}`, credentials: { accessKeyId: 'k', secretAccessKey: 's' } });
    await expect(s.build({ flowFile: FLOW_FILE, flowName: FLOW })).rejects.toThrow(
      new RegExp(`^s3 storage: cannot upload s3://flows/${FLOW}/[0-9a-f]{64}\\.mjs at http://127\\.0\\.0\\.1:${port}: the endpoint is unreachable \\(ECONNREFUSED: `),
    );
  });

  it('checks its options', () => {
    expect(() => new S3Storage({ bucket: 'x' })).toThrow(/"x" is not a bucket name/);
    expect(() => new S3Storage({ bucket: 'flows', endpoint: 'localhost:9000' })).toThrow(/endpoint "localhost:9000" is not an http\(s\) URL/);
  });
});

describe('git storage', () => {
  it('checks its options', () => {
    expect(() => new GitStorage({ url: 'https://example.com/r.git', ref: 'main', depth: 0 })).toThrow(/depth must be a positive integer/);
    expect(() => new GitStorage({ url: 'https://example.com/r.git', ref: '-x' })).toThrow(/"-x" is not a git ref name/);
    expect(() => new GitStorage({ url: 'https://example.com/r.git', ref: 'main', path: '../x.ts' })).toThrow(/is outside the repository/);
  });

  it('without a path, the flow file must be in a checkout', async () => {
    const file = join(tmp, 'loose.ts');
    await writeFile(file, 'export {};\n');
    await expect(new GitStorage({ url: 'https://example.com/r.git', ref: 'main' }).build({ flowFile: file, flowName: FLOW })).rejects.toThrow(
      `git storage: ${file} is not in a git checkout; give the flow file's path inside the repository`,
    );
  });
});

describe('docker storage', () => {
  it('is loaded inside its image only', async () => {
    await expect(
      loadFromStorage({ kind: 'docker', image: '127.0.0.1:5000/weft/etl:1', path: '/opt/weft/nothing-here.mjs', flow: FLOW }, { workDir: tmp }),
    ).rejects.toThrow(/\/opt\/weft\/nothing-here\.mjs is not here; this process must run in image 127\.0\.0\.1:5000\/weft\/etl:1/);
  });
});
