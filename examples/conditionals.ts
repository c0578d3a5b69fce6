/**
 * Conditionals: choose a branch at run time (Prefect 1's `case`, `merge`, `ifelse`).
 *
 *   node bin/weft.js run examples/conditionals.ts                       # incremental load
 *   node bin/weft.js run examples/conditionals.ts --param mode=full      # full reload
 *   node bin/weft.js run examples/conditionals.ts --param dryRun=true    # skip publishing
 *
 * `caseOf(mode, 'full', ...)` runs its tasks only when the parameter is 'full'; the other
 * case's tasks end Skipped. `merge` takes the result of the branch that ran. `ifElse`
 * skips `publish` on a dry run (and `notify` after it, by skip propagation).
 */
import { caseOf, flow, ifElse, merge, parameter, task } from '../src/index.ts';

export interface Batch {
  mode: 'full' | 'incremental';
  rows: number;
}

export const lastWatermark = task(function lastWatermark(): number {
  return 1_700_000_000;
});

export const fullReload = task(function fullReload(): Batch {
  return { mode: 'full', rows: 250_000 };
});

export const incrementalLoad = task(function incrementalLoad(since: number): Batch {
  return { mode: 'incremental', rows: since % 997 };
});

export const checkMode = task(function checkMode(mode: string): string {
  if (mode !== 'full' && mode !== 'incremental') throw new Error(`mode must be 'full' or 'incremental', got '${mode}'`);
  return mode;
});

export const publish = task(function publish(batch: Batch): string {
  return `published ${batch.rows} rows (${batch.mode})`;
});

export const notify = task(function notify(message: string): string {
  return `notified #data: ${message}`;
});

export default flow('conditional-load', () => {
  const mode = checkMode(parameter('mode', 'incremental', { type: 'string' }));
  const dryRun = parameter('dryRun', false, { type: 'boolean' });

  const full = caseOf(mode, 'full', () => fullReload());
  const incremental = caseOf(mode, 'incremental', () => incrementalLoad(lastWatermark()));
  const batch = merge(full, incremental);

  const published = publish(batch);
  ifElse(dryRun, undefined, published);
  return { batch, sent: notify(published) };
});
