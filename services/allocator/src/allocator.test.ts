import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { Bus, BusMessage, Subjects } from "@harbor/bus";
import type { Pool } from "@harbor/db";
import { PortAllocatorClient, Protocol } from "@harbor/proto";
import { createLogger, grpc, invoke } from "@harbor/runtime";
import { waitFor } from "@harbor/testkit";
import { startTestAllocator, type TestAllocator } from "./allocator.fixture.js";
import { repair, type Allocator } from "./service.js";
import { PortBindFailed, PortServiceEvent, WorkerHeartbeat, Protocol as P, timestampFromMs, type Node } from "@harbor/proto";
import { publishMessage } from "@harbor/bus";

const logger = createLogger("test", "silent");
let harness: TestAllocator;
let pool: Pool;
let bus: Bus;
let allocator: Allocator;
let client: PortAllocatorClient;
let subjects: Subjects;

async function expectCode(promise: Promise<unknown>, code: grpc.status, message: RegExp): Promise<void> {
  const err = (await promise.then(
    () => expect.unreachable("the call succeeded"),
    (e: unknown) => e,
  )) as grpc.ServiceError;
  expect(grpc.status[err.code]).toBe(grpc.status[code]);
  expect(err.details).toMatch(message);
}

beforeAll(async () => {
  harness = await startTestAllocator({ HARBOR_NODE_ID: "n1", HARBOR_PORT_RANGE: "30000-30999", HARBOR_NODE_HOST: "10.0.0.5" });
  ({ pool, bus, allocator, client, subjects } = harness);
});

afterAll(async () => {
  await harness?.stop();
});

