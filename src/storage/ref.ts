/**
 * `checkStorageRef`: a StorageRef that came over the wire (from the server, a file, an
 * environment variable) checked field by field before anything acts on it. The error
 * names the kind and the bad field. Fields this version does not know are kept (a newer
 * registration may add some) but never acted on.
 */
import { isBundleHash } from '../cluster/bundle.ts';
import { StorageError } from './common.ts';
import { badGitRef, badGitUrl, badRepoPath, isCommitSha } from './git.ts';
import { isBucketName } from './s3.ts';
import type { StorageKind, StorageRef } from './types.ts';

export const STORAGE_KINDS: readonly StorageKind[] = ['local', 'module', 'bundle', 's3', 'git', 'docker'];

type Check = (v: unknown) => string | null;

const str: Check = (v) => (typeof v === 'string' && v !== '' ? null : 'must be a non-empty string');
const optStr: Check = (v) => (v === undefined ? null : str(v));
const absPath: Check = (v) => str(v) ?? ((v as string).startsWith('/') || /^[A-Za-z]:[\\/]/.test(v as string) ? null : `must be an absolute path, not "${v as string}"`);
const optAbsPath: Check = (v) => (v === undefined ? null : absPath(v));
const hash: Check = (v) => (typeof v === 'string' && isBundleHash(v) ? null : 'must be a sha256 hash (64 lower-case hex digits)');
const optHash: Check = (v) => (v === undefined ? null : hash(v));
const bool: Check = (v) => (v === undefined || typeof v === 'boolean' ? null : 'must be true or false');
const url: Check = (v) => {
  if (v === undefined) return null;
  if (typeof v !== 'string') return 'must be a URL';
  try {
    const u = new URL(v);
    return u.protocol === 'http:' || u.protocol === 'https:' ? null : `must be an http(s) URL, not "${v}"`;
  } catch {
    return `must be a URL, not "${v}"`;
  }
};

const FIELDS: Record<StorageKind, Record<string, Check>> = {
  local: { path: absPath, host: str, flow: str, hash: optHash },
  module: { specifier: str, cwd: optAbsPath, flow: str },
  bundle: { hash, flow: str },
  s3: {
    bucket: (v) => (typeof v === 'string' && isBucketName(v) ? null : 'must be a bucket name (3-63 of a-z 0-9 . -)'),
    key: (v) => str(v) ?? ((v as string).length > 1024 ? 'is longer than 1024 characters' : null),
    hash,
    endpoint: url,
    region: optStr,
    forcePathStyle: bool,
    flow: str,
  },
  git: {
    url: badGitUrl,
    ref: badGitRef,
    path: badRepoPath,
    commit: (v) => (v === undefined || (typeof v === 'string' && isCommitSha(v)) ? null : 'must be a full commit sha (40 or 64 hex digits)'),
    depth: (v) => (v === undefined || (typeof v === 'number' && Number.isInteger(v) && v >= 1) ? null : 'must be a positive integer'),
    flow: str,
  },
  docker: { image: str, path: absPath, flow: str },
};

/** `v` as a StorageRef, or a StorageError STORAGE_INVALID naming the bad field. */
export function checkStorageRef(v: unknown): StorageRef {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw new StorageError('STORAGE_INVALID', `invalid storage ref: expected an object, got ${v === null ? 'null' : Array.isArray(v) ? 'an array' : typeof v}`);
  }
  const o = v as Record<string, unknown>;
  const kind = o.kind;
  if (typeof kind !== 'string' || !(STORAGE_KINDS as readonly string[]).includes(kind)) {
    throw new StorageError('STORAGE_INVALID', `invalid storage ref: "kind" must be one of ${STORAGE_KINDS.join(', ')}, not ${JSON.stringify(kind) ?? 'undefined'}`);
  }
  for (const [field, check] of Object.entries(FIELDS[kind as StorageKind])) {
    const why = check(o[field]);
    if (why !== null) throw new StorageError('STORAGE_INVALID', `invalid ${kind} storage ref: "${field}": ${why}`);
  }
  return o as unknown as StorageRef;
}
