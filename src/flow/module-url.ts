/**
 * Which module called `task()`? Workers import that module to find the task again, so
 * its URL is part of the task's registry key.
 *
 * Read once per `task()` definition (never per call) from a V8 stack trace: the first
 * frame outside weft's own `src/flow/` files. Frames show `file://` URLs under plain Node
 * ESM and absolute `.ts` paths under tsx and vitest; both become file URLs. Query strings
 * and hashes (cache busting, loader namespaces) are dropped so that every thread computes
 * the same key.
 *
 * A frame in a code bundle a worker fetched (`…/weft-bundles/…/<sha256>.mjs`, see
 * `cluster/bundle.ts`) is mapped through the bundle's inline source map back to the
 * module it was written in, so that its tasks get the same keys as on the client.
 */
import { readFileSync } from 'node:fs';
import { SourceMap } from 'node:module';
import { fileURLToPath, pathToFileURL } from 'node:url';

/** `file:///…/src/flow/`: frames in here are weft's own. */
const OWN_DIR = new URL('.', import.meta.url).href;

// `    at name (location:line:col)` or `    at location:line:col`; location is a file URL,
// a POSIX path or a Windows path.
const FRAME_RE = /((?:file:\/\/|\/|[A-Za-z]:[\\/])[^()\n]*?):(\d+):(\d+)\)?\s*$/;

/** A path or URL as a file URL without query or hash; '' when it is not a file (node:, eval, <anonymous>). */
export function toModuleUrl(location: string): string {
  let loc = location.trim();
  if (loc.startsWith('file://')) return stripQuery(loc);
  if (loc.startsWith('/') || /^[A-Za-z]:[\\/]/.test(loc)) {
    loc = stripQuery(loc);
    return pathToFileURL(loc).href;
  }
  return '';
}

function stripQuery(s: string): string {
  const q = s.search(/[?#]/);
  return q < 0 ? s : s.slice(0, q);
}

/** Module URL of the first stack frame outside `src/flow/` ('' when none can be read). */
export function callerModuleUrl(): string {
  const saved = Error.stackTraceLimit;
  Error.stackTraceLimit = 30;
  let stack: string;
  try {
    stack = new Error().stack ?? '';
  } finally {
    Error.stackTraceLimit = saved;
  }
  const lines = stack.split('\n');
  for (let i = 1; i < lines.length; i++) {
    const m = FRAME_RE.exec(lines[i]!);
    if (m === null) continue;
    let url = toModuleUrl(m[1]!);
    if (BUNDLE_FILE_RE.test(url)) url = bundleSource(url, Number(m[2]), Number(m[3]));
    if (url === '' || url.startsWith(OWN_DIR)) continue;
    return url;
  }
  return '';
}

/** A linked code bundle in a worker's cache (`cluster/bundle.ts`). */
const BUNDLE_FILE_RE = /\/weft-bundles\/[^/]+\/[0-9a-f]{64}\.mjs$/;
const bundleMaps = new Map<string, SourceMap | null>();

/** The original module URL of a position (1-based line and column) in a bundle file; the bundle's own URL when unknown. */
function bundleSource(url: string, line: number, column: number): string {
  let map = bundleMaps.get(url);
  if (map === undefined) {
    map = null;
    try {
      const text = readFileSync(fileURLToPath(url), 'utf8');
      const at = text.lastIndexOf('//# sourceMappingURL=data:application/json;base64,');
      if (at >= 0) {
        const b64 = text.slice(at + '//# sourceMappingURL=data:application/json;base64,'.length).trim();
        map = new SourceMap(JSON.parse(Buffer.from(b64, 'base64').toString('utf8')) as ConstructorParameters<typeof SourceMap>[0]);
      }
    } catch {
      map = null;
    }
    bundleMaps.set(url, map);
  }
  if (map === null) return url;
  const e = map.findEntry(line - 1, column - 1) as { originalSource?: string };
  return typeof e.originalSource === 'string' ? toModuleUrl(e.originalSource) || url : url;
}
