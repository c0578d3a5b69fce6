/**
 * The README's API example: map, unmapped, a skip signal, an allFinished reducer.
 *
 *   node bin/weft.js run examples/squares.ts --param n=1000 --executor pool --threads 2
 */
import { flow, parameter, skip, task, triggers, unmapped } from '../src/index.ts';

export const extract = task(function extract(n: number): number[] {
  return Array.from({ length: n }, (_, i) => i);
});

export const square = task({ maxRetries: 2, retryDelay: '100ms', timeout: '5s' }, function square(x: number, k: number) {
  if (x === 13) throw skip('unlucky'); // signals: fail, skip, retry, pause, loop
  return x * x * k;
});

// Skipped children reach the reducer as null instead of skipping it.
export const total = task({ trigger: triggers.allFinished, skipOnUpstreamSkip: false }, function total(xs: (number | null)[]) {
  return xs.reduce<number>((a, b) => a + (b ?? 0), 0);
});

export default flow('squares', () => {
  const n = parameter('n', 100, { type: 'number' });
  const k = parameter('k', 1);
  const xs = extract(n);
  const sq = square.map(xs, unmapped(k));
  return { total: total(sq) };
});
