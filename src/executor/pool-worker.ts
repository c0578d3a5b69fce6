/**
 * The worker side of PoolExecutor: one of these runs in every pool thread (as a
 * long-lived piscina task serving a MessagePort) and in every pool child process
 * (serving the IPC channel). Same code, same protocol (`pool-protocol.ts`).
 *
 * Sessions: the worker outlives one flow run when the pool is kept alive: each run opens
 * with a session message (import the run's modules, check its task keys, take its flow
 * name and parameters); the task table persists, so indices stay valid across runs.
 *
 * Hot loop: for each call of a batch, look up the function by its wire index, set the
 * task context, call it with its arguments straight from the flat column, and write the
 * outcome into columnar buffers; one message per
 * batch (or every FLUSH_MS while a batch of slow tasks runs, so progress streams). An
 * async task (returns a thenable) does not hold the batch: its outcome joins a later
 * flush when it settles.
 */
import type { MessagePort } from 'node:worker_threads';
import { threadId } from 'node:worker_threads';
import { performance } from 'node:perf_hooks';
import { getTask } from '../flow/registry.ts';
import { loadTasks, resolveTask, taskNameOf, type TaskFn } from './pool-tasks.ts';
import { setCurrentContext, type TaskContext } from '../flow/context.ts';
import { serializeError, TaskResolutionError, TaskSerializationError, type SerializedError } from '../errors.ts';
import {
  CALL_STRIDE,
  C_ARGC,
  C_ATTEMPT,
  C_KEYLEN,
  C_LOOP,
  C_MAP,
  C_SLOT,
  C_TASK,
  ST_ERROR,
  ST_OK,
  type DoneMsg,
  type FromWorker,
  type RunMsg,
  type SessionMsg,
  type ToWorker,
} from './pool-protocol.ts';

/** Flush outcomes at least this often while a batch is running (ms). */
const FLUSH_MS = 1;

type Mutable<T> = { -readonly [K in keyof T]: T[K] };

type Post = (msg: FromWorker, transfer: ArrayBuffer[]) => void;

/** Growable columnar outcome buffer; `take()` hands out exactly-sized copies. */
class OutBuf {
  len = 0;
  slots = new Int32Array(256);
  status = new Uint8Array(256);
  times = new Float64Array(512);
  values: unknown[] = [];
  /** Node keys (for the unsendable-result message). */
  keys: string[] = [];
  /** Result buffers to move without copying (threads only). */
  transfer: ArrayBuffer[] = [];

  push(slot: number, status: number, value: unknown, key: string, start: number, end: number): void {
    const i = this.len;
    if (i === this.slots.length) this.grow();
    this.slots[i] = slot;
    this.status[i] = status;
    this.times[2 * i] = start;
    this.times[2 * i + 1] = end;
    this.values.push(value);
    this.keys.push(key);
    this.len = i + 1;
  }

  private grow(): void {
    const n = this.slots.length * 2;
    const s = new Int32Array(n);
    s.set(this.slots);
    this.slots = s;
    const st = new Uint8Array(n);
    st.set(this.status);
    this.status = st;
    const t = new Float64Array(2 * n);
    t.set(this.times);
    this.times = t;
  }
}

/** Serves one worker (thread or process): one session at a time, batches of calls. */
class WorkerRuntime {
  private readonly out = new OutBuf();
  private flushQueued = false;
  private lastFlush = 0;
  private readonly origin = performance.timeOrigin;
  private readonly ctx: Mutable<TaskContext>;
  private readonly sendsBuffers: boolean;
  private between = 'threads';
  /** Task table: index on the wire → key / function (kept across sessions). */
  private readonly taskKeys: string[] = [];
  private readonly fns: TaskFn[] = [];
  /** Sessions open in order; a later one supersedes a slower earlier one. */
  private opening = 0;

  constructor(
    private readonly post: Post,
    private readonly workerName: string,
    threads: boolean,
  ) {
    this.ctx = { flowName: '', key: '', mapIndex: -1, attempt: 1, loopCount: 0, loopResult: undefined, parameters: {} };
    this.sendsBuffers = threads;
  }

  handle(msg: ToWorker): void {
    if (msg.op === 'run') this.run(msg);
    else if (msg.op === 'session') void this.open(msg);
  }

