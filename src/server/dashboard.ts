/**
 * The weft server's dashboard: a single-page app under `/ui/` (flow runs, one run with
 * its task runs and live logs, flows, agents), served by `weft server` itself.
 *
 * The page is static: HTML, CSS and one ES module read from `./dashboard/` once, at the
 * first request, and kept in memory. It holds no data, so it is served without a token;
 * everything it shows comes from the JSON API and the `/api/events` feed, which check
 * the token as they do for any client (the page asks for it on a 401).
 *
 * Every answer carries a Content-Security-Policy that allows scripts, styles and
 * connections to this origin only (plus its own WebSocket origin for the feed) and no
 * inline script, so a flow name or a log line that reaches the DOM as markup could not
 * run anyway; the page inserts server text with `textContent` in the first place.
 */
import { readFileSync } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';

interface Asset {
  readonly body: Buffer;
  readonly type: string;
}

/** The files under `./dashboard/` the page is made of, by their path under `/ui/`. */
const FILES: Readonly<Record<string, { file: string; type: string }>> = {
  '': { file: 'index.html', type: 'text/html; charset=utf-8' },
  'app.js': { file: 'app.js', type: 'text/javascript; charset=utf-8' },
  'style.css': { file: 'style.css', type: 'text/css; charset=utf-8' },
};

let assets: Map<string, Asset> | null = null;

function loadAssets(): Map<string, Asset> {
  if (assets !== null) return assets;
  const dir = new URL('./dashboard/', import.meta.url);
  const out = new Map<string, Asset>();
  for (const [path, { file, type }] of Object.entries(FILES)) out.set(path, { body: readFileSync(new URL(file, dir)), type });
  assets = out;
  return out;
}

/** A Host header we can echo into the CSP (host, IPv4, [IPv6], optional port), else null. */
const SAFE_HOST = /^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?$/;

/** The headers every dashboard answer carries. */
export function securityHeaders(host: string | undefined): Record<string, string> {
  // CSP 3 lets 'self' match the page's own ws: origin, but not every browser does:
  // name it explicitly when the Host header is one we can put in a header safely.
  const feed = host !== undefined && SAFE_HOST.test(host) ? ` ws://${host} wss://${host}` : '';
  return {
    'content-security-policy': [
      "default-src 'self'",
      "script-src 'self'",
      "style-src 'self'",
      "img-src 'self' data:",
      `connect-src 'self'${feed}`,
      "object-src 'none'",
      "base-uri 'none'",
      "form-action 'self'",
      "frame-ancestors 'none'",
    ].join('; '),
    'x-content-type-options': 'nosniff',
    'x-frame-options': 'DENY',
    'referrer-policy': 'no-referrer',
    'cross-origin-opener-policy': 'same-origin',
    // The files change with the server's version: let the browser revalidate.
    'cache-control': 'no-cache',
  };
}

/**
 * Answers `/` (a redirect to `/ui/`) and everything under `/ui`; returns false for any
 * other path, which is the API's. Only GET and HEAD; anything else is 405.
 */
export function handleDashboard(req: IncomingMessage, res: ServerResponse): boolean {
  let path: string;
  try {
    path = new URL(req.url ?? '/', 'http://weft').pathname;
  } catch {
    return false;
  }
  if (path !== '/' && path !== '/ui' && !path.startsWith('/ui/')) return false;
  const headers = securityHeaders(req.headers.host);
  const method = req.method ?? 'GET';
  if (method !== 'GET' && method !== 'HEAD') {
    res.writeHead(405, { ...headers, allow: 'GET, HEAD', 'content-type': 'text/plain; charset=utf-8' });
    res.end(`${method} is not allowed on ${path} (allowed: GET, HEAD)\n`);
    return true;
  }
  if (path === '/' || path === '/ui') {
    res.writeHead(302, { ...headers, location: '/ui/', 'content-length': 0 });
    res.end();
    return true;
  }
  const asset = loadAssets().get(path.slice('/ui/'.length));
  if (asset === undefined) {
    const text = `no dashboard file ${path}\n`;
    res.writeHead(404, { ...headers, 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(text) });
    res.end(method === 'HEAD' ? undefined : text);
    return true;
  }
  res.writeHead(200, { ...headers, 'content-type': asset.type, 'content-length': asset.body.byteLength });
  res.end(method === 'HEAD' ? undefined : asset.body);
  return true;
}
