/**
 * GitStorage: the flow file lives in a git repository, at a branch, a tag or a commit.
 *
 * Registration records the URL, the ref and the file's path in the repository, and pins
 * the commit the ref points at when `git ls-remote` can tell (a ref that is not there is
 * an error; a repository this machine cannot reach is only a warning: the machines that
 * run the flow may reach it). A pinned ref loads what was registered even after the branch
 * moves on (`pin: false` follows the branch instead).
 *
 * A load makes a shallow checkout in a fresh directory of its work directory: `git init`,
 * `git fetch --depth <depth> <url> <commit or ref>` (a branch, a tag, or a commit by sha),
 * `git checkout --detach FETCH_HEAD`. A server that refuses commits by sha gets the ref
 * fetched instead, which must still point at the pinned commit.
 *
 * The checked-out file imports `weft` as a package (`import { task } from 'weft'`) and
 * its neighbours by relative paths, and the clone has no `node_modules`. So the loader
 * links `node_modules/weft` next to the clone to this weft installation and bundles the
 * flow file (`cluster/bundle.ts`): its relative imports are resolved from the clone, weft
 * stays external and is linked to this installation (one weft in the process, whatever
 * the repository has), and the TypeScript is compiled once, as ESM, whatever the
 * repository's `package.json` says. The bundle is written next to the flow file, so code
 * that reads files relative to `import.meta.url` finds the repository's files. Packages
 * the repository depends on must be resolvable from the clone (installed in an ancestor
 * directory of the work directory); submodules and LFS files are not fetched.
 */
import { execFile } from 'node:child_process';
import { mkdir, realpath, rm, stat, symlink } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, normalize, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { linkBundle } from '../cluster/bundle.ts';
import { bundleFlow } from './bundler.ts';
import { oneLine, safeName, scratchDir, StorageError, writeAtomic } from './common.ts';
import type { BuildContext, LoadContext, LoadedCode, Storage, StorageRef } from './types.ts';

export type GitRef = Extract<StorageRef, { kind: 'git' }>;

export interface GitStorageOptions {
  /** What `git fetch` accepts: https://, ssh://, git@host:path, file://, a path. */
  readonly url: string;
  /** A branch, a tag, or a commit (its full sha). */
  readonly ref: string;
  /** The flow file inside the repository; default: the registered file's path in the checkout it is in. */
  readonly path?: string;
  /** History fetched at load (default 1). */
  readonly depth?: number;
  /** Record the commit the ref points at, and load that commit (default true). */
  readonly pin?: boolean;
}

/** This weft installation's root (what `node_modules/weft` next to a clone points at). */
const WEFT_ROOT = fileURLToPath(new URL('../../', import.meta.url));
const SHA_RE = /^(?:[0-9a-f]{40}|[0-9a-f]{64})$/;
const LS_REMOTE_TIMEOUT_MS = 30_000;
const FETCH_TIMEOUT_MS = 120_000;
const LOCAL_TIMEOUT_MS = 30_000;

export function isCommitSha(s: string): boolean {
  return SHA_RE.test(s);
}

