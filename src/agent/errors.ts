/**
 * How agents and flow-run processes name what went wrong: one line per error (the first
 * line of its message, its class unless plain), with the network cause of a failed
 * request (`fetch failed (ECONNREFUSED)`), and the backend's CONFLICT test.
 */
import { BackendError } from '../server/model.ts';

/** A write the backend refused because the record moved on (a stale `expectVersion`). */
export function isConflict(err: unknown): boolean {
  return err instanceof BackendError && (err.code === 'CONFLICT' || err.status === 409);
}

const PLAIN = new Set(['Error', 'BackendError', 'LoadError', 'StorageError']);

/** One line for anything thrown. */
export function describe(err: unknown): string {
  if (!(err instanceof Error)) return String(err);
  const first = err.message.split('\n')[0] ?? '';
  // fetch's TypeError says only "fetch failed"; its cause says why (ECONNREFUSED, a bad port).
  const network = err.name === 'TypeError' && first === 'fetch failed';
  const text = PLAIN.has(err.name) || network ? first : `${err.name}: ${first}`;
  const cause = (err as { cause?: { code?: unknown; message?: unknown } }).cause;
  const why = typeof cause?.code === 'string' ? cause.code : network && typeof cause?.message === 'string' ? cause.message : undefined;
  // A message that already names its cause (a StorageError's does) is not told it twice.
  return why !== undefined && !text.includes(why) ? `${text} (${why})` : text;
}
