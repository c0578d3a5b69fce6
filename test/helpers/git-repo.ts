/**
 * A throwaway git repository for Git storage tests: a bare repository (what a loader
 * fetches from, by `file://` URL) and a working tree that commits, tags, branches and
 * pushes to it. git runs with no system or global configuration, so the machine's
 * settings (signing, hooks, default branch) do not leak in.
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { pathToFileURL } from 'node:url';

const ENV = {
  ...process.env,
  GIT_CONFIG_NOSYSTEM: '1',
  GIT_CONFIG_GLOBAL: '/dev/null',
  GIT_AUTHOR_NAME: 'weft test',
  GIT_AUTHOR_EMAIL: 'test@weft.invalid',
  GIT_COMMITTER_NAME: 'weft test',
  GIT_COMMITTER_EMAIL: 'test@weft.invalid',
  GIT_TERMINAL_PROMPT: '0',
  LC_ALL: 'C',
};

export function git(args: readonly string[], cwd?: string): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('git', args, { cwd, env: ENV, timeout: 30_000, killSignal: 'SIGKILL' }, (err, stdout, stderr) => {
      if (err !== null) reject(new Error(`git ${args.join(' ')}: ${stderr.trim() || err.message}`));
      else resolve(stdout.trim());
    });
  });
}

export class GitRepo {
  private constructor(
    /** The directory holding both repositories. */
    readonly dir: string,
    /** The bare repository. */
    readonly bare: string,
    /** The working tree that pushes to it. */
    readonly work: string,
  ) {}

  /** `file://` URL of the bare repository. */
  get url(): string {
    return pathToFileURL(this.bare).href;
  }

  static async create(): Promise<GitRepo> {
    const dir = await mkdtemp(join(tmpdir(), 'weft-git-'));
    const repo = new GitRepo(dir, join(dir, 'origin.git'), join(dir, 'work'));
    await git(['init', '-q', '--bare', '-b', 'main', repo.bare]);
    await git(['init', '-q', '-b', 'main', repo.work]);
    await git(['remote', 'add', 'origin', repo.bare], repo.work);
    return repo;
  }

  /** Write (or, for null, delete) files and commit them; returns the commit's sha. */
  async commit(files: Readonly<Record<string, string | null>>, message: string): Promise<string> {
    for (const [path, text] of Object.entries(files)) {
      const file = join(this.work, path);
      if (text === null) {
        await git(['rm', '-q', '--', path], this.work);
      } else {
        await mkdir(dirname(file), { recursive: true });
        await writeFile(file, text);
        await git(['add', '--', path], this.work);
      }
    }
    await git(['commit', '-q', '-m', message], this.work);
    return git(['rev-parse', 'HEAD'], this.work);
  }

  /** An annotated tag (what releases use: `ls-remote` shows it peeled) at `at` (default HEAD). */
  async tag(name: string, at = 'HEAD'): Promise<void> {
    await git(['tag', '-a', '-m', name, name, at], this.work);
  }

  async branch(name: string, at = 'HEAD'): Promise<void> {
    await git(['branch', '-f', name, at], this.work);
  }

  /** Push every branch and tag to the bare repository. */
  async push(): Promise<void> {
    await git(['push', '-q', '--force', 'origin', '--all'], this.work);
    await git(['push', '-q', '--force', 'origin', '--tags'], this.work);
  }

  async remove(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }
}
