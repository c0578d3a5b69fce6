/**
 * The cluster's errors and log sink that code outside a cluster run may name (the
 * package's exports, ClusterExecutor), kept apart from the client so that importing
 * weft does not load ws and the wire protocol until a cluster is used.
 */
import { registerErrorClass, WeftError } from '../errors.ts';
import type { LogRecord } from './protocol.ts';

/** The scheduler could not be reached, refused us, or the connection to it was lost. */
export class ClusterConnectionError extends WeftError {
  constructor(
    code: 'SCHEDULER_UNREACHABLE' | 'SCHEDULER_LOST',
    message: string,
    readonly address = '',
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
    this.name = 'ClusterConnectionError';
  }
}
registerErrorClass('ClusterConnectionError', ClusterConnectionError);

/** Writes a worker log record as a `[worker task-key] msg` line on stderr. */
export function logToStderr(r: LogRecord): void {
  const who = [r.worker ?? 'scheduler', r.key].filter((s) => s !== undefined && s !== '').join(' ');
  process.stderr.write(`[${who}] ${r.msg}${r.msg.endsWith('\n') ? '' : '\n'}`);
}
