import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { createAllocator, loadAllocatorConfig, type Allocator } from "@harbor/allocator";
import { NatsBus, createSubjects, type Bus } from "@harbor/bus";
import { ManualClock } from "@harbor/core";
import { createPool, type Pool } from "@harbor/db";
import { BackendRegistryClient, BackendSet, PortAllocatorClient, Protocol, type WatchBackendsResponse } from "@harbor/proto";
import { RegistryStore, createRegistry, loadRegistryConfig, type RegistryService } from "@harbor/registry";
import { createGrpcServer, createLogger, grpc, invoke, type GrpcServer } from "@harbor/runtime";
import { createTestDatabase, uniqueName, waitFor, type TestDatabase } from "@harbor/testkit";

// The registry derives backend sets from the allocator's bindings, so its
// service tests run both, against the real Postgres and NATS.
const logger = createLogger("test", "silent");
const clock = new ManualClock(Date.now());
const subjects = createSubjects(uniqueName("hbt"));
let db: TestDatabase;
let pool: Pool;
let bus: Bus;
let allocator: Allocator;
let registry: RegistryService;
let server: GrpcServer;
let ports: PortAllocatorClient;
let backends: BackendRegistryClient;
let published: BackendSet[] = [];

async function startRegistry(over: Bus = bus): Promise<void> {
  registry = createRegistry(loadRegistryConfig({ HARBOR_INSTANCE_TTL_SECONDS: "30", HARBOR_EXPIRY_SWEEP_MS: "60000" }), { pool, bus: over, subjects, logger, clock });
  await registry.start();
  server = createGrpcServer({ address: "127.0.0.1:0", services: [allocator.grpc, registry.grpc], logger });
  await server.start();
  ports = new PortAllocatorClient(server.boundAddress, grpc.credentials.createInsecure());
  backends = new BackendRegistryClient(server.boundAddress, grpc.credentials.createInsecure());
}

async function stopRegistry(): Promise<void> {
  ports.close();
  backends.close();
  await server.stop();
  await registry.stop();
}

const register = (app: string, instanceId: string, port: number, extra: { ttlSeconds?: number; ports?: Array<{ intPort: number; port: number }> } = {}) =>
  invoke(backends, "registerInstance", { app, instanceId, host: "127.0.0.1", ports: extra.ports ?? [{ intPort: 4100, port }], ttlSeconds: extra.ttlSeconds ?? 0 });

/**
 * A statement of this test's database touching `table` waits for a lock another
 * transaction holds (only that one: a reconcile waiting on a set row would pass
 * for the race and let the test go on before it happened).
 */
const lockWaiter = (table: string) => async () =>
  (
    await pool.query<{ n: number }>(
      "SELECT count(*)::int AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database() AND query ILIKE '%' || $1 || '%'",
      [table],
    )
  ).rows[0]!.n > 0;

const setOf = (serviceId: string) => published.filter((s) => s.serviceId === serviceId).at(-1);

beforeAll(async () => {
  db = await createTestDatabase();
  pool = createPool({ url: db.url, logger, max: 20 });
  bus = await NatsBus.connect({ url: "nats://127.0.0.1:4222", logger });
  bus.subscribe(subjects.backendsOfNode("n1"), (m) => published.push(BackendSet.fromJSON(JSON.parse(m.data))));
  allocator = createAllocator(loadAllocatorConfig({ HARBOR_NODE_ID: "n1", HARBOR_PORT_RANGE: "30000-30999" }), { pool, bus, subjects, logger });
  await allocator.start();
  await startRegistry();
});

afterAll(async () => {
  await stopRegistry();
  await allocator?.stop();
  await bus?.close();
  await pool?.end();
  await db?.drop();
});

beforeEach(() => {
  published = [];
});

