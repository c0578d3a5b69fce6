/**
 * BundleStorage: the flow as one esbuild bundle kept by the weft server, addressed by its
 * sha256 (Prefect 1 has no counterpart: its server never holds code; here the server holds
 * the bundle's bytes and nothing else, and any agent that reaches the server can run it).
 *
 * Registration bundles the flow file with everything it imports except weft (see
 * `cluster/bundle.ts`) and uploads it with `putBundle`; the ref is the hash. A load fetches
 * the bytes with `getBundle`, checks their hash, links them to this weft installation and
 * writes them into the load's work directory (see `common.ts`).
 */
import { rm } from 'node:fs/promises';
import { bundleFlow } from './bundler.ts';
import { loadedName, oneLine, scratchDir, StorageError, verifyBundle, writeLinked } from './common.ts';
import type { BuildContext, LoadContext, LoadedCode, Storage, StorageRef } from './types.ts';

export type BundleRef = Extract<StorageRef, { kind: 'bundle' }>;

export class BundleStorage implements Storage {
  readonly kind = 'bundle' as const;

  async build(ctx: BuildContext): Promise<BundleRef> {
    if (ctx.backend === undefined) throw new StorageError('STORAGE_BUILD', 'bundle storage: no server to upload the bundle to (register with a server)');
    const { hash, code } = await bundleFlow(ctx.flowFile);
    try {
      await ctx.backend.putBundle(hash, code);
    } catch (err) {
      throw new StorageError('STORAGE_BUILD', `bundle storage: cannot upload bundle ${hash} to the server: ${oneLine(err)}`, { cause: err });
    }
    ctx.log?.(`bundle storage: uploaded ${ctx.flowName} as bundle ${hash} (${code.byteLength} bytes)`);
    return { kind: 'bundle', hash, flow: ctx.flowName };
  }

  labels(): readonly string[] {
    return [];
  }
}

export function bundleStorage(): BundleStorage {
  return new BundleStorage();
}

export async function loadBundle(ref: BundleRef, ctx: LoadContext): Promise<LoadedCode> {
  if (ctx.backend === undefined) throw new StorageError('STORAGE_LOAD', `bundle storage: no server to fetch bundle ${ref.hash} from`);
  let code: Uint8Array;
  try {
    code = await ctx.backend.getBundle(ref.hash);
  } catch (err) {
    throw new StorageError('STORAGE_LOAD', `bundle storage: cannot fetch bundle ${ref.hash} from the server: ${oneLine(err)}`, { cause: err });
  }
  verifyBundle(code, ref.hash, `bundle storage: bundle ${ref.hash} from the server`);
  const dir = await scratchDir(ctx.workDir, 'bundle-');
  try {
    const module = await writeLinked(dir, loadedName(ref.flow), code);
    return { module, flow: ref.flow, cleanup: () => rm(dir, { recursive: true, force: true }) };
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}
