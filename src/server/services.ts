/**
 * The server's background services, each a loop of ticks on its own timer (a tick
 * never overlaps the previous one; a failed tick is logged and the loop goes on):
 *
 * - scheduler: keeps the next `scheduledRuns` (10) runs of every active schedule
 *   materialised (`Store.materializeSchedules`: idempotent, so two servers on one
 *   database or a restart create nothing twice). A registration or a resume triggers a
 *   tick at once.
 * - zombie killer: a Running/Cancelling run without a heartbeat for `zombieTimeoutMs`
 *   lost its process (a flow-run process killed with `kill -9`, a machine gone). While
 *   it has been restarted fewer than `maxRestarts` times it goes back to Scheduled (an
 *   agent starts it again, and the new process restarts from the task runs already
 *   Success, whose results are checkpointed); after that it is Failed. Set
 *   `maxRestarts: 0` to fail zombies at once.
 * - lazarus: a run Submitted for `lazarusTimeoutMs` without becoming Running (its agent
 *   died, its container never started) goes back to Scheduled under the same
 *   `maxRestarts` budget, then Failed.
 *
 * Every write re-checks the run's state version under a lock, so a heartbeat that lands
 * during a tick wins, and two servers running these loops do each change once.
 */
import type { Store } from './store.ts';

export interface ServiceOptions {
  /** Scheduler tick. Default 10 s. */
  readonly schedulerIntervalMs?: number;
  /** Runs kept materialised per scheduled flow. Default 10. */
  readonly scheduledRuns?: number;
  /** Zombie killer and lazarus tick. Default 10 s. */
  readonly reaperIntervalMs?: number;
  /** A Running run silent this long is a zombie. Default 60 s. */
  readonly zombieTimeoutMs?: number;
  /** A Submitted run not Running after this long is revived. Default 60 s. */
  readonly lazarusTimeoutMs?: number;
  /** Restarts (zombie or lazarus) before a run is Failed instead. Default 3. */
  readonly maxRestarts?: number;
  readonly log?: (line: string) => void;
}

export const SERVICE_DEFAULTS = {
  schedulerIntervalMs: 10_000,
  scheduledRuns: 10,
  reaperIntervalMs: 10_000,
  zombieTimeoutMs: 60_000,
  lazarusTimeoutMs: 60_000,
  maxRestarts: 3,
} as const;

/** One repeating job: ticks `every` ms after the previous one ended; `poke()` runs one soon. */
class Loop {
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<void> | null = null;
  private again = false;
  private stopped = false;

  constructor(
    private readonly name: string,
    private readonly every: number,
    private readonly tick: () => Promise<void>,
    private readonly log: (line: string) => void,
  ) {}

  start(): void {
    this.arm(0);
  }

  poke(): void {
    if (this.stopped) return;
    if (this.running !== null) {
      this.again = true;
      return;
    }
    this.arm(0);
  }

  private arm(ms: number): void {
    if (this.stopped) return;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = setTimeout(() => {
      this.timer = null;
      this.running = this.tick()
        .catch((err: unknown) => this.log(`${this.name}: ${err instanceof Error ? err.message : String(err)}`))
        .finally(() => {
          this.running = null;
          const soon = this.again;
          this.again = false;
          this.arm(soon ? 0 : this.every);
        });
    }, ms);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    await this.running;
  }
}

export interface Services {
  /** Run the scheduler soon (after a registration, a resume). */
  pokeScheduler(): void;
  stop(): Promise<void>;
}

export function startServices(store: Store, opts: ServiceOptions = {}): Services {
  const o = { ...SERVICE_DEFAULTS, ...definedOnly(opts) };
  const log = opts.log ?? (() => undefined);
  const scheduler = new Loop(
    'scheduler',
    o.schedulerIntervalMs,
    async () => {
      const made = await store.materializeSchedules(o.scheduledRuns);
      if (made.length > 0) log(`scheduler: created ${made.length} scheduled run${made.length === 1 ? '' : 's'}`);
    },
    log,
  );
  const reaper = new Loop(
    'zombie killer',
    o.reaperIntervalMs,
    async () => {
      for (const r of await store.reapZombies(o.zombieTimeoutMs, o.maxRestarts)) log(`zombie killer: flow run ${r.run.id} ${r.outcome}: ${r.run.message ?? ''}`);
      for (const r of await store.reviveSubmitted(o.lazarusTimeoutMs, o.maxRestarts)) log(`lazarus: flow run ${r.run.id} ${r.outcome}: ${r.run.message ?? ''}`);
    },
    log,
  );
  scheduler.start();
  reaper.start();
  const unsubscribe = store.onEvent((e) => {
    if (e.type === 'flow') scheduler.poke();
  });
  return {
    pokeScheduler: () => scheduler.poke(),
    async stop(): Promise<void> {
      unsubscribe();
      await Promise.all([scheduler.stop(), reaper.stop()]);
    },
  };
}

function definedOnly<T extends object>(o: T): Partial<T> {
  return Object.fromEntries(Object.entries(o).filter(([, v]) => v !== undefined)) as Partial<T>;
}
