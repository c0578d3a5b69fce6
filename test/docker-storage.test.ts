/**
 * DockerStorage end to end, against a real dockerd and docker-registry started for this
 * file (test/helpers/dockerd.ts): the flow (copied to a directory no container sees) is
 * bundled into an image FROM a local node image, pushed to the registry, removed from the
 * daemon and pulled back; a container from it — with this checkout bind-mounted
 * read-only at its own path, as the docker agent does — loads the flow from `ref.path`,
 * runs it, and reports the same graph as the original, its tasks keyed by the bundle
 * file in the image. A flow whose executor is a pool of threads runs on those threads in
 * the container: they import the bundle file, not the path the flow had here.
 */
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { GraphSpec } from '../src/flow/spec.ts';
import { DockerStorage, IMAGE_BUNDLE_DIR, loadDockerCode, type DockerRef } from '../src/storage/docker.ts';
import { graphShape, taskModules } from './fixtures/storage/shape.ts';
import { dockerUnavailable, IMAGES, mountsUnder, pathExists, startDockerd, WEFT_ROOT, weftBind, type TestDockerd } from './helpers/dockerd.ts';

const skip = dockerUnavailable();
const FIXTURES = fileURLToPath(new URL('./fixtures/docker/', import.meta.url));
const RUN_FLOW = join(FIXTURES, 'run-flow.mjs');
const WEFT_INDEX = pathToFileURL(join(WEFT_ROOT, 'src/index.ts')).href;

