import { randomUUID } from "node:crypto";
import pino from "pino";
import { afterEach, describe, expect, it } from "vitest";
import { createSubjects, encodeMessage, InProcessBus } from "@harbor/bus";
import { waitFor } from "@harbor/testkit";
import {
  BackendSet,
  BindingEvent,
  Node,
  NodeEvent,
  PortService,
  PortServiceEvent,
  Protocol,
  type BackendRegistryClient,
  type ListBackendsRequest,
  type ListBackendsResponse,
  type ListPortServicesRequest,
  type ListPortServicesResponse,
  type PortAllocatorClient,
} from "@harbor/proto";
import { NodeView } from "../domain/node-view.js";
import { Follower } from "./follower.js";

const NODE = "n1";
const subjects = createSubjects();

const service = (id: string, port: number): PortService => PortService.fromPartial({ name: id, serviceName: `svc-${port}`, nodeId: NODE, port, protocol: Protocol.PROTOCOL_TCP, host: "127.0.0.1" });
const set = (serviceId: string, revision: string, ...ports: number[]): BackendSet =>
  BackendSet.fromPartial({
    serviceId,
    nodeId: NODE,
    revision,
    protocol: Protocol.PROTOCOL_TCP,
    backends: ports.map((port, i) => ({ instanceId: `i${i}`, app: "demo", host: "127.0.0.1", port })),
  });

/**
 * The control plane as the follower sees it: what it answers, and every
 * request it got. It answers `unchanged` when the digest asked with matches,
 * as the allocator and registry do. `gate`, when set, holds answers until
 * released, so events can arrive mid-snapshot.
 */
class FakeControlPlane {
  services: PortService[] = [];
  sets: BackendSet[] = [];
  servicesDigest = "d1";
  setsDigest = "e1";
  fail = false;
  gate: Promise<void> | undefined;
  servicesAsked: ListPortServicesRequest[] = [];
  setsAsked: ListBackendsRequest[] = [];

  private answer<T>(cb: (err: Error | null, res?: T) => void, res: () => T): object {
    void (this.gate ?? Promise.resolve()).then(() => (this.fail ? cb(new Error("control plane away")) : cb(null, res())));
    return {};
  }

  readonly allocator = {
    listNodes: (_req: unknown, _m: unknown, _o: unknown, cb: (err: Error | null, res?: unknown) => void) =>
      this.answer(cb, () => ({ nodes: [Node.fromPartial({ nodeId: NODE, host: "127.0.0.1" })] })),
    listPortServices: (req: ListPortServicesRequest, _m: unknown, _o: unknown, cb: (err: Error | null, res?: ListPortServicesResponse) => void) => {
      this.servicesAsked.push(req);
      return this.answer(cb, () =>
        req.unlessDigest === this.servicesDigest
          ? { services: [], digest: this.servicesDigest, unchanged: true }
          : { services: this.services, digest: this.servicesDigest, unchanged: false },
      );
    },
  } as unknown as PortAllocatorClient;

  readonly registry = {
    listBackends: (req: ListBackendsRequest, _m: unknown, _o: unknown, cb: (err: Error | null, res?: ListBackendsResponse) => void) => {
      this.setsAsked.push(req);
      // One service's set when asked for it (a fetch of a set too large for the bus), else all.
      const sets = () => (req.serviceId ? this.sets.filter((x) => x.serviceId === req.serviceId) : this.sets);
      return this.answer(cb, () =>
        req.unlessDigest === this.setsDigest ? { sets: [], digest: this.setsDigest, unchanged: true } : { sets: sets(), digest: this.setsDigest, unchanged: false },
      );
    },
  } as unknown as BackendRegistryClient;
}

/** The in-process bus (which never disconnects) with a NATS reconnect the test makes happen. */
function reconnectingBus() {
  const bus = new InProcessBus();
  const listeners: Array<() => void> = [];
  bus.onReconnect = (listener?: () => void) => void (listener && listeners.push(listener));
  return { bus, reconnect: () => listeners.forEach((listener) => listener()) };
}

