import type { Logger } from "pino";
import type { Pool } from "./pool.js";

export interface Migration {
  /** Increasing within an owner; never renumbered once released. */
  version: number;
  name: string;
  sql: string;
}

/**
 * Applies an owner's pending migrations, each in its own transaction, under
 * an advisory lock so replicas starting together do not race.
 */
export async function migrate(pool: Pool, owner: string, migrations: Migration[], logger: Logger): Promise<void> {
  const client = await pool.connect();
  try {
    await client.query("SELECT pg_advisory_lock(hashtext('harbor-migrations'))");
    await client.query(`CREATE TABLE IF NOT EXISTS schema_migrations (
      owner text NOT NULL, version int NOT NULL, name text NOT NULL,
      applied_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (owner, version))`);
    const { rows } = await client.query<{ version: number }>("SELECT version FROM schema_migrations WHERE owner = $1", [owner]);
    const applied = new Set(rows.map((r) => r.version));
    for (const m of [...migrations].sort((a, b) => a.version - b.version)) {
      if (applied.has(m.version)) continue;
      await client.query("BEGIN");
      try {
        await client.query(m.sql);
        await client.query("INSERT INTO schema_migrations (owner, version, name) VALUES ($1, $2, $3)", [owner, m.version, m.name]);
        await client.query("COMMIT");
      } catch (err) {
        await client.query("ROLLBACK").catch(() => undefined);
        throw err;
      }
      logger.info({ owner, version: m.version, migration: m.name }, "db-migration-applied");
    }
  } finally {
    await client.query("SELECT pg_advisory_unlock(hashtext('harbor-migrations'))").catch(() => undefined);
    client.release();
  }
}
