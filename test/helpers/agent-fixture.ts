/**
 * What the agent tests share: a weft server on a temp SQLite database, a flow registered
 * per run (one name per call, so runs of different tests never share a flow), waiting
 * for a run to finish, and the run's logs as text for assertion messages.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { RunConfig } from '../../src/run-config/index.ts';
import { BackendClient } from '../../src/server/client.ts';
import { startServer, type RunningServer } from '../../src/server/index.ts';
import type { FlowRun, StoredLogEntry } from '../../src/server/model.ts';
import type { StorageRef } from '../../src/storage/types.ts';

/** The flow files the agents run (test/fixtures/agents/). */
export const AGENT_FIXTURES = fileURLToPath(new URL('../fixtures/agents/', import.meta.url));

/** LocalStorage of a flow in test/fixtures/agents/ on this host. */
export const localFlow = (file: string, flow: string): StorageRef => ({ kind: 'local', path: join(AGENT_FIXTURES, file), host: hostname(), flow });

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `get` every 100 ms until `ok`; the timeout error shows the last value. */
export async function until<T>(what: string, get: () => Promise<T> | T, ok: (v: T) => boolean, timeoutMs = 45_000): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await get();
    if (ok(v)) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}; last: ${JSON.stringify(v)?.slice(0, 2000)}`);
    await sleep(100);
  }
}

export const logText = (logs: readonly StoredLogEntry[]): string => logs.map((l) => `[${l.source}/${l.level}] ${l.message}`).join('\n');

export interface TestServer {
  readonly tmp: string;
  readonly server: RunningServer;
  readonly backend: BackendClient;
  /** Closes the server and removes `tmp`. */
  close(): Promise<void>;
}

/** A weft server on 127.0.0.1, port 0, with its SQLite database in a new temp directory. */
export async function startTestServer(prefix: string): Promise<TestServer> {
  const tmp = await mkdtemp(join(tmpdir(), prefix));
  const server = await startServer({ db: `sqlite:${join(tmp, 'server.db')}`, host: '127.0.0.1', port: 0 });
  return {
    tmp,
    server,
    backend: new BackendClient(server.url),
    async close() {
      await server.close();
      await rm(tmp, { recursive: true, force: true });
    },
  };
}

export interface AgentFlows {
  /** Registers a flow (a new name per call) and creates a run of it; the run's id. */
  runOf(storage: StorageRef, runConfig: RunConfig, labels: readonly string[], parameters?: Record<string, unknown>): Promise<string>;
  /** The run once it is Success, Failed or Cancelled. */
  finished(id: string): Promise<FlowRun>;
}

/** Runs registered in `project` through the backend `backend()` returns (known once the server started). */
export function agentFlows(project: string, backend: () => BackendClient): AgentFlows {
  let flows = 0;
  return {
    async runOf(storage, runConfig, labels, parameters = {}) {
      const { flow } = await backend().registerFlow({
        project,
        name: `${storage.flow}-${++flows}`,
        graph: { test: true },
        storage,
        runConfig,
        executor: { kind: 'local' },
        parameters: [{ name: 'n', required: false, default: 2 }],
        labels,
      });
      return (await backend().createFlowRun({ flowId: flow.id, parameters })).id;
    },
    finished: (id) => until(`run ${id} to finish`, () => backend().getFlowRun(id), (r) => r.state === 'Success' || r.state === 'Failed' || r.state === 'Cancelled'),
  };
}
