import pg from "pg";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestDatabase, waitFor, type TestDatabase } from "@harbor/testkit";
import type { ServiceJson } from "./cluster.js";
import { startHarbor, type Harbor } from "./harbor.js";

let db: TestDatabase;
let harbor: Harbor;
let restarted: Harbor | undefined;

// Snapshots only at start (and every 10 minutes): a set the worker gets meanwhile came by the bus.
const ENV = { HARBOR_RECONCILE_INTERVAL_MS: "1000", HARBOR_RESYNC_INTERVAL_MS: "600000" };

beforeAll(async () => {
  db = await createTestDatabase();
  harbor = await startHarbor({ database: db, env: ENV });
});

afterAll(async () => {
  await harbor?.stop();
  await restarted?.stop();
  await db?.drop();
});

describe("e2e scale - sets larger than a NATS message, a node's listing larger than gRPC's default 4 MiB", () => {
  it("each set reaches the worker at once by a notice and a fetch, and the full snapshot still comes (10 services × 10,000 backends: ~5 MiB of sets)", async () => {
    const SERVICES = 10;
    const INSTANCES = 10_000;
    const created: ServiceJson[] = [];
    for (let i = 0; i < SERVICES; i++) created.push(await harbor.json<ServiceJson>("create-service", `crowd-${i}`, "--app", "crowd"));
    const logsBefore = harbor.logs().length;
    // 10,000 instances at once, straight into the registry's table (registering each would take minutes);
    // each maps every int_port the app's bindings have (4100…4109) to a private address.
    const sql = new pg.Client({ connectionString: harbor.env.DATABASE_URL });
    await sql.connect();
    try {
      await sql.query(
        `INSERT INTO registry_instances (app, instance_id, host, ports, ttl_seconds, available_since, expires_at)
         SELECT 'crowd', 'crowd-instance-' || lpad(i::text, 6, '0'), '10.9.' || (i / 250) || '.' || (i % 250),
                (SELECT jsonb_agg(jsonb_build_object('int_port', 4100 + b, 'port', 20000 + b)) FROM generate_series(0, $2 - 1) b),
                3600, now(), now() + interval '1 hour'
           FROM generate_series(1, $1) i`,
        [INSTANCES, SERVICES],
      );
      // The registry's reconcile (every second here) puts them in the sets.
      await waitFor(
        async () =>
          (await sql.query<{ n: number }>("SELECT count(*)::int AS n FROM registry_backend_sets WHERE jsonb_array_length(content->'backends') = $1", [INSTANCES])).rows[0]!.n === SERVICES,
        "the registry's sets holding every instance",
        60_000,
        200,
      );
    } finally {
      await sql.end();
    }
    // Too large for one NATS message (10,000 backends: ~1.2 MB), each set comes as a notice
    // of its revision, and the worker fetches it over gRPC.
    const fetchedWhole = () => new Set([...harbor.logs().slice(logsBefore).matchAll(/"serviceId":"([^"]+)","revision":"\d+","backends":10000,"msg":"backend-set-fetched"/g)].map((m) => m[1]));
    await waitFor(() => fetchedWhole().size === SERVICES, "every large set fetched", 30_000, 200);
    expect(harbor.logs().slice(logsBefore)).not.toMatch(/backend-set-fetch-failed/);

    // A restarted worker's first snapshot carries all ten: ~5 MiB in one gRPC answer.
    await harbor.stop();
    restarted = await startHarbor({ database: db, like: harbor, env: ENV });
    await waitFor(() => /"sets":10,"unchanged":false[^\n]*"msg":"worker-synced"/.test(restarted!.logs()), "the first snapshot", 30_000, 200);
    expect(restarted.logs()).not.toMatch(/worker-sync-failed|Received message larger than max/);
    expect(created).toHaveLength(SERVICES);
  }, 120_000);
});
