/**
 * A flow module that runs a flow at its top level would start a pool inside every worker
 * that imports it. Workers refuse: the run on the pool fails before any task runs, naming
 * the cause, instead of hanging.
 */
import { describe, expect, it } from 'vitest';
import { PoolExecutor } from '../src/index.ts';
import selfRunning, { topLevelState } from './fixtures/run-self-running.ts';

describe('flow.run() inside a weft worker', () => {
  it('is refused: the pool run rejects naming the module problem, the main thread run works', async () => {
    expect(topLevelState).toBe('Success'); // in the main thread the top-level run is fine
    const pool = new PoolExecutor({ threads: 1 });
    const err = await selfRunning.run({ executor: pool }).then(
      () => null,
      (e: unknown) => e as Error,
    );
    expect(err).not.toBeNull();
    expect(err!.message).toMatch(/run-self-running\.ts/);
    expect(err!.message).toMatch(/run\(\) was called inside a weft worker/);
  });
});
