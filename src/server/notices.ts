/**
 * The live feed across servers that share one PostgreSQL database.
 *
 * Each write transaction that produced events also NOTIFYs them on `FEED_CHANNEL`
 * (`Store.write`): PostgreSQL delivers a NOTIFY when its transaction commits, never
 * when it rolls back, and in commit order. A notice is small (a payload must stay under
 * 8000 bytes): per event the record's id, its version and the fields a write changes
 * (state, times, message…), never the bulky ones that do not change (a run's
 * parameters, a log line's text). Every server LISTENs on one dedicated connection
 * (`startRelay`), reads back what a notice leaves out, and hands the events to its
 * store's listeners, the HTTP feed among them.
 *
 * Exactly once: a store emits its own events at once, in-process; each notice names the
 * store that sent it (`origin`), and a relay drops the notices of its own store.
 *
 * Read back after the fact, a record may already be at a newer version: the notice's
 * changed fields are laid over it, so a subscriber still sees each state a run went
 * through (a message longer than `MAX_MESSAGE` travels cut, and is whole when the
 * record is still at that version). A record deleted meanwhile (a scheduled run of a
 * flow re-registered) is skipped.
 *
 * SQLite has no NOTIFY: its servers' feeds stay in-process.
 */
import type { Db, Listener } from './db.ts';
import type { FlowRun, ServerEvent, TaskRun } from './model.ts';

export const FEED_CHANNEL = 'weft_events';
/** PostgreSQL refuses payloads of 8000 bytes or more; this leaves room for the envelope. */
export const MAX_NOTICE_BYTES = 7900;
/** Longer messages travel cut to this many characters. */
export const MAX_MESSAGE = 1000;

/** The fields of a flow run that a write may change. */
const FLOW_RUN_CHANGES = ['state', 'stateVersion', 'message', 'startedAt', 'endedAt', 'heartbeatAt', 'agentId', 'restarts'] as const;
/** The fields of a task run that a write may change. */
const TASK_RUN_CHANGES = ['state', 'version', 'attempts', 'startedAt', 'endedAt', 'message', 'processId'] as const;

export type NoticeItem =
  | {
      readonly type: 'flowRun' | 'taskRun';
      readonly id: string;
      /** The run's stateVersion, the task run's version. */
      readonly version: number;
      /** The changed fields (absent only when even a cut message would not fit). */
      readonly set?: Readonly<Record<string, unknown>>;
      /** `set.message` is the first MAX_MESSAGE characters of the message. */
      readonly cut?: true;
    }
  | { readonly type: 'log'; readonly seq: number }
  | { readonly type: 'flow'; readonly id: string };

export interface Notice {
  /** The store that committed the events. */
  readonly origin: string;
  readonly items: readonly NoticeItem[];
}

function pick(o: object, keys: readonly string[]): Record<string, unknown> {
  const src = o as Record<string, unknown>;
  const out: Record<string, unknown> = {};
  for (const k of keys) out[k] = src[k];
  return out;
}

const byteLength = (v: unknown): number => Buffer.byteLength(JSON.stringify(v));

/** One event as a notice item, no bigger than `budget` bytes of JSON. */
function toItem(e: ServerEvent, budget: number): NoticeItem {
  switch (e.type) {
    case 'log':
      return { type: 'log', seq: e.entry.seq };
    case 'flow':
      return { type: 'flow', id: e.flow.id };
    default: {
      const [id, version, set] =
        e.type === 'flowRun' ? [e.run.id, e.run.stateVersion, pick(e.run, FLOW_RUN_CHANGES)] : [e.task.id, e.task.version, pick(e.task, TASK_RUN_CHANGES)];
      const message = set.message;
      let item: NoticeItem = { type: e.type, id, version, set };
      if (typeof message === 'string' && message.length > MAX_MESSAGE) {
        item = { type: e.type, id, version, set: { ...set, message: message.slice(0, MAX_MESSAGE) }, cut: true };
      }
      if (byteLength(item) > budget) item = { type: e.type, id, version, set: { ...set, message: '' }, cut: true };
      if (byteLength(item) > budget) item = { type: e.type, id, version };
      return item;
    }
  }
}

