/**
 * Load a flow file and find the flow it exports.
 *
 * The CLI does not import the `Flow` class: it duck-types (an object with a string
 * `name`, a `spec()` and a `run()`), so a flow built against another copy of weft (or a
 * hand-written runnable) is found too, and the CLI stays out of the flow model's imports.
 * Every failure is a `LoadError` whose message is one line naming the file and the cause.
 */
import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import type { GraphSpec, NodeSpec } from '../flow/spec.ts';
import type { FlowRunResult, RunOptions } from '../runner/types.ts';

/** What the CLI needs of a flow. */
export interface RunnableFlow {
  readonly name: string;
  spec(): GraphSpec;
  run(opts: RunOptions): Promise<FlowRunResult>;
  /** What the builder returned (refs): the CLI prints their values after a run. */
  readonly outputs?: unknown;
}

export class LoadError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'LoadError';
  }
}

export function isFlow(v: unknown): v is RunnableFlow {
  if (v === null || (typeof v !== 'object' && typeof v !== 'function')) return false;
  const o = v as Record<string, unknown>;
  return typeof o.name === 'string' && typeof o.spec === 'function' && typeof o.run === 'function';
}

export interface LoadedFlow {
  readonly flow: RunnableFlow;
  /** Absolute path of the file. */
  readonly path: string;
  /** The export it came from (`default` or a name). */
  readonly exportName: string;
}

/**
 * Import `file` (relative to `cwd`) and pick its flow: `flowName` when given (matched
 * against export names and flow names), else the default export when it is a flow, else
 * the only exported flow.
 */
export async function loadFlow(file: string, opts: { cwd?: string; flowName?: string } = {}): Promise<LoadedFlow> {
  const path = resolve(opts.cwd ?? process.cwd(), file);
  try {
    const st = await stat(path);
    if (!st.isFile()) throw new LoadError(`cannot load ${file}: not a file`);
  } catch (err) {
    if (err instanceof LoadError) throw err;
    const code = (err as { code?: unknown }).code;
    throw new LoadError(`cannot load ${file}: ${code === 'ENOENT' ? 'file not found' : describe(err)}`);
  }

  let mod: Record<string, unknown>;
  try {
    mod = (await import(pathToFileURL(path).href)) as Record<string, unknown>;
  } catch (err) {
    throw new LoadError(`cannot load ${file}: ${describe(err)}`);
  }

  const found = findFlows(mod);
  if (found.length === 0) {
    throw new LoadError(`cannot load ${file}: it exports no flow (export one, e.g. \`export default flow('name', () => { ... })\`)`);
  }

  if (opts.flowName !== undefined) {
    const want = opts.flowName;
    const hits = found.filter((f) => f.exportName === want || f.flow.name === want);
    const first = hits[0];
    if (first === undefined) {
      throw new LoadError(`cannot load ${file}: no flow named '${want}' (found: ${names(found)})`);
    }
    if (hits.some((h) => h.flow !== first.flow)) {
      throw new LoadError(`cannot load ${file}: several flows match '${want}' (${names(hits)})`);
    }
    return { flow: first.flow, path, exportName: first.exportName };
  }

  const def = found.find((f) => f.exportName === 'default');
  if (def !== undefined) return { flow: def.flow, path, exportName: 'default' };
  const [only, ...rest] = found;
  if (only === undefined) throw new LoadError(`cannot load ${file}: it exports no flow`);
  if (rest.length > 0) {
    throw new LoadError(`cannot load ${file}: it exports several flows (${names(found)}); choose one with --flow NAME`);
  }
  return { flow: only.flow, path, exportName: only.exportName };
}

/** Flows among a module's exports, the default first, each object once. */
export function findFlows(mod: Record<string, unknown>): { exportName: string; flow: RunnableFlow }[] {
  const out: { exportName: string; flow: RunnableFlow }[] = [];
  const seen = new Set<unknown>();
  const keys = Object.keys(mod).sort((a, b) => (a === 'default' ? -1 : b === 'default' ? 1 : 0));
  for (const k of keys) {
    const v = mod[k];
    if (!isFlow(v) || seen.has(v)) continue;
    seen.add(v);
    out.push({ exportName: k, flow: v });
  }
  return out;
}

/** The flow's parameter nodes (from its spec). */
export function parameterNodes(spec: GraphSpec): NodeSpec[] {
  return spec.nodes.filter((n) => n.kind === 'parameter' && n.parameter !== undefined);
}

/** One line describing anything thrown (esbuild syntax errors span many lines: keep the useful one). */
export function describe(err: unknown): string {
  if (err instanceof Error) {
    const syntax = transformErrorLine(err);
    if (syntax !== null) return syntax;
    // tsx compiles a `.ts` file outside a `"type": "module"` package as CommonJS; when
    // that compile fails, Node reports a misleading require(esm) cycle instead.
    if ((err as { code?: unknown }).code === 'ERR_REQUIRE_CYCLE_MODULE') {
      return 'it does not compile as CommonJS (check its syntax, or put it in a "type": "module" package, or name it .mts)';
    }
    const msg = firstLine(err.message).trim();
    const name = err.name === 'Error' ? '' : `${err.name}: `;
    return `${name}${msg === '' ? '(no message)' : msg}`;
  }
  return firstLine(String(err));
}

/**
 * tsx reports a file that does not compile as a `TransformError` whose first line is
 * "Transform failed with 1 error:" and whose next line is `<path>:<line>:<col>: ERROR: <text>`.
 */
function transformErrorLine(err: Error): string | null {
  if (err.name !== 'TransformError' && !err.message.startsWith('Transform failed')) return null;
  const line = err.message.split('\n').find((l) => / ERROR: /.test(l));
  if (line === undefined) return null;
  const m = /:(\d+):(\d+): ERROR: (.*)$/.exec(line);
  if (m === null) return `syntax error: ${line.slice(line.indexOf(' ERROR: ') + 8)}`;
  return `syntax error at line ${m[1]}:${m[2]}: ${m[3]}`;
}

function names(found: readonly { exportName: string; flow: RunnableFlow }[]): string {
  return found.map((f) => (f.exportName === f.flow.name ? f.flow.name : `${f.exportName} ('${f.flow.name}')`)).join(', ');
}

function firstLine(s: string): string {
  const i = s.indexOf('\n');
  return i === -1 ? s : s.slice(0, i);
}