/** Why `ref` cannot be a git branch, tag or commit name; null when it can. */
export function badGitRef(ref: unknown): string | null {
  if (typeof ref !== 'string' || ref === '') return 'must be a non-empty branch, tag or commit';
  if (ref.startsWith('-') || ref.startsWith('/') || ref.endsWith('/') || ref.endsWith('.') || ref.endsWith('.lock')) return `"${ref}" is not a git ref name`;
  if (/[\s~^:?*[\\\x00-\x1f\x7f]|\.\.|@\{|\/\/|\/\./.test(ref)) return `"${ref}" is not a git ref name`;
  return null;
}

/** Why `path` cannot name a file inside a repository; null when it can. */
export function badRepoPath(path: unknown): string | null {
  if (typeof path !== 'string' || path === '') return 'must be a non-empty path inside the repository';
  if (isAbsolute(path) || path.includes('\0')) return `"${path}" must be relative to the repository's root`;
  const n = normalize(path);
  if (n === '..' || n.startsWith(`..${sep}`) || n === '.') return `"${path}" is outside the repository`;
  return null;
}

export function badGitUrl(url: unknown): string | null {
  if (typeof url !== 'string' || url.trim() === '') return 'must be a non-empty repository URL';
  if (url.startsWith('-') || /\s/.test(url)) return `"${url}" is not a repository URL`;
  if (/^ext::/i.test(url)) return `"${url}": the ext:: transport runs commands and is refused`;
  return null;
}

export class GitStorage implements Storage {
  readonly kind = 'git' as const;
  readonly url: string;
  readonly ref: string;
  readonly path: string | undefined;
  readonly depth: number;
  readonly pin: boolean;

  constructor(opts: GitStorageOptions) {
    const bad = badGitUrl(opts?.url) ?? badGitRef(opts?.ref) ?? (opts?.path !== undefined ? badRepoPath(opts.path) : null);
    if (bad !== null) throw new StorageError('STORAGE_INVALID', `git storage: ${bad}`);
    const depth = opts.depth ?? 1;
    if (!Number.isInteger(depth) || depth < 1) throw new StorageError('STORAGE_INVALID', `git storage: depth must be a positive integer, not ${String(opts.depth)}`);
    this.url = opts.url;
    this.ref = opts.ref;
    this.path = opts.path !== undefined ? normalize(opts.path).split(sep).join('/') : undefined;
    this.depth = depth;
    this.pin = opts.pin !== false;
  }

  async build(ctx: BuildContext): Promise<GitRef> {
    const path = this.path ?? (await pathInCheckout(ctx.flowFile));
    let commit: string | undefined;
    if (isCommitSha(this.ref)) commit = this.ref;
    else if (this.pin) {
      try {
        commit = await resolveRemoteRef(this.url, this.ref);
      } catch (err) {
        if (err instanceof UnknownRefError) throw err;
        ctx.log?.(`git storage: warning: ${oneLine(err)}; the ref is recorded without its commit`);
      }
    }
    await warnUncommitted(ctx, path);
    return {
      kind: 'git',
      url: this.url,
      ref: this.ref,
      path,
      ...(commit !== undefined && this.pin ? { commit } : {}),
      ...(this.depth !== 1 ? { depth: this.depth } : {}),
      flow: ctx.flowName,
    };
  }

  labels(): readonly string[] {
    return [];
  }
}

export function gitStorage(opts: GitStorageOptions): GitStorage {
  return new GitStorage(opts);
}

export async function loadGit(ref: GitRef, ctx: LoadContext): Promise<LoadedCode> {
  const at = `${ref.url}#${ref.ref}${ref.commit !== undefined && ref.commit !== ref.ref ? ` (commit ${ref.commit.slice(0, 12)})` : ''}`;
  const depth = ref.depth ?? 1;
  const dir = await scratchDir(ctx.workDir, 'git-');
  const repo = join(dir, 'repo');
  try {
    await git(['init', '-q', repo], { where: at });
    const target = ref.commit ?? ref.ref;
    try {
      await fetchInto(repo, ref.url, target, depth, at);
    } catch (err) {
      // A server may refuse commits by sha: fetch the ref, which must still point there.
      if (ref.commit === undefined || ref.commit === ref.ref || !(err instanceof StorageError) || /cannot reach/.test(err.message)) throw err;
      await fetchInto(repo, ref.url, ref.ref, depth, at);
      try {
        await git(['-C', repo, 'cat-file', '-e', `${ref.commit}^{commit}`], { where: at });
      } catch {
        throw new StorageError('STORAGE_LOAD', `git storage: ${at}: the server does not serve commits by sha, and ${ref.ref} no longer reaches ${ref.commit} within depth ${depth}`);
      }
    }
    await git(['-C', repo, '-c', 'advice.detachedHead=false', 'checkout', '-q', '--detach', ref.commit ?? 'FETCH_HEAD'], { where: at });
    const head = (await git(['-C', repo, 'rev-parse', 'HEAD'], { where: at })).trim();
    ctx.log?.(`git storage: checked out ${at} at ${head}`);

    const file = join(repo, ref.path);
    const bad = badRepoPath(ref.path);
    if (bad !== null) throw new StorageError('STORAGE_INVALID', `git storage: path ${bad}`);
    let isFile = false;
    try {
      isFile = (await stat(file)).isFile();
    } catch {
      // reported below
    }
    if (!isFile) throw new StorageError('STORAGE_LOAD', `git storage: there is no file ${ref.path} in ${ref.url} at ${ref.ref} (commit ${head.slice(0, 12)})`);

    // Bare `weft` imports resolve to this installation (see the module comment).
    await mkdir(join(dir, 'node_modules'), { recursive: true });
    await symlink(WEFT_ROOT, join(dir, 'node_modules', 'weft'), 'dir');
    let bundle;
    try {
      bundle = await bundleFlow(file, 'STORAGE_LOAD');
    } catch (err) {
      // esbuild names files by absolute path: inside the clone, by their path in the repository.
      const detail = oneLine(err).replace(`cannot bundle ${file}: `, '').split(`${repo}${sep}`).join('');
      throw new StorageError('STORAGE_LOAD', `git storage: cannot compile ${ref.path} of ${at}: ${detail}`, { cause: err });
    }
    const module = join(dirname(file), `.${basename(file)}.${safeName(ref.flow)}.weft.mjs`);
    try {
      await writeAtomic(module, new TextEncoder().encode(linkBundle(bundle.code)));
    } catch (err) {
      throw new StorageError('STORAGE_LOAD', `git storage: cannot write ${module}: ${oneLine(err)}`, { cause: err });
    }
    return { module, flow: ref.flow, cleanup: () => rm(dir, { recursive: true, force: true }) };
  } catch (err) {
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

async function fetchInto(repo: string, url: string, target: string, depth: number, at: string): Promise<void> {
  await git(['-C', repo, 'fetch', '-q', '--no-tags', `--depth=${depth}`, '--', url, target], { where: at, timeoutMs: FETCH_TIMEOUT_MS, ref: target, url });
}

/** The commit `ref` points at in the repository at `url` (tags peeled). */
export async function resolveRemoteRef(url: string, ref: string): Promise<string> {
  // `<ref>^{}` too: an annotated tag's own line names the tag object, its peeled line the commit.
  const out = await git(['ls-remote', '--', url, ref, `${ref}^{}`], { where: `${url}#${ref}`, timeoutMs: LS_REMOTE_TIMEOUT_MS, url });
  const refs = new Map<string, string>();
  for (const line of out.split('\n')) {
    const [sha, name] = line.split('\t');
    if (sha !== undefined && name !== undefined) refs.set(name.trim(), sha.trim());
  }
  const candidates = ref.startsWith('refs/') ? [`${ref}^{}`, ref] : ref === 'HEAD' ? ['HEAD'] : [`refs/tags/${ref}^{}`, `refs/tags/${ref}`, `refs/heads/${ref}`];
  for (const c of candidates) {
    const sha = refs.get(c);
    if (sha !== undefined) return sha;
  }
  throw new UnknownRefError(`git storage: there is no branch or tag "${ref}" in ${url}${/^[0-9a-f]{7,39}$/.test(ref) ? ' (give a commit as its full sha)' : ''}`);
}

/** The repository answered, without the ref: registration fails (an unreachable repository only warns). */
class UnknownRefError extends StorageError {
  constructor(message: string) {
    super('STORAGE_BUILD', message);
  }
}

/** `flowFile`'s path relative to the root of the git checkout it is in. */
async function pathInCheckout(flowFile: string): Promise<string> {
  let top: string;
  try {
    top = (await git(['-C', dirname(flowFile), 'rev-parse', '--show-toplevel'], { where: flowFile })).trim();
  } catch {
    throw new StorageError('STORAGE_BUILD', `git storage: ${flowFile} is not in a git checkout; give the flow file's path inside the repository`);
  }
  const rel = relative(await realpath(top), await realpath(flowFile));
  const bad = badRepoPath(rel);
  if (bad !== null) throw new StorageError('STORAGE_BUILD', `git storage: ${flowFile}: ${bad}`);
  return rel.split(sep).join('/');
}

/** Runs load what is committed: say so when the registered file differs from it. */
async function warnUncommitted(ctx: BuildContext, path: string): Promise<void> {
  try {
    const out = await git(['-C', dirname(ctx.flowFile), 'status', '--porcelain', '--', basename(ctx.flowFile)], { where: ctx.flowFile });
    if (out.trim() !== '') ctx.log?.(`git storage: warning: ${path} has changes that are not committed; runs load the committed file`);
  } catch {
    // not in a checkout: nothing to compare
  }
}

interface GitOptions {
  readonly where: string;
  readonly timeoutMs?: number;
  /** For error messages: the ref and URL a fetch asked for. */
  readonly ref?: string;
  readonly url?: string;
}

/** Run git; stdout, or a StorageError whose one line says why (from git's `fatal:` line). */
function git(args: readonly string[], o: GitOptions): Promise<string> {
  const timeoutMs = o.timeoutMs ?? LOCAL_TIMEOUT_MS;
  return new Promise((resolveP, rejectP) => {
    execFile(
      'git',
      args,
      {
        timeout: timeoutMs,
        killSignal: 'SIGKILL',
        maxBuffer: 16 * 1024 * 1024,
        // Never prompt for credentials; English messages (they are parsed below).
        env: { ...process.env, GIT_TERMINAL_PROMPT: '0', LC_ALL: 'C', LANGUAGE: 'C' },
      },
      (err, stdout, stderr) => {
        if (err === null) return resolveP(stdout);
        const code = (err as { code?: unknown }).code;
        if (code === 'ENOENT') return rejectP(new StorageError('STORAGE_LOAD', 'git storage: git is not installed (no git on PATH)', { cause: err }));
        if ((err as { killed?: boolean }).killed === true) {
          return rejectP(new StorageError('STORAGE_LOAD', `git storage: ${o.where}: git ${subcommand(args)} did not finish within ${timeoutMs / 1000} s`, { cause: err }));
        }
        rejectP(new StorageError('STORAGE_LOAD', `git storage: ${o.where}: ${gitCause(stderr, o)}`, { cause: err }));
      },
    );
  });
}

/** `fetch` of `git -C dir -c k=v fetch ...`. */
function subcommand(args: readonly string[]): string {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === '-C' || a === '-c') i++;
    else if (!a.startsWith('-')) return a;
  }
  return '';
}

function gitCause(stderr: string, o: GitOptions): string {
  const lines = stderr.split('\n').map((l) => l.trim()).filter((l) => l !== '');
  const fatal = lines.find((l) => l.startsWith('fatal:')) ?? lines.find((l) => l.startsWith('error:')) ?? lines[0] ?? 'git failed';
  const text = fatal.replace(/^(fatal|error):\s*/, '');
  if (/couldn't find remote ref/i.test(text)) return `there is no branch or tag "${o.ref ?? ''}" in ${o.url ?? 'the repository'}`;
  if (/not our ref|unadvertised object|no such remote ref/i.test(text)) return `there is no commit ${o.ref ?? ''} in ${o.url ?? 'the repository'} (or the server does not serve commits by sha)`;
  if (/does not appear to be a git repository|could not read from remote|repository .*not found|unable to access|could not resolve host|connection refused|no such file or directory/i.test(text)) {
    return `cannot reach the repository ${o.url ?? ''}: ${text}`;
  }
  return text;
}
