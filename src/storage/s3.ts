/**
 * S3Storage: the flow's bundle in an S3 bucket (AWS, or any S3-compatible service such as
 * a Ceph RADOS Gateway), at `s3://<bucket>/<prefix>/<flow>/<sha256>.mjs`.
 *
 * Registration bundles the flow file (see `common.ts`) and uploads the bundle; the ref
 * names bucket, key, hash, and the endpoint and region when they are not AWS's defaults.
 * It never holds keys: each side brings its own (options, `LoadContext.s3`, or the AWS
 * SDK's chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles). A
 * load downloads the object, checks its hash, links it and writes it into the load's
 * work directory.
 *
 * Buckets are not created unless `createBucket` says so. Every failure is one line naming
 * the object (`s3://bucket/key`), the endpoint when one is set, and the cause: no such
 * bucket or object, access denied, a wrong secret (signature mismatch), an unknown access
 * key, missing credentials, or an endpoint that cannot be reached.
 */
import { rm } from 'node:fs/promises';
import type { S3Client, S3ClientConfig } from '@aws-sdk/client-s3';
import { bundleFlow } from './bundler.ts';
import { loadedName, oneLine, safeName, scratchDir, StorageError, verifyBundle, writeLinked } from './common.ts';
import type { BuildContext, LoadContext, LoadedCode, S3Credentials, Storage, StorageRef } from './types.ts';

export type S3Ref = Extract<StorageRef, { kind: 's3' }>;

export interface S3StorageOptions {
  readonly bucket: string;
  /** Key prefix (no leading or trailing `/` needed). */
  readonly prefix?: string;
  /** An S3-compatible service's URL (`http://127.0.0.1:7480`); default AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, else AWS. */
  readonly endpoint?: string;
  /** Default AWS_REGION or AWS_DEFAULT_REGION, else us-east-1. */
  readonly region?: string;
  /** Default: the AWS SDK's chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, profiles, roles). */
  readonly credentials?: S3Credentials;
  /** Path-style addressing; default true when an endpoint is set. */
  readonly forcePathStyle?: boolean;
  /** Create the bucket when it does not exist (default false: a missing bucket is an error). */
  readonly createBucket?: boolean;
}

/** A request that gets no answer within this long fails (the SDK retries it twice first). */
const CONNECT_TIMEOUT_MS = 5_000;
const REQUEST_TIMEOUT_MS = 60_000;

export class S3Storage implements Storage {
  readonly kind = 's3' as const;
  readonly bucket: string;
  readonly prefix: string;
  readonly endpoint: string | undefined;
  readonly region: string | undefined;
  readonly forcePathStyle: boolean | undefined;
  readonly createBucket: boolean;
  readonly #credentials: S3Credentials | undefined;

  constructor(opts: S3StorageOptions) {
    if (typeof opts?.bucket !== 'string' || !BUCKET_RE.test(opts.bucket)) {
      throw new StorageError('STORAGE_INVALID', `s3 storage: "${String(opts?.bucket)}" is not a bucket name (3-63 of a-z 0-9 . -)`);
    }
    this.bucket = opts.bucket;
    this.prefix = (opts.prefix ?? '').replace(/^\/+|\/+$/g, '');
    const endpoint = opts.endpoint ?? envOf('AWS_ENDPOINT_URL_S3') ?? envOf('AWS_ENDPOINT_URL');
    if (endpoint !== undefined) checkEndpoint(endpoint);
    this.endpoint = endpoint;
    this.region = opts.region ?? envOf('AWS_REGION') ?? envOf('AWS_DEFAULT_REGION');
    this.forcePathStyle = opts.forcePathStyle;
    this.createBucket = opts.createBucket === true;
    this.#credentials = opts.credentials;
  }

  /** The key of a bundle of `flow`. */
  keyOf(flow: string, hash: string): string {
    return [this.prefix, safeName(flow), `${hash}.mjs`].filter((p) => p !== '').join('/');
  }

