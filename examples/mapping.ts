/**
 * Mapping: a map-reduce word count (Prefect 1's `task.map`, `unmapped`, `flatten`).
 *
 *   node bin/weft.js run examples/mapping.ts
 *   node bin/weft.js run examples/mapping.ts --param docs=200 --param topN=5
 *
 * corpus    builds `docs` documents in-process (seeded);
 * tokenize  is mapped over the documents: one child per document, each returning a list
 *           of words;
 * normalize is mapped over `flatten(tokens)` — every word of every document, one child
 *           per *batch* of words here, to keep the graph small — with the stop-word list
 *           passed whole to each child through `unmapped`;
 * count     is mapped again over the batches, and `top` reduces the partial counts.
 */
import { flow, flatten, parameter, task, unmapped } from '../src/index.ts';

const WORDS = [
  'the', 'a', 'of', 'and', 'to', 'in', 'graph', 'task', 'flow', 'worker', 'thread', 'pool', 'retry',
  'state', 'queue', 'result', 'map', 'reduce', 'schedule', 'cluster', 'trigger', 'signal', 'cache',
];
const STOP = ['the', 'a', 'of', 'and', 'to', 'in'];

function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (Math.imul(a, 1664525) + 1013904223) >>> 0;
    return a / 4294967296;
  };
}

export const corpus = task(function corpus(docs: number, wordsPerDoc: number): string[] {
  const rnd = prng(7);
  return Array.from({ length: docs }, () =>
    Array.from({ length: wordsPerDoc }, () => WORDS[Math.floor(rnd() * WORDS.length)] ?? 'flow').join(' '),
  );
});

/** One document in, its words in batches of 50 out (a list of lists). */
export const tokenize = task(function tokenize(doc: string): string[][] {
  const words = doc.split(/\s+/).filter((w) => w !== '');
  const batches: string[][] = [];
  for (let i = 0; i < words.length; i += 50) batches.push(words.slice(i, i + 50));
  return batches;
});

/** One batch of words in, lower-cased words without stop words out. */
export const normalize = task(function normalize(batch: string[], stop: string[]): string[] {
  const s = new Set(stop);
  return batch.map((w) => w.toLowerCase()).filter((w) => !s.has(w));
});

export const count = task(function count(words: string[]): Record<string, number> {
  const out: Record<string, number> = {};
  for (const w of words) out[w] = (out[w] ?? 0) + 1;
  return out;
});

export const top = task(function top(partials: Record<string, number>[], n: number): [string, number][] {
  const total = new Map<string, number>();
  for (const p of partials) for (const [w, c] of Object.entries(p)) total.set(w, (total.get(w) ?? 0) + c);
  return [...total].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).slice(0, n);
});

export default flow('word-count', () => {
  const docs = parameter('docs', 40, { type: 'number' });
  const n = parameter('topN', 3, { type: 'number' });
  const texts = corpus(docs, 120);
  // tokenize: one child per document; each returns a list of batches.
  const batches = tokenize.map(texts);
  // normalize: one child per batch across all documents (flatten), stop words passed whole.
  const words = normalize.map(flatten(batches), unmapped(STOP));
  const partials = count.map(words);
  return { top: top(partials, n) };
});
