/**
 * The server's schema, as numbered migrations applied in order and recorded in
 * `schema_migrations`.
 *
 * One schema for both databases: each migration is written once against a few column
 * types that map per dialect (BIGINT ms times, JSON kept as TEXT, bytes as BLOB/BYTEA,
 * an increasing `seq`/`id` as AUTOINCREMENT/BIGSERIAL). A migration is a list of single
 * statements. `migrate` applies what is pending in one transaction; on PostgreSQL it
 * first takes an advisory lock, so servers starting together on one database apply
 * each migration once. Never edit a released migration: add the next one.
 */
import type { Db, Dialect, Sql } from './db.ts';

interface Types {
  /** Times in ms, sizes. */
  readonly big: string;
  readonly int: string;
  readonly bytes: string;
  /** An increasing integer primary key. */
  readonly serial: string;
}

const TYPES: Record<Dialect, Types> = {
  sqlite: { big: 'INTEGER', int: 'INTEGER', bytes: 'BLOB', serial: 'INTEGER PRIMARY KEY AUTOINCREMENT' },
  postgres: { big: 'BIGINT', int: 'INTEGER', bytes: 'BYTEA', serial: 'BIGSERIAL PRIMARY KEY' },
};

export interface Migration {
  readonly version: number;
  readonly name: string;
  readonly statements: (t: Types) => readonly string[];
}

