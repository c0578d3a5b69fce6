/**
 * A real Docker daemon for one test file: `dockerd` with its own data root, exec root
 * and unix socket in a temporary directory under /tmp (short, because containerd's
 * socket path inside it must fit in 108 bytes), no bridge and no iptables (containers
 * use `--network none`, or `host` to reach servers on 127.0.0.1), overlay2; plus,
 * when asked, a `docker-registry` on a free 127.0.0.1 port, and local base images.
 *
 * Nothing is pulled. The base images are root filesystems streamed from this machine's
 * files into `POST /images/create?fromSrc=-` (`docker import`):
 * - `weft-test/busybox`: the static busybox and its applet links;
 * - `weft-test/node:<major>`: the same, plus the node binary running the tests and the
 *   shared libraries `ldd` lists for it (about 100 MB, imported in under a second).
 *
 * weft itself is not copied into images: a flow-run container gets this checkout
 * bind-mounted read-only at the same absolute path (`weftBind`), node_modules included,
 * so weft's files and the bundles linked against them resolve alike on both sides.
 *
 * Each test file starts its own daemon (about a second) and imports the images it needs
 * into it. `stop()` removes containers, stops the registry and the daemon by PID (and
 * the containerd and shims it started), unmounts whatever is left mounted under the
 * directory and removes it. A process that exits without `stop()` does the same
 * synchronously on its way out.
 */
