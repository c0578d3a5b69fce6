/**
 * Which module called `task()`? Workers import that module to find the task again, so
 * its URL is part of the task's registry key.
 *
 * Read once per `task()` definition (never per call) from a V8 stack trace: the first
 * frame outside weft's own `src/flow/` files. Frames show `file://` URLs under plain Node
 * ESM and absolute `.ts` paths under tsx and vitest; both become file URLs. Query strings
 * and hashes (cache busting, loader namespaces) are dropped so that every thread computes
 * the same key.
 */
import { pathToFileURL } from 'node:url';

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
    const url = toModuleUrl(m[1]!);
    if (url === '' || url.startsWith(OWN_DIR)) continue;
    return url;
  }
  return '';
}