describe("allocator - create and bind", () => {
  it("create returns the seed's credentials, and an app's int_ports go 4100, 4101", async () => {
    const { service } = await invoke(client, "createPortService", { name: "my-port", app: "port-test", nodeId: "", port: 0 });
    expect(service).toMatchObject({ hostname: "10.0.0.5", host: "10.0.0.5", nodeId: "n1", intPort: 4100, serviceName: "my-port", protocol: Protocol.PROTOCOL_TCP, extHost: "", extHostname: "" });
    expect(service!.name).toMatch(/^[0-9a-f-]{36}$/);
    expect(service!.port).toBeGreaterThanOrEqual(30000);
    expect(service!.port).toBeLessThanOrEqual(30999);
    const second = await invoke(client, "createPortService", { name: "udp-port-test", app: "", nodeId: "", port: 0 });
    expect(second.service!.protocol).toBe(Protocol.PROTOCOL_UDP);
    expect(second.service!.intPort).toBe(0);
    const bound = await invoke(client, "bindPortService", { name: "udp-port-test", app: "port-test" });
    expect(bound.service!.intPort).toBe(4101);
    const { variables } = await invoke(client, "getAppEnvironment", { app: "port-test" });
    expect(variables.STACKATO_HARBOR).toBeUndefined();
    expect(variables.STACKATO_HARBOR_MY_PORT).toBe("4100");
    expect(variables.STACKATO_HARBOR_UDP_PORT_TEST).toBe("4101");
    expect(variables.STACKATO_APP_NAME_UPCASE).toBe("PORT_TEST");
    expect(JSON.parse(variables.STACKATO_SERVICES!)["my-port"]).toEqual({
      hostname: "10.0.0.5",
      host: "10.0.0.5",
      port: service!.port,
      name: service!.name,
      node_id: "n1",
      int_port: 4100,
    });
    await expectCode(invoke(client, "bindPortService", { name: "udp-port-test", app: "port-test" }), grpc.status.ALREADY_EXISTS, /already bound.*4101/);
    // Asked about an app it is not bound to, a service shows no int_port rather than another app's.
    expect((await invoke(client, "getPortService", { name: "udp-port-test", app: "port-test" })).service!.intPort).toBe(4101);
    expect((await invoke(client, "getPortService", { name: "udp-port-test", app: "stranger" })).service!.intPort).toBe(0);
    expect((await invoke(client, "getPortService", { name: "udp-port-test", app: "" })).service!.intPort).toBe(4101);
  });

  it("protocol and HTTPS proxy follow the name", async () => {
    const both = await invoke(client, "createPortService", { name: "multi-dns", app: "", nodeId: "", port: 0 });
    expect(both.service!.protocol).toBe(Protocol.PROTOCOL_BOTH);
    const https = await invoke(client, "createPortService", { name: "harbor-https-custom-1", app: "", nodeId: "", port: 0 });
    expect(https.service!.httpsProxy).toBe(true);
    expect(https.service!.protocol).toBe(Protocol.PROTOCOL_TCP);
  });

  it("a requested port is honoured; a taken one is ALREADY_EXISTS; one in no range is INVALID_ARGUMENT", async () => {
    // The seed's example port, unless an earlier test's random pick holds it.
    const used = new Set((await invoke(client, "listPortServices", { nodeId: "", app: "", unlessDigest: "" })).services.map((s) => s.port));
    const wanted = [30134, 30135, 30136, 30137].find((p) => !used.has(p))!;
    const { service } = await invoke(client, "createPortService", { name: "fixed", app: "", nodeId: "", port: wanted });
    expect(service!.port).toBe(wanted);
    await expectCode(
      invoke(client, "createPortService", { name: "fixed-2", app: "", nodeId: "", port: wanted }),
      grpc.status.ALREADY_EXISTS,
      new RegExp(`port ${wanted} on node n1 is already allocated`),
    );
    await expectCode(invoke(client, "createPortService", { name: "fixed-3", app: "", nodeId: "", port: 40000 }), grpc.status.INVALID_ARGUMENT, /in no node's range \(n1 30000-30999/);
    await expectCode(invoke(client, "createPortService", { name: "fixed-4", app: "", nodeId: "n1", port: 29999 }), grpc.status.INVALID_ARGUMENT, /outside node n1's range/);
  });

  it("bad input answers a clear error and changes nothing", async () => {
    const before = (await invoke(client, "listPortServices", { nodeId: "", app: "", unlessDigest: "" })).services.length;
    await expectCode(invoke(client, "createPortService", { name: "no spaces", app: "", nodeId: "", port: 0 }), grpc.status.INVALID_ARGUMENT, /service name "no spaces" is not valid/);
    await expectCode(invoke(client, "createPortService", { name: "x".repeat(5000), app: "", nodeId: "", port: 0 }), grpc.status.INVALID_ARGUMENT, /is not valid/);
    await expectCode(invoke(client, "createPortService", { name: "ok-name", app: "bad.app", nodeId: "", port: 0 }), grpc.status.INVALID_ARGUMENT, /app name "bad.app"/);
    await expectCode(invoke(client, "createPortService", { name: "ok-name", app: "", nodeId: "", port: 70000 }), grpc.status.INVALID_ARGUMENT, /port 70000 is not valid/);
    await expectCode(invoke(client, "createPortService", { name: "udp-https", app: "", nodeId: "", port: 0 }), grpc.status.INVALID_ARGUMENT, /asks for UDP \(udp…\) and the HTTPS container proxy/);
    await expectCode(invoke(client, "createPortService", { name: "ok-name", app: "", nodeId: "nowhere", port: 0 }), grpc.status.NOT_FOUND, /no harbor node "nowhere"/);
    await expectCode(invoke(client, "createPortService", { name: "MY-PORT", app: "", nodeId: "", port: 0 }), grpc.status.ALREADY_EXISTS, /already exists/);
    await expectCode(invoke(client, "getPortService", { name: "missing", app: "" }), grpc.status.NOT_FOUND, /no port service named "missing"/);
    await expectCode(invoke(client, "unbindPortService", { name: "fixed", app: "nobody" }), grpc.status.NOT_FOUND, /not bound to app "nobody"/);
    await expectCode(invoke(client, "upsertNode", { node: undefined }), grpc.status.INVALID_ARGUMENT, /give the node/);
    expect((await invoke(client, "listPortServices", { nodeId: "", app: "", unlessDigest: "" })).services.length).toBe(before);
  });

  it("a node's listing carries a digest; asked with it, an unchanged node answers unchanged and sends nothing", async () => {
    const list = (unlessDigest = "") => invoke(client, "listPortServices", { nodeId: "n1", app: "", unlessDigest });
    const full = await list();
    expect(full.unchanged).toBe(false);
    expect(full.services.length).toBeGreaterThan(0);
    expect(full.digest).toMatch(/^[0-9a-f]{32}$/);
    expect(await list(full.digest)).toEqual({ services: [], digest: full.digest, unchanged: true });
    // A service that comes, and one that goes, each change the digest.
    await invoke(client, "createPortService", { name: "digest-test", app: "", nodeId: "n1", port: 0 });
    const afterCreate = await list(full.digest);
    expect(afterCreate.unchanged).toBe(false);
    expect(afterCreate.services.map((s) => s.serviceName)).toContain("digest-test");
    await invoke(client, "deletePortService", { name: "digest-test" });
    const afterDelete = await list(afterCreate.digest);
    expect(afterDelete.unchanged).toBe(false);
    expect(afterDelete.digest).toBe(full.digest);
    await expectCode(list("").then(() => invoke(client, "listPortServices", { nodeId: "", app: "", unlessDigest: full.digest })), grpc.status.INVALID_ARGUMENT, /unless_digest goes with node_id/);
  });

  it("a node's range cannot shrink past allocated ports", async () => {
    await expectCode(
      invoke(client, "upsertNode", { node: { nodeId: "n1", hostname: "", host: "10.0.0.5", extHostname: "", extHost: "", portMin: 30500, portMax: 30999, allocated: 0, workerSeenAt: undefined, blocked: [] } }),
      grpc.status.FAILED_PRECONDITION,
      /would leave allocated ports outside it \(.*30134/,
    );
  });
});

describe("allocator - concurrency", () => {
  it("200 concurrent creates on a 100-port node give 100 distinct ports and 100 clear RESOURCE_EXHAUSTED", async () => {
    await invoke(client, "upsertNode", { node: { nodeId: "small", hostname: "", host: "10.0.0.9", extHostname: "", extHost: "", portMin: 31000, portMax: 31099, allocated: 0, workerSeenAt: undefined, blocked: [] } });
    const results = await Promise.allSettled(
      Array.from({ length: 200 }, (_, i) => invoke(client, "createPortService", { name: `rush-${i}`, app: "", nodeId: "small", port: 0 }, 60_000)),
    );
    const ports = results.flatMap((r) => (r.status === "fulfilled" ? [r.value.service!.port] : []));
    const errors = results.flatMap((r) => (r.status === "rejected" ? [r.reason as grpc.ServiceError] : []));
    expect(ports.length).toBe(100);
    expect(new Set(ports).size).toBe(100);
    expect(ports.every((p) => p >= 31000 && p <= 31099)).toBe(true);
    expect(errors.length).toBe(100);
    for (const err of errors) {
      expect(err.code).toBe(grpc.status.RESOURCE_EXHAUSTED);
      expect(err.details).toMatch(/no free port on node small: all 100 ports of its range 31000-31099 are allocated/);
    }
    const { rows } = await pool.query("SELECT count(*)::int AS n, count(DISTINCT port)::int AS d FROM port_services WHERE node_id = 'small'");
    expect(rows[0]).toEqual({ n: 100, d: 100 });
  });
});

/** Waits until every event written so far is relayed: rows leave the outbox only once NATS confirmed them. */
const outboxRelayed = (what: string) => waitFor(async () => (await pool.query("SELECT count(*)::int AS n FROM outbox")).rows[0].n === 0, what);

describe("allocator - events", () => {
  it("every change reaches NATS through the outbox, in order, with increasing sequence", async () => {
    // Earlier tests' events (the rush's hundred) are relayed first, so only this test's reach the subscription.
    await outboxRelayed("earlier events relayed");
    const seen: BusMessage[] = [];
    const sub = bus.subscribe(subjects.all(), (m) => seen.push(m));
    await bus.flush();
    await invoke(client, "createPortService", { name: "evented", app: "ev-app", nodeId: "", port: 0 });
    await invoke(client, "unbindPortService", { name: "evented", app: "ev-app" });
    await invoke(client, "deletePortService", { name: "evented" });
    await waitFor(() => seen.length >= 4, "four events");
    sub.unsubscribe();
    expect(seen.map((m) => m.subject)).toEqual([
      `${subjects.prefix}.v1.services.n1.created`,
      `${subjects.prefix}.v1.services.n1.bound`,
      `${subjects.prefix}.v1.services.n1.unbound`,
      `${subjects.prefix}.v1.services.n1.deleted`,
    ]);
    const payloads = seen.map((m) => JSON.parse(m.data) as { sequence: string; service: { serviceName: string }; app?: string });
    expect(payloads.every((p) => p.service.serviceName === "evented")).toBe(true);
    expect(payloads[1]!.app).toBe("ev-app");
    const sequences = payloads.map((p) => Number(p.sequence));
    expect([...sequences].sort((a, b) => a - b)).toEqual(sequences);
    expect(new Set(sequences).size).toBe(4);
    await outboxRelayed("an empty outbox");
  });

  it("service.created carries the service as the create answered it, with or without an app", async () => {
    const seen: BusMessage[] = [];
    const sub = bus.subscribe(subjects.all(), (m) => m.subject.endsWith(".created") && seen.push(m));
    await bus.flush();
    const plain = (await invoke(client, "createPortService", { name: "snapshot-plain", app: "", nodeId: "", port: 0 })).service;
    const bound = (await invoke(client, "createPortService", { name: "snapshot-bound", app: "snapshot-app", nodeId: "", port: 0, healthCheck: { intervalMs: 2000, timeoutMs: 500, unhealthyThreshold: 3, healthyThreshold: 2, udpProbe: "" } })).service;
    await waitFor(() => seen.length >= 2, "two created events");
    sub.unsubscribe();
    expect(seen.map((m) => PortServiceEvent.fromJSON(JSON.parse(m.data)).service)).toEqual([plain, bound]);
    expect(bound!.bindings.map((b) => b.app)).toEqual(["snapshot-app"]);
    expect(bound!.healthCheck).toMatchObject({ intervalMs: 2000, unhealthyThreshold: 3 });
  });
});

describe("allocator - changing a service's health check", () => {
  const check = { intervalMs: 1000, timeoutMs: 0, unhealthyThreshold: 0, healthyThreshold: 0, udpProbe: "" };

  it("replaces the check, answers the service as it is now, and tells its node on services.<node>.updated", async () => {
    const { service: created } = await invoke(client, "createPortService", { name: "checked-later", app: "", nodeId: "", port: 0 });
    const seen: BusMessage[] = [];
    // Only updates: the created event may still be on its way.
    const sub = bus.subscribe(subjects.serviceUpdated("n1"), (m) => seen.push(m));
    await bus.flush();

    const { service } = await invoke(client, "setHealthCheck", { name: "CHECKED-LATER", healthCheck: check });
    // Defaults filled in as at creation.
    expect(service!.healthCheck).toEqual({ intervalMs: 1000, timeoutMs: 500, unhealthyThreshold: 2, healthyThreshold: 2, udpProbe: "" });
    expect(service!.port).toBe(created!.port);
    expect((await invoke(client, "getPortService", { name: "checked-later", app: "" })).service!.healthCheck).toEqual(service!.healthCheck);
    await waitFor(() => seen.length >= 1, "the updated event");
    expect(seen[0]!.subject).toBe(`${subjects.prefix}.v1.services.n1.updated`);
    expect(PortServiceEvent.fromJSON(JSON.parse(seen[0]!.data)).service).toEqual(service);

    // The same check again changes nothing and tells nobody.
    await invoke(client, "setHealthCheck", { name: "checked-later", healthCheck: { ...check, timeoutMs: 500 } });
    // Removed: passive checks only.
    const { service: passive } = await invoke(client, "setHealthCheck", { name: "checked-later", healthCheck: undefined });
    expect(passive!.healthCheck).toBeUndefined();
    await waitFor(() => seen.length >= 2, "the second updated event");
    await new Promise((r) => setTimeout(r, 300));
    sub.unsubscribe();
    expect(seen.map((m) => m.subject)).toEqual([`${subjects.prefix}.v1.services.n1.updated`, `${subjects.prefix}.v1.services.n1.updated`]);
    expect(PortServiceEvent.fromJSON(JSON.parse(seen[1]!.data)).service!.healthCheck).toBeUndefined();
  });

  it("a bad check or an unknown service is a clear error and changes nothing", async () => {
    await invoke(client, "createPortService", { name: "checked-bad", app: "", nodeId: "", port: 0, healthCheck: check });
    await expectCode(invoke(client, "setHealthCheck", { name: "checked-bad", healthCheck: { ...check, intervalMs: 5 } }), grpc.status.INVALID_ARGUMENT, /health check: interval 5 ms is not valid/);
    await expectCode(invoke(client, "setHealthCheck", { name: "checked-bad", healthCheck: { ...check, unhealthyThreshold: 500 } }), grpc.status.INVALID_ARGUMENT, /unhealthy threshold 500/);
    await expectCode(invoke(client, "setHealthCheck", { name: "no such", healthCheck: check }), grpc.status.INVALID_ARGUMENT, /service name "no such" is not valid/);
    await expectCode(invoke(client, "setHealthCheck", { name: "missing-one", healthCheck: check }), grpc.status.NOT_FOUND, /no port service named "missing-one"/);
    expect((await invoke(client, "getPortService", { name: "checked-bad", app: "" })).service!.healthCheck).toMatchObject({ intervalMs: 1000, unhealthyThreshold: 2 });
  });
});

const node = (nodeId: string, portMin: number, portMax: number, blocked: Node["blocked"] = []): Node => ({
  nodeId,
  hostname: "",
  host: "10.0.1.1",
  extHostname: "",
  extHost: "",
  portMin,
  portMax,
  allocated: 0,
  workerSeenAt: undefined,
  blocked,
});
const create = (name: string, nodeId: string, port = 0) => invoke(client, "createPortService", { name, app: "", nodeId, port });

describe("allocator - ports", () => {
  it("a released port cools down: no other service gets it, the same name gets it back", async () => {
    await invoke(client, "upsertNode", { node: node("cool", 32000, 32002) });
    const first = (await create("cooling", "cool")).service!.port;
    await invoke(client, "deletePortService", { name: "cooling" });
    const others = [(await create("other-a", "cool")).service!.port, (await create("other-b", "cool")).service!.port];
    expect(others).not.toContain(first);
    await expectCode(create("other-c", "cool"), grpc.status.RESOURCE_EXHAUSTED, /2 are allocated and the rest reserved or cooling down/);
    await expectCode(create("other-c", "cool", first), grpc.status.FAILED_PRECONDITION, new RegExp(`port ${first} on node cool was released by "cooling" and is kept for it until`));
    // Re-created soon after, without naming a node or port: its old port.
    const back = (await invoke(client, "createPortService", { name: "cooling", app: "", nodeId: "", port: 0 })).service!;
    expect([back.nodeId, back.port]).toEqual(["cool", first]);
    // Asked for on a node, it is not kept from its own released port either.
    await invoke(client, "deletePortService", { name: "cooling" });
    expect((await create("cooling", "cool")).service!.port).toBe(first);
  });

  it("operator-reserved ports are never handed out", async () => {
    await invoke(client, "upsertNode", { node: node("held", 32100, 32109, [{ portMin: 32100, portMax: 32107, reason: "reserved" }]) });
    const ports = [(await create("free-1", "held")).service!.port, (await create("free-2", "held")).service!.port].sort();
    expect(ports).toEqual([32108, 32109]);
    await expectCode(create("free-3", "held"), grpc.status.RESOURCE_EXHAUSTED, /no free port on node held/);
    await expectCode(create("free-3", "held", 32103), grpc.status.FAILED_PRECONDITION, /port 32103 on node held is not offered \(reserved\)/);
    const { nodes } = await invoke(client, "listNodes", {});
    expect(nodes.find((n) => n.nodeId === "held")!.blocked).toEqual([{ portMin: 32100, portMax: 32107, reason: "reserved" }]);
    await expectCode(
      invoke(client, "upsertNode", { node: node("held", 32100, 32109, [{ portMin: 9, portMax: 3, reason: "" }]) }),
      grpc.status.INVALID_ARGUMENT,
      /reserved range 9-3 is not valid/,
    );
  });

  it("create after create, only the free ports of a mostly reserved range are handed out", async () => {
    await invoke(client, "upsertNode", { node: node("sieve", 32400, 32499, [{ portMin: 32400, portMax: 32489, reason: "reserved" }]) });
    // One after another, on the same connection: Postgres plans the claim anew for the first five, then reuses a generic plan.
    const ports: number[] = [];
    for (let i = 0; i < 10; i++) ports.push((await create(`sieve-${i}`, "sieve")).service!.port);
    expect(ports.sort()).toEqual(Array.from({ length: 10 }, (_, i) => 32490 + i));
    await expectCode(create("sieve-10", "sieve"), grpc.status.RESOURCE_EXHAUSTED, /no free port on node sieve/);
  });

  it("a port a worker cannot bind stops being offered until a worker listens on it", async () => {
    await invoke(client, "upsertNode", { node: node("taken", 32200, 32201) });
    const holder = (await create("holder", "taken")).service!;
    publishMessage(bus, subjects.portBindFailed("taken"), PortBindFailed, {
      nodeId: "taken", serviceId: holder.name, port: holder.port, protocol: P.PROTOCOL_TCP, error: "listen EADDRINUSE", at: undefined,
    });
    await waitFor(async () => (await invoke(client, "listNodes", {})).nodes.find((n) => n.nodeId === "taken")!.blocked.length === 1, "the port blocked");
    const blocked = (await invoke(client, "listNodes", {})).nodes.find((n) => n.nodeId === "taken")!.blocked[0]!;
    expect(blocked).toEqual({ portMin: holder.port, portMax: holder.port, reason: "bind failed: listen EADDRINUSE" });
    // The holder is deleted; its port is still not offered (blocked, and cooling down).
    await invoke(client, "deletePortService", { name: "holder" });
    const other = (await create("neighbour", "taken")).service!;
    expect(other.port).not.toBe(holder.port);
    // A worker reports the port listening: it is offered again.
    publishMessage(bus, subjects.workerHeartbeat("taken"), WorkerHeartbeat, {
      nodeId: "taken", workerId: "w", at: timestampFromMs(Date.now()), listeners: [], listeningTcp: [holder.port], listeningUdp: [],
    });
    await waitFor(async () => (await invoke(client, "listNodes", {})).nodes.find((n) => n.nodeId === "taken")!.blocked.length === 0, "the port offered again");
  });

  it("the repair pass reports what differs between allocations and what a worker listens on", async () => {
    await invoke(client, "upsertNode", { node: node("drift", 32300, 32309) });
    const a = (await create("drift-a", "drift")).service!;
    const b = (await create("drift-b", "drift")).service!;
    const beat: WorkerHeartbeat = {
      nodeId: "drift", workerId: "w", at: timestampFromMs(Date.now()),
      listeningTcp: [a.port, 32350],
      listeningUdp: [],
      listeners: [{ serviceId: b.name, port: b.port, protocol: P.PROTOCOL_UDP, listening: false, error: "EADDRINUSE", backends: 0, revision: "0" }],
    };
    const [report] = await repair(allocator.store, new Map([["drift", beat]]), { pool, bus, subjects, logger }, logger);
    expect(report).toMatchObject({ nodeId: "drift", missing: [b.port], unexpected: [32350], failing: [b.port] });
    const clean = await repair(allocator.store, new Map([["drift", { ...beat, listeningTcp: [a.port], listeningUdp: [b.port], listeners: [] }]]), { pool, bus, subjects, logger }, logger);
    expect(clean).toEqual([]);
  });
});