  async build(ctx: BuildContext): Promise<S3Ref> {
    const { hash, code } = await bundleFlow(ctx.flowFile);
    const ref: S3Ref = {
      kind: 's3',
      bucket: this.bucket,
      key: this.keyOf(ctx.flowName, hash),
      hash,
      ...(this.endpoint !== undefined ? { endpoint: this.endpoint } : {}),
      ...(this.region !== undefined ? { region: this.region } : {}),
      ...(this.forcePathStyle !== undefined ? { forcePathStyle: this.forcePathStyle } : {}),
      flow: ctx.flowName,
    };
    const sdk = await import('@aws-sdk/client-s3');
    const client = makeClient(sdk.S3Client, ref, this.#credentials);
    let step = 'upload';
    try {
      if (this.createBucket) {
        step = 'create the bucket for';
        await ensureBucket(client, sdk, this.bucket);
        step = 'upload';
      }
      await client.send(
        new sdk.PutObjectCommand({
          Bucket: ref.bucket,
          Key: ref.key,
          Body: code,
          ContentType: 'text/javascript',
          Metadata: { 'weft-sha256': hash },
        }),
      );
    } catch (err) {
      throw s3Error('STORAGE_BUILD', step, ref, err);
    } finally {
      client.destroy();
    }
    ctx.log?.(`s3 storage: uploaded ${ctx.flowName} to s3://${ref.bucket}/${ref.key} (${code.byteLength} bytes)`);
    return ref;
  }

  labels(): readonly string[] {
    return [];
  }
}

export function s3Storage(opts: S3StorageOptions): S3Storage {
  return new S3Storage(opts);
}

export async function loadS3(ref: S3Ref, ctx: LoadContext): Promise<LoadedCode> {
  if (ref.endpoint !== undefined) checkEndpoint(ref.endpoint);
  const sdk = await import('@aws-sdk/client-s3');
  const client = makeClient(sdk.S3Client, ref, ctx.s3?.credentials);
  let code: Uint8Array;
  try {
    const res = await client.send(new sdk.GetObjectCommand({ Bucket: ref.bucket, Key: ref.key }));
    if (res.Body === undefined) throw new Error('the answer had no body');
    code = await res.Body.transformToByteArray();
  } catch (err) {
    throw s3Error('STORAGE_LOAD', 'download', ref, err);
  } finally {
    client.destroy();
  }
  verifyBundle(code, ref.hash, `s3 storage: s3://${ref.bucket}/${ref.key}`);
  const dir = await scratchDir(ctx.workDir, 's3-');
  try {
    const module = await writeLinked(dir, loadedName(ref.flow), code);
    return { module, flow: ref.flow, cleanup: () => rm(dir, { recursive: true, force: true }) };
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

/** S3 bucket names (lower case; dots allowed, as S3-compatible services accept them). */
const BUCKET_RE = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;

export function isBucketName(s: string): boolean {
  return BUCKET_RE.test(s);
}

function envOf(name: string): string | undefined {
  const v = process.env[name];
  return v === undefined || v === '' ? undefined : v;
}

function checkEndpoint(endpoint: string): void {
  let u: URL;
  try {
    u = new URL(endpoint);
  } catch {
    throw new StorageError('STORAGE_INVALID', `s3 storage: endpoint "${endpoint}" is not a URL`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new StorageError('STORAGE_INVALID', `s3 storage: endpoint "${endpoint}" is not an http(s) URL`);
}

function makeClient(Client: typeof S3Client, ref: S3Ref, credentials: S3Credentials | undefined): S3Client {
  const config: S3ClientConfig = {
    region: ref.region ?? envOf('AWS_REGION') ?? envOf('AWS_DEFAULT_REGION') ?? 'us-east-1',
    forcePathStyle: ref.forcePathStyle ?? ref.endpoint !== undefined,
    followRegionRedirects: true,
    maxAttempts: 3,
    // weft checks the sha256 of what it downloads itself; extra checksum headers only
    // trouble S3-compatible services that predate them.
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    requestHandler: { connectionTimeout: CONNECT_TIMEOUT_MS, requestTimeout: REQUEST_TIMEOUT_MS },
    ...(ref.endpoint !== undefined ? { endpoint: ref.endpoint } : {}),
    ...(credentials !== undefined ? { credentials } : {}),
  };
  return new Client(config);
}

async function ensureBucket(client: S3Client, sdk: typeof import('@aws-sdk/client-s3'), bucket: string): Promise<void> {
  try {
    await client.send(new sdk.HeadBucketCommand({ Bucket: bucket }));
    return;
  } catch (err) {
    if (statusOf(err) !== 404) throw err;
  }
  try {
    await client.send(new sdk.CreateBucketCommand({ Bucket: bucket }));
  } catch (err) {
    const name = (err as { name?: unknown }).name;
    if (name !== 'BucketAlreadyOwnedByYou' && name !== 'BucketAlreadyExists') throw err;
  }
}

function statusOf(err: unknown): number | undefined {
  return (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
}

/** One line: what failed, on which object, and why. */
function s3Error(code: 'STORAGE_BUILD' | 'STORAGE_LOAD', step: string, ref: S3Ref, err: unknown): StorageError {
  const where = `s3://${ref.bucket}/${ref.key}${ref.endpoint !== undefined ? ` at ${ref.endpoint}` : ''}`;
  return new StorageError(code, `s3 storage: cannot ${step} ${where}: ${describeS3Error(err, ref)}`, { cause: err });
}

/** The cause of an S3 failure in words (the service's error code first when it sent one). */
export function describeS3Error(err: unknown, ref: { bucket: string; key: string }): string {
  const e = err as { name?: string; code?: string; Code?: string; message?: string; errors?: unknown[] };
  const name = e.Code ?? e.name ?? '';
  const status = statusOf(err);
  const net = networkCode(err);
  if (net !== undefined) return `the endpoint is unreachable (${net}: ${oneLine(err)})`;
  switch (name) {
    case 'NoSuchBucket':
      return `NoSuchBucket: the bucket "${ref.bucket}" does not exist`;
    case 'NoSuchKey':
      return `NoSuchKey: there is no object "${ref.key}" in the bucket`;
    case 'AccessDenied':
    case 'AllAccessDisabled':
      return `${name}: access denied (check the keys and the bucket's policy)`;
    case 'SignatureDoesNotMatch':
      return 'SignatureDoesNotMatch: the secret access key is wrong';
    case 'InvalidAccessKeyId':
      return 'InvalidAccessKeyId: the service does not know this access key id';
    case 'CredentialsProviderError':
      return 'no credentials: pass them, or set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY';
    case 'TimeoutError':
    case 'RequestTimeout':
      return `the endpoint did not answer in time (${oneLine(err)})`;
    default:
      break;
  }
  if (status === 404) return `NotFound: no bucket "${ref.bucket}" or no object "${ref.key}" (HTTP 404)`;
  if (status === 403) return `Forbidden: access denied (HTTP 403; check the keys and the bucket's policy)`;
  const msg = oneLine(err);
  return name !== '' && name !== 'Error' && !msg.startsWith(name) ? `${name}: ${msg}${status !== undefined ? ` (HTTP ${status})` : ''}` : msg;
}

const NET_CODES = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EPIPE']);

function networkCode(err: unknown): string | undefined {
  const seen = new Set<unknown>();
  let e: unknown = err;
  while (e !== null && typeof e === 'object' && !seen.has(e)) {
    seen.add(e);
    const c = (e as { code?: unknown }).code;
    if (typeof c === 'string' && NET_CODES.has(c)) return c;
    const inner = (e as { errors?: unknown[] }).errors;
    if (Array.isArray(inner) && inner.length > 0) {
      const c2 = networkCode(inner[0]);
      if (c2 !== undefined) return c2;
    }
    e = (e as { cause?: unknown }).cause;
  }
  return undefined;
}
