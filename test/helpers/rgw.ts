/**
 * A real S3 endpoint for tests: a one-node Ceph cluster (one monitor, one OSD on the
 * in-memory object store) with a RADOS Gateway in front, on free 127.0.0.1 ports, in a
 * temporary directory. It takes about 12 s to come up.
 *
 * Steps: a monitor keyring and monmap, `ceph-mon --mkfs`, the monitor (foreground), an
 * OSD id from `ceph osd new`, `ceph-osd --mkfs`, the OSD, radosgw (beast frontend), then,
 * once it answers HTTP, an S3 user with known keys (`radosgw-admin user create`). Ceph's
 * own authentication (cephx) is off, but the gateway still checks S3 signatures. Clients
 * must speak `crc` mode on the wire (`ms mon client mode` / `ms client mode`), or
 * radosgw loops on `get_initial_auth_request returned -13`.
 *
 * Every daemon is started in the foreground as a direct child and stopped by its PID
 * (SIGTERM, then SIGKILL after a grace period); `stop()` also removes the directory.
 * Waits are bounded; a daemon that exits early fails the start with its log's last lines.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { openSync, closeSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export interface Rgw {
  /** `http://127.0.0.1:<port>` */
  readonly endpoint: string;
  readonly region: string;
  readonly accessKeyId: string;
  readonly secretAccessKey: string;
  readonly dir: string;
  /** PIDs of the monitor, the OSD and the gateway. */
  readonly pids: readonly number[];
  stop(): Promise<void>;
}

export const RGW_BINARIES = ['ceph-mon', 'ceph-osd', 'radosgw', 'ceph', 'ceph-authtool', 'monmaptool', 'radosgw-admin'] as const;

const ACCESS_KEY = 'WEFTTESTKEY';
const SECRET_KEY = 'weft-test-secret';

