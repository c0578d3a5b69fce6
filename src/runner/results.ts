/**
 * Where task results go besides memory: checkpoint files at templated locations,
 * `target` files that make a task Cached when they already exist, and the in-process
 * cache that `cacheFor` + `cacheValidator` consult (Prefect 1 kept it in
 * `prefect.context.caches`; so does weft, per process).
 */
import { mkdirSync, readFileSync, renameSync, writeFileSync, existsSync } from 'node:fs';
import { dirname, isAbsolute, join } from 'node:path';
import { createRequire } from 'node:module';
import type { NodeSpec, ResultSpec, TaskOptions } from '../flow/spec.ts';

export interface TemplateVars {
  flow: string;
  task: string;
  mapIndex: number;
  runId: string;
  parameters: Readonly<Record<string, unknown>>;
}

/** Fill `{flow}`, `{task}`, `{mapIndex}`, `{runId}`, `{date}`, `{param.x}` in a location template. */
export function renderLocation(template: string, v: TemplateVars): string {
  return template.replace(/\{([a-zA-Z_.]+)\}/g, (whole, name: string) => {
    switch (name) {
      case 'flow':
        return safe(v.flow);
      case 'task':
        return safe(v.task);
      case 'mapIndex':
        return v.mapIndex < 0 ? 'all' : String(v.mapIndex);
      case 'runId':
        return v.runId;
      case 'date':
        return new Date().toISOString().slice(0, 10);
      default:
        if (name.startsWith('param.')) {
          const p = name.slice(6);
          if (!(p in v.parameters)) throw new Error(`location template "${template}" names parameter "${p}", which the flow does not have`);
          return safe(String(v.parameters[p]));
        }
        throw new Error(`location template "${template}" has an unknown placeholder ${whole}`);
    }
  });
}

const safe = (s: string): string => s.replace(/[^A-Za-z0-9._=-]/g, '_');

export const DEFAULT_LOCATION = '{flow}/{task}/{mapIndex}.result';

export function resolvePath(resultDir: string, location: string): string {
  return isAbsolute(location) ? location : join(resultDir, location);
}

/** msgpackr, loaded by the first msgpack result rather than with every flow module. */
let msgpackr: typeof import('msgpackr') | null = null;
const codec = (): typeof import('msgpackr') => (msgpackr ??= createRequire(import.meta.url)('msgpackr') as typeof import('msgpackr'));

export function serialize(value: unknown, spec: ResultSpec | null): Buffer {
  if (spec?.serializer === 'msgpack') return codec().pack(value);
  const text = JSON.stringify(value === undefined ? null : value);
  return Buffer.from(text, 'utf8');
}

export function deserialize(buf: Buffer, spec: ResultSpec | null): unknown {
  if (spec?.serializer === 'msgpack') return codec().unpack(buf);
  return JSON.parse(buf.toString('utf8')) as unknown;
}

/** Write a result atomically (write to a temp file, then rename). */
export function writeResult(path: string, value: unknown, spec: ResultSpec | null): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, serialize(value, spec));
  renameSync(tmp, path);
}

export function readResult(path: string, spec: ResultSpec | null): { found: true; value: unknown } | { found: false } {
  if (!existsSync(path)) return { found: false };
  return { found: true, value: deserialize(readFileSync(path), spec) };
}

/** Whether a successful result is written to its location (or target). `task()` turns it on when a result spec is given. */
export function wantsCheckpoint(node: NodeSpec): boolean {
  return node.options.checkpoint;
}

// ---------------------------------------------------------------------------------
// The in-process cache (`cacheFor`).

interface CacheEntry {
  value: unknown;
  args: readonly unknown[];
  parameters: Readonly<Record<string, unknown>>;
  expires: number;
}

const CACHE = Symbol.for('weft.resultCache');
function cacheMap(): Map<string, CacheEntry[]> {
  const g = globalThis as unknown as Record<symbol, Map<string, CacheEntry[]> | undefined>;
  return (g[CACHE] ??= new Map());
}

export function cacheKeyOf(node: NodeSpec, mapIndex: number): string {
  const base = node.options.cacheKey ?? node.taskKey ?? node.key;
  return mapIndex >= 0 ? `${base}[${mapIndex}]` : base;
}

/** A valid cached result for these inputs, per the task's validator. */
export function cacheLookup(
  opts: TaskOptions,
  key: string,
  args: readonly unknown[],
  parameters: Readonly<Record<string, unknown>>,
  now: number,
): { hit: true; value: unknown } | { hit: false } {
  const entries = cacheMap().get(key);
  if (entries === undefined) return { hit: false };
  for (let i = entries.length - 1; i >= 0; i--) {
    const e = entries[i]!;
    if (e.expires <= now) {
      entries.splice(i, 1);
      continue;
    }
    if (validates(opts, e, args, parameters)) return { hit: true, value: e.value };
  }
  return { hit: false };
}

export function cacheStore(
  opts: TaskOptions,
  key: string,
  value: unknown,
  args: readonly unknown[],
  parameters: Readonly<Record<string, unknown>>,
  now: number,
): void {
  const m = cacheMap();
  const entries = m.get(key) ?? [];
  entries.push({ value, args, parameters, expires: now + opts.cacheForMs });
  if (entries.length > 16) entries.shift();
  m.set(key, entries);
}

/** Drop every cached result (tests, long-lived processes). */
export function clearResultCache(): void {
  cacheMap().clear();
}

function validates(opts: TaskOptions, e: CacheEntry, args: readonly unknown[], parameters: Readonly<Record<string, unknown>>): boolean {
  const v = opts.cacheValidator;
  if (typeof v === 'function') return v(args, e.args);
  switch (v) {
    case 'durationOnly':
      return true;
    case 'allInputs':
      return sameJson(args, e.args);
    case 'allParameters':
      return sameJson(parameters, e.parameters);
    case 'partialInputsOnly': {
      // Only the inputs present in both calls are compared (Prefect 1's partial_inputs_only).
      const n = Math.min(args.length, e.args.length);
      for (let i = 0; i < n; i++) if (args[i] !== undefined && e.args[i] !== undefined && !sameJson(args[i], e.args[i])) return false;
      return true;
    }
  }
}

function sameJson(a: unknown, b: unknown): boolean {
  if (a === b) return true;
  try {
    return JSON.stringify(a) === JSON.stringify(b);
  } catch {
    return false;
  }
}