import { execFileSync, spawn, type ChildProcess } from 'node:child_process';
import { accessSync, constants, existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readdirSync, readFileSync, realpathSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { DockerEngine } from '../../src/docker/engine.ts';
import { tarStream, type TarEntry } from '../../src/docker/tar.ts';

/** This checkout's root (no trailing slash). */
export const WEFT_ROOT = fileURLToPath(new URL('../../', import.meta.url)).replace(/\/$/, '');
/** Bind of this checkout into a container, read-only, at the same path. */
export const weftBind = `${WEFT_ROOT}:${WEFT_ROOT}:ro`;

export const NODE_MAJOR = process.versions.node.split('.')[0]!;
export const IMAGES = {
  busybox: 'weft-test/busybox:latest',
  node: `weft-test/node:${NODE_MAJOR}`,
} as const;
export type BaseImage = keyof typeof IMAGES;

const SEARCH = [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/usr/bin', '/sbin', '/bin'];

function which(cmd: string): string | null {
  for (const d of SEARCH) {
    if (d === '') continue;
    try {
      accessSync(join(d, cmd), constants.X_OK);
      return join(d, cmd);
    } catch {
      // next
    }
  }
  return null;
}

/** Why these tests cannot run here (not root, a tool missing), or null when they can. */
export function dockerUnavailable(): string | null {
  if (process.platform !== 'linux') return 'dockerd tests need Linux';
  if (process.getuid?.() !== 0) return 'dockerd tests need root';
  for (const tool of ['dockerd', 'docker-registry', 'busybox']) if (which(tool) === null) return `${tool} is not installed (apt-get install docker.io docker-registry busybox-static)`;
  return null;
}

export interface TestDockerd {
  readonly dir: string;
  /** `unix://<dir>/docker.sock` */
  readonly host: string;
  readonly engine: DockerEngine;
  readonly pid: number;
  /** `127.0.0.1:<port>` of the registry ('' when none was asked for). */
  readonly registry: string;
  readonly registryPid: number;
  /** Make a base image (once per daemon); resolves to its name. */
  image(which: BaseImage): Promise<string>;
  /** The daemon's log so far (for failure messages). */
  log(): string;
  stop(): Promise<void>;
}

export interface StartOptions {
  readonly registry?: boolean;
  /** Base images to make before returning. */
  readonly images?: readonly BaseImage[];
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function exited(child: ChildProcess): Promise<void> {
  return child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : new Promise((r) => child.once('exit', () => r()));
}

/** SIGTERM, SIGKILL after `graceMs`; resolves once the child has exited. */
async function terminate(child: ChildProcess, graceMs: number): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null || child.pid === undefined) return;
  const pid = child.pid;
  try {
    process.kill(pid, 'SIGTERM');
  } catch {
    return;
  }
  const t = setTimeout(() => alive(pid) && process.kill(pid, 'SIGKILL'), graceMs);
  await exited(child);
  clearTimeout(t);
}

/**
 * PIDs of processes whose command line names `dir` (the daemon, its containerd and
 * shims, the registry), and of their descendants (the containers' processes, which
 * name nothing of it).
 */
function processesUnder(dir: string): number[] {
  const named = new Set<number>();
  const children = new Map<number, number[]>();
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const pid = Number(name);
    try {
      if (pid !== process.pid && readFileSync(`/proc/${name}/cmdline`, 'utf8').includes(dir)) named.add(pid);
      // "pid (comm) state ppid …": comm may hold spaces and parentheses, so read after the last ')'.
      const stat = readFileSync(`/proc/${name}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), pid]);
    } catch {
      // gone
    }
  }
  const out = new Set<number>();
  const visit = (pid: number): void => {
    if (out.has(pid) || pid === process.pid) return;
    out.add(pid);
    for (const c of children.get(pid) ?? []) visit(c);
  };
  for (const pid of named) visit(pid);
  return [...out];
}

/** Mount points at or under `dir`, deepest first. */
export function mountsUnder(dir: string): string[] {
  const points = readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .map((l) => l.split(' ')[4] ?? '')
    .map((p) => p.replace(/\\040/g, ' '))
    .filter((p) => p === dir || p.startsWith(dir + '/'));
  return [...new Set(points)].sort((a, b) => b.length - a.length);
}

/** Unmount (lazily) what is left under `dir`, kill what still runs from it, remove it. */
function cleanupSync(dir: string): void {
  for (const pid of processesUnder(dir)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  for (const mp of mountsUnder(dir)) {
    try {
      execFileSync('umount', ['-l', mp], { stdio: 'ignore' });
    } catch {
      // already gone
    }
  }
  rmSync(dir, { recursive: true, force: true });
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

function httpStatus(url: string): Promise<number> {
  return new Promise((resolve) => {
    const req = request(url, { agent: false, timeout: 1_000 }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', () => resolve(0));
    req.on('timeout', () => req.destroy());
    req.end();
  });
}

const DIR_PREFIX = '/tmp/weft-dk-';

function readPid(file: string): number {
  try {
    const n = Number(readFileSync(file, 'utf8').trim());
    return Number.isInteger(n) && n > 0 ? n : 0;
  } catch {
    return 0;
  }
}

/**
 * Daemons left by a test process that died without cleaning up (killed by a timeout,
 * say): a directory whose `owner.pid` names a process that is gone. Its processes are
 * killed by PID, its mounts and files removed.
 */
function reapOrphans(): void {
  for (const name of readdirSync('/tmp')) {
    const dir = `/tmp/${name}`;
    if (!dir.startsWith(DIR_PREFIX)) continue;
    const owner = readPid(join(dir, 'owner.pid'));
    if (owner === 0 || alive(owner)) continue;
    // Its daemon, containerd, shims and registry all name the directory on their command lines.
    cleanupSync(dir);
  }
}

/** Start a daemon (and a registry) in a fresh directory under /tmp. */
export async function startDockerd(opts: StartOptions = {}): Promise<TestDockerd> {
  const why = dockerUnavailable();
  if (why !== null) throw new Error(why);
  reapOrphans();
  const dir = mkdtempSync(DIR_PREFIX);
  writeFileSync(join(dir, 'owner.pid'), String(process.pid));
  const onExit = (): void => cleanupSync(dir);
  process.once('exit', onExit);
  const children: ChildProcess[] = [];
  const logFile = join(dir, 'dockerd.log');
  const readLog = (): string => {
    try {
      return readFileSync(logFile, 'utf8');
    } catch {
      return '';
    }
  };

  const stopAll = async (engine: DockerEngine | null): Promise<void> => {
    if (engine !== null && children[0]?.exitCode === null) {
      try {
        const cs = await engine.listContainers({ all: true });
        await Promise.all(cs.map((c) => engine.removeContainer(c.Id, { force: true, missingOk: true }).catch(() => undefined)));
      } catch {
        // the daemon is going away anyway
      }
    }
    for (const c of [...children].reverse()) await terminate(c, 10_000);
    // containerd outlives a daemon that was killed; shims outlive both.
    for (let i = 0; i < 50 && processesUnder(dir).length > 0; i++) await sleep(100);
    cleanupSync(dir);
    process.removeListener('exit', onExit);
  };

  try {
    mkdirSync(join(dir, 'data'));
    mkdirSync(join(dir, 'exec'));
    const sock = join(dir, 'docker.sock');
    const fd = openSync(logFile, 'a');
    const dockerd = spawn(
      which('dockerd')!,
      [
        '--data-root', join(dir, 'data'),
        '--exec-root', join(dir, 'exec'),
        '--pidfile', join(dir, 'dockerd.pid'),
        '-H', `unix://${sock}`,
        '--iptables=false',
        '--ip6tables=false',
        '--bridge=none',
        '--storage-driver=overlay2',
        '--log-level=warn',
      ],
      { stdio: ['ignore', fd, fd] },
    );
    closeSync(fd);
    children.push(dockerd);
    const host = `unix://${sock}`;
    const engine = new DockerEngine({ host, timeoutMs: 30_000 });
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (dockerd.exitCode !== null || dockerd.signalCode !== null) throw new Error(`dockerd exited at start:\n${readLog().slice(-2000)}`);
      try {
        await engine.ping(AbortSignal.timeout(1_000));
        break;
      } catch {
        if (Date.now() > deadline) throw new Error(`dockerd did not answer within 30 s:\n${readLog().slice(-2000)}`);
        await sleep(50);
      }
    }

    let registry = '';
    let registryPid = 0;
    if (opts.registry === true) {
      const port = await freePort();
      registry = `127.0.0.1:${port}`;
      mkdirSync(join(dir, 'registry'));
      writeFileSync(
        join(dir, 'registry.yml'),
        [
          'version: 0.1',
          'log:',
          '  level: warn',
          '  accesslog:',
          '    disabled: true',
          'storage:',
          '  filesystem:',
          `    rootdirectory: ${join(dir, 'registry')}`,
          '  delete:',
          '    enabled: true',
          'http:',
          `  addr: ${registry}`,
          `  secret: weft-test-${port}`,
          '',
        ].join('\n'),
      );
      const rfd = openSync(join(dir, 'registry.log'), 'a');
      const reg = spawn(which('docker-registry')!, ['serve', join(dir, 'registry.yml')], { stdio: ['ignore', rfd, rfd] });
      closeSync(rfd);
      children.push(reg);
      registryPid = reg.pid!;
      const until = Date.now() + 15_000;
      while ((await httpStatus(`http://${registry}/v2/`)) !== 200) {
        if (reg.exitCode !== null || Date.now() > until) {
          throw new Error(`docker-registry did not start on ${registry}:\n${readFileSync(join(dir, 'registry.log'), 'utf8').slice(-2000)}`);
        }
        await sleep(50);
      }
    }

    const made = new Map<BaseImage, Promise<string>>();
    const image = (which: BaseImage): Promise<string> => {
      let p = made.get(which);
      if (p === undefined) {
        p = importBase(engine, which);
        made.set(which, p);
      }
      return p;
    };
    for (const b of opts.images ?? []) await image(b);

    let stopping: Promise<void> | undefined;
    return {
      dir,
      host,
      engine,
      pid: dockerd.pid!,
      registry,
      registryPid,
      image,
      log: readLog,
      stop: () => (stopping ??= stopAll(engine)),
    };
  } catch (err) {
    await stopAll(null);
    throw err;
  }
}

