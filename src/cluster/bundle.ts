/**
 * Code shipping: a flow's modules as one esbuild bundle, content-addressed by the
 * sha256 of its code, so that workers without the code on disk can run it.
 *
 * - Client (`buildBundle`): bundles the modules (ESM, platform node) with everything they
 *   import, except weft itself: imports of files under this package's `src/` stay
 *   external as `weft-runtime:/src/…` placeholders, which a worker points at its own
 *   installation (`linkBundle`), so the bundle's tasks and the worker share one weft
 *   (one task registry, one `context()`). The source map travels inline, its sources
 *   the original file URLs: task keys are `<module url>#<name>`, and `callerModuleUrl()`
 *   maps a `task()` call made from a bundle file back to the module it was written in.
 * - Worker (`BundleCache`): fetches a bundle once per hash (concurrent runs share the
 *   fetch), verifies the hash, writes it linked into
 *   `<os.tmpdir()>/weft-bundles/<installation>/<hash>.mjs` (atomic rename) and hands the
 *   run's executor that file URL as its module. The file is reused across runs,
 *   reconnects and worker processes of the same installation.
 *
 * Code in a bundle sees the bundle file as its `import.meta.url`; files it reads next to
 * its sources must be reachable by absolute path on the workers.
 */
import { createHash } from 'node:crypto';
import { mkdir, rename, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve as resolvePath, sep } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import type { StdinOptions } from 'esbuild';
import { WeftError } from '../errors.ts';

/** This package's root (`file:///…/`) and its `src/` directory as a path. */
const ROOT_URL = new URL('../../', import.meta.url).href;
const SRC_DIR = fileURLToPath(new URL('../', import.meta.url));
/** Imports of weft's own files become `weft-runtime:/src/<path>` in a bundle. */
export const RUNTIME_PREFIX = 'weft-runtime:/';
const HASH_RE = /^[0-9a-f]{64}$/;
/** Where the bundle pretends to be written (its source map's sources are relative to it). */
const OUTFILE = '/weft-bundle.mjs';
/** CommonJS dependencies bundled into ESM call `require` for Node's built-in modules. */
const BANNER = 'import { createRequire as __weftCreateRequire } from "node:module";\nconst require = __weftCreateRequire(import.meta.url);';

export interface Bundle {
  /** sha256 of `code`, hex. */
  readonly hash: string;
  readonly code: Uint8Array;
}

export function bundleHash(code: Uint8Array): string {
  return createHash('sha256').update(code).digest('hex');
}

export function isBundleHash(s: string): boolean {
  return HASH_RE.test(s);
}

/**
 * One ESM bundle of `modules` (file URLs) and what they import, weft excepted (see the
 * module comment). Deterministic: the same sources give the same bytes and hash.
 * Throws a WeftError BUNDLE_BUILD naming the first esbuild errors.
 */
