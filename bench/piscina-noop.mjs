// Worker file of the raw piscina baseline (bench/baselines.ts): one no-op task.
// Plain .mjs on purpose: piscina loads it directly, with no TypeScript loader on the path.
export default function noop() {
  return null;
}
