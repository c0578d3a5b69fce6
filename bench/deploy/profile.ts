/**
 * Summaries of V8 CPU profiles (`node --cpu-prof`), for `weft bench --shape deploy
 * --cpu-prof DIR`: where a flow-run process spends its time, by kind of code. Self time
 * per profile node is the sum of the sampling intervals that landed in it; nodes are
 * bucketed by their script URL.
 *
 * Node 20 runs the module loader hooks that tsx registers (`register()`) on a thread of
 * their own, so each process writes two profiles: the main thread's and the loader's.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fmt, table } from '../stats.ts';

interface ProfileNode {
  readonly id: number;
  readonly callFrame: { readonly functionName: string; readonly url: string };
}

interface CpuProfile {
  readonly nodes: readonly ProfileNode[];
  readonly startTime: number;
  readonly endTime: number;
  readonly samples?: readonly number[];
  readonly timeDeltas?: readonly number[];
}

/** The buckets, in the order they are tested. */
const BUCKETS: readonly (readonly [string, (url: string, fn: string) => boolean])[] = [
  ['(idle)', (_u, fn) => fn === '(idle)'],
  ['(garbage collector)', (_u, fn) => fn === '(garbage collector)'],
  ['(program: V8/native, not JS)', (_u, fn) => fn === '(program)' || fn === '(root)'],
  ['esbuild (tsx transforms)', (u) => u.includes('/node_modules/esbuild/')],
  ['tsx loader', (u) => u.includes('/node_modules/tsx/')],
  ['weft src/', (u) => u.includes('/src/') && !u.includes('/node_modules/')],
  ['flow file and bench/', (u) => u.includes('/bench/') || u.includes('/test/')],
  ['other node_modules', (u) => u.includes('/node_modules/')],
  ['node internals (module loading, fs, net)', (u) => u.startsWith('node:') || u === ''],
];

function bucketOf(url: string, fn: string): string {
  for (const [name, test] of BUCKETS) if (test(url, fn)) return name;
  return 'other';
}

export interface ProfileSummary {
  /** Profiles read (two per process: main thread and loader thread). */
  readonly profiles: number;
  /** Per bucket: self ms summed over the profiles, then divided by the processes. */
  readonly buckets: readonly { readonly bucket: string; readonly main_ms: number; readonly loader_ms: number }[];
  readonly processes: number;
  /** Median wall span of a main-thread profile (process start → exit), ms. */
  readonly main_span_ms: number;
  /** The main thread's top self-time functions (ms per process). */
  readonly top: readonly { readonly fn: string; readonly ms: number }[];
}

/** Self ms by bucket and by function of one profile. */
function selfTimes(p: CpuProfile): { buckets: Map<string, number>; fns: Map<string, number> } {
  const byId = new Map(p.nodes.map((n) => [n.id, n]));
  const buckets = new Map<string, number>();
  const fns = new Map<string, number>();
  const samples = p.samples ?? [];
  const deltas = p.timeDeltas ?? [];
  for (let i = 0; i < samples.length; i++) {
    const node = byId.get(samples[i]!);
    if (node === undefined) continue;
    // A sample's interval is the delta that follows it (V8 records the one before; for a sum the shift does not matter).
    const ms = (deltas[i] ?? 0) / 1000;
    const { url, functionName } = node.callFrame;
    const b = bucketOf(url, functionName);
    buckets.set(b, (buckets.get(b) ?? 0) + ms);
    const short = url.replace(/^.*\/(node_modules\/[^/]+|src|bench)\//, '$1/');
    const key = `${functionName || '(anonymous)'} ${short}`;
    fns.set(key, (fns.get(key) ?? 0) + ms);
  }
  return { buckets, fns };
}

/**
 * Summarise every `*.cpuprofile` in `dir`. Node names them `CPU.<date>.<time>.<pid>.<thread>.<seq>`:
 * thread 0 is the main thread, others (1) the loader's.
 */
export function summarizeProfiles(dir: string): ProfileSummary {
  const files = readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'));
  const main = new Map<string, number>();
  const loader = new Map<string, number>();
  const fns = new Map<string, number>();
  const spans: number[] = [];
  const pids = new Set<string>();
  for (const f of files) {
    const parts = f.split('.');
    const pid = parts[3] ?? f;
    const thread = parts[4] ?? '0';
    pids.add(pid);
    const p = JSON.parse(readFileSync(join(dir, f), 'utf8')) as CpuProfile;
    const t = selfTimes(p);
    const into = thread === '0' ? main : loader;
    for (const [b, ms] of t.buckets) into.set(b, (into.get(b) ?? 0) + ms);
    if (thread === '0') {
      spans.push((p.endTime - p.startTime) / 1000);
      for (const [k, ms] of t.fns) fns.set(k, (fns.get(k) ?? 0) + ms);
    }
  }
  const n = Math.max(1, pids.size);
  const names = [...new Set([...main.keys(), ...loader.keys()])];
  const buckets = names
    .map((bucket) => ({ bucket, main_ms: (main.get(bucket) ?? 0) / n, loader_ms: (loader.get(bucket) ?? 0) / n }))
    .sort((a, b) => b.main_ms + b.loader_ms - (a.main_ms + a.loader_ms));
  const top = [...fns]
    .filter(([k]) => !k.startsWith('('))
    .map(([fn, ms]) => ({ fn, ms: ms / n }))
    .sort((a, b) => b.ms - a.ms)
    .slice(0, 12);
  spans.sort((a, b) => a - b);
  return { profiles: files.length, processes: pids.size, buckets, main_span_ms: spans.length > 0 ? spans[spans.length >> 1]! : NaN, top };
}

export function profileTable(s: ProfileSummary): string {
  const rows = s.buckets.map((b) => [b.bucket, fmt(b.main_ms), fmt(b.loader_ms), fmt(b.main_ms + b.loader_ms)]);
  const fnRows = s.top.map((t) => [t.fn.length > 90 ? `${t.fn.slice(0, 87)}...` : t.fn, fmt(t.ms)]);
  return (
    `${s.processes} flow-run process(es), ${s.profiles} profiles; main thread span (median) ${fmt(s.main_span_ms)} ms; ms per process:\n` +
    `${table(['self time in', 'main thread', 'loader thread', 'both'], rows)}\n\n` +
    `Top main-thread functions by self time (ms per process):\n${table(['function', 'ms'], fnRows)}`
  );
}
