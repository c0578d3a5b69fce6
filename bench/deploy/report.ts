/** The deployment benchmark's table (`weft bench --shape deploy`). */
import { fmt, table } from '../stats.ts';
import type { DeployRow } from './harness.ts';

export function deployTable(rows: readonly DeployRow[]): string {
  return table(
    ['group', 'measure', 'n', 'runs', 'median ms', 'p90 ms', 'per s', 'weft --version ms', 'ratio', 'child CPU ms', 'host CPU ms'],
    rows.map((r) => [
      r.group,
      r.name,
      String(r.n),
      String(r.runs),
      fmt(r.median_ms),
      r.p90_ms === null ? '-' : fmt(r.p90_ms),
      r.per_s === null ? '-' : fmt(r.per_s),
      r.spawn_floor_ms === null ? '-' : fmt(r.spawn_floor_ms),
      r.ratio_vs_spawn === null ? '-' : `${fmt(r.ratio_vs_spawn)}x`,
      r.child_cpu_ms === null ? '-' : fmt(r.child_cpu_ms),
      r.host_cpu_ms === null ? '-' : fmt(r.host_cpu_ms),
    ]),
  );
}

export const DEPLOY_NOTES = `n: requests, spawns or runs per timed run; median and p90 over every item of every run (drains: median of the runs' wall times, agents' start → last Success).
per s: requests/s (1000 ÷ median), claims/s over a whole claim-down, runs/s of a drain.
ratio: median ÷ the weft --version spawn measured beside the row (before each run; 3 before each drain; drains: wall ÷ runs ÷ it).
child CPU: user + system ms per spawn / per run of the processes started (Linux); host CPU: this process's (server + agents) per run.`;
