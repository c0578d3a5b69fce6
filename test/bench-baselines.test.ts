import { describe, expect, it } from 'vitest';
import { EchoWorkers, loopBaseline, piscinaBaseline, postMessageBaseline, roundTripBaseline, runBaselines } from '../bench/baselines.ts';

describe('baselines (tiny n)', () => {
  it('loop, piscina and postMessage report positive medians over their runs', async () => {
    const loop = await loopBaseline(10_000, 3);
    const pis = await piscinaBaseline(500, 2, 3);
    const batched = await postMessageBaseline(5_000, 2, 3, 100);
    const single = await postMessageBaseline(500, 2, 3, 1);
    const rt = await roundTripBaseline(200, 3);
    for (const b of [loop, pis, batched, single, rt]) {
      expect(b.samples_s).toHaveLength(3);
      expect(b.median_s).toBeGreaterThan(0);
      expect(b.us_per_task).toBeCloseTo((b.median_s * 1e6) / b.n, 9);
    }
    expect(batched).toMatchObject({ name: 'postmessage-batched', n: 5_000, workers: 2, batch: 100 });
    expect(single).toMatchObject({ name: 'postmessage-unbatched', batch: 1 });
    expect(pis).toMatchObject({ name: 'piscina-run', n: 500, workers: 2 });
    expect(rt).toMatchObject({ name: 'postmessage-roundtrip', n: 200, workers: 1, batch: 1 });
  });

  it('the echo workers return every id, whatever the batch and window', async () => {
    const echo = new EchoWorkers(2);
    try {
      await echo.ready();
      for (const [n, batch, window] of [[1, 10, 2], [1000, 7, 3], [999, 1000, 1]] as const) {
        await echo.round(n, batch, window);
      }
    } finally {
      await echo.close();
    }
  });

  it('runBaselines runs the selected ones in order', async () => {
    const r = await runBaselines({ n: 1000, runs: 1, only: ['postmessage-batched', 'piscina-run'] });
    expect(r.map((b) => b.name)).toEqual(['postmessage-batched', 'piscina-run']);
  });
});