describe("registry - instances and backend sets", () => {
  it("a set built in SQL names the protocol as the service has it (udp…, both…)", async () => {
    for (const [name, protocol] of [["udp-sqlproto", Protocol.PROTOCOL_UDP], ["both-sqlproto", Protocol.PROTOCOL_BOTH]] as const) {
      const { service } = await invoke(ports, "createPortService", { name, app: "sqlproto", nodeId: "", port: 0 });
      expect(service!.protocol).toBe(protocol);
      await waitFor(() => setOf(service!.name)?.protocol === protocol, `${name}'s set`);
    }
  });

  it("publishes the ordered set when instances come; a heartbeat that changes nothing publishes nothing", async () => {
    const { service } = await invoke(ports, "createPortService", { name: "game", app: "arcade", nodeId: "", port: 0 });
    const id = service!.name;
    const a0 = await register("arcade", "a-0", 5000);
    expect(a0.created).toBe(true);
    const a1 = await register("arcade", "a-1", 5001);
    await waitFor(() => setOf(id)?.backends.length === 2, "a set with two backends");
    const first = setOf(id)!;
    expect(first.backends.map((b) => [b.instanceId, b.port])).toEqual([["a-0", 5000], ["a-1", 5001]]);
    expect(first).toMatchObject({ serviceId: id, nodeId: "n1", serviceName: "game", port: service!.port, protocol: Protocol.PROTOCOL_TCP });
    // The set is built in SQL, the instance in TypeScript: the same instant either way.
    expect(first.backends.map((b) => b.availableSince)).toEqual([a0.instance!.availableSince, a1.instance!.availableSince]);
    const count = published.length;
    const beat = await register("arcade", "a-0", 5000);
    expect(beat.created).toBe(false);
    await bus.flush();
    await new Promise((r) => setTimeout(r, 100));
    expect(published.length).toBe(count);
    // ListBackends answers the same set
    const listed = await invoke(backends, "listBackends", { nodeId: "n1", serviceId: id, unlessDigest: "" });
    expect(listed.sets[0]!.revision).toBe(first.revision);
  });

  it("concurrent registrations of one instance leave its set as the instance ends up", async () => {
    const { service } = await invoke(ports, "createPortService", { name: "racing", app: "racer", nodeId: "", port: 0 });
    const id = service!.name;
    await register("racer", "r-0", 7000);
    const setPort = async () => (await invoke(backends, "listBackends", { nodeId: "n1", serviceId: id, unlessDigest: "" })).sets[0]?.backends[0]?.port;
    const instancePort = async () => (await invoke(backends, "listInstances", { app: "racer" })).instances[0]!.ports[0]!.port;
    for (let round = 0; round < 8; round++) {
      // They race; whichever order they commit in, the set ends as the instance does
      // (a change taken for a heartbeat would leave the set behind).
      const answers = await Promise.all([7001, 7002, 7001, 7003, 7002].map((port) => register("racer", "r-0", port)));
      expect(answers.every((a) => !a.created)).toBe(true);
      const final = await instancePort();
      await waitFor(async () => (await setPort()) === final, `the set to follow the instance to port ${final}`);
    }
  });

  it("an app another space claims while this claim waits for it belongs to that space, also afterwards", async () => {
    const store = new RegistryStore(pool);
    const other = await pool.connect();
    try {
      await other.query("BEGIN");
      await other.query("INSERT INTO app_spaces (app, space) VALUES ('contested', 'space-a')");
      const claim = store.claimApp("contested", "space-b");
      await waitFor(lockWaiter("app_spaces"), "the claim waiting for the other");
      await other.query("COMMIT");
      expect(await claim).toBe("space-a");
      // Remembered as it is in the database, not as this caller asked.
      expect(await store.claimApp("contested", "space-b")).toBe("space-a");
    } finally {
      other.release();
    }
  });

  it("of two first registrations of one instance racing, only one is its creation", async () => {
    const other = await pool.connect();
    try {
      await other.query("BEGIN");
      await other.query(
        `INSERT INTO registry_instances (app, instance_id, host, ports, ttl_seconds, available_since, expires_at)
         VALUES ('twice', 't-0', '127.0.0.1', '[{"int_port": 4100, "port": 7100}]', 30, now(), now() + interval '30 seconds')`,
      );
      const second = register("twice", "t-0", 7100, { ttlSeconds: 30 });
      await waitFor(lockWaiter("registry_instances"), "the registration waiting for the other");
      await other.query("COMMIT");
      expect((await second).created).toBe(false);
    } finally {
      other.release();
    }
  });

  it("a column a later migration adds to registry_instances does not break registering on warm connections", async () => {
    await register("widened", "w-0", 7200);
    await pool.query("ALTER TABLE registry_instances ADD COLUMN migrated_later int");
    try {
      // The same pooled connection, its registration statement prepared before the change.
      await expect(register("widened", "w-0", 7201)).resolves.toMatchObject({ created: false });
    } finally {
      await pool.query("ALTER TABLE registry_instances DROP COLUMN migrated_later");
    }
  });

  it("a node's sets carry a digest; asked with it, unchanged sets answer unchanged and send nothing", async () => {
    const list = (unlessDigest = "") => invoke(backends, "listBackends", { nodeId: "n1", serviceId: "", unlessDigest });
    const { service } = await invoke(ports, "createPortService", { name: "digest-sets", app: "digest-app", nodeId: "", port: 0 });
    await register("digest-app", "d-0", 6000);
    await waitFor(() => setOf(service!.name)?.backends.length === 1, "the set published");
    const full = await list();
    expect(full.unchanged).toBe(false);
    expect(full.sets.some((s) => s.serviceId === service!.name)).toBe(true);
    expect(await list(full.digest)).toEqual({ sets: [], digest: full.digest, unchanged: true });
    // A heartbeat that changes nothing leaves it; a new instance does not.
    await register("digest-app", "d-0", 6000);
    expect((await list(full.digest)).unchanged).toBe(true);
    await register("digest-app", "d-1", 6001);
    const after = await list(full.digest);
    expect(after.unchanged).toBe(false);
    expect(after.sets.find((s) => s.serviceId === service!.name)?.backends.map((b) => b.instanceId)).toEqual(["d-0", "d-1"]);
    await expect(invoke(backends, "listBackends", { nodeId: "n1", serviceId: service!.name, unlessDigest: full.digest })).rejects.toThrow(/unless_digest goes with node_id alone/);
  });

  it("deregistration, expiry and re-registration keep availability order, with revisions that only increase", async () => {
    const { service } = await invoke(ports, "createPortService", { name: "fifo", app: "queue", nodeId: "", port: 0 });
    const id = service!.name;
    await register("queue", "q-0", 6000);
    await register("queue", "q-1", 6001, { ttlSeconds: 5 });
    await register("queue", "q-2", 6002);
    await waitFor(() => setOf(id)?.backends.length === 3, "three backends");
    const r3 = BigInt(setOf(id)!.revision);
    await invoke(backends, "deregisterInstance", { app: "queue", instanceId: "q-0" });
    await waitFor(() => setOf(id)?.backends.length === 2, "q-0 gone");
    expect(setOf(id)!.backends.map((b) => b.instanceId)).toEqual(["q-1", "q-2"]);
    const r4 = BigInt(setOf(id)!.revision);
    expect(r4).toBeGreaterThan(r3);
    // q-1's TTL runs out; heartbeats keep the others
    clock.advance(6_000);
    await register("queue", "q-2", 6002);
    await registry.registry.expire();
    await waitFor(() => setOf(id)?.backends.length === 1, "q-1 expired");
    // q-0 returns: it joins the back of the queue
    await register("queue", "q-0", 6000);
    await waitFor(() => setOf(id)?.backends.length === 2, "q-0 back");
    expect(setOf(id)!.backends.map((b) => b.instanceId)).toEqual(["q-2", "q-0"]);
    expect(BigInt(setOf(id)!.revision)).toBeGreaterThan(r4);
  });

  it("an instance heartbeating after its TTL ran out, before the sweep, is back in its sets", async () => {
    const { service } = await invoke(ports, "createPortService", { name: "revive", app: "lazarus", nodeId: "", port: 0 });
    await register("lazarus", "z-0", 7000, { ttlSeconds: 5 });
    await waitFor(() => setOf(service!.name)?.backends.length === 1, "one backend");
    clock.advance(6_000);
    // A change to the app recomputes its set while z-0 is expired but not swept: it drops out.
    await register("lazarus", "z-1", 7001, { ttlSeconds: 600 });
    await waitFor(() => setOf(service!.name)?.backends.map((b) => b.instanceId).join() === "z-1", "z-0 left out");
    // Its heartbeat, same host and ports, brings it back.
    await register("lazarus", "z-0", 7000, { ttlSeconds: 5 });
    await waitFor(() => setOf(service!.name)?.backends.length === 2, "z-0 back");
  });

  it("an instance may register before any service is bound; int_ports without a mapping are reached at host:int_port", async () => {
    await register("late", "l-0", 0, { ports: [{ intPort: 4101, port: 7101 }] });
    const { service: first } = await invoke(ports, "createPortService", { name: "late-one", app: "late", nodeId: "", port: 0 });
    const { service: second } = await invoke(ports, "createPortService", { name: "late-two", app: "late", nodeId: "", port: 0 });
    await waitFor(() => setOf(first!.name)?.backends.length === 1 && setOf(second!.name)?.backends.length === 1, "both sets");
    expect(setOf(first!.name)!.backends[0]!.port).toBe(4100);
    expect(setOf(second!.name)!.backends[0]!.port).toBe(7101);
  });

  it("revisions keep increasing across a registry restart", async () => {
    const { service } = await invoke(ports, "createPortService", { name: "restart", app: "phoenix", nodeId: "", port: 0 });
    await register("phoenix", "p-0", 8000);
    await waitFor(() => setOf(service!.name)?.backends.length === 1, "one backend");
    const before = BigInt(setOf(service!.name)!.revision);
    await stopRegistry();
    await startRegistry();
    await register("phoenix", "p-1", 8001);
    await waitFor(() => setOf(service!.name)?.backends.length === 2, "two backends");
    expect(BigInt(setOf(service!.name)!.revision)).toBeGreaterThan(before);
  });

  it("WatchBackends sends a snapshot, then each change", async () => {
    const { service } = await invoke(ports, "createPortService", { name: "watched", app: "tv", nodeId: "", port: 0 });
    await register("tv", "t-0", 9000);
    const messages: WatchBackendsResponse[] = [];
    const stream = backends.watchBackends({ nodeId: "n1" });
    stream.on("data", (m: WatchBackendsResponse) => messages.push(m));
    stream.on("error", () => undefined);
    await waitFor(() => messages.length >= 1, "the snapshot");
    expect(messages[0]!.snapshot).toBe(true);
    expect(messages[0]!.sets.find((s) => s.serviceId === service!.name)?.backends.length).toBe(1);
    await register("tv", "t-1", 9001);
    await waitFor(() => messages.some((m) => !m.snapshot && m.sets[0]?.serviceId === service!.name && m.sets[0].backends.length === 2), "the change");
    stream.cancel();
  });

  it("a set too large for one bus message is published as a notice on its own subject; WatchBackends sends the set itself", async () => {
    // The same NATS, as if its max_payload were 64 bytes: every set is too large.
    const tiny = new Proxy(bus, { get: (target, key) => (key === "maxPayloadBytes" ? () => 64 : Reflect.get(target, key)) });
    await stopRegistry();
    await startRegistry(tiny);
    try {
      const { service } = await invoke(ports, "createPortService", { name: "crowded", app: "throng", nodeId: "", port: 0 });
      const id = service!.name;
      await register("throng", "t-0", 9300);
      const notices: BackendSet[] = [];
      const sub = bus.subscribe(subjects.backendsElided("n1", id), (m) => notices.push(BackendSet.fromJSON(JSON.parse(m.data))));
      const messages: WatchBackendsResponse[] = [];
      const stream = backends.watchBackends({ nodeId: "n1" });
      stream.on("data", (m: WatchBackendsResponse) => messages.push(m));
      stream.on("error", () => undefined);
      try {
        await waitFor(() => messages.length >= 1, "the snapshot");
        await bus.flush();
        await register("throng", "t-1", 9301);
        await waitFor(() => notices.length >= 1, "the notice");
        expect(notices[0]).toMatchObject({ serviceId: id, elided: true, backends: [] });
        expect(BigInt(notices[0]!.revision)).toBeGreaterThan(0n);
        const whole = () => messages.find((m) => !m.snapshot && m.sets[0]?.serviceId === id)?.sets[0];
        await waitFor(() => whole() !== undefined, "the set on the watch stream");
        expect(whole()!.backends.map((b) => b.port)).toEqual([9300, 9301]);
        expect(whole()!.revision).toBe(notices[0]!.revision);
        expect(whole()!.elided).toBe(false);
        // Nothing for this service on the sets' own subject: a subscriber there never takes a notice for an empty set.
        expect(published.filter((p) => p.serviceId === id)).toEqual([]);
      } finally {
        stream.cancel();
        sub.unsubscribe();
      }
    } finally {
      await stopRegistry();
      await startRegistry();
    }
  });

  it("instance agents can register over NATS; malformed requests get an error and change nothing", async () => {
    const reply = JSON.parse(await bus.request(subjects.registerInstance(), JSON.stringify({ app: "natsy", instanceId: "n-0", host: "127.0.0.1", ports: [{ intPort: 4100, port: 9100 }] }), 5_000));
    expect(reply.created).toBe(true);
    for (const garbage of ["not json", "[]", JSON.stringify({ app: "bad app", instanceId: "x", host: "127.0.0.1" }), JSON.stringify({ app: "ok", instanceId: "x", host: "no host!" })]) {
      const answer = JSON.parse(await bus.request(subjects.registerInstance(), garbage, 5_000));
      expect(answer.error).toBeTruthy();
    }
    const { instances } = await invoke(backends, "listInstances", { app: "" });
    expect(instances.map((i) => i.app).sort()).not.toContain("ok");
    expect(instances.some((i) => i.app === "natsy")).toBe(true);
  });

  it("stopping waits for a NATS registration still being handled: it is stored and answered", async () => {
    const holder = await pool.connect();
    let reply: Promise<string> | undefined;
    let stopping: Promise<void> | undefined;
    let stopped = false;
    try {
      await holder.query("BEGIN");
      await holder.query("LOCK TABLE registry_instances IN EXCLUSIVE MODE");
      reply = bus.request(subjects.registerInstance(), JSON.stringify({ app: "unhurried", instanceId: "u-0", host: "127.0.0.1", ports: [{ intPort: 4100, port: 9200 }] }), 10_000);
      await waitFor(lockWaiter("registry_instances"), "the registration waiting on the lock");
      stopping = stopRegistry().then(() => {
        stopped = true;
      });
      await new Promise((resolve) => setTimeout(resolve, 200));
      expect(stopped).toBe(false);
    } finally {
      await holder.query("COMMIT");
      holder.release();
    }
    await stopping;
    expect(JSON.parse(await reply!).created).toBe(true);
    await startRegistry();
    const { instances } = await invoke(backends, "listInstances", { app: "unhurried" });
    expect(instances.map((i) => i.instanceId)).toEqual(["u-0"]);
  });

  it("bad registrations answer INVALID_ARGUMENT or NOT_FOUND and change nothing", async () => {
    const before = (await invoke(backends, "listInstances", { app: "" })).instances.length;
    const bad = [
      { app: "x", instanceId: "i", host: "not a host!", ports: [], ttlSeconds: 0 },
      { app: "x", instanceId: "i", host: "127.0.0.1", ports: [{ intPort: 4100, port: 0 }], ttlSeconds: 0 },
      { app: "x", instanceId: "i", host: "127.0.0.1", ports: [{ intPort: 4100, port: 1 }, { intPort: 4100, port: 2 }], ttlSeconds: 0 },
      { app: "x", instanceId: "i", host: "127.0.0.1", ports: [], ttlSeconds: 999_999 },
      { app: "", instanceId: "i", host: "127.0.0.1", ports: [], ttlSeconds: 0 },
    ];
    for (const req of bad) {
      const err = (await invoke(backends, "registerInstance", req).catch((e: unknown) => e)) as grpc.ServiceError;
      expect(err.code).toBe(grpc.status.INVALID_ARGUMENT);
    }
    const missing = (await invoke(backends, "deregisterInstance", { app: "x", instanceId: "nobody" }).catch((e: unknown) => e)) as grpc.ServiceError;
    expect(missing.code).toBe(grpc.status.NOT_FOUND);
    expect((await invoke(backends, "listInstances", { app: "" })).instances.length).toBe(before);
  });
});