describe("Follower: snapshots and events", () => {
  let follower: Follower | undefined;
  afterEach(() => follower?.stop());

  function follow(plane: FakeControlPlane, bus = new InProcessBus()) {
    const view = new NodeView();
    const changes: Array<readonly string[] | "all"> = [];
    follower = new Follower({
      nodeId: NODE,
      view,
      bus,
      subjects,
      allocator: plane.allocator,
      registry: plane.registry,
      resyncIntervalMs: 3_600_000,
      logger: pino({ level: "silent" }),
      onChange: (ids) => changes.push(ids ?? "all"),
    });
    return { follower, bus, view, changes };
  }

  /** A started follower whose control plane holds one service (port 30001) with one backend (4001). */
  async function followOneService(bus?: InProcessBus) {
    const plane = new FakeControlPlane();
    const s1 = randomUUID();
    plane.services = [service(s1, 30001)];
    plane.sets = [set(s1, "1", 4001)];
    const followed = follow(plane, bus);
    await followed.follower.start();
    return { ...followed, plane, s1, f: followed.follower };
  }

  it("reads everything at the first snapshot and every tenth after it, and by digest in between", async () => {
    const { plane, s1, f, view } = await followOneService();
    for (let i = 0; i < 20; i++) await f.resync("timer");

    const asked = plane.servicesAsked.map((r) => r.unlessDigest);
    expect(asked).toEqual(["", ...Array(9).fill("d1"), "", ...Array(9).fill("d1"), ""]);
    expect(plane.setsAsked.map((r) => r.unlessDigest)).toEqual(asked.map((d) => (d === "" ? "" : "e1")));
    // An `unchanged` answer leaves the view as it was.
    expect(view.service(s1)?.port).toBe(30001);
    expect(view.backends(s1).map((b) => b.port)).toEqual([4001]);
  });

  it("hands on only the services a periodic snapshot changed", async () => {
    const plane = new FakeControlPlane();
    const [s1, s2] = [randomUUID(), randomUUID()];
    plane.services = [service(s1, 30001), service(s2, 30002)];
    plane.sets = [set(s1, "1", 4001), set(s2, "1", 4002)];
    const { follower: f, changes } = follow(plane);
    await f.start();
    expect(changes).toEqual(["all"]);

    plane.sets = [set(s1, "1", 4001), set(s2, "2", 4003)];
    plane.setsDigest = "e2";
    await f.resync("timer");
    expect(changes.at(-1)).toEqual([s2]);
  });

  it("holds events that arrive during a snapshot and applies them after it", async () => {
    const { plane, s1, f, bus, view } = await followOneService();
    const s2 = randomUUID();

    // The snapshot's answers were read before s2 was created; its event comes first.
    let release = () => undefined as void;
    plane.gate = new Promise<void>((r) => (release = r));
    plane.servicesDigest = "d2";
    const snapshot = f.resync("timer");
    bus.publish(subjects.serviceCreated(NODE), encodeMessage(PortServiceEvent, { service: service(s2, 30002), sequence: "1" }));
    await new Promise((r) => setImmediate(r));
    expect(view.service(s2)).toBeUndefined();
    release();
    await snapshot;
    // Applied before the snapshot, the snapshot would have dropped it again.
    expect(view.service(s2)?.port).toBe(30002);
    expect(view.service(s1)?.port).toBe(30001);
  });

  it("keeps its view when a snapshot fails, applies what was held, and retries", async () => {
    const { plane, s1, f, bus, view, changes } = await followOneService();

    let release = () => undefined as void;
    plane.gate = new Promise<void>((r) => (release = r));
    plane.fail = true;
    const snapshot = f.resync("timer");
    bus.publish(subjects.backendsOfNode(NODE), encodeMessage(BackendSet, set(s1, "2", 4002)));
    release();
    await snapshot;
    expect(view.service(s1)?.port).toBe(30001);
    expect(view.backends(s1).map((b) => b.port)).toEqual([4002]);
    // Only the held event's service is handed on, not a look at every listener.
    expect(changes.at(-1)).toEqual([s1]);

    plane.fail = false;
    plane.gate = undefined;
    const asked = plane.servicesAsked.length;
    await new Promise((r) => setTimeout(r, 1_200));
    expect(plane.servicesAsked.length).toBeGreaterThan(asked);
  });

  it("applies a service's changed health check from services.<node>.updated", async () => {
    const { s1, bus, view, changes } = await followOneService();

    const healthCheck = { intervalMs: 1000, timeoutMs: 500, unhealthyThreshold: 2, healthyThreshold: 2, udpProbe: "" };
    bus.publish(subjects.serviceUpdated(NODE), encodeMessage(PortServiceEvent, { service: { ...service(s1, 30001), healthCheck }, sequence: "7" }));
    await new Promise((r) => setImmediate(r));
    expect(view.service(s1)?.healthCheck).toEqual(healthCheck);
    expect(changes.at(-1)).toEqual([s1]);
  });

  it("drops an allocator event older than one already received about the same service (a repeat, or relayed out of order)", async () => {
    const { s1, bus, view } = await followOneService();
    const s2 = randomUUID();
    const send = (subject: string, id: string, port: number, sequence: string) =>
      bus.publish(subject, encodeMessage(PortServiceEvent, { service: service(id, port), sequence }));
    send(subjects.serviceCreated(NODE), s2, 30002, "5");
    send(subjects.serviceDeleted(NODE), s2, 30002, "7");
    // The created event again, after the deletion: the port must stay closed.
    send(subjects.serviceCreated(NODE), s2, 30002, "5");
    bus.publish(subjects.serviceBound(NODE), encodeMessage(BindingEvent, { service: service(s2, 30002), app: "demo", intPort: 4100, sequence: "6" }));
    // Another service's older sequence is no concern of s2's.
    send(subjects.serviceUpdated(NODE), s1, 30001, "3");
    await new Promise((r) => setImmediate(r));
    expect(view.service(s2)).toBeUndefined();
    expect(view.service(s1)).toBeDefined();
    // A newer event about s2 is applied.
    send(subjects.serviceCreated(NODE), s2, 30009, "8");
    await new Promise((r) => setImmediate(r));
    expect(view.service(s2)?.port).toBe(30009);
  });

  it("drops a node event older than one already received: a repeat does not take the host back", async () => {
    const { bus, view } = await followOneService();
    const hosted = (host: string, sequence: string) => encodeMessage(NodeEvent, { node: Node.fromPartial({ nodeId: NODE, host }), sequence });
    bus.publish(subjects.nodeUpdated(NODE), hosted("10.0.0.7", "11"));
    bus.publish(subjects.nodeUpdated(NODE), hosted("10.0.0.8", "12"));
    bus.publish(subjects.nodeUpdated(NODE), hosted("10.0.0.7", "11"));
    await new Promise((r) => setImmediate(r));
    expect(view.host).toBe("10.0.0.8");
  });

  it("drops a malformed set and a set of another node, and changes nothing", async () => {
    const { s1, bus, view, changes } = await followOneService();
    const before = changes.length;

    bus.publish(subjects.backendsOfNode(NODE), "{not json");
    bus.publish(subjects.backendsOfNode(NODE), encodeMessage(BackendSet, { ...set(s1, "2", 4002), revision: "-1" }));
    bus.publish(subjects.backendsOfNode(NODE), encodeMessage(BackendSet, { ...set(s1, "2", 70000) }));
    bus.publish(subjects.backendsOfNode(NODE), encodeMessage(BackendSet, { ...set(s1, "2", 4002), nodeId: "n2" }));
    await new Promise((r) => setImmediate(r));
    expect(view.backends(s1).map((b) => b.port)).toEqual([4001]);
    expect(changes.length).toBe(before);
  });

  it("takes a snapshot when a set's revision jumps (events were missed)", async () => {
    const { plane, s1, f, bus } = await followOneService();
    const asked = plane.servicesAsked.length;

    bus.publish(subjects.backendsOfNode(NODE), encodeMessage(BackendSet, set(s1, "2", 4002)));
    await new Promise((r) => setImmediate(r));
    expect(plane.servicesAsked.length).toBe(asked);
    bus.publish(subjects.backendsOfNode(NODE), encodeMessage(BackendSet, set(s1, "5", 4005)));
    await waitFor(() => plane.servicesAsked.length === asked + 1, "the snapshot the gap asked for", 1_000, 5);
    expect(f.synced).toBe(true);
  });

  it("a reconnect during a snapshot is followed by a snapshot of its own (the one under way may have read before the outage)", async () => {
    const { bus, reconnect } = reconnectingBus();
    const { plane, f } = await followOneService(bus);
    const asked = plane.servicesAsked.length;

    let release = () => undefined as void;
    plane.gate = new Promise<void>((r) => (release = r));
    const snapshot = f.resync("timer");
    reconnect();
    plane.gate = undefined;
    release();
    await snapshot;
    await new Promise((r) => setTimeout(r, 20));
    expect(plane.servicesAsked.length).toBe(asked + 2);
  });

  it("a revision gap found among the events held during a snapshot takes another snapshot", async () => {
    const { plane, s1, f, bus, view } = await followOneService();
    const asked = plane.servicesAsked.length;

    let release = () => undefined as void;
    plane.gate = new Promise<void>((r) => (release = r));
    const snapshot = f.resync("timer");
    // Revision 3 over the snapshot's 1: revision 2 was missed.
    bus.publish(subjects.backendsOfNode(NODE), encodeMessage(BackendSet, set(s1, "3", 4003)));
    await new Promise((r) => setImmediate(r));
    plane.gate = undefined;
    release();
    await snapshot;
    expect(view.backends(s1).map((b) => b.port)).toEqual([4003]);
    await new Promise((r) => setTimeout(r, 20));
    expect(plane.servicesAsked.length).toBe(asked + 2);
  });

  describe("a set too large for the bus (a notice of its revision, no backends)", () => {
    const notice = (serviceId: string, revision: string) => encodeMessage(BackendSet, { ...set(serviceId, revision), elided: true });
    const announce = (bus: InProcessBus, serviceId: string, revision: string) => bus.publish(subjects.backendsElided(NODE, serviceId), notice(serviceId, revision));
    const fetches = (plane: FakeControlPlane, serviceId: string) => plane.setsAsked.filter((r) => r.serviceId === serviceId).length;

    it("is fetched over gRPC and applied; the notice itself never empties the set", async () => {
      const { plane, s1, bus, view, changes } = await followOneService();
      plane.sets = [set(s1, "2", 4001, 4002)];
      announce(bus, s1, "2");
      await waitFor(() => view.revision(s1) === 2n, "the fetched set");
      expect(view.backends(s1).map((b) => b.port)).toEqual([4001, 4002]);
      expect(fetches(plane, s1)).toBe(1);
      expect(changes.at(-1)).toEqual([s1]);

      // A notice of a revision the worker already holds fetches nothing.
      announce(bus, s1, "2");
      await bus.flush();
      await new Promise((r) => setTimeout(r, 20));
      expect(fetches(plane, s1)).toBe(1);
      expect(view.backends(s1)).toHaveLength(2);
    });

    it("notices that come during a fetch join it; one more fetch follows when the first brought an older revision", async () => {
      const { plane, s1, bus, view } = await followOneService();
      const snapshots = plane.servicesAsked.length;
      let release = () => undefined as void;
      plane.gate = new Promise<void>((r) => (release = r));
      announce(bus, s1, "2");
      await waitFor(() => fetches(plane, s1) === 1, "the first fetch");
      announce(bus, s1, "3");
      announce(bus, s1, "4");
      await bus.flush();
      expect(fetches(plane, s1)).toBe(1);

      // The first fetch answers revision 3: revision 4 was announced, so one more fetch.
      plane.sets = [set(s1, "3", 4003)];
      const first = release;
      plane.gate = new Promise<void>((r) => (release = r));
      first();
      await waitFor(() => fetches(plane, s1) === 2, "the second fetch");
      expect(view.revision(s1)).toBe(3n);
      plane.sets = [set(s1, "4", 4004)];
      plane.gate = undefined;
      release();
      await waitFor(() => view.revision(s1) === 4n, "revision 4");
      expect(view.backends(s1).map((b) => b.port)).toEqual([4004]);
      expect(fetches(plane, s1)).toBe(2);
      // Revisions 1 → 3 → 4 is no gap here (every notice came): no snapshot was asked for.
      expect(plane.servicesAsked.length).toBe(snapshots);
    });

    it("a fetch that fails keeps the view and asks for a snapshot, which brings the set", async () => {
      const { plane, s1, bus, view } = await followOneService();
      const asked = plane.servicesAsked.length;
      plane.fail = true;
      announce(bus, s1, "2");
      await waitFor(() => plane.servicesAsked.length > asked, "a snapshot asked for");
      expect(view.backends(s1).map((b) => b.port)).toEqual([4001]);
      plane.sets = [set(s1, "2", 4005)];
      plane.setsDigest = "e2";
      plane.fail = false;
      await waitFor(() => view.revision(s1) === 2n, "the set, from the snapshot's retry", 5_000);
      expect(view.backends(s1).map((b) => b.port)).toEqual([4005]);
    });
  
    it("a jump in the notices' revisions (one was missed) asks for a snapshot, as a jump in sets does", async () => {
      const { plane, s1, bus, view } = await followOneService();
      const asked = plane.servicesAsked.length;
      plane.sets = [set(s1, "3", 4003)];
      plane.setsDigest = "e2";
      announce(bus, s1, "3");
      await waitFor(() => view.revision(s1) === 3n, "revision 3");
      await waitFor(() => plane.servicesAsked.length > asked, "a snapshot for the missed notice");
    });

    it("waits for a snapshot under way, which brings the set: no fetch of its own", async () => {
      const { plane, s1, bus, view, f } = await followOneService();
      let release = () => undefined as void;
      plane.gate = new Promise<void>((r) => (release = r));
      const snapshot = f.resync("timer");
      announce(bus, s1, "2");
      await bus.flush();
      plane.sets = [set(s1, "2", 4006)];
      plane.setsDigest = "e2";
      plane.gate = undefined;
      release();
      await snapshot;
      await waitFor(() => view.revision(s1) === 2n, "the set, from the snapshot");
      await new Promise((r) => setTimeout(r, 20));
      expect(fetches(plane, s1)).toBe(0);
      expect(view.backends(s1).map((b) => b.port)).toEqual([4006]);
    });

    it("a fetch that answers after stop changes nothing", async () => {
      const { plane, s1, bus, view, f } = await followOneService();
      let release = () => undefined as void;
      plane.gate = new Promise<void>((r) => (release = r));
      announce(bus, s1, "2");
      await waitFor(() => fetches(plane, s1) === 1, "the fetch");
      plane.sets = [set(s1, "2", 4007)];
      f.stop();
      release();
      await new Promise((r) => setTimeout(r, 20));
      expect(view.revision(s1)).toBe(1n);
    });
  });
});
