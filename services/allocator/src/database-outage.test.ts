import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { InProcessBus, createSubjects } from "@harbor/bus";
import { createPool, startEmbeddedPostgres, type EmbeddedPostgres, type Pool } from "@harbor/db";
import { PortAllocatorClient } from "@harbor/proto";
import { createGrpcServer, createLogger, grpc, invoke, type GrpcServer } from "@harbor/runtime";
import { freePort, waitFor } from "@harbor/testkit";
import { loadAllocatorConfig } from "./config.js";
import { createAllocator, type Allocator } from "./service.js";

// A private Postgres (the embedded one), so stopping it harms no other test.
const logger = createLogger("test", "silent");
let database: EmbeddedPostgres | undefined;
let pool: Pool | undefined;
let allocator: Allocator | undefined;
let server: GrpcServer | undefined;
let client: PortAllocatorClient | undefined;

afterAll(async () => {
  client?.close();
  await server?.stop();
  await allocator?.stop();
  await pool?.end();
  await database?.stop();
});

describe("allocator - Postgres away", () => {
  it("answers UNAVAILABLE at once while the database is down, and recovers by itself when it is back", async () => {
    const dataDir = join(mkdtempSync(join(tmpdir(), "harbor-outage-")), "postgres");
    const port = await freePort();
    database = await startEmbeddedPostgres({ dataDir, logger, port });
    pool = createPool({ url: database.url, logger, connectTimeoutMs: 1_000 });
    allocator = createAllocator(loadAllocatorConfig({ HARBOR_PORT_RANGE: "30000-30099" }), { pool, bus: new InProcessBus(), subjects: createSubjects(), logger });
    await allocator.start();
    server = createGrpcServer({ address: "127.0.0.1:0", services: [allocator.grpc], logger });
    await server.start();
    client = new PortAllocatorClient(server.boundAddress, grpc.credentials.createInsecure());
    const before = await invoke(client, "createPortService", { name: "survivor", app: "keep", nodeId: "", port: 0 });

    await database.stop();
    for (const call of [
      () => invoke(client!, "createPortService", { name: "while-down", app: "", nodeId: "", port: 0 }, 5_000),
      () => invoke(client!, "listPortServices", { nodeId: "", app: "", unlessDigest: "" }, 5_000),
      () => invoke(client!, "getAppEnvironment", { app: "keep" }, 5_000),
    ]) {
      const err = (await call().then(
        () => expect.unreachable("answered while the database was down"),
        (e: unknown) => e,
      )) as grpc.ServiceError;
      // Within the client's deadline, not DEADLINE_EXCEEDED: it does not hang.
      expect(grpc.status[err.code]).toBe("UNAVAILABLE");
      expect(err.details).toMatch(/database .*(not reachable|lost); try again shortly/);
    }

    database = await startEmbeddedPostgres({ dataDir, logger, port });
    const { services } = await waitFor(() => invoke(client!, "listPortServices", { nodeId: "", app: "", unlessDigest: "" }).catch(() => undefined), "the allocator to recover");
    expect(services.map((s) => [s.serviceName, s.port])).toEqual([["survivor", before.service!.port]]);
    const after = await invoke(client, "createPortService", { name: "after-outage", app: "keep", nodeId: "", port: 0 });
    expect(after.service!.intPort).toBe(4101);
  });
});
