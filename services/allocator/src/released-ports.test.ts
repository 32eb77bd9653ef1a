import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NatsBus, createSubjects, type Bus } from "@harbor/bus";
import { Authenticator, parseTokens } from "@harbor/core";
import { createPool, type Pool } from "@harbor/db";
import { PortAllocatorClient } from "@harbor/proto";
import { createGrpcServer, createLogger, grpc, invoke, tokenMetadata, type GrpcServer, type RequestOf } from "@harbor/runtime";
import { createTestDatabase, uniqueName, type TestDatabase } from "@harbor/testkit";
import { loadAllocatorConfig } from "./config.js";
import { createAllocator, type Allocator } from "./service.js";

// A released port is kept for its name in its own space: clients of a deleted
// service still point at its port, so another space must not inherit it by
// re-creating the name, nor learn the name from a refusal.
const logger = createLogger("test", "silent");
const BLUE = "blue-0123456789abcdef";
const RED = "red-0123456789abcdef";
let db: TestDatabase;
let pool: Pool;
let bus: Bus;
let allocator: Allocator;
let server: GrpcServer;
let client: PortAllocatorClient;

const as = <M extends "createPortService" | "deletePortService">(token: string, method: M, request: RequestOf<PortAllocatorClient[M]>) =>
  invoke(client, method, request, 5_000, tokenMetadata(token));

beforeAll(async () => {
  db = await createTestDatabase();
  pool = createPool({ url: db.url, logger, max: 10 });
  bus = await NatsBus.connect({ url: "nats://127.0.0.1:4222", logger });
  allocator = createAllocator(loadAllocatorConfig({ HARBOR_NODE_ID: "n1", HARBOR_PORT_RANGE: "30000-30099" }), {
    pool,
    bus,
    subjects: createSubjects(uniqueName("hbt")),
    logger,
    auth: new Authenticator(parseTokens(`${BLUE}=space:blue,${RED}=space:red`).tokens),
  });
  await allocator.start();
  server = createGrpcServer({ address: "127.0.0.1:0", services: [allocator.grpc], logger });
  await server.start();
  client = new PortAllocatorClient(server.boundAddress, grpc.credentials.createInsecure());
});

afterAll(async () => {
  client?.close();
  await server?.stop();
  await allocator?.stop();
  await bus?.close();
  await pool?.end();
  await db?.drop();
});

describe("allocator - released ports and spaces", () => {
  it("another space neither learns the released name nor inherits the port by re-creating it; the space itself does", async () => {
    const { service } = await as(BLUE, "createPortService", { name: "blue-db", app: "", nodeId: "", port: 0 });
    const port = service!.port;
    await as(BLUE, "deletePortService", { name: "blue-db" });

    const fixed = (await as(RED, "createPortService", { name: "red-x", app: "", nodeId: "", port }).catch((e: unknown) => e)) as grpc.ServiceError;
    expect(fixed.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(fixed.details).toMatch(new RegExp(`^port ${port} on node n1 was released by another space's service and is kept for it until`));
    expect(fixed.details).not.toContain("blue-db");

    const squat = await as(RED, "createPortService", { name: "blue-db", app: "", nodeId: "", port: 0 });
    expect(squat.service!.port).not.toBe(port);
    const squatAgain = (await as(RED, "createPortService", { name: "blue-db-2", app: "", nodeId: "", port }).catch((e: unknown) => e)) as grpc.ServiceError;
    expect(squatAgain.code).toBe(grpc.status.FAILED_PRECONDITION);
    await as(RED, "deletePortService", { name: "blue-db" });

    const back = await as(BLUE, "createPortService", { name: "blue-db", app: "", nodeId: "", port: 0 });
    expect(back.service!.port).toBe(port);
  });
});
