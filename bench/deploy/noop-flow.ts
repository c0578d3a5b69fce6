/**
 * The flow of the deployment benchmark (`weft bench --shape deploy`): one task that
 * does nothing, so a flow run's cost is the deployment path's alone (claim, process
 * start, load, state writes), not its work.
 */
import { flow, task } from '../../src/index.ts';

export const noop = task(function noop(): null {
  return null;
});

export default flow('weft-bench-noop', () => ({ out: noop() }));
