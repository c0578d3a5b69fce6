/**
 * A small, realistic ETL flow: the README's quick start (`npm start`).
 *
 *   node bin/weft.js run examples/etl.ts
 *   node bin/weft.js run examples/etl.ts --param orders=50000 --param chunkSize=5000
 *   node bin/weft.js run examples/etl.ts --executor pool --threads 4 --json .weft/etl/run.json
 *
 * extract   generates a day of orders in-process (seeded, so every run is the same; no
 *           network) and splits them into chunks;
 * rates     fetches exchange rates from a (simulated) flaky service: it fails on its
 *           first attempts and succeeds after retries;
 * transform is mapped over the chunks: validates, converts to EUR, rolls up per region;
 * aggregate merges the chunk roll-ups;
 * load      writes the report as JSON under `outDir` (default `.weft/etl/`).
 *
 * Tasks are defined at the module's top level so that a worker thread that imports this
 * file finds the same functions (see DESIGN.md, "Task code in workers").
 */
import { mkdir, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { context, flow, parameter, task, unmapped } from '../src/index.ts';

export interface Order {
  id: number;
  region: 'EU' | 'US' | 'APAC' | 'LATAM';
  currency: 'EUR' | 'USD' | 'JPY' | 'BRL';
  /** Minor units (cents). Negative or zero amounts are bad rows. */
  amountMinor: number;
  items: number;
}

export interface ChunkRollup {
  chunk: number;
  valid: number;
  rejected: number;
  /** EUR cents per region. */
  revenueByRegion: Record<string, number>;
  items: number;
}

export interface Report {
  orders: number;
  rejected: number;
  items: number;
  revenueEur: Record<string, number>;
  totalEur: number;
}

const REGIONS = ['EU', 'US', 'APAC', 'LATAM'] as const;
const CURRENCY: Record<Order['region'], Order['currency']> = { EU: 'EUR', US: 'USD', APAC: 'JPY', LATAM: 'BRL' };
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** mulberry32: a tiny seeded PRNG, so the generated data is the same on every run. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export const extract = task(function extract(orders: number, chunkSize: number): Order[][] {
  if (!Number.isInteger(orders) || orders < 0) throw new RangeError(`orders must be a non-negative integer, got ${orders}`);
  if (!Number.isInteger(chunkSize) || chunkSize < 1) throw new RangeError(`chunkSize must be a positive integer, got ${chunkSize}`);
  const rnd = prng(42);
  const chunks: Order[][] = [];
  for (let start = 0; start < orders; start += chunkSize) {
    const chunk: Order[] = [];
    for (let id = start; id < Math.min(orders, start + chunkSize); id++) {
      const region = REGIONS[Math.floor(rnd() * REGIONS.length)] ?? 'EU';
      // About 1% bad rows (refunds booked as orders, zero amounts).
      const bad = rnd() < 0.01;
      chunk.push({
        id,
        region,
        currency: CURRENCY[region],
        amountMinor: bad ? -Math.floor(rnd() * 1000) : 100 + Math.floor(rnd() * 20_000),
        items: 1 + Math.floor(rnd() * 5),
      });
    }
    chunks.push(chunk);
  }
  return chunks;
});

/** Rates to EUR. The "service" is flaky: the first two attempts time out, the third answers. */
export const rates = task(
  { maxRetries: 3, retryDelay: '100ms', tags: ['network'] },
  async function rates(): Promise<Record<Order['currency'], number>> {
    const { attempt } = context(); // read before the first await
    await sleep(50);
    if (attempt < 3) throw new Error(`rates service timed out (simulated, attempt ${attempt})`);
    return { EUR: 1, USD: 0.92, JPY: 0.0061, BRL: 0.18 };
  },
);

export const transform = task(async function transform(
  orders: Order[],
  fx: Record<Order['currency'], number>,
): Promise<ChunkRollup> {
  const { mapIndex } = context();
  // Stands in for per-chunk I/O (an enrichment lookup); keeps the progress visible.
  await sleep(40 + (mapIndex % 4) * 20);
  const revenueByRegion: Record<string, number> = {};
  let valid = 0;
  let rejected = 0;
  let items = 0;
  for (const o of orders) {
    if (o.amountMinor <= 0) {
      rejected++;
      continue;
    }
    valid++;
    items += o.items;
    revenueByRegion[o.region] = (revenueByRegion[o.region] ?? 0) + Math.round(o.amountMinor * fx[o.currency]);
  }
  return { chunk: mapIndex, valid, rejected, revenueByRegion, items };
});

export const aggregate = task(function aggregate(rollups: ChunkRollup[]): Report {
  const revenueEur: Record<string, number> = {};
  let orders = 0;
  let rejected = 0;
  let items = 0;
  for (const r of rollups) {
    orders += r.valid;
    rejected += r.rejected;
    items += r.items;
    for (const [region, cents] of Object.entries(r.revenueByRegion)) revenueEur[region] = (revenueEur[region] ?? 0) + cents;
  }
  for (const k of Object.keys(revenueEur)) revenueEur[k] = (revenueEur[k] ?? 0) / 100;
  const totalEur = Object.values(revenueEur).reduce((a, b) => a + b, 0);
  return { orders, rejected, items, revenueEur, totalEur: Math.round(totalEur * 100) / 100 };
});

export const load = task(async function load(report: Report, outDir: string): Promise<{ file: string; orders: number; totalEur: number }> {
  const dir = resolve(outDir);
  await mkdir(dir, { recursive: true });
  const file = join(dir, 'report.json');
  await writeFile(file, `${JSON.stringify(report, null, 2)}\n`);
  return { file, orders: report.orders, totalEur: report.totalEur };
});

export default flow('etl', () => {
  const orders = parameter('orders', 20_000, { type: 'number' });
  const chunkSize = parameter('chunkSize', 1_000, { type: 'number' });
  const outDir = parameter('outDir', '.weft/etl', { type: 'string' });

  const chunks = extract(orders, chunkSize);
  const fx = rates();
  const rollups = transform.map(chunks, unmapped(fx));
  const report = aggregate(rollups);
  return { report, loaded: load(report, outDir) };
});