let d: TestDockerd;
let flowDir = '';
let flowFile = '';
let originalSpec: GraphSpec;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function getJson(url: string): Promise<unknown> {
  return new Promise((resolve, reject) => {
    const req = request(url, { agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c: string) => (body += c));
      res.on('end', () => resolve(JSON.parse(body)));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Load `ref` and run its flow inside `ref.image`, as a flow-run process does; return what run-flow.mjs printed. */
async function runInImage(
  ref: DockerRef,
  params: Record<string, unknown>,
): Promise<{ module: string; name: string; spec: GraphSpec; state: string; message: string; outputs: Record<string, unknown> }> {
  const e = d.engine;
  const { id } = await e.createContainer({
    image: ref.image,
    cmd: ['node', RUN_FLOW, JSON.stringify(ref), JSON.stringify(params)],
    workingDir: WEFT_ROOT,
    labels: { 'weft.test': 'storage' },
    hostConfig: { NetworkMode: 'none', Binds: [weftBind] },
  });
  try {
    await e.startContainer(id);
    const { exitCode } = await e.waitContainer(id);
    const logs = await e.logs(id);
    if (exitCode !== 0) throw new Error(`the flow container exited with ${exitCode}: ${logs.stderr}${logs.stdout}`);
    return JSON.parse(logs.stdout.trim().split('\n').at(-1)!) as Awaited<ReturnType<typeof runInImage>>;
  } finally {
    await e.removeContainer(id, { force: true });
  }
}

describe.skipIf(skip !== null)('DockerStorage against a real dockerd and registry', () => {
  beforeAll(async () => {
    // The flow outside this checkout: only the image can give it to a container.
    flowDir = mkdtempSync('/tmp/weft-docker-flow-');
    for (const f of ['flow.ts', 'helper.ts', 'pool-flow.ts']) {
      writeFileSync(join(flowDir, f), readFileSync(join(FIXTURES, f), 'utf8').replaceAll("'../../../src/index.ts'", JSON.stringify(WEFT_INDEX)));
    }
    flowFile = join(flowDir, 'flow.ts');
    const mod = (await import(pathToFileURL(flowFile).href)) as { dockerFlow: { spec(): GraphSpec } };
    originalSpec = mod.dockerFlow.spec();
    d = await startDockerd({ registry: true, images: ['node'] });
  });

  afterAll(async () => {
    if (flowDir !== '') rmSync(flowDir, { recursive: true, force: true });
    if (d === undefined) return;
    await d.stop();
    expect(alive(d.pid)).toBe(false);
    expect(alive(d.registryPid)).toBe(false);
    expect(mountsUnder(d.dir)).toEqual([]);
    expect(pathExists(d.dir)).toBe(false);
  });

  it('builds and pushes the image; pulled back, it runs the flow with the original graph', async () => {
    const lines: string[] = [];
    const storage = new DockerStorage({ registry: d.registry, baseImage: IMAGES.node, engine: d.engine });
    const ref = await storage.build({ flowFile, flowName: 'docker-demo', log: (l) => lines.push(l) });

    expect(ref).toMatchObject({ kind: 'docker', flow: 'docker-demo' });
    expect(ref.image).toMatch(new RegExp(`^${d.registry.replace(/\./g, '\\.')}/weft/docker-demo:[0-9a-f]{16}$`));
    expect(ref.path).toMatch(new RegExp(`^${IMAGE_BUNDLE_DIR}/docker-demo/[0-9a-f]{64}\\.mjs$`));
    expect(lines.some((l) => l.startsWith('Step 2/4 : COPY flow.mjs '))).toBe(true);
    expect(lines.at(-1)).toMatch(/^pushed .* \(sha256:[0-9a-f]{64}\)$/);
    const labels = (await d.engine.inspectImage(ref.image)).Config?.Labels;
    expect(labels).toMatchObject({ 'weft.flow': 'docker-demo', 'weft.flow-path': ref.path });

    // The registry has it; the daemon forgets it and pulls it back.
    expect(await getJson(`http://${d.registry}/v2/_catalog`)).toEqual({ repositories: ['weft/docker-demo'] });
    await d.engine.removeImage(ref.image);
    expect(await d.engine.imageExists(ref.image)).toBe(false);
    await d.engine.pullImage(ref.image);
    expect(await d.engine.imageExists(ref.image)).toBe(true);

    const got = await runInImage(ref, { n: 5 });
    expect(got.module).toBe(ref.path);
    expect(got.name).toBe('docker-demo');
    expect(got.state).toBe('Success');
    // The same graph (nodes, edges, options, task names); every task, the helper module's
    // included, belongs to the bundle file in the image, which is what workers import.
    expect(graphShape(got.spec)).toEqual(JSON.parse(JSON.stringify(graphShape(originalSpec))));
    expect(taskModules(originalSpec)).toEqual([pathToFileURL(join(flowDir, 'flow.ts')).href, pathToFileURL(join(flowDir, 'helper.ts')).href]);
    expect(got.spec.modules).toEqual([pathToFileURL(ref.path).href]);
    expect(got.spec.nodes.find((n) => n.key === 'square')?.taskKey).toBe(`${pathToFileURL(ref.path).href}#square`);
    expect(got.outputs).toEqual({ total: 0 + 1 + 4 + 9 + 16 + 100, where: pathToFileURL(ref.path).href });
  });

  it('a flow whose executor is a thread pool runs on its threads in the container, which import the bundle in the image', async () => {
    const pooled = join(flowDir, 'pool-flow.ts');
    const ref = await new DockerStorage({ baseImage: IMAGES.node, engine: d.engine }).build({ flowFile: pooled, flowName: 'docker-pool' });
    const got = await runInImage(ref, { n: 6 });
    expect(got.state, got.message).toBe('Success');
    expect(got.module).toBe(ref.path);
    expect(got.spec.modules).toEqual([pathToFileURL(ref.path).href]);
    expect(got.outputs.total).toBe(0 + 1 + 4 + 9 + 16 + 25);
    const threads = got.outputs.threads as number[];
    expect(threads).toHaveLength(6);
    // Every call ran on a pool thread (0 is the main thread); the pool's two threads shared them.
    expect(threads.every((t) => t > 0)).toBe(true);
    expect(new Set(threads).size).toBe(2);
  });

  it('tags by content: the same code gives the same image, other settings another', async () => {
    const a = await new DockerStorage({ baseImage: IMAGES.node, engine: d.engine }).build({ flowFile, flowName: 'docker-demo' });
    const b = await new DockerStorage({ baseImage: IMAGES.node, engine: d.engine }).build({ flowFile, flowName: 'docker-demo' });
    const c = await new DockerStorage({ baseImage: IMAGES.node, engine: d.engine, env: { MODE: 'other' }, imageName: 'flows/demo', imageTag: 'v1' }).build({ flowFile, flowName: 'dockerFlow' });
    expect(b).toEqual(a);
    expect(a.image).toMatch(/^weft\/docker-demo:[0-9a-f]{16}$/);
    expect(c.image).toBe('flows/demo:v1');
    expect(c.path).toMatch(/\/dockerflow\//);
    // Chosen by its export name this time; the flow still runs from the unpushed image.
    const got = await runInImage(c, { n: 2 });
    expect(got.outputs.total).toBe(101);
    expect((await d.engine.inspectImage(c.image)).Config?.Env).toContain('MODE=other');
  });

  it('an unreachable registry fails the push with an error naming it', async () => {
    const storage = new DockerStorage({ registry: '127.0.0.1:1', baseImage: IMAGES.node, engine: d.engine });
    const err = await storage.build({ flowFile, flowName: 'docker-demo' }).catch((x: unknown) => x);
    expect(err).toMatchObject({ code: 'DOCKER_PUSH' });
    expect((err as Error).message).toMatch(/^cannot push 127\.0\.0\.1:1\/weft\/docker-demo:[0-9a-f]{16} to registry 127\.0\.0\.1:1: .*connection refused/);
  });

  it('a failing extra command fails the build naming its step; a missing flow file fails before any build', async () => {
    const bad = new DockerStorage({ baseImage: IMAGES.node, engine: d.engine, extraCommands: ['RUN echo checking && exit 5'] });
    await expect(bad.build({ flowFile, flowName: 'docker-demo' })).rejects.toMatchObject({
      code: 'DOCKER_BUILD',
      message: expect.stringMatching(/at step 5\/5 \(RUN echo checking && exit 5\): .*non-zero code: 5; last output: checking$/),
    });
    await expect(new DockerStorage({ engine: d.engine }).build({ flowFile: join(flowDir, 'nope.ts'), flowName: 'x' })).rejects.toMatchObject({
      code: 'STORAGE_BUILD',
      message: expect.stringMatching(/cannot read flow file .*nope\.ts/),
    });
  });

  it('loading outside the image says which image the process must run in', async () => {
    const ref: DockerRef = { kind: 'docker', image: 'r/x:1', path: `${IMAGE_BUNDLE_DIR}/x/${'0'.repeat(64)}.mjs`, flow: 'x' };
    await expect(loadDockerCode(ref)).rejects.toMatchObject({ code: 'STORAGE_LOAD', message: expect.stringMatching(/must run in image r\/x:1/) });
    const here = join(flowDir, 'copy.mjs');
    copyFileSync(RUN_FLOW, here);
    const code = await loadDockerCode({ ...ref, path: here });
    expect(code).toMatchObject({ module: here, flow: 'x' });
    await code.cleanup();
  });
});
