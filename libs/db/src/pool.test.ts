import pg from "pg";
import pino from "pino";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import { createTestDatabase, TEST_ADMIN_URL, waitFor, type TestDatabase } from "@harbor/testkit";
import { createPool, type Pool } from "./pool.js";

describe("createPool against the machine's Postgres", () => {
  let database: TestDatabase;
  let pool: Pool;
  let lines: Array<Record<string, unknown>>;

  beforeEach(async () => {
    database = await createTestDatabase();
    lines = [];
    const logger = pino({ level: "debug" }, { write: (line: string) => lines.push(JSON.parse(line) as Record<string, unknown>) });
    pool = createPool({ url: database.url, logger });
  });

  afterEach(async () => {
    await pool.end().catch(() => undefined);
    await database.drop();
  });

  async function terminateBackends(): Promise<void> {
    const admin = new pg.Client({ connectionString: TEST_ADMIN_URL });
    await admin.connect();
    try {
      await admin.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()", [database.name]);
    } finally {
      await admin.end();
    }
  }

  it("logs an idle client's lost connection as one short warning, without the client, and keeps serving", async () => {
    await pool.query({ name: "pool-test-prepared", text: "SELECT 1 AS one" });
    await terminateBackends();
    await waitFor(() => lines.some((l) => l.msg === "db-idle-client-error"), "the idle client's error logged", 5_000);

    const line = lines.find((l) => l.msg === "db-idle-client-error") as { level: number; err: Record<string, unknown> };
    expect(line.level).toBe(40);
    expect(line.err).toMatchObject({ message: "terminating connection due to administrator command", code: "57P01", severity: "FATAL" });
    expect(line.err).not.toHaveProperty("client");
    expect(JSON.stringify(line)).not.toContain("pool-test-prepared");
    // The broken client left the pool; the next query gets a new one.
    const { rows } = await pool.query<{ one: number }>("SELECT 1 AS one");
    expect(rows[0]?.one).toBe(1);
  });

  it("does not warn about a client that Postgres closes while the pool is ending", async () => {
    await pool.query("SELECT 1");
    const ending = pool.end();
    // What a client whose Terminate raced Postgres' own shutdown reports, as pg-pool emits it.
    pool.emit("error", Object.assign(new Error("terminating connection due to administrator command"), { code: "57P01" }));
    await ending;
    expect(lines.filter((l) => (l.level as number) >= 40)).toEqual([]);
    expect(lines.map((l) => l.msg)).toContain("db-idle-client-error-while-ending");
  });
});
