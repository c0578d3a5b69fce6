/**
 * DockerAgent end to end: a real `weft server` (temp SQLite), a real dockerd and
 * docker-registry for this file (test/helpers/dockerd.ts), flow runs executed by
 * `weft execute flow-run` inside real containers that report back to the server.
 *
 * - A DockerRun with a LocalStorage flow under this checkout (which the agent mounts
 *   read-only at its own path): Success, task runs, the container's output in the run's
 *   logs, the container's labels, env and HostConfig, then the container removed.
 * - A DockerStorage image pushed to the registry and absent from the daemon: the agent
 *   pulls it and the flow runs from the image.
 * - An image that cannot be pulled and a daemon that cannot be reached: the run fails
 *   with the cause in its logs, and the agent goes on to run the next one.
 * - A flow-run process that exits 3 in the middle of its run: Failed, with the exit code
 *   and its last output lines in the logs.
 */
import { hostname } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DockerAgent, type DockerAgentOptions } from '../src/agent/docker.ts';
import { dockerRun } from '../src/run-config/index.ts';
import type { BackendClient } from '../src/server/client.ts';
import type { RunningServer } from '../src/server/index.ts';
import { DockerStorage } from '../src/storage/docker.ts';
import type { StorageRef } from '../src/storage/types.ts';
import { agentFlows, AGENT_FIXTURES as FIXTURES, localFlow as local, logText, startTestServer, until, type TestServer } from './helpers/agent-fixture.ts';
import { dockerUnavailable, IMAGES, startDockerd, WEFT_ROOT, type TestDockerd } from './helpers/dockerd.ts';

const skip = dockerUnavailable();
const HOST = `host:${hostname()}`;

let ts: TestServer;
let server: RunningServer;
let backend: BackendClient;
let d: TestDockerd;
const agents: DockerAgent[] = [];

const { runOf, finished } = agentFlows('agent-docker', () => backend);

async function agent(labels: readonly string[], extra: Partial<DockerAgentOptions> = {}): Promise<DockerAgent> {
  const a = new DockerAgent({ backend, serverUrl: server.url, engine: d.engine, labels, pollMinMs: 100, pollMaxMs: 500, ...extra });
  agents.push(a);
  await a.start();
  return a;
}

