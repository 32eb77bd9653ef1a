import { NatsBus, createSubjects, type Bus, type Subjects } from "@harbor/bus";
import type { Authenticator } from "@harbor/core";
import { createPool, type Pool } from "@harbor/db";
import { PortAllocatorClient } from "@harbor/proto";
import { createGrpcServer, createLogger, grpc, type GrpcServer } from "@harbor/runtime";
import { createTestDatabase, uniqueName, type TestDatabase } from "@harbor/testkit";
import { loadAllocatorConfig } from "./config.js";
import { createAllocator, type Allocator } from "./service.js";

/** An allocator for a service test: its own database on the machine's Postgres, the machine's NATS, a gRPC server and a client. */
export interface TestAllocator {
  db: TestDatabase;
  pool: Pool;
  bus: Bus;
  subjects: Subjects;
  allocator: Allocator;
  server: GrpcServer;
  client: PortAllocatorClient;
  stop(): Promise<void>;
}

export async function startTestAllocator(env: Record<string, string>, auth?: Authenticator): Promise<TestAllocator> {
  const logger = createLogger("test", "silent");
  const db = await createTestDatabase();
  const pool = createPool({ url: db.url, logger, max: 20 });
  const bus = await NatsBus.connect({ url: "nats://127.0.0.1:4222", logger });
  const subjects = createSubjects(uniqueName("hbt"));
  const allocator = createAllocator(loadAllocatorConfig(env), { pool, bus, subjects, logger, ...(auth ? { auth } : {}) });
  await allocator.start();
  const server = createGrpcServer({ address: "127.0.0.1:0", services: [allocator.grpc], logger });
  await server.start();
  const client = new PortAllocatorClient(server.boundAddress, grpc.credentials.createInsecure());
  return {
    db,
    pool,
    bus,
    subjects,
    allocator,
    server,
    client,
    async stop() {
      client.close();
      await server.stop();
      await allocator.stop();
      await bus.close();
      await pool.end();
      await db.drop();
    },
  };
}
