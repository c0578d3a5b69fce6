/**
 * Storage: where a registered flow's code is kept and where a flow-run process loads it
 * from (see `types.ts` for the contract).
 *
 *   kind     build (at `weft register`)                      load (in the flow-run process)
 *   local    names the file on this host (or keeps a bundle)  imports it; only on that host
 *   module   names an installed package's module             resolves the specifier, imports it
 *   bundle   bundles the file, uploads it to the server       fetches, verifies, links, imports
 *   s3       bundles the file, uploads it to a bucket         downloads, verifies, links, imports
 *   git      names url, ref, path; pins the commit            shallow fetch, bundles the file, imports
 *   docker   builds an image with the file                    inside the image: `path` as a local
 *                                                             file (the docker module, loaded lazily)
 *
 * `loadFromStorage(ref, ctx)` checks the ref (`checkStorageRef`) and dispatches on its
 * kind; the returned `LoadedCode.module` is an absolute path that `loadFlow`
 * (`cli/load.ts`) imports. `storageFromSpec` parses the CLI's one-string forms.
 */
import { loadBundle } from './bundle.ts';
import { hostLabel } from './common.ts';
import { loadGit } from './git.ts';
import { loadLocal } from './local.ts';
import { loadModule } from './module.ts';
import { checkStorageRef } from './ref.ts';
import { loadS3 } from './s3.ts';
import type { LoadContext, LoadedCode, StorageRef } from './types.ts';

export type * from './types.ts';
export { StorageError, hostLabel } from './common.ts';
export { checkStorageRef, STORAGE_KINDS } from './ref.ts';
export { storageFromSpec, STORAGE_SPEC_FORMS, type StorageSpecOptions } from './spec.ts';
export { LocalStorage, localStorage, defaultFlowsDirectory, type LocalStorageOptions } from './local.ts';
export { ModuleStorage, moduleStorage, resolveSpecifier, type ModuleStorageOptions } from './module.ts';
export { BundleStorage, bundleStorage } from './bundle.ts';
export { S3Storage, s3Storage, type S3StorageOptions } from './s3.ts';
export { GitStorage, gitStorage, resolveRemoteRef, type GitStorageOptions } from './git.ts';

/** Get the code a ref names onto this machine. Throws a StorageError (one line: the place and the cause). */
export async function loadFromStorage(ref: StorageRef, ctx: LoadContext): Promise<LoadedCode> {
  const r = checkStorageRef(ref);
  switch (r.kind) {
    case 'local':
      return loadLocal(r, ctx);
    case 'module':
      return loadModule(r, ctx);
    case 'bundle':
      return loadBundle(r, ctx);
    case 's3':
      return loadS3(r, ctx);
    case 'git':
      return loadGit(r, ctx);
    case 'docker': {
      // The code is in the image: inside the flow's container this is a local file; anywhere else a clear error.
      const { loadDockerCode } = await import('./docker.ts');
      return loadDockerCode(r);
    }
  }
}

/** The labels a run of a flow kept at `ref` must carry (local: its host). */
export function storageLabels(ref: StorageRef): readonly string[] {
  return ref.kind === 'local' ? [hostLabel(ref.host)] : [];
}