export async function buildBundle(modules: readonly string[]): Promise<Bundle> {
  const paths: string[] = [];
  for (const m of modules) {
    if (!m.startsWith('file://')) throw new WeftError('BUNDLE_BUILD', `cannot bundle module ${m}: only file: URLs can be bundled`);
    const p = fileURLToPath(m);
    if (!isOwn(p)) paths.push(p);
  }
  const { js, map } = await esbuildBundle(
    { stdin: { contents: paths.map((p) => `import ${JSON.stringify(p)};`).join('\n'), resolveDir: '/', sourcefile: 'weft-bundle-entry.js', loader: 'js' } },
    true,
    modules.join(', '),
  );
  // The map's sources as the original file URLs (what task keys are made of), inline.
  const sm = JSON.parse(map!) as { sources: string[] };
  sm.sources = sm.sources.map((s) => (s.includes(':') || s.startsWith('<') ? s : pathToFileURL(resolvePath(dirname(OUTFILE), s)).href));
  const body = js.replace(/\n\/\/# sourceMappingURL=\S*\s*$/, '\n');
  const text = `${body}//# sourceMappingURL=data:application/json;base64,${Buffer.from(JSON.stringify(sm)).toString('base64')}\n`;
  const code = new TextEncoder().encode(text);
  return { hash: bundleHash(code), code };
}

/**
 * One ESM bundle of the module `file` (a path) that keeps its exports, with no source
 * map: the code storages ship a flow this way (a loader imports the bundle and finds the
 * flow among its exports; without a map its tasks are keyed by the file the loader
 * writes). Same rules as `buildBundle` otherwise; throws a WeftError BUNDLE_BUILD.
 */
export async function bundleModule(file: string): Promise<Bundle> {
  const { js } = await esbuildBundle({ entryPoints: [file] }, false, file);
  const code = new TextEncoder().encode(js);
  return { hash: bundleHash(code), code };
}

/** The esbuild run both bundles share: weft's own files external, names kept, a `require` for CommonJS. */
async function esbuildBundle(input: { stdin: StdinOptions } | { entryPoints: string[] }, sourcemap: boolean, what: string): Promise<{ js: string; map: string | null }> {
  const { build } = await import('esbuild');
  let result;
  try {
    result = await build({
      ...input,
      bundle: true,
      format: 'esm',
      platform: 'node',
      target: 'node20',
      outfile: OUTFILE,
      absWorkingDir: '/',
      write: false,
      sourcemap: sourcemap ? 'external' : false,
      sourcesContent: false,
      // Task names default to function names: renaming a clashing top-level function must not change them.
      keepNames: true,
      banner: { js: BANNER },
      logLevel: 'silent',
      plugins: [
        {
          name: 'weft-runtime',
          setup(b) {
            b.onResolve({ filter: /.*/ }, async (args) => {
              if (args.kind === 'entry-point' || (args.pluginData as { weft?: boolean } | undefined)?.weft === true) return undefined;
              const spec = args.path.startsWith('file://') ? fileURLToPath(args.path) : args.path;
              const r = await b.resolve(spec, { kind: args.kind, importer: args.importer, resolveDir: args.resolveDir, pluginData: { weft: true } });
              if (r.errors.length > 0) return { errors: r.errors };
              if (!r.external && r.namespace === 'file' && isOwn(r.path)) {
                return { path: RUNTIME_PREFIX + 'src/' + relative(SRC_DIR, r.path).split(sep).join('/'), external: true };
              }
              return { path: r.path, namespace: r.namespace, external: r.external, sideEffects: r.sideEffects, suffix: r.suffix, pluginData: r.pluginData as unknown };
            });
          },
        },
      ],
    });
  } catch (err) {
    const errors = (err as { errors?: { text: string; location?: { file: string; line: number } | null }[] }).errors;
    const detail =
      errors !== undefined && errors.length > 0
        ? errors
            .slice(0, 3)
            .map((e) => (e.location != null ? `${resolvePath('/', e.location.file)}:${e.location.line}: ${e.text}` : e.text))
            .join('; ')
        : ((err as Error).message.split('\n')[0] ?? '');
    throw new WeftError('BUNDLE_BUILD', `cannot bundle ${what}: ${detail}`, { cause: err });
  }
  const js = result.outputFiles.find((f) => f.path.endsWith('.mjs'));
  const map = result.outputFiles.find((f) => f.path.endsWith('.map'));
  if (js === undefined || (sourcemap && map === undefined)) throw new WeftError('BUNDLE_BUILD', `esbuild produced no output for ${what}`);
  return { js: js.text, map: map?.text ?? null };
}

function isOwn(path: string): boolean {
  return path.startsWith(SRC_DIR);
}

/**
 * A bundle's code with its `weft-runtime:/` placeholders pointing at the files of the weft
 * installation whose root is the file URL `root` (ending in `/`; default: this one).
 * DockerStorage links to the path weft has inside the image.
 */
export function linkBundle(code: Uint8Array, root: string = ROOT_URL): string {
  if (!root.startsWith('file://') || !root.endsWith('/')) throw new TypeError(`linkBundle: root must be a file: URL ending in "/", got ${JSON.stringify(root)}`);
  return new TextDecoder().decode(code).replace(/(["'])weft-runtime:\//g, (_m, q: string) => q + root);
}

/** `<os.tmpdir()>/weft-bundles/<installation>`: linked bundles of this weft installation. */
export function defaultBundleDir(): string {
  const installation = createHash('sha256').update(ROOT_URL).digest('hex').slice(0, 12);
  return join(tmpdir(), 'weft-bundles', installation);
}

/**
 * A worker's bundles: each fetched once per hash, verified, linked and written to
 * `dir`; `get` resolves to the file URL to import.
 */
export class BundleCache {
  private readonly files = new Map<string, Promise<string>>();
  /** Fetched from the scheduler (not found on disk): for diagnostics and tests. */
  fetches = 0;

  constructor(
    private readonly dir: string,
    private readonly fetch: (hash: string) => Promise<Uint8Array>,
  ) {}

  /** The file URL of bundle `hash`, fetching it first when needed. Rejects with a WeftError BUNDLE_UNAVAILABLE. */
  get(hash: string): Promise<string> {
    let p = this.files.get(hash);
    if (p === undefined) {
      p = this.load(hash);
      this.files.set(hash, p);
      // A failure is not cached: the next run asks again.
      p.catch(() => {
        if (this.files.get(hash) === p) this.files.delete(hash);
      });
    }
    return p;
  }

  private async load(hash: string): Promise<string> {
    const fail = (why: string, cause?: unknown): WeftError =>
      new WeftError('BUNDLE_UNAVAILABLE', `code bundle ${hash} is unavailable: ${why}`, cause !== undefined ? { cause } : undefined);
    if (!isBundleHash(hash)) throw fail('not a sha256 hex hash');
    const file = join(this.dir, `${hash}.mjs`);
    try {
      await stat(file);
      return pathToFileURL(file).href;
    } catch {
      // not cached on disk yet
    }
    let code: Uint8Array;
    try {
      code = await this.fetch(hash);
    } catch (err) {
      throw fail((err as Error).message, err);
    }
    this.fetches++;
    const got = bundleHash(code);
    if (got !== hash) throw fail(`the bytes received hash to ${got}`);
    try {
      await mkdir(this.dir, { recursive: true });
      const tmp = `${file}.${process.pid}.${Math.random().toString(36).slice(2)}.tmp`;
      await writeFile(tmp, linkBundle(code));
      await rename(tmp, file);
    } catch (err) {
      throw fail(`cannot write it to ${this.dir}: ${(err as Error).message}`, err);
    }
    return pathToFileURL(file).href;
  }
}

/**
 * The scheduler's bundles, in memory by hash: bounded by total bytes, least recently
 * used dropped first (a run whose bundle was dropped fails its fetches clearly; the
 * client sends it again with its next run).
 */
export class BundleStore {
  private readonly codes = new Map<string, Uint8Array>();
  /** Why recent `put`s were refused, by the hash they claimed. */
  private readonly refused = new Map<string, string>();
  private bytes = 0;
  readonly stats = { stored: 0, fetched: 0, fetchedBytes: 0, refused: 0 };

  constructor(private readonly maxBytes = 256 * 1024 * 1024) {}

  get size(): number {
    return this.codes.size;
  }

  /** Keep a bundle; returns why it was refused (hash mismatch, too big), null when kept. */
  put(hash: string, code: Uint8Array): string | null {
    const got = bundleHash(code);
    let why: string | null = null;
    if (got !== hash) why = `its code hashes to ${got}, not ${hash}`;
    else if (code.byteLength > this.maxBytes) why = `${code.byteLength} bytes is over the scheduler's bundle budget of ${this.maxBytes} bytes`;
    if (why !== null) {
      this.stats.refused++;
      this.refused.delete(hash);
      this.refused.set(hash, why);
      if (this.refused.size > 64) this.refused.delete(this.refused.keys().next().value!);
      return why;
    }
    this.refused.delete(hash);
    const old = this.codes.get(hash);
    if (old !== undefined) {
      this.codes.delete(hash);
      this.codes.set(hash, old);
      return null;
    }
    this.codes.set(hash, code);
    this.bytes += code.byteLength;
    this.stats.stored++;
    for (const [h, c] of this.codes) {
      if (this.bytes <= this.maxBytes) break;
      this.codes.delete(h);
      this.bytes -= c.byteLength;
    }
    return null;
  }

  has(hash: string): boolean {
    return this.codes.has(hash);
  }

  /** A bundle for a worker (counted), most recently used from now on. */
  fetch(hash: string): Uint8Array | undefined {
    const code = this.codes.get(hash);
    if (code === undefined) return undefined;
    this.codes.delete(hash);
    this.codes.set(hash, code);
    this.stats.fetched++;
    this.stats.fetchedBytes += code.byteLength;
    return code;
  }

  /** Why `hash` is not here, as the error a run fails with. */
  missing(hash: string): WeftError {
    const why = this.refused.get(hash);
    return new WeftError(
      'BUNDLE_UNAVAILABLE',
      why !== undefined
        ? `code bundle ${hash} was refused by the scheduler: ${why}`
        : `code bundle ${hash} is unknown to the scheduler (send it with putBundle before the run that names it)`,
    );
  }
}
