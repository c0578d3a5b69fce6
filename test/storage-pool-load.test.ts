/**
 * A flow loaded from a storage that ships code runs on a PoolExecutor's threads when the
 * place it was registered from no longer exists: the flow (with a helper module) is
 * written to a temporary directory, registered, and that directory is deleted before the
 * load. The threads must import the file the loader wrote (the flow's `spec().modules`),
 * not the author's files. In-process: the load, the import and the run happen here.
 */
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadFlow } from '../src/cli/load.ts';
import type { Backend } from '../src/server/model.ts';
import { bundleStorage, loadFromStorage, localStorage, type Storage, type StorageRef } from '../src/storage/index.ts';

const FIXTURES = fileURLToPath(new URL('./fixtures/docker/', import.meta.url));
const WEFT_INDEX = pathToFileURL(fileURLToPath(new URL('../src/index.ts', import.meta.url))).href;
const FLOW = 'docker-pool';

/** A server's bundle store, in memory (all BundleStorage asks of a backend). */
function memoryBackend(): Backend {
  const bundles = new Map<string, Uint8Array>();
  const b: Pick<Backend, 'putBundle' | 'getBundle'> = {
    putBundle: async (hash, code) => void bundles.set(hash, code),
    getBundle: async (hash) => {
      const code = bundles.get(hash);
      if (code === undefined) throw new Error(`no bundle ${hash}`);
      return code;
    },
  };
  return b as Backend;
}

let tmp = '';
beforeAll(() => {
  tmp = mkdtempSync(join(tmpdir(), 'weft-storage-pool-'));
});
afterAll(() => {
  if (tmp !== '') rmSync(tmp, { recursive: true, force: true });
});

/** The pool flow of the docker fixtures, written to a fresh author directory; returns its flow file. */
function authorCopy(name: string): string {
  const dir = join(tmp, name);
  for (const f of ['pool-flow.ts', 'helper.ts']) {
    const text = readFileSync(join(FIXTURES, f), 'utf8').replaceAll("'../../../src/index.ts'", JSON.stringify(WEFT_INDEX));
    mkdirSync(dir, { recursive: true });
    writeFileSync(join(dir, f), text);
  }
  return join(dir, 'pool-flow.ts');
}

const cases: { kind: string; storage: () => Storage; backend?: Backend }[] = [
  { kind: 'bundle (server)', storage: () => bundleStorage(), backend: memoryBackend() },
  { kind: 'local, kept copy', storage: () => localStorage({ directory: join(tmp, 'kept') }) },
];

describe.each(cases)('$kind storage, the author\'s directory gone', ({ kind, storage, backend }) => {
  it('runs the loaded flow on two pool threads, which import the file the loader wrote', async () => {
    const flowFile = authorCopy(kind.replace(/\W+/g, '-'));
    const authorDir = join(flowFile, '..');
    const ctx = backend !== undefined ? { backend } : {};
    const ref: StorageRef = await storage().build({ flowFile, flowName: FLOW, ...ctx });
    rmSync(authorDir, { recursive: true, force: true });
    expect(existsSync(flowFile)).toBe(false);

    const code = await loadFromStorage(JSON.parse(JSON.stringify(ref)) as StorageRef, { workDir: join(tmp, 'work'), ...ctx });
    try {
      const { flow } = await loadFlow(code.module, { flowName: code.flow });
      const spec = flow.spec();
      const loadedUrl = pathToFileURL(code.module).href;
      // Every task (the helper module's too) belongs to the loaded file; nothing names the author's files.
      expect(spec.modules).toEqual([loadedUrl]);
      expect(JSON.stringify(spec.nodes.map((n) => n.taskKey))).not.toContain(pathToFileURL(authorDir).href);

      const r = await flow.run({ parameters: { n: 6 } });
      expect(r.state, r.message).toBe('Success');
      const out = flow.outputs as { total: Parameters<typeof r.result>[0]; threads: Parameters<typeof r.result>[0] };
      expect(r.result(out.total)).toBe(0 + 1 + 4 + 9 + 16 + 25);
      const threads = r.result(out.threads) as number[];
      expect(threads).toHaveLength(6);
      // On the pool's threads (0 is this, the main thread), both of them.
      expect(threads.every((t) => t > 0)).toBe(true);
      expect(new Set(threads).size).toBe(2);
    } finally {
      await code.cleanup();
    }
    expect(existsSync(code.module)).toBe(false);
  }, 60_000);
});
