/**
 * Retries and triggers: a nightly sync where some things go wrong, and the flow still
 * reports what it should.
 *
 *   node bin/weft.js run examples/retries.ts
 *
 * connect    fails twice with a transient error, then succeeds (maxRetries + retryDelay,
 *            retrying only on `ConnectionResetError` thanks to `retryOn`);
 * sync       is mapped over the tables; the `audit_log` table always fails (`fail()`);
 * alert      runs only because something upstream failed (`triggers.anyFailed`);
 * disconnect runs whatever happened (`triggers.allFinished`): clean-up;
 * report     counts what synced; it tolerates failed children (`triggers.allFinished`).
 *
 * The flow's state is decided by its reference tasks, here `report` and `disconnect`: a
 * partial sync is an expected outcome of this job, so the run ends Success (exit 0) while
 * the summary shows the failed child and the retries.
 */
import { context, fail, flow, task, triggers, unmapped } from '../src/index.ts';

export class ConnectionResetError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConnectionResetError';
  }
}

const TABLES = ['customers', 'orders', 'invoices', 'audit_log', 'products'];
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export const connect = task(
  { maxRetries: 3, retryDelay: '50ms', retryOn: [ConnectionResetError] },
  async function connect(): Promise<string> {
    const { attempt } = context();
    await sleep(20);
    if (attempt <= 2) throw new ConnectionResetError(`connection reset by peer (attempt ${attempt})`);
    return 'db://replica-1';
  },
);

export const listTables = task(function listTables(conn: string): string[] {
  if (conn === '') throw new Error('no connection');
  return TABLES;
});

export const sync = task(async function sync(table: string, conn: string): Promise<{ table: string; rows: number }> {
  await sleep(30);
  if (table === 'audit_log') throw fail(`${table}: permission denied on ${conn}`);
  return { table, rows: table.length * 1000 };
});

export const alert = task({ trigger: triggers.anyFailed }, function alert(): string {
  return 'paged the on-call: a table failed to sync';
});

export const disconnect = task({ trigger: triggers.allFinished }, function disconnect(): string {
  return 'connection closed';
});

export const report = task(
  { trigger: triggers.allFinished },
  function report(results: readonly unknown[]): { synced: number; rows: number } {
    // A failed child has no result: keep only the ones that look like a sync outcome.
    const ok = (results ?? []).filter((r): r is { table: string; rows: number } => typeof (r as { rows?: unknown } | null)?.rows === 'number');
    return { synced: ok.length, rows: ok.reduce((n, r) => n + r.rows, 0) };
  },
);

export default flow(
  'nightly-sync',
  () => {
    const conn = connect();
    const tables = listTables(conn);
    const synced = sync.map(tables, unmapped(conn));
    const summary = report(synced);
    const paged = alert().after(synced);
    const closed = disconnect().after(synced, summary);
    return { summary, paged, closed };
  },
  { referenceTasks: (o) => [o.summary, o.closed] },
);