  /** Open a session: import its modules (cached after the first time), resolve its keys, report. */
  private async open(msg: SessionMsg): Promise<void> {
    const mine = ++this.opening;
    // Table entries first (synchronously, so that indices stay in step whatever happens
    // next); their functions once the modules are in.
    const first = this.taskKeys.length;
    for (const k of msg.newKeys) {
      this.taskKeys.push(k);
      this.fns.push(unresolved(k));
    }
    let error: SerializedError | null = null;
    try {
      await loadTasks(msg.modules, []);
    } catch (err) {
      error = serializeError(err);
    }
    for (let i = first; i < this.taskKeys.length; i++) {
      const k = this.taskKeys[i]!;
      // An unknown key fails its calls, not the worker.
      this.fns[i] = (getTask(k)?.fn ?? unresolved(k)) as TaskFn;
    }
    if (mine !== this.opening) return;
    if (error === null) {
      for (const i of msg.check) {
        const k = this.taskKeys[i]!;
        try {
          this.fns[i] = resolveTask(k);
        } catch (err) {
          error = serializeError(err);
          break;
        }
      }
    }
    if (error !== null) {
      this.post({ op: 'startError', epoch: msg.epoch, error }, []);
      return;
    }
    this.ctx.flowName = msg.flowName;
    this.ctx.parameters = msg.parameters;
    this.between = msg.mode;
    this.post({ op: 'ready', epoch: msg.epoch, worker: this.workerName }, []);
  }

  /** Run a batch: synchronous tasks inline, async ones settle later. */
  run(msg: RunMsg): void {
    if (msg.newKeys !== undefined) {
      for (const k of msg.newKeys) {
        this.taskKeys.push(k);
        this.fns.push((getTask(k)?.fn ?? unresolved(k)) as TaskFn);
      }
    }
    const { ints, names, loopResults } = msg;
    const a: ArrayLike<unknown> = msg.nums ?? msg.args ?? EMPTY;
    const n = ints.length / CALL_STRIDE;
    const fns = this.fns;
    const ctx = this.ctx;
    const out = this.out;
    const origin = this.origin;
    let t0 = performance.now();
    if (this.lastFlush === 0) this.lastFlush = t0;
    let ko = 0;
    let ao = 0;
    for (let i = 0, j = 0; i < n; i++, j += CALL_STRIDE) {
      const slot = ints[j + C_SLOT]!;
      const fn = fns[ints[j + C_TASK]!]!;
      const kl = ints[j + C_KEYLEN]!;
      const key = names.slice(ko, ko + kl);
      ko += kl;
      ctx.key = key;
      ctx.mapIndex = ints[j + C_MAP]!;
      ctx.attempt = ints[j + C_ATTEMPT]!;
      ctx.loopCount = ints[j + C_LOOP]!;
      ctx.loopResult = loopResults === undefined ? undefined : loopResults[i];
      setCurrentContext(ctx);
      const argc = ints[j + C_ARGC]!;
      let status = ST_OK;
      let value: unknown;
      try {
        // No argument array per call: the common arities call straight from the column.
        switch (argc) {
          case 0:
            value = fn();
            break;
          case 1:
            value = fn(a[ao]);
            break;
          case 2:
            value = fn(a[ao], a[ao + 1]);
            break;
          case 3:
            value = fn(a[ao], a[ao + 1], a[ao + 2]);
            break;
          default:
            value = fn(...Array.prototype.slice.call(a, ao, ao + argc));
        }
      } catch (err) {
        status = ST_ERROR;
        value = serializeError(err);
      }
      ao += argc;
      if (status === ST_OK && typeof value === 'object' && value !== null) {
        if (typeof (value as PromiseLike<unknown>).then === 'function') {
          this.awaitCall(slot, key, value as PromiseLike<unknown>, t0 + origin);
          t0 = performance.now();
          continue;
        }
        if (this.sendsBuffers) this.maybeTransfer(value);
      }
      const t1 = performance.now();
      out.push(slot, status, value, key, t0 + origin, t1 + origin);
      t0 = t1;
      if (t1 - this.lastFlush > FLUSH_MS) this.flush();
    }
    setCurrentContext(null);
    this.flush();
  }

  private awaitCall(slot: number, key: string, p: PromiseLike<unknown>, start: number): void {
    const done = (status: number, value: unknown): void => {
      if (status === ST_OK && this.sendsBuffers && typeof value === 'object' && value !== null) this.maybeTransfer(value);
      this.out.push(slot, status, value, key, start, performance.now() + this.origin);
      this.queueFlush();
    };
    p.then(
      (v) => done(ST_OK, v),
      (e: unknown) => done(ST_ERROR, serializeError(e)),
    );
  }

  /**
   * Move a result buffer instead of copying it: only a whole, non-shared ArrayBuffer (or
   * a view covering all of one). A view into a larger buffer (Node's Buffer pool,
   * msgpackr's pool) is copied: transferring it would detach memory others still use.
   */
  private maybeTransfer(value: object): void {
    let buf: ArrayBufferLike;
    if (value instanceof ArrayBuffer) buf = value;
    else if (ArrayBuffer.isView(value)) {
      buf = value.buffer;
      if (value.byteOffset !== 0 || value.byteLength !== buf.byteLength) return;
    } else return;
    if (!(buf instanceof ArrayBuffer) || buf.byteLength === 0) return;
    if (!this.out.transfer.includes(buf)) this.out.transfer.push(buf);
  }

