/**
 * The Docker pieces that need no daemon: the tar writer (read back by the system's
 * `tar`), the log demultiplexer and JSON message parser over awkward chunkings, image
 * references, the generated Dockerfile and image module, option checks, and the
 * client's error when no daemon listens.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, readlinkSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { DockerEngine, DockerError, parseImageRef, publishPorts, registryOf } from '../src/docker/engine.ts';
import { jsonMessages, LogDemuxer } from '../src/docker/streams.ts';
import { tarBytes, tarStream, type TarEntry } from '../src/docker/tar.ts';
import { linkBundle } from '../src/cluster/bundle.ts';
import { dockerfileFor, DockerStorage, flowSlug, imageModule, IMAGE_BUNDLE_DIR } from '../src/storage/docker.ts';

const dir = mkdtempSync(join(tmpdir(), 'weft-docker-units-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function collect(s: NodeJS.ReadableStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of s) parts.push(Buffer.from(c as Uint8Array));
  return Buffer.concat(parts);
}

describe('tar writer', () => {
  const longDir = 'deep/' + 'd'.repeat(120) + '/' + 'e'.repeat(60);
  const veryLong = 'x'.repeat(200) + '/' + 'y'.repeat(150) + '.txt';
  const entries: TarEntry[] = [
    { type: 'dir', name: 'etc' },
    { type: 'file', name: 'etc/hello.txt', data: 'hello\n', mode: 0o640 },
    { type: 'file', name: 'empty', data: new Uint8Array(0) },
    { type: 'file', name: 'bin/run', data: '#!/bin/sh\necho ok\n', mode: 0o755 },
    { type: 'symlink', name: 'bin/alias', target: 'run' },
    { type: 'file', name: `${longDir}/f.txt`, data: 'split into prefix and name' },
    { type: 'file', name: veryLong, data: 'pax path' },
    { type: 'symlink', name: 'longlink', target: '/' + 'z'.repeat(150) },
    { type: 'file', name: 'unicodé/файл.txt', data: 'ünïcode' },
  ];

  it('writes archives GNU tar extracts exactly, long and non-ASCII names included', () => {
    const bytes = tarBytes(entries);
    expect(bytes.length % 512).toBe(0);
    const out = join(dir, 'x1');
    execFileSync('mkdir', ['-p', out]);
    execFileSync('tar', ['-x', '-C', out, '-f', '-'], { input: bytes });
    expect(readFileSync(join(out, 'etc/hello.txt'), 'utf8')).toBe('hello\n');
    expect(statSync(join(out, 'etc/hello.txt')).mode & 0o777).toBe(0o640);
    expect(statSync(join(out, 'bin/run')).mode & 0o777).toBe(0o755);
    expect(readFileSync(join(out, 'empty')).length).toBe(0);
    expect(readlinkSync(join(out, 'bin/alias'))).toBe('run');
    expect(readFileSync(join(out, longDir, 'f.txt'), 'utf8')).toBe('split into prefix and name');
    expect(readFileSync(join(out, veryLong), 'utf8')).toBe('pax path');
    expect(readlinkSync(join(out, 'longlink'))).toBe('/' + 'z'.repeat(150));
    expect(readFileSync(join(out, 'unicodé/файл.txt'), 'utf8')).toBe('ünïcode');
  });

  it('is deterministic, and a stream from source files gives the same bytes as memory', async () => {
    expect(Buffer.from(tarBytes(entries)).equals(Buffer.from(tarBytes(entries)))).toBe(true);
    const big = Buffer.alloc(300_000);
    for (let i = 0; i < big.length; i++) big[i] = (i * 7) & 0xff;
    writeFileSync(join(dir, 'big.bin'), big, { mode: 0o600 });
    const mem = tarBytes([{ type: 'file', name: 'big.bin', data: big, mode: 0o600 }]);
    const streamed = await collect(tarStream([{ type: 'file', name: 'big.bin', source: join(dir, 'big.bin') }]));
    expect(streamed.equals(Buffer.from(mem))).toBe(true);
  });

  it('refuses a source file in tarBytes and fails a stream whose source is missing', async () => {
    expect(() => tarBytes([{ type: 'file', name: 'a', source: '/etc/hostname' }])).toThrow(/use tarStream/);
    await expect(collect(tarStream([{ type: 'file', name: 'a', source: join(dir, 'missing') }]))).rejects.toThrow(/ENOENT/);
  });
});

describe('stream formats', () => {
  const frame = (type: number, text: string): Buffer => {
    const body = Buffer.from(text);
    const h = Buffer.alloc(8);
    h[0] = type;
    h.writeUInt32BE(body.length, 4);
    return Buffer.concat([h, body]);
  };

  it('demultiplexes frames whatever the chunking (one byte at a time, several per chunk)', () => {
    const all = Buffer.concat([frame(1, 'out 1\n'), frame(2, 'err 1\n'), frame(1, ''), frame(1, 'x'.repeat(70_000)), frame(2, 'last')]);
    for (const size of [1, 3, 8, 9, 4096, all.length]) {
      const d = new LogDemuxer();
      const got: { stream: string; text: string }[] = [];
      for (let i = 0; i < all.length; i += size) for (const f of d.push(all.subarray(i, i + size))) got.push({ stream: f.stream, text: f.data.toString() });
      d.end();
      expect(got.map((g) => g.stream)).toEqual(['stdout', 'stderr', 'stdout', 'stdout', 'stderr']);
      expect(got[0]!.text).toBe('out 1\n');
      expect(got[3]!.text.length).toBe(70_000);
      expect(got[4]!.text).toBe('last');
    }
    const d = new LogDemuxer();
    d.push(frame(1, 'cut').subarray(0, 10));
    expect(() => d.end()).toThrow(/inside a frame/);
  });

  it('parses JSON messages split anywhere, multi-byte characters included', async () => {
    const text = '{"stream":"Step 1/2 : FROM x"}\r\n{"stream":"\\n"}\n\n{"status":"ünï"}\n{"aux":{"ID":"sha256:1"}}';
    const bytes = Buffer.from(text);
    async function* chunks(size: number): AsyncGenerator<Uint8Array> {
      for (let i = 0; i < bytes.length; i += size) yield bytes.subarray(i, i + size);
    }
    for (const size of [1, 2, 5, bytes.length]) {
      const got: unknown[] = [];
      for await (const m of jsonMessages(chunks(size))) got.push(m);
      expect(got).toEqual([{ stream: 'Step 1/2 : FROM x' }, { stream: '\n' }, { status: 'ünï' }, { aux: { ID: 'sha256:1' } }]);
    }
    const bad = async function* (): AsyncGenerator<string> {
      yield '<html>oops</html>\n';
    };
    await expect(async () => {
      for await (const _ of jsonMessages(bad())) void _;
    }).rejects.toThrow(/not JSON: <html>/);
  });
});

describe('image references and ports', () => {
  it('splits repository, tag and digest, keeping a registry port in the repository', () => {
    expect(parseImageRef('busybox')).toEqual({ repository: 'busybox' });
    expect(parseImageRef('weft/demo:abc')).toEqual({ repository: 'weft/demo', tag: 'abc' });
    expect(parseImageRef('127.0.0.1:5000/weft/demo')).toEqual({ repository: '127.0.0.1:5000/weft/demo' });
    expect(parseImageRef('127.0.0.1:5000/weft/demo:1.2')).toEqual({ repository: '127.0.0.1:5000/weft/demo', tag: '1.2' });
    expect(parseImageRef('r.io/a@sha256:ff')).toEqual({ repository: 'r.io/a', digest: 'sha256:ff' });
    expect(registryOf('127.0.0.1:5000/weft/demo:1')).toBe('127.0.0.1:5000');
    expect(registryOf('localhost/x')).toBe('localhost');
    expect(registryOf('weft/demo:1')).toBe('docker.io');
    expect(registryOf('node:20')).toBe('docker.io');
    expect(publishPorts({ '8080/tcp': 18080, '53/udp': 1053, 9000: 19000 })).toEqual({
      '8080/tcp': [{ HostPort: '18080' }],
      '53/udp': [{ HostPort: '1053' }],
      '9000/tcp': [{ HostPort: '19000' }],
    });
  });
});

describe('DockerStorage without a daemon', () => {
  it('generates a Dockerfile that copies the bundle and names the flow, with quoting', () => {
    const text = dockerfileFor({
      baseImage: 'node:20-slim',
      flowName: 'my "flow" $HOME',
      bundlePath: `${IMAGE_BUNDLE_DIR}/my-flow/${'a'.repeat(64)}.mjs`,
      bundleHash: 'a'.repeat(64),
      weftPath: '/opt/weft/app',
      env: { EXTRA: 'x y' },
      imageLabels: { team: 'data' },
      extraCommands: ['RUN echo hi'],
    });
    expect(text).toBe(
      [
        '# Built by weft\'s DockerStorage for flow "my \\"flow\\" \\$HOME".',
        'FROM node:20-slim',
        `COPY flow.mjs /opt/weft/flows/my-flow/${'a'.repeat(64)}.mjs`,
        `ENV WEFT_FLOW_NAME="my \\"flow\\" \\$HOME" \\\n    WEFT_FLOW_PATH="/opt/weft/flows/my-flow/${'a'.repeat(64)}.mjs" \\\n    WEFT_PATH="/opt/weft/app" \\\n    EXTRA="x y"`,
        `LABEL team="data" \\\n    weft.flow="my \\"flow\\" \\$HOME" \\\n    weft.bundle="${'a'.repeat(64)}" \\\n    weft.flow-path="/opt/weft/flows/my-flow/${'a'.repeat(64)}.mjs"`,
        'RUN echo hi',
        '',
      ].join('\n'),
    );
    const base = { baseImage: 'b', flowName: 'f', bundlePath: '/p', bundleHash: 'h', weftPath: '/w' };
    expect(() => dockerfileFor({ ...base, flowName: 'two\nlines' })).toThrow(/line break/);
    expect(() => dockerfileFor({ ...base, env: { 'BAD KEY': '1' } })).toThrow(/not a valid ENV or LABEL name/);
    expect(() => dockerfileFor({ ...base, extraCommands: ['RUN a\nRUN b'] })).toThrow(/one line/);
    expect(() => dockerfileFor({ ...base, baseImage: 'node:20 AS x' })).toThrow(/not an image reference/);
  });

  it('links the bundle to the weft path in the image and keeps it otherwise as bundled', () => {
    const text = 'import { task } from "weft-runtime:/src/index.ts";\nimport "weft-runtime:/src/flow/task.ts";\nexport const x = "see weft-runtime:/ here";\n';
    const code = new TextEncoder().encode(text);
    const m = imageModule(code, '/srv/weft app');
    expect(m).toBe(
      'import { task } from "file:///srv/weft%20app/src/index.ts";\nimport "file:///srv/weft%20app/src/flow/task.ts";\nexport const x = "see weft-runtime:/ here";\n',
    );
    // A trailing slash on the path changes nothing.
    expect(imageModule(code, '/srv/weft app/')).toBe(m);
    expect(() => linkBundle(code, '/not/a/url/')).toThrow(/file: URL ending in "\/"/);
  });

  it('a flow file that does not compile fails the build naming the file and line, before any daemon is asked', async () => {
    const broken = join(dir, 'broken.ts');
    writeFileSync(broken, 'export const x = 1;\nexport default flow("b", () => { return ;;; ) });\n');
    const storage = new DockerStorage({ engine: { host: `unix://${join(dir, 'no-daemon.sock')}` } });
    const err = await storage.build({ flowFile: broken, flowName: 'b' }).catch((x: unknown) => x);
    expect(err).toMatchObject({ name: 'StorageError', code: 'STORAGE_BUILD' });
    expect((err as Error).message).toMatch(new RegExp(`^cannot bundle ${broken.replace(/[.]/g, '\\.')}: ${broken.replace(/[.]/g, '\\.')}:2: `));
  });

  it('slugs flow names and checks its options', () => {
    expect(flowSlug('My Flow: ETL #2')).toBe('my-flow-etl-2');
    expect(flowSlug('---')).toBe('flow');
    expect(flowSlug('ü'.repeat(3))).toBe('flow');
    expect(() => new DockerStorage({ imageName: 'Upper/Case' })).toThrow(/not a valid repository name/);
    expect(() => new DockerStorage({ imageTag: ':bad' })).toThrow(/not a valid tag/);
    expect(() => new DockerStorage({ registry: 'http://r:5000' })).toThrow(/host\[:port\]/);
    expect(() => new DockerStorage({ weftPath: 'relative' })).toThrow(/absolute/);
    expect(new DockerStorage().labels({ kind: 'docker', image: 'x', path: '/p', flow: 'f' })).toEqual([]);
  });
});

describe('DockerEngine without a daemon', () => {
  it('names the address it cannot reach', async () => {
    const e = new DockerEngine({ host: `unix://${join(dir, 'no.sock')}` });
    const err = await e.ping().catch((x: unknown) => x);
    expect(err).toBeInstanceOf(DockerError);
    expect(err).toMatchObject({ code: 'DOCKER_UNREACHABLE' });
    expect((err as Error).message).toMatch(/cannot reach the Docker daemon at unix:\/\/.*no\.sock: .*ENOENT/);
    expect(() => new DockerEngine({ host: 'ssh://somewhere' })).toThrow(/unsupported Docker host/);
    expect(new DockerEngine({ host: 'tcp://127.0.0.1:1', apiVersion: 'v1.40' }).apiVersion).toBe('1.40');
  });
});