/** A port nobody listens on right now (127.0.0.1). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr !== null ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

function run(cmd: string, args: readonly string[], cwd: string, timeoutMs: number): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { cwd, timeout: timeoutMs, killSignal: 'SIGKILL', env: { ...process.env, CEPH_CONF: join(cwd, 'ceph.conf') } }, (err, stdout, stderr) => {
      if (err !== null) reject(new Error(`${cmd} ${args.join(' ')} failed: ${(stderr || err.message).trim().split('\n').slice(-3).join(' | ')}`));
      else resolve(stdout);
    });
  });
}

function conf(dir: string, port: number, monPort: number, fsid: string): string {
  return `[global]
fsid = ${fsid}
mon host = v2:127.0.0.1:${monPort}
mon initial members = a
public addr = 127.0.0.1
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms client mode = crc
ms bind msgr1 = false
run dir = ${dir}/run
admin socket = ${dir}/run/$name.asok
log file = ${dir}/log/$name.log
keyring = ${dir}/keyring
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon max pg per osd = 1000
osd crush chooseleaf type = 0
[mon]
mon data = ${dir}/mon/$cluster-$id
mon data avail warn = 1
mon data avail crit = 0
[osd]
osd data = ${dir}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 268435456
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:${port}
rgw data = ${dir}/rgw
`;
}

interface Daemon {
  readonly name: string;
  readonly child: ChildProcess;
  readonly exited: Promise<void>;
  readonly logFile: string;
}

function tail(file: string): string {
  try {
    return readFileSync(file, 'utf8').trim().split('\n').slice(-5).join(' | ');
  } catch {
    return '(no log)';
  }
}

export async function startRgw(timeoutMs = 60_000): Promise<Rgw> {
  const deadline = Date.now() + timeoutMs;
  const dir = await mkdtemp(join(tmpdir(), 'weft-rgw-'));
  const daemons: Daemon[] = [];
  const stop = async (): Promise<void> => {
    // The gateway first, the monitor last (each stops cleanly while the others are up).
    for (const d of [...daemons].reverse()) {
      if (d.child.exitCode !== null || d.child.signalCode !== null) continue;
      try {
        process.kill(d.child.pid!, 'SIGTERM');
      } catch {
        continue;
      }
      const t = setTimeout(() => {
        try {
          process.kill(d.child.pid!, 'SIGKILL');
        } catch {
          // gone
        }
      }, 3_000);
      await d.exited;
      clearTimeout(t);
    }
    await rm(dir, { recursive: true, force: true });
  };
  const daemon = (name: string, cmd: string, args: readonly string[]): Daemon => {
    const logFile = join(dir, 'log', `${name}.out`);
    const fd = openSync(logFile, 'a');
    const child = spawn(cmd, args, { cwd: dir, stdio: ['ignore', fd, fd], env: { ...process.env, CEPH_CONF: join(dir, 'ceph.conf') } });
    closeSync(fd);
    const d: Daemon = { name, child, logFile, exited: new Promise((r) => child.once('exit', () => r())) };
    child.once('error', () => undefined);
    daemons.push(d);
    return d;
  };
  const checkAlive = (): void => {
    for (const d of daemons) {
      if (d.child.exitCode !== null || d.child.signalCode !== null) {
        throw new Error(`rgw: ${d.name} exited early (${d.child.exitCode ?? d.child.signalCode}): ${tail(d.logFile)}`);
      }
    }
  };
  const left = (): number => Math.max(1_000, deadline - Date.now());

  try {
    const port = await freePort();
    let monPort = await freePort();
    while (monPort === port) monPort = await freePort();
    for (const d of ['run', 'log', 'mon', 'osd/ceph-0', 'rgw']) await mkdir(join(dir, d), { recursive: true });
    const fsid = randomUUID();
    await writeFile(join(dir, 'ceph.conf'), conf(dir, port, monPort, fsid));
    const c = ['-c', join(dir, 'ceph.conf')];

    await run('ceph-authtool', ['--create-keyring', join(dir, 'keyring'), '--gen-key', '-n', 'mon.', '--cap', 'mon', 'allow *'], dir, left());
    await run('monmaptool', ['--create', '--addv', 'a', `[v2:127.0.0.1:${monPort}]`, '--fsid', fsid, join(dir, 'monmap')], dir, left());
    await run('ceph-mon', [...c, '--mkfs', '-i', 'a', '--monmap', join(dir, 'monmap'), '--keyring', join(dir, 'keyring')], dir, left());
    daemon('mon', 'ceph-mon', [...c, '-i', 'a', '-f']);

    const uuid = randomUUID();
    const id = (await run('ceph', [...c, '--connect-timeout', '30', 'osd', 'new', uuid], dir, Math.min(left(), 40_000))).trim();
    if (!/^\d+$/.test(id)) throw new Error(`rgw: ceph osd new answered "${id}"`);
    await run('ceph-osd', [...c, '-i', id, '--mkfs', '--osd-uuid', uuid], dir, left());
    daemon('osd', 'ceph-osd', [...c, '-i', id, '-f']);
    daemon('rgw', 'radosgw', [...c, '-n', 'client.rgw.a', '-f']);

    const endpoint = `http://127.0.0.1:${port}`;
    for (;;) {
      checkAlive();
      try {
        const res = await fetch(`${endpoint}/`, { signal: AbortSignal.timeout(2_000) });
        await res.arrayBuffer();
        break;
      } catch {
        // not up yet
      }
      if (Date.now() > deadline) throw new Error(`rgw: no answer on ${endpoint} within ${timeoutMs} ms: ${tail(join(dir, 'log', 'rgw.out'))}`);
      await new Promise((r) => setTimeout(r, 250));
    }
    await run(
      'radosgw-admin',
      [...c, 'user', 'create', '--uid=weft', '--display-name=weft', `--access-key=${ACCESS_KEY}`, `--secret=${SECRET_KEY}`],
      dir,
      left(),
    );
    return {
      endpoint,
      region: 'us-east-1',
      accessKeyId: ACCESS_KEY,
      secretAccessKey: SECRET_KEY,
      dir,
      pids: daemons.map((d) => d.child.pid!),
      stop,
    };
  } catch (err) {
    await stop();
    throw err;
  }
}