  private queueFlush(): void {
    if (this.flushQueued) return;
    this.flushQueued = true;
    setImmediate(() => {
      this.flushQueued = false;
      this.flush();
    });
  }

  flush(): void {
    const out = this.out;
    const n = out.len;
    if (n === 0) return;
    const slots = out.slots.slice(0, n);
    const status = out.status.slice(0, n);
    const times = out.times.slice(0, 2 * n);
    const values = out.values;
    const keys = out.keys;
    const transfer = out.transfer;
    out.len = 0;
    out.values = [];
    out.keys = [];
    out.transfer = [];
    this.lastFlush = performance.now();
    const cols = [slots.buffer, status.buffer, times.buffer];
    const packed = packValues(values, status, n);
    if (packed !== null) {
      this.post({ op: 'done', slots, status, times, ...packed }, cols);
      return;
    }
    const msg: DoneMsg = { op: 'done', slots, status, times, values };
    try {
      this.post(msg, transfer.length === 0 ? cols : [...cols, ...transfer]);
    } catch (err) {
      if (!isCloneError(err)) throw err;
      // Find the culprits one by one; fail only them.
      for (let i = 0; i < n; i++) {
        const v = values[i];
        try {
          structuredClone(v);
        } catch (e) {
          const why = e instanceof Error ? e.message : String(e);
          if (status[i] === ST_ERROR) {
            // An error whose data cannot travel: keep the error, stringify the data.
            const rec = v as SerializedError;
            values[i] = { ...rec, data: String(rec.data) };
          } else {
            status[i] = ST_ERROR;
            values[i] = serializeError(
              new TaskSerializationError(`result of task "${keys[i]!}" cannot be sent between ${this.between}: ${why}`),
            );
          }
        }
      }
      this.post(msg, [...cols, ...transfer]);
    }
  }
}

const EMPTY: readonly unknown[] = [];

/** The compact forms of a batch's values: all numbers, or all null / all undefined; null when mixed. */
function packValues(values: unknown[], status: Uint8Array, n: number): { nums: Float64Array } | { fill?: null } | null {
  const v0 = values[0];
  if (typeof v0 === 'number') {
    for (let i = 0; i < n; i++) if (status[i] !== ST_OK || typeof values[i] !== 'number') return null;
    return { nums: Float64Array.from(values as number[]) };
  }
  if (v0 === null || v0 === undefined) {
    for (let i = 0; i < n; i++) if (status[i] !== ST_OK || values[i] !== v0) return null;
    return v0 === null ? { fill: null } : {};
  }
  return null;
}

function unresolved(key: string): TaskFn {
  const err = new TaskResolutionError(
    `task "${taskNameOf(key)}" (${key}) cannot be found in a worker: it is defined inside a function or its module did not register it`,
    key,
  );
  return () => {
    throw err;
  };
}

function isCloneError(err: unknown): boolean {
  return (
    err instanceof Error &&
    (err.name === 'DataCloneError' || (err as { code?: unknown }).code === 'ERR_INVALID_ARG_TYPE' || /could not be cloned|serializ/i.test(err.message))
  );
}

// ---- threads: one long-lived piscina task per worker ------------------------------

export interface ThreadTask {
  readonly port: MessagePort;
}

/**
 * The piscina task: serve the port (sessions, batches) until a 'stop' message. Resolves
 * when stopped; an aborted task is a terminated thread.
 */
export function serveThread(task: ThreadTask): Promise<void> {
  const { port } = task;
  const rt = new WorkerRuntime((msg, transfer) => port.postMessage(msg, transfer), `thread-${threadId}`, true);
  return new Promise<void>((resolve) => {
    port.on('message', (msg: ToWorker) => {
      if (msg.op === 'stop') {
        port.close();
        resolve();
      } else rt.handle(msg);
    });
  });
}

// ---- processes: the IPC channel -----------------------------------------------

/** Entry of a pool child process (forked with `serialization: 'advanced'`). */
export function serveProcess(): void {
  const send = process.send?.bind(process);
  if (send === undefined) throw new Error('weft pool child started without an IPC channel');
  const rt = new WorkerRuntime((msg) => void send(msg), `process-${process.pid}`, false);
  process.on('message', (m: unknown) => {
    const msg = m as ToWorker;
    // Not process.disconnect(): with a send still queued Node 20 throws inside its IPC
    // internals. Nothing is left to deliver once the pool says stop.
    if (msg.op === 'stop') process.exit(0);
    else rt.handle(msg);
  });
  // The parent went away: nothing left to serve.
  process.on('disconnect', () => process.exit(0));
}