describe.skipIf(skip !== null)('DockerAgent against a real dockerd', () => {
  beforeAll(async () => {
    ts = await startTestServer('weft-agent-docker-');
    ({ server, backend } = ts);
    d = await startDockerd({ registry: true, images: ['node'] });
  }, 90_000);

  afterAll(async () => {
    for (const a of agents) await a.stop({ stopRuns: true });
    await d?.stop();
    await ts?.close();
  }, 60_000);

  it('runs a DockerRun flow run in a container that reports back: task runs, logs, labels, env, HostConfig', async () => {
    const labels = ['docker-a', HOST];
    const id = await runOf(local('hello.ts', 'agents-hello'), dockerRun({ image: IMAGES.node, env: { GREETING: 'bonjour' }, hostConfig: { Memory: 512 * 2 ** 20 } }), labels, { n: 5 });
    const a = await agent(labels, { removeContainers: false, env: { GREETING: 'agent-default', EXTRA: 'x' } });
    const [c] = await until('the container', () => d.engine.listContainers({ all: true, labels: { 'weft.flow-run-id': id } }), (cs) => cs.length === 1);
    const cid = c?.Id;
    const info = await d.engine.inspectContainer(cid!);
    expect(info.Config.Labels).toMatchObject({ 'weft.flow-run-id': id, 'weft.agent': a.id! });
    expect(info.Config.Env).toEqual(expect.arrayContaining(['GREETING=bonjour', 'EXTRA=x', `WEFT_SERVER=${server.url}`, `WEFT_FLOW_RUN_ID=${id}`, 'WEFT_OUTPUT_FORWARDED=1']));
    expect(info.Config.Cmd).toEqual([`${WEFT_ROOT}/bin/weft.js`, 'execute', 'flow-run', id, '--server', server.url]);
    expect(info.HostConfig).toMatchObject({ NetworkMode: 'host', Memory: 512 * 2 ** 20, Init: true });
    expect(info.HostConfig.Binds).toContain(`${WEFT_ROOT}:${WEFT_ROOT}:ro`);

    const run = await finished(id);
    const logs = await backend.getLogs(id);
    expect(run.state, logText(logs)).toBe('Success');
    const tasks = await backend.getTaskRuns(id);
    expect(tasks.map((t) => `${t.key}:${t.state}`).sort()).toEqual(['greet:Success', 'n:Success', 'total:Success']);
    // The task's console line came out of the container through the agent.
    await until('the forwarded output', () => backend.getLogs(id), (l) => l.some((e) => e.source === 'flow-run' && e.message.includes(`greet: bonjour n=5 run=${id}`)));
    expect(logText(logs)).toMatch(/\[agent\/info\] started container weft-/);
    await until('the agent to let go of it', async () => a.containers.size, (n) => n === 0);
    // removeContainers: false kept it; it exited 0.
    expect((await d.engine.inspectContainer(cid!)).State.ExitCode).toBe(0);
    await d.engine.removeContainer(cid!, { force: true });
    await a.stop();
  });

  it('pulls a DockerStorage image from the registry and runs the flow from it', async () => {
    const storage = new DockerStorage({ registry: d.registry, engine: d.engine, baseImage: IMAGES.node, imageName: 'weft/agents-hello' });
    const ref = await storage.build({ flowFile: join(FIXTURES, 'hello.ts'), flowName: 'agents-hello' });
    expect(ref.kind).toBe('docker');
    const image = (ref as Extract<StorageRef, { kind: 'docker' }>).image;
    await d.engine.removeImage(image, { force: true });
    expect(await d.engine.imageExists(image)).toBe(false);

    const labels = ['docker-b'];
    const id = await runOf(ref, dockerRun({ env: { GREETING: 'from-image' } }), labels, { n: 1 });
    const lines: string[] = [];
    const a = await agent(labels, { log: (l) => lines.push(l) });
    const run = await finished(id);
    const logs = await backend.getLogs(id);
    expect(run.state, logText(logs)).toBe('Success');
    expect(lines.some((l) => l.startsWith(`pulling ${image}`))).toBe(true);
    expect(await d.engine.imageExists(image)).toBe(true);
    await until('the forwarded output', () => backend.getLogs(id), (l) => l.some((e) => e.source === 'flow-run' && e.message.includes('greet: from-image n=1')));
    await until('the container to be removed', () => d.engine.listContainers({ all: true, labels: { 'weft.flow-run-id': id } }), (cs) => cs.length === 0);
    await a.stop();
  });

  it('fails a run whose image cannot be pulled, with the cause in its logs, and keeps polling', async () => {
    const labels = ['docker-c', HOST];
    const missing = `${d.registry}/weft/not-pushed:1`;
    const bad = await runOf(local('hello.ts', 'agents-hello'), dockerRun({ image: missing }), labels);
    const a = await agent(labels);
    const run = await finished(bad);
    expect(run.state).toBe('Failed');
    expect(run.message).toContain(`image ${missing} is not on the Docker host`);
    const logs = logText(await backend.getLogs(bad));
    expect(logs).toContain(`cannot pull ${missing} from registry ${d.registry}`);
    // The same agent takes the next run.
    const good = await runOf(local('hello.ts', 'agents-hello'), dockerRun({ image: IMAGES.node }), labels);
    expect((await finished(good)).state).toBe('Success');
    expect(a.healthReport()).toMatchObject({ runsStarted: 1, runsFailed: 1 });
    await a.stop();
  });

  it('fails a run when the Docker daemon cannot be reached', async () => {
    const labels = ['docker-d', HOST];
    const id = await runOf(local('hello.ts', 'agents-hello'), dockerRun({ image: IMAGES.node }), labels);
    const a = await agent(labels, { engine: { host: `unix://${join(ts.tmp, 'no-docker.sock')}` } });
    const run = await finished(id);
    expect(run.state).toBe('Failed');
    expect(logText(await backend.getLogs(id))).toContain('cannot reach the Docker daemon');
    await a.stop();
  });

  it('fails a run whose flow-run process exits non-zero, with the exit code and its last output', async () => {
    const labels = ['docker-e', HOST];
    const id = await runOf(local('crash.ts', 'agents-crash'), dockerRun({ image: IMAGES.node }), labels);
    const a = await agent(labels);
    const run = await finished(id);
    const logs = logText(await backend.getLogs(id));
    expect(run.state, logs).toBe('Failed');
    expect(run.message).toMatch(/^container weft-\S+ exited with code 3 before finishing the run$/);
    expect(logs).toContain('crash: about to exit the flow-run process with code 3');
    expect(logs).toMatch(/exited with code 3 before finishing the run\nits last output:\n[\s\S]*crash: about to exit/);
    await until('the container to be removed', () => d.engine.listContainers({ all: true, labels: { 'weft.flow-run-id': id } }), (cs) => cs.length === 0);
    await a.stop();
  });
});
