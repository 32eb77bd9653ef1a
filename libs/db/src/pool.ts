import pg from "pg";
import type { Logger } from "pino";
import { UnavailableError } from "@harbor/core";

export type Pool = pg.Pool;
export type PoolClient = pg.PoolClient;

export interface PoolOptions {
  url: string;
  logger: Logger;
  max?: number;
  /** How long a query may wait for a connection before the caller gets UNAVAILABLE. */
  connectTimeoutMs?: number;
}

/** A pool whose idle-client errors are logged instead of crashing the process. */
export function createPool(options: PoolOptions): Pool {
  const pool = new pg.Pool({
    connectionString: options.url,
    max: options.max ?? 10,
    connectionTimeoutMillis: options.connectTimeoutMs ?? 3_000,
    idleTimeoutMillis: 30_000,
    application_name: "harbor",
  });
  // pg-pool hangs the whole client (its prepared statements included) on an
  // idle client's error: only what an operator needs is logged. A client that
  // is closing because the pool is ending (shutdown) may see Postgres stop
  // first; that is expected, not a warning.
  pool.on("error", (err) => {
    if (pool.ending) options.logger.debug({ err: describeDbError(err) }, "db-idle-client-error-while-ending");
    else options.logger.warn({ err: describeDbError(err) }, "db-idle-client-error");
  });
  // The pool listens on idle clients only: a client checked out when Postgres
  // goes away would otherwise throw its error at the process. The query in
  // flight fails on its own and is answered UNAVAILABLE.
  pool.on("connect", (client) => client.on("error", (err) => options.logger.warn({ err: describeDbError(err) }, "db-client-error")));
  return pool;
}

/** An error of pg as a log field: its message and codes, never the client it carries. */
export function describeDbError(err: unknown): { message: string; code?: string; severity?: string } {
  if (!(err instanceof Error)) return { message: String(err) };
  const { code, severity } = err as { code?: string; severity?: string };
  return { message: err.message, ...(code ? { code } : {}), ...(severity ? { severity } : {}) };
}

const CONNECTION_ERRORS = new Set(["ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENOTFOUND", "EPIPE", "57P01", "57P02", "57P03", "08000", "08003", "08006", "08001", "08004"]);

/** True when the error says the database cannot be reached (as opposed to a bad query). */
export function isConnectionError(err: unknown): boolean {
  if (!(err instanceof Error)) return false;
  const code = (err as { code?: string }).code;
  if (code && CONNECTION_ERRORS.has(code)) return true;
  return /timeout exceeded when trying to connect|Connection terminated|connect ECONNREFUSED|Client has encountered a connection error/i.test(err.message);
}

export function isUniqueViolation(err: unknown, constraint?: string): boolean {
  const e = err as { code?: string; constraint?: string };
  return e?.code === "23505" && (constraint === undefined || e.constraint === constraint);
}

/**
 * Runs `fn` with a client of the pool, each of its statements a transaction
 * of its own. A lost database becomes UnavailableError so callers answer
 * UNAVAILABLE; the client is then discarded, not reused.
 */
export async function withClient<T>(pool: Pool, fn: (client: PoolClient) => Promise<T>): Promise<T> {
  let client: PoolClient;
  try {
    client = await pool.connect();
  } catch (err) {
    throw new UnavailableError("the database is not reachable; try again shortly", { cause: err });
  }
  let broken = false;
  try {
    return await fn(client);
  } catch (err) {
    broken = isConnectionError(err);
    if (broken) throw new UnavailableError("the database connection was lost; try again shortly", { cause: err });
    throw err;
  } finally {
    client.release(broken);
  }
}

/** Runs `fn` in a transaction: commit on success, roll back on error; a lost database as in withClient. */
export function withTransaction<T>(pool: Pool, fn: (client: PoolClient) => Promise<T>): Promise<T> {
  return withClient(pool, async (client) => {
    await client.query("BEGIN");
    try {
      const result = await fn(client);
      await client.query("COMMIT");
      return result;
    } catch (err) {
      if (!isConnectionError(err)) await client.query("ROLLBACK").catch(() => undefined);
      throw err;
    }
  });
}

/**
 * One query outside a transaction, with the same mapping of a lost database.
 * `statement` may be a named one ({ name, text }): prepared once per connection.
 */
export async function query<R extends pg.QueryResultRow = pg.QueryResultRow>(
  pool: Pool,
  statement: string | { name: string; text: string },
  values: unknown[] = [],
): Promise<pg.QueryResult<R>> {
  try {
    return await pool.query<R>(typeof statement === "string" ? { text: statement, values } : { ...statement, values });
  } catch (err) {
    if (isConnectionError(err)) throw new UnavailableError("the database is not reachable; try again shortly", { cause: err });
    throw err;
  }
}