/** The NOTIFY payloads for one transaction's events: each under MAX_NOTICE_BYTES, in order. */
export function encodeNotices(origin: string, events: readonly ServerEvent[], maxBytes = MAX_NOTICE_BYTES): string[] {
  const envelope = byteLength({ origin, items: [] });
  const budget = maxBytes - envelope - 1;
  const out: string[] = [];
  let items: NoticeItem[] = [];
  let size = envelope;
  for (const e of events) {
    const item = toItem(e, budget);
    const n = byteLength(item) + 1; // and its comma
    if (items.length > 0 && size + n > maxBytes) {
      out.push(JSON.stringify({ origin, items }));
      items = [];
      size = envelope;
    }
    items.push(item);
    size += n;
  }
  if (items.length > 0) out.push(JSON.stringify({ origin, items }));
  return out;
}

/** A payload as a Notice; null when it is not one (another program's NOTIFY on the channel). */
export function decodeNotice(payload: string): Notice | null {
  try {
    const n = JSON.parse(payload) as Partial<Notice>;
    if (typeof n.origin !== 'string' || !Array.isArray(n.items)) return null;
    return n as Notice;
  } catch {
    return null;
  }
}

/**
 * The event a notice item stands for, given the record as read now (`current`): the
 * record itself when it is still at the notice's version, else the notice's changed
 * fields laid over it; null when only a newer version is known (a later notice carries it).
 */
export function eventFromRead<T extends FlowRun | TaskRun>(item: NoticeItem & { type: 'flowRun' | 'taskRun' }, current: T): T | null {
  const version = item.type === 'flowRun' ? (current as FlowRun).stateVersion : (current as TaskRun).version;
  if (version === item.version) return current;
  if (item.set === undefined) return null;
  const set = item.cut === true ? { ...item.set, message: `${String(item.set.message)}…` } : item.set;
  return { ...current, ...set } as T;
}

/** What the relay needs of a store (`Store` is one): its origin, the read-back, the listeners. */
export interface NoticeTarget {
  readonly origin: string;
  readNotice(items: readonly NoticeItem[]): Promise<ServerEvent[]>;
  publish(events: readonly ServerEvent[]): void;
}

export interface RelayOptions {
  readonly log?: (line: string) => void;
  /** Events of other servers may have been missed (the listener reconnected, a read failed). */
  readonly onGap?: (why: string) => void;
}

export interface Relay {
  close(): Promise<void>;
}

/**
 * LISTEN for the other servers' notices and hand their events to `store`'s listeners,
 * one notice at a time in the order they came. Null on a database without NOTIFY.
 */
export async function startRelay(store: NoticeTarget, db: Db, opts: RelayOptions = {}): Promise<Relay | null> {
  if (db.listen === undefined) return null;
  const log = opts.log ?? (() => undefined);
  let chain: Promise<void> = Promise.resolve();
  let closed = false;
  const listener: Listener = await db.listen(FEED_CHANNEL, {
    onNotice(payload) {
      const notice = decodeNotice(payload);
      if (notice === null || notice.origin === store.origin) return;
      chain = chain.then(async () => {
        if (closed) return;
        try {
          store.publish(await store.readNotice(notice.items));
        } catch (err) {
          log(`live feed: cannot read another server's changes: ${err instanceof Error ? err.message : String(err)}`);
          opts.onGap?.('a change of another server could not be read');
        }
      });
    },
    onLost(err, attempt) {
      if (attempt === 1) log(`live feed: lost the PostgreSQL listener connection (${err.message}); reconnecting`);
    },
    onReconnect() {
      log('live feed: listening again; changes of other servers made meanwhile were missed');
      opts.onGap?.('the server missed changes of other servers');
    },
  });
  return {
    async close(): Promise<void> {
      closed = true;
      await listener.close();
      await chain;
    },
  };
}
