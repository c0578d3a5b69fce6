/**
 * Settings of the deployment benchmark (bench/deploy/harness.ts), apart from it so the
 * CLI reads its defaults without loading the server and the agents.
 */
export interface DeployBenchOptions {
  /** Timed runs per row but the drains (after one warm-up). */
  readonly runs: number;
  /** Runs per drain. */
  readonly drainN: number;
  /** Timed drains per agent count (no warm-up). */
  readonly drainRuns: number;
  /** Agent counts of the drain rows. */
  readonly agents: readonly number[];
  /** Flow-run processes per agent at once. */
  readonly maxRuns: number;
  /** The agents' poll interval when idle. */
  readonly pollMs: number;
  /** Requests per run of the HTTP floors. */
  readonly httpN: number;
  /** Runs created per claim measurement. */
  readonly claimN: number;
  /** Claim batch sizes (`limit` of a claim). */
  readonly claimBatches: readonly number[];
  /** `sqlite:PATH` or `postgres://…`; default a SQLite file in a temp directory. */
  readonly db?: string;
  /** The one-run rows again through an agent with this many standby processes (default 0: not measured). */
  readonly standby?: number;
  /** Profile the flow-run processes of the one-run rows into this directory (`node --cpu-prof`). */
  readonly cpuProfDir?: string;
  readonly log?: (line: string) => void;
}

export const DEPLOY_DEFAULTS = {
  runs: 5,
  drainN: 50,
  drainRuns: 1,
  agents: [1, 2],
  maxRuns: 2,
  pollMs: 50,
  httpN: 100,
  claimN: 300,
  claimBatches: [1, 10],
  standby: 0,
} as const satisfies Omit<DeployBenchOptions, 'log'>;

/** `--quick`: a smoke run (seconds, not minutes). */
export const DEPLOY_QUICK = { runs: 2, drainN: 4, httpN: 20, claimN: 20 } as const;
