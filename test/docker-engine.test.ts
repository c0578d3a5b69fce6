/**
 * The Engine API client against a real dockerd started for this file
 * (test/helpers/dockerd.ts): container round trip, streamed logs, kill and stop, label
 * listing, events, image import and tag, and builds that fail with the failing step named.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DockerError, isNotFound, type EngineEvent } from '../src/docker/engine.ts';
import { tarBytes } from '../src/docker/tar.ts';
import { dockerUnavailable, IMAGES, mountsUnder, pathExists, startDockerd, type TestDockerd } from './helpers/dockerd.ts';

const skip = dockerUnavailable();
let d: TestDockerd;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** A Dockerfile (and files) as a build context. */
const context = (dockerfile: string, files: Record<string, string> = {}): Uint8Array =>
  tarBytes([{ type: 'file', name: 'Dockerfile', data: dockerfile }, ...Object.entries(files).map(([name, data]) => ({ type: 'file' as const, name, data }))]);

describe.skipIf(skip !== null)('DockerEngine against a real dockerd', () => {
  beforeAll(async () => {
    d = await startDockerd({ images: ['busybox'] });
  });

  afterAll(async () => {
    if (d === undefined) return;
    await d.stop();
    // Nothing is left behind: processes, mounts, the directory.
    expect(alive(d.pid)).toBe(false);
    expect(mountsUnder(d.dir)).toEqual([]);
    expect(pathExists(d.dir)).toBe(false);
  });

  it('pings and reports its version', async () => {
    await d.engine.ping();
    const v = await d.engine.version();
    expect(v.ApiVersion).toMatch(/^1\.\d+$/);
    expect(v.Os).toBe('linux');
  });

  it('creates, starts, waits for the exit code, reads both streams, inspects and removes a container', async () => {
    const e = d.engine;
    const { id } = await e.createContainer({
      image: IMAGES.busybox,
      // stdout and stderr are two pipes: the pause makes `more` the last line logged.
      cmd: ['sh', '-c', 'echo "out $GREETING"; echo err >&2; sleep 0.1; echo more; exit 3'],
      env: { GREETING: 'hello' },
      labels: { 'weft.test': 'round-trip' },
      hostConfig: { NetworkMode: 'none', Memory: 64 * 1024 * 1024, NanoCpus: 500_000_000 },
    });
    await e.startContainer(id);
    expect(await e.waitContainer(id)).toEqual({ exitCode: 3 });
    expect(await e.logs(id)).toEqual({ stdout: 'out hello\nmore\n', stderr: 'err\n' });
    expect(await e.logs(id, { stderr: false, tail: 1 })).toEqual({ stdout: 'more\n', stderr: '' });
    const info = await e.inspectContainer(id);
    expect(info.State).toMatchObject({ Status: 'exited', ExitCode: 3, Running: false });
    expect(info.Config.Labels).toMatchObject({ 'weft.test': 'round-trip' });
    expect(info.HostConfig).toMatchObject({ NetworkMode: 'none', Memory: 64 * 1024 * 1024, NanoCpus: 500_000_000 });
    await e.removeContainer(id);
    await expect(e.inspectContainer(id)).rejects.toSatisfy(isNotFound);
    await e.removeContainer(id, { missingOk: true });
    await expect(e.removeContainer(id)).rejects.toMatchObject({ code: 'DOCKER_API', status: 404 });
  });

  it('follows logs as they are written, and a TTY container as one raw stream', async () => {
    const e = d.engine;
    const { id } = await e.createContainer({ image: IMAGES.busybox, cmd: ['sh', '-c', 'for i in 1 2 3; do echo line $i; sleep 0.2; done; echo bye >&2'], hostConfig: { NetworkMode: 'none' } });
    await e.startContainer(id);
    const seen: { stream: string; text: string; at: number }[] = [];
    const t0 = Date.now();
    for await (const f of e.followLogs(id)) seen.push({ stream: f.stream, text: f.data.toString(), at: Date.now() - t0 });
    expect(seen.filter((s) => s.stream === 'stdout').map((s) => s.text).join('')).toBe('line 1\nline 2\nline 3\n');
    expect(seen.filter((s) => s.stream === 'stderr').map((s) => s.text).join('')).toBe('bye\n');
    // Streamed: the first line arrived well before the last.
    expect(seen.at(-1)!.at - seen[0]!.at).toBeGreaterThan(250);
    await e.removeContainer(id);

    const tty = await e.createContainer({ image: IMAGES.busybox, cmd: ['sh', '-c', 'echo to-out; echo to-err >&2'], tty: true, hostConfig: { NetworkMode: 'none' } });
    await e.startContainer(tty.id);
    await e.waitContainer(tty.id);
    const out = await e.logs(tty.id);
    expect(out.stdout.replace(/\r/g, '')).toBe('to-out\nto-err\n');
    expect(out.stderr).toBe('');
    await e.removeContainer(tty.id);
  });

  it('stops following when its signal aborts', async () => {
    const e = d.engine;
    const { id } = await e.createContainer({ image: IMAGES.busybox, cmd: ['sh', '-c', 'echo started; sleep 30'], hostConfig: { NetworkMode: 'none' } });
    await e.startContainer(id);
    const ac = new AbortController();
    const frames: string[] = [];
    for await (const f of e.followLogs(id, { signal: ac.signal })) {
      frames.push(f.data.toString());
      ac.abort();
    }
    expect(frames).toEqual(['started\n']);
    await e.removeContainer(id, { force: true });
  });

  it('kills, stops, lists by label and reports events', async () => {
    const e = d.engine;
    const ac = new AbortController();
    const events: EngineEvent[] = [];
    const watching = (async () => {
      for await (const ev of e.events({ filters: { type: ['container'], label: ['weft.test=lifecycle'] }, signal: ac.signal })) events.push(ev);
    })();
    const mk = async (name: string): Promise<string> => {
      const { id } = await e.createContainer({ image: IMAGES.busybox, name, cmd: ['sleep', '60'], labels: { 'weft.test': 'lifecycle', 'weft.name': name }, stopTimeout: 1, hostConfig: { NetworkMode: 'none', Init: true } });
      await e.startContainer(id);
      return id;
    };
    const a = await mk('weft-kill-me');
    const b = await mk('weft-stop-me');
    const listed = await e.listContainers({ labels: { 'weft.test': 'lifecycle' } });
    expect(listed.map((c) => c.Names[0]).sort()).toEqual(['/weft-kill-me', '/weft-stop-me']);
    expect(await e.listContainers({ labels: ['weft.name=weft-kill-me'] })).toHaveLength(1);

    await e.killContainer(a);
    expect((await e.waitContainer(a)).exitCode).toBe(137);
    await e.killContainer(a); // not running any more: no error
    await e.stopContainer(b, { timeoutSec: 1 });
    expect((await e.inspectContainer(b)).State.Running).toBe(false);
    await e.stopContainer(b); // already stopped: no error
    expect(await e.listContainers({ labels: ['weft.test=lifecycle'] })).toHaveLength(0);
    expect(await e.listContainers({ all: true, labels: ['weft.test=lifecycle'] })).toHaveLength(2);
    await Promise.all([a, b].map((id) => e.removeContainer(id)));

    // The destroy events come shortly after the removals.
    const until = Date.now() + 5_000;
    while (events.filter((ev) => ev.Action === 'destroy').length < 2 && Date.now() < until) await new Promise((r) => setTimeout(r, 20));
    ac.abort();
    await watching;
    const actions = events.map((ev) => `${ev.Actor.Attributes['weft.name']}:${ev.Action}`);
    expect(actions).toEqual(expect.arrayContaining(['weft-kill-me:start', 'weft-kill-me:die', 'weft-kill-me:destroy', 'weft-stop-me:kill', 'weft-stop-me:die']));
  });

  it('builds, tags, inspects and removes images', async () => {
    const e = d.engine;
    const lines: string[] = [];
    const { id } = await e.buildImage(context(`FROM ${IMAGES.busybox}\nCOPY greeting.txt /greeting.txt\nRUN cat /greeting.txt\nLABEL weft.test=build\n`, { 'greeting.txt': 'hi from the context\n' }), {
      tags: ['weft-test/built:1'],
      labels: { 'weft.extra': 'yes' },
      onLine: (l) => lines.push(l),
    });
    expect(id).toMatch(/^sha256:[0-9a-f]{64}$/);
    expect(lines).toContain('hi from the context');
    expect(lines.some((l) => /^Step 3\/\d : RUN cat \/greeting\.txt$/.test(l))).toBe(true);
    const img = await e.inspectImage('weft-test/built:1');
    expect(img.Id).toBe(id);
    expect(img.Config?.Labels).toMatchObject({ 'weft.test': 'build', 'weft.extra': 'yes' });
    await e.tagImage('weft-test/built:1', 'weft-test/built', 'again');
    expect((await e.listImages({ reference: 'weft-test/built' })).flatMap((i) => i.RepoTags ?? []).sort()).toEqual(['weft-test/built:1', 'weft-test/built:again']);
    await e.removeImage('weft-test/built:1');
    await e.removeImage('weft-test/built:again');
    expect(await e.imageExists('weft-test/built:1')).toBe(false);
    await expect(e.removeImage('weft-test/built:1')).rejects.toSatisfy(isNotFound);
  });

  it('fails a build at a bad step with the step, the message and its last output', async () => {
    const err = (await d.engine
      .buildImage(context(`FROM ${IMAGES.busybox}\nRUN echo fine\nRUN echo about to fail && echo on stderr >&2 && exit 7\nRUN echo never\n`), { tags: ['weft-test/bad:1'] })
      .catch((x: unknown) => x)) as DockerError;
    expect(err).toBeInstanceOf(DockerError);
    expect(err.code).toBe('DOCKER_BUILD');
    expect(err.message).toMatch(/^docker build failed at step 3\/4 \(RUN echo about to fail && echo on stderr >&2 && exit 7\): The command .* returned a non-zero code: 7; last output: (about to fail \| on stderr|on stderr \| about to fail)$/);
    expect(await d.engine.imageExists('weft-test/bad:1')).toBe(false);
    // forcerm: the failed step's container is gone too.
    expect((await d.engine.listContainers({ all: true })).map((c) => `${c.Image} ${c.State} ${c.Names.join()}`)).toEqual([]);
  });

  it('fails a Dockerfile that does not parse, and a FROM image that is not here, clearly', async () => {
    await expect(d.engine.buildImage(context(`FROM ${IMAGES.busybox}\nFROBNICATE now\n`))).rejects.toMatchObject({
      code: 'DOCKER_BUILD',
      message: expect.stringMatching(/docker build failed: .*unknown instruction: FROBNICATE/i),
    });
    await expect(d.engine.buildImage(context('FROM 127.0.0.1:1/nothing/here:1\n'))).rejects.toMatchObject({
      code: 'DOCKER_BUILD',
      message: expect.stringMatching(/^docker build failed at step 1\/1 \(FROM 127\.0\.0\.1:1\/nothing\/here:1\): .*127\.0\.0\.1:1.*connection refused/),
    });
  });

  it('creating a container from a missing image is a 404 naming it', async () => {
    await expect(d.engine.createContainer({ image: 'weft-test/absent:1' })).rejects.toMatchObject({ code: 'DOCKER_API', status: 404, message: expect.stringMatching(/weft-test\/absent:1/) });
  });
});
