import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createAllocator, loadAllocatorConfig, type Allocator } from "@harbor/allocator";
import { NatsBus, createSubjects, type Bus, type Subjects } from "@harbor/bus";
import { Authenticator, parseTokens } from "@harbor/core";
import { createPool, type Pool } from "@harbor/db";
import { BackendRegistryClient } from "@harbor/proto";
import { createRegistry, loadRegistryConfig, type RegistryService } from "@harbor/registry";
import { createGrpcServer, createLogger, grpc, invoke, tokenMetadata, type GrpcServer } from "@harbor/runtime";
import { createTestDatabase, uniqueName, type TestDatabase } from "@harbor/testkit";

// What the registry lets a caller do once tokens are on: a NATS message
// carries no Harbor token, so registering over NATS is off unless an operator
// turns it on; and the node's loopback (its embedded Postgres, NATS, the API)
// is no backend unless an operator names it.
const logger = createLogger("test", "silent");
const AGENT = "blue-agent-0123456789abcdef";
const TOKENS = `op-0123456789abcdef=operator,${AGENT}=agent:blue`;
let db: TestDatabase;
let pool: Pool;
let bus: Bus;
let allocator: Allocator;
const stops: Array<() => Promise<void>> = [];

async function registryWith(env: Record<string, string>): Promise<{ subjects: Subjects; client: BackendRegistryClient }> {
  const subjects = createSubjects(uniqueName("hbn"));
  const registry: RegistryService = createRegistry(loadRegistryConfig({ HARBOR_EXPIRY_SWEEP_MS: "60000", ...env }), {
    pool,
    bus,
    subjects,
    logger,
    auth: new Authenticator(parseTokens(TOKENS).tokens),
  });
  await registry.start();
  const server: GrpcServer = createGrpcServer({ address: "127.0.0.1:0", services: [registry.grpc], logger });
  await server.start();
  const client = new BackendRegistryClient(server.boundAddress, grpc.credentials.createInsecure());
  stops.push(async () => {
    client.close();
    await server.stop();
    await registry.stop();
  });
  return { subjects, client };
}

const ask = async (subject: string, body: unknown) => JSON.parse(await bus.request(subject, JSON.stringify(body), 5_000)) as Record<string, unknown>;
const instancesOf = async (app: string) => (await pool.query("SELECT instance_id FROM registry_instances WHERE app = $1", [app])).rows.map((r) => r.instance_id as string);
const registerAsAgent = (client: BackendRegistryClient, app: string, host: string, port: number) =>
  invoke(client, "registerInstance", { app, instanceId: `${app}-0`, host, ports: [{ intPort: 4100, port }], ttlSeconds: 0 }, 5_000, tokenMetadata(AGENT));

beforeAll(async () => {
  db = await createTestDatabase();
  pool = createPool({ url: db.url, logger, max: 10 });
  bus = await NatsBus.connect({ url: "nats://127.0.0.1:4222", logger });
  allocator = createAllocator(loadAllocatorConfig({ HARBOR_NODE_ID: "n1", HARBOR_PORT_RANGE: "30000-30099" }), { pool, bus, subjects: createSubjects(uniqueName("hbn")), logger });
  await allocator.start();
  await pool.query("INSERT INTO app_spaces (app, space) VALUES ('blue-app', 'blue')");
});

afterAll(async () => {
  for (const stop of stops.reverse()) await stop();
  await allocator?.stop();
  await bus?.close();
  await pool?.end();
  await db?.drop();
});

describe("registry - registration over NATS with tokens on", () => {
  it("is refused by default: no registering into, nor deregistering from, a space's app", async () => {
    const { subjects } = await registryWith({});
    // Blue's instance; the registry's table exists once it has started.
    await pool.query(
      `INSERT INTO registry_instances (app, instance_id, host, ports, ttl_seconds, available_since, expires_at)
       VALUES ('blue-app', 'blue-0', '127.0.0.1', '[]', 30, now(), now() + interval '1 hour')`,
    );
    const hijack = await ask(subjects.registerInstance(), { app: "blue-app", instanceId: "intruder-0", host: "10.1.2.3", ports: [{ intPort: 4100, port: 9100 }] });
    expect(hijack.error).toMatch(/^registration over NATS is off: .*HARBOR_NATS_REGISTRATION=true/);
    const evict = await ask(subjects.deregisterInstance(), { app: "blue-app", instanceId: "blue-0" });
    expect(evict.error).toMatch(/^registration over NATS is off/);
    expect(await instancesOf("blue-app")).toEqual(["blue-0"]);
  });

  it("works when an operator sets HARBOR_NATS_REGISTRATION=true; a bad value is a config error", async () => {
    const { subjects } = await registryWith({ HARBOR_NATS_REGISTRATION: "true" });
    const reply = await ask(subjects.registerInstance(), { app: "nats-app", instanceId: "n-0", host: "10.1.2.3", ports: [] });
    expect(reply.error).toBeUndefined();
    expect(await instancesOf("nats-app")).toEqual(["n-0"]);
    expect(() => loadRegistryConfig({ HARBOR_NATS_REGISTRATION: "maybe" })).toThrow(/HARBOR_NATS_REGISTRATION=maybe: expected true or false/);

    // JSON may hold any ttl: one that is not whole positive seconds is refused, nothing registered
    // (-5 was answered created, already expired; "abc" with Postgres' own words).
    for (const ttlSeconds of [-5, 1.5, "abc"]) {
      const bad = await ask(subjects.registerInstance(), { app: "nats-app", instanceId: "n-ttl", host: "10.1.2.3", ports: [], ttlSeconds });
      expect(bad.error, String(ttlSeconds)).toMatch(/^ttl_seconds .* is not valid: use whole seconds from 1 to \d+ \(0 for the default, 30\)/);
    }
    expect(await instancesOf("nats-app")).toEqual(["n-0"]);
  });
});

describe("registry - backend networks with tokens on", () => {
  it("leave the node's loopback out by default: an agent cannot point its app at the node's own services", async () => {
    const { client } = await registryWith({});
    for (const host of ["127.0.0.1", "localhost", "::1", "::ffff:127.0.0.1"]) {
      const err = (await registerAsAgent(client, "loop-app", host, 5432).catch((e: unknown) => e)) as grpc.ServiceError;
      expect(err.code, host).toBe(grpc.status.PERMISSION_DENIED);
      expect(err.details).toMatch(/is outside the backend networks \(10\.0\.0\.0\/8, 172\.16\.0\.0\/12, 192\.168\.0\.0\/16, fc00::\/7\); an operator sets HARBOR_BACKEND_NETWORKS/);
    }
    expect(await instancesOf("loop-app")).toEqual([]);
    expect((await registerAsAgent(client, "private-app", "10.1.2.3", 4100)).created).toBe(true);
  });

  it("hold loopback when the operator names it", async () => {
    const { client } = await registryWith({ HARBOR_BACKEND_NETWORKS: "127.0.0.0/8" });
    expect((await registerAsAgent(client, "local-app", "127.0.0.1", 4100)).created).toBe(true);
  });
});
