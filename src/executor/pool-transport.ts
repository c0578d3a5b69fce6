/**
 * How the pool reaches one worker: a piscina thread serving a MessagePort, or a forked
 * child process serving its IPC channel. Both look the same to the pool core
 * (`pool.ts`): `send` a batch, `kill` (stop whatever runs there, now), `close` (orderly
 * end), and two callbacks — every message, then exactly one exit.
 */
import { fork, type ChildProcess } from 'node:child_process';
import { MessageChannel, receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { fileURLToPath } from 'node:url';
import type { Piscina } from 'piscina';
import type { FromWorker, ToWorker } from './pool-protocol.ts';

/** The pool worker entry: registers tsx's loader hooks, then loads `pool-worker.ts`. */
export const BOOTSTRAP = fileURLToPath(new URL('./pool-bootstrap.mjs', import.meta.url));

export interface WorkerEvents {
  onMessage(w: WorkerLink, msg: FromWorker): void;
  /** Called once, after every message the worker sent has been passed to onMessage. */
  onExit(w: WorkerLink, reason: string): void;
}

export interface WorkerLink {
  /** Unique per spawn (a replacement gets a new serial): outcomes are checked against it. */
  readonly serial: number;
  /** Throws a clone error synchronously when the message cannot be serialized. Messages sent before the worker is up wait for it. */
  send(msg: ToWorker, transfer: ArrayBuffer[]): void;
  /** Stop the worker now (terminate the thread / SIGKILL the process). */
  kill(): void;
  /** Orderly end; resolves when the worker is gone. */
  close(): Promise<void>;
}

/** One long-lived piscina task per worker; aborting its signal terminates the thread. */
export class ThreadLink implements WorkerLink {
  private readonly port: MessagePort;
  private readonly ac = new AbortController();
  private readonly done: Promise<void>;
  private exited = false;

  constructor(
    readonly serial: number,
    pool: Piscina,
    private readonly events: WorkerEvents,
  ) {
    const { port1, port2 } = new MessageChannel();
    this.port = port1;
    port1.on('message', (msg: FromWorker) => events.onMessage(this, msg));
    this.done = pool.run({ port: port2 }, { transferList: [port2], signal: this.ac.signal }).then(
      () => this.exit('worker stopped'),
      (err: unknown) => this.exit(err instanceof Error ? err.message : String(err)),
    );
  }

  send(msg: ToWorker, transfer: ArrayBuffer[]): void {
    this.port.postMessage(msg, transfer);
  }

  kill(): void {
    this.ac.abort();
  }

  close(): Promise<void> {
    if (!this.exited) {
      this.port.postMessage({ op: 'stop' });
      // A thread busy in a task never reads 'stop': terminate it.
      const t = setTimeout(() => this.kill(), 1000);
      void this.done.then(() => clearTimeout(t));
    }
    return this.done;
  }

  private exit(reason: string): void {
    if (this.exited) return;
    this.exited = true;
    // Outcomes the thread posted before it died are still queued on our end: take them
    // first, so that only the calls really lost are reported lost.
    for (let m = receiveMessageOnPort(this.port); m !== undefined; m = receiveMessageOnPort(this.port)) {
      this.events.onMessage(this, m.message as FromWorker);
    }
    this.port.close();
    this.events.onExit(this, reason);
  }
}

/** A forked child process (same bootstrap), IPC with V8 ('advanced') serialization. */
export class ProcessLink implements WorkerLink {
  private readonly child: ChildProcess;
  private readonly done: Promise<void>;
  private exited = false;

  constructor(
    readonly serial: number,
    execArgv: string[],
    private readonly events: WorkerEvents,
  ) {
    this.child = fork(BOOTSTRAP, [], {
      serialization: 'advanced',
      env: { ...process.env, WEFT_POOL_CHILD: '1' },
      execArgv,
      stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    });
    const child = this.child;
    child.on('message', (msg: FromWorker) => events.onMessage(this, msg));
    child.on('error', () => {
      // Spawn or IPC failure: the 'close' event follows and reports the exit.
    });
    this.done = new Promise<void>((resolve) => {
      child.once('close', (code, signal) => {
        this.exited = true;
        events.onExit(this, signal !== null ? `process killed by ${signal}` : `process exited with code ${String(code)}`);
        resolve();
      });
    });
  }

  send(msg: ToWorker): void {
    if (this.child.connected) this.child.send(msg);
  }

  kill(): void {
    if (!this.exited) this.child.kill('SIGKILL');
  }

  close(): Promise<void> {
    if (!this.exited) {
      if (this.child.connected) this.child.send({ op: 'stop' });
      // A child that does not leave on its own (busy in a task) is killed.
      const t = setTimeout(() => this.kill(), 1000);
      void this.done.then(() => clearTimeout(t));
    }
    return this.done;
  }
}