// ---------------------------------------------------------------------------------
// Base images

/** Parent directories of `path` (relative, no leading slash), outermost first. */
function parents(path: string): string[] {
  const out: string[] = [];
  for (let d = dirname(path); d !== '.' && d !== '/' && d !== ''; d = dirname(d)) out.unshift(d);
  return out;
}

/** busybox and its applet links, /etc/passwd, /tmp. */
function busyboxEntries(): TarEntry[] {
  const busybox = realpathSync(which('busybox')!);
  const applets = execFileSync(busybox, ['--list'], { encoding: 'utf8' })
    .split('\n')
    .map((s) => s.trim())
    .filter((s) => s !== '' && s !== 'busybox' && /^[\w.[-]+$/.test(s));
  return [
    { type: 'dir', name: 'bin' },
    { type: 'dir', name: 'etc' },
    { type: 'dir', name: 'root', mode: 0o700 },
    { type: 'dir', name: 'tmp', mode: 0o1777 },
    { type: 'file', name: 'bin/busybox', source: busybox, mode: 0o755 },
    ...applets.map((a): TarEntry => ({ type: 'symlink', name: `bin/${a}`, target: 'busybox' })),
    { type: 'file', name: 'etc/passwd', data: 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' },
    { type: 'file', name: 'etc/group', data: 'root:x:0:\nnogroup:x:65534:\n' },
  ];
}

/** The node binary running the tests and the shared libraries it loads, at their paths here. */
function nodeEntries(): TarEntry[] {
  const node = realpathSync(process.execPath);
  const files = new Map<string, string>([['usr/bin/node', node]]);
  for (const line of execFileSync('ldd', [node], { encoding: 'utf8' }).split('\n')) {
    // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
    const m = /(?:=>\s*)?(\/\S+)\s+\(0x/.exec(line);
    if (m !== null) files.set(m[1]!.slice(1), realpathSync(m[1]!));
  }
  const dirs = new Set<string>();
  for (const p of files.keys()) for (const d of parents(p)) dirs.add(d);
  dirs.add('usr/local/bin');
  for (const d of [...dirs]) for (const pd of parents(d)) dirs.add(pd);
  return [
    ...[...dirs].sort().map((d): TarEntry => ({ type: 'dir', name: d })),
    ...[...files].map(([name, source]): TarEntry => ({ type: 'file', name, source })),
    { type: 'symlink', name: 'usr/local/bin/node', target: '/usr/bin/node' },
  ];
}

async function importBase(engine: DockerEngine, which: BaseImage): Promise<string> {
  const name = IMAGES[which];
  const [repository, tag] = name.split(':') as [string, string];
  if (await engine.imageExists(name)) return name;
  const entries = which === 'busybox' ? busyboxEntries() : [...busyboxEntries(), ...nodeEntries()];
  const seen = new Set<string>();
  const unique = entries.filter((e) => (seen.has(e.name) ? false : (seen.add(e.name), true)));
  await engine.importImage(tarStream(unique), {
    repository,
    tag,
    changes: ['ENV PATH=/usr/local/bin:/usr/bin:/bin', which === 'node' ? 'CMD ["node"]' : 'CMD ["/bin/sh"]'],
  });
  return name;
}

/** True when `path` exists (for leak checks in tests). */
export const pathExists = (path: string): boolean => existsSync(path);