export const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    name: 'initial schema',
    statements: (t) => [
      `CREATE TABLE projects (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        created_at ${t.big} NOT NULL
      )`,
      // schedule: the flow's Schedule as JSON (its `paused` flag included), or NULL.
      `CREATE TABLE flows (
        id TEXT PRIMARY KEY,
        project_id TEXT NOT NULL REFERENCES projects(id),
        name TEXT NOT NULL,
        version ${t.int} NOT NULL,
        version_id TEXT NOT NULL,
        schedule TEXT,
        created_at ${t.big} NOT NULL,
        updated_at ${t.big} NOT NULL,
        UNIQUE (project_id, name)
      )`,
      `CREATE TABLE flow_versions (
        id TEXT PRIMARY KEY,
        flow_id TEXT NOT NULL REFERENCES flows(id) ON DELETE CASCADE,
        version ${t.int} NOT NULL,
        fingerprint TEXT NOT NULL,
        graph TEXT NOT NULL,
        storage TEXT NOT NULL,
        run_config TEXT NOT NULL,
        executor TEXT NOT NULL,
        parameters TEXT NOT NULL,
        labels TEXT NOT NULL,
        created_at ${t.big} NOT NULL,
        UNIQUE (flow_id, version)
      )`,
      // flow_name, project, version and run_kind (its run config's kind) are copied at
      // creation (they never change for a run); state_at is when the run entered its
      // state (lazarus reads it); auto_scheduled marks the runs a schedule made.
      `CREATE TABLE flow_runs (
        id TEXT PRIMARY KEY,
        flow_id TEXT NOT NULL REFERENCES flows(id) ON DELETE CASCADE,
        version_id TEXT NOT NULL REFERENCES flow_versions(id),
        flow_name TEXT NOT NULL,
        project TEXT NOT NULL,
        version ${t.int} NOT NULL,
        state TEXT NOT NULL,
        state_version ${t.int} NOT NULL,
        state_at ${t.big} NOT NULL,
        message TEXT,
        parameters TEXT NOT NULL,
        labels TEXT NOT NULL,
        scheduled_start ${t.big} NOT NULL,
        started_at ${t.big},
        ended_at ${t.big},
        heartbeat_at ${t.big},
        agent_id TEXT,
        restarts ${t.int} NOT NULL DEFAULT 0,
        idempotency_key TEXT UNIQUE,
        auto_scheduled ${t.int} NOT NULL DEFAULT 0,
        run_kind TEXT NOT NULL,
        created_at ${t.big} NOT NULL
      )`,
      'CREATE INDEX flow_runs_state_start ON flow_runs (state, scheduled_start)',
      'CREATE INDEX flow_runs_flow ON flow_runs (flow_id, created_at)',
      // A run's labels, one per row: claims test "labels ⊆ agent's" and count runs per
      // label in SQL.
      `CREATE TABLE flow_run_labels (
        flow_run_id TEXT NOT NULL REFERENCES flow_runs(id) ON DELETE CASCADE,
        label TEXT NOT NULL,
        PRIMARY KEY (flow_run_id, label)
      )`,
      'CREATE INDEX flow_run_labels_label ON flow_run_labels (label)',
      `CREATE TABLE flow_run_states (
        id ${t.serial},
        flow_run_id TEXT NOT NULL REFERENCES flow_runs(id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        message TEXT,
        at ${t.big} NOT NULL
      )`,
      'CREATE INDEX flow_run_states_run ON flow_run_states (flow_run_id, id)',
      `CREATE TABLE task_runs (
        id TEXT PRIMARY KEY,
        flow_run_id TEXT NOT NULL REFERENCES flow_runs(id) ON DELETE CASCADE,
        key TEXT NOT NULL,
        map_index ${t.int} NOT NULL,
        state TEXT NOT NULL,
        version ${t.int} NOT NULL,
        attempts ${t.int} NOT NULL DEFAULT 0,
        started_at ${t.big},
        ended_at ${t.big},
        message TEXT,
        process_id TEXT,
        updated_at ${t.big} NOT NULL,
        UNIQUE (flow_run_id, key, map_index)
      )`,
      `CREATE TABLE task_run_states (
        id ${t.serial},
        task_run_id TEXT NOT NULL REFERENCES task_runs(id) ON DELETE CASCADE,
        version ${t.int} NOT NULL,
        state TEXT NOT NULL,
        message TEXT,
        process_id TEXT,
        at ${t.big} NOT NULL
      )`,
      'CREATE INDEX task_run_states_task ON task_run_states (task_run_id, id)',
      `CREATE TABLE logs (
        seq ${t.serial},
        flow_run_id TEXT NOT NULL REFERENCES flow_runs(id) ON DELETE CASCADE,
        task_key TEXT,
        map_index ${t.int},
        level TEXT NOT NULL,
        message TEXT NOT NULL,
        at ${t.big} NOT NULL,
        source TEXT NOT NULL
      )`,
      'CREATE INDEX logs_run ON logs (flow_run_id, seq)',
      `CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        labels TEXT NOT NULL,
        created_at ${t.big} NOT NULL,
        last_seen ${t.big} NOT NULL
      )`,
      // Only the sha256 of a token is kept.
      `CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created_at ${t.big} NOT NULL
      )`,
      // kind 'tag' (task runs) or 'label' (flow runs).
      `CREATE TABLE concurrency_limits (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        lim ${t.int} NOT NULL,
        PRIMARY KEY (kind, name)
      )`,
      `CREATE TABLE task_slots (
        flow_run_id TEXT NOT NULL REFERENCES flow_runs(id) ON DELETE CASCADE,
        task_key TEXT NOT NULL,
        tag TEXT NOT NULL,
        acquired_at ${t.big} NOT NULL,
        PRIMARY KEY (flow_run_id, task_key, tag)
      )`,
      'CREATE INDEX task_slots_tag ON task_slots (tag)',
      `CREATE TABLE bundles (
        hash TEXT PRIMARY KEY,
        bytes ${t.bytes} NOT NULL,
        size ${t.big} NOT NULL,
        created_at ${t.big} NOT NULL
      )`,
    ],
  },
  {
    version: 2,
    name: 'one agent record per name',
    // Registrations before this one made a record per start: keep each name's most recently
    // seen record (ties: the greatest id), then let the name be the agent's key.
    statements: () => [
      `DELETE FROM agents WHERE id IN (
        SELECT a.id FROM agents a JOIN agents b ON b.name = a.name AND (b.last_seen > a.last_seen OR (b.last_seen = a.last_seen AND b.id > a.id))
      )`,
      'CREATE UNIQUE INDEX agents_name ON agents (name)',
    ],
  },
];

/** Any 64-bit constant: the advisory lock key of weft's migrations. */
const PG_MIGRATION_LOCK = 0x77656674; // "weft"

/** Apply the pending migrations; answers the versions applied now. */
export async function migrate(db: Db, migrations: readonly Migration[] = MIGRATIONS): Promise<number[]> {
  const types = TYPES[db.dialect];
  return db.tx(async (q: Sql) => {
    if (db.dialect === 'postgres') await q.all('SELECT pg_advisory_xact_lock($1)', [PG_MIGRATION_LOCK]);
    await q.run(`CREATE TABLE IF NOT EXISTS schema_migrations (
      version ${types.int} PRIMARY KEY,
      name TEXT NOT NULL,
      applied_at ${types.big} NOT NULL
    )`);
    const done = new Set((await q.all<{ version: number }>('SELECT version FROM schema_migrations')).map((r) => Number(r.version)));
    const applied: number[] = [];
    for (const m of [...migrations].sort((a, b) => a.version - b.version)) {
      if (done.has(m.version)) continue;
      for (const stmt of m.statements(types)) await q.run(stmt);
      await q.run('INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)', [m.version, m.name, Date.now()]);
      applied.push(m.version);
    }
    return applied;
  });
}
