/**
 * Storage: where a registered flow's code is kept and where a flow-run process loads it
 * from. The server keeps only a `StorageRef` (plain JSON), never the code itself (a
 * bundle is the one exception: BundleStorage keeps the bundle's bytes on the server).
 *
 * `build` runs at registration (`weft register`) on the author's machine; `load` runs in
 * the flow-run process (or a worker) on the machine the agent chose.
 */
import type { Backend } from '../server/model.ts';

export type StorageRef =
  /** A flow file on one machine: only an agent on `host` can load it. */
  | {
      readonly kind: 'local';
      readonly path: string;
      readonly host: string;
      readonly flow: string;
      /** Set when `path` is a bundle weft keeps (`LocalStorage({ directory })`): the sha256 of its unlinked code. */
      readonly hash?: string;
    }
  /** An installed package's module, by import specifier (resolved from `cwd` when given). */
  | { readonly kind: 'module'; readonly specifier: string; readonly cwd?: string; readonly flow: string }
  /** An esbuild bundle kept by the server, by sha256. */
  | { readonly kind: 'bundle'; readonly hash: string; readonly flow: string }
  /** A bundle uploaded to an S3-compatible bucket. */
  | {
      readonly kind: 's3';
      readonly bucket: string;
      readonly key: string;
      readonly hash: string;
      readonly endpoint?: string;
      readonly region?: string;
      /** Path-style addressing (`endpoint/bucket/key`), as S3-compatible services want; default: true when `endpoint` is set. */
      readonly forcePathStyle?: boolean;
      readonly flow: string;
    }
  /** A file in a git repository at a branch, tag or commit (`commit` pins what was registered when known). */
  | {
      readonly kind: 'git';
      readonly url: string;
      readonly ref: string;
      readonly path: string;
      readonly commit?: string;
      /** History fetched at load (default 1). */
      readonly depth?: number;
      readonly flow: string;
    }
  /** A file inside a Docker image built (and pushed) at registration. */
  | { readonly kind: 'docker'; readonly image: string; readonly path: string; readonly flow: string };

export type StorageKind = StorageRef['kind'];

export interface BuildContext {
  /** Absolute path of the flow file being registered. */
  readonly flowFile: string;
  /** The flow's name inside that file. */
  readonly flowName: string;
  /** The backend (BundleStorage uploads its bundle there). */
  readonly backend?: Backend;
  readonly log?: (line: string) => void;
}

/** Keys for an S3-compatible service. Never part of a `StorageRef`: each side brings its own. */
export interface S3Credentials {
  readonly accessKeyId: string;
  readonly secretAccessKey: string;
  readonly sessionToken?: string;
}

export interface LoadContext {
  readonly backend?: Backend;
  /** Scratch space for clones and downloads (the loader may create it). */
  readonly workDir: string;
  readonly log?: (line: string) => void;
  /** S3 keys for `s3` refs; default: the AWS SDK's chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, profiles...). */
  readonly s3?: { readonly credentials?: S3Credentials };
}

/** What `load` gives: a module to import and the flow's name in it. */
export interface LoadedCode {
  /** Absolute path or file: URL of a module to import (`loadFlow` in src/cli/load.ts picks the flow). */
  readonly module: string;
  readonly flow: string;
  /** Remove what the load created (clones, downloads); idempotent. */
  cleanup(): Promise<void>;
}

export interface Storage {
  readonly kind: StorageKind;
  /** Put the flow's code in place and say where it is. */
  build(ctx: BuildContext): Promise<StorageRef>;
  /** Labels a run of a flow kept here must carry (LocalStorage: its host). */
  labels(ref: StorageRef): readonly string[];
}
