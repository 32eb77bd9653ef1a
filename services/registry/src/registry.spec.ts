import { describe, expect, it } from "vitest";
import { InProcessBus, createSubjects } from "@harbor/bus";
import { ManualClock } from "@harbor/core";
import { Protocol, type BackendSet } from "@harbor/proto";
import { createLogger } from "@harbor/runtime";
import { registryMetrics } from "./metrics.js";
import { Registry } from "./registry.js";
import type { RegistryStore } from "./store.js";

/** A store whose recomputes finish when the test says so: the registry's ordering is what is tested. */
function gatedStore(ids: string[]) {
  const started: string[] = [];
  const gates = new Map<string, Array<() => void>>();
  let revision = 0;
  const store = {
    allServiceIds: async () => ids,
    recompute: (serviceId: string): Promise<BackendSet> =>
      new Promise((resolve) => {
        started.push(serviceId);
        const open = () => resolve({ serviceId, nodeId: "n1", serviceName: serviceId, port: 1, protocol: Protocol.PROTOCOL_TCP, backends: [], revision: String(++revision), elided: false });
        gates.set(serviceId, [...(gates.get(serviceId) ?? []), open]);
      }),
  };
  const open = (serviceId: string) => {
    const waiting = gates.get(serviceId) ?? [];
    waiting.shift()?.();
  };
  return { store: store as unknown as RegistryStore, started, open };
}

const settle = () => new Promise((r) => setTimeout(r, 5));

function registryOver(store: RegistryStore) {
  const bus = new InProcessBus();
  return new Registry(store, bus, createSubjects("t"), new ManualClock(), createLogger("test", "silent"), registryMetrics(store));
}

describe("registry - recompute ordering", () => {
  it("a change's recompute does not wait behind a reconcile of every set", async () => {
    const ids = Array.from({ length: 50 }, (_, i) => `s${i}`);
    const { store, started, open } = gatedStore(ids);
    const registry = registryOver(store);
    const reconciling = registry.reconcile();
    await settle();
    // A reconcile works a few sets at a time, not all at once.
    expect(started).toEqual(["s0", "s1"]);
    let done = false;
    const change = registry.recompute("other").then(() => (done = true));
    await settle();
    expect(started).toContain("other");
    open("other");
    await change;
    expect(done).toBe(true);
    // The reconcile goes on to the end.
    for (const id of ids) {
      await waitStarted(started, id);
      open(id);
    }
    await reconciling;
    expect(started.filter((id) => id !== "other")).toEqual(ids);
  });

  it("recomputes of one service run one after another", async () => {
    const { store, started, open } = gatedStore([]);
    const registry = registryOver(store);
    const first = registry.recompute("s");
    const second = registry.recompute("s");
    await settle();
    expect(started).toEqual(["s"]);
    open("s");
    await first;
    await settle();
    expect(started).toEqual(["s", "s"]);
    open("s");
    await second;
  });
});

async function waitStarted(started: string[], id: string): Promise<void> {
  for (let i = 0; i < 200 && !started.includes(id); i++) await new Promise((r) => setTimeout(r, 1));
  expect(started).toContain(id);
}

describe("registry - expiry", () => {
  it("instances that expire together recompute each service they were bound to once, and each is announced", async () => {
    const recomputed: string[] = [];
    const instance = (id: string) => ({ app: "a", instanceId: id, host: "10.0.0.1", ports: [], ttlSeconds: 30, availableSince: undefined, expiresAt: undefined });
    const store = {
      expire: async () => ["i0", "i1", "i2"].map((id) => ({ instance: instance(id), boundServices: ["s1", "s2"] })),
      recompute: async (serviceId: string) => {
        recomputed.push(serviceId);
        return undefined;
      },
    } as unknown as RegistryStore;
    const bus = new InProcessBus();
    const down: string[] = [];
    bus.subscribe(createSubjects("t").instanceDown("a"), (m) => down.push((JSON.parse(m.data) as { instance: { instanceId: string } }).instance.instanceId));
    await new Registry(store, bus, createSubjects("t"), new ManualClock(), createLogger("test", "silent"), registryMetrics(store)).expire();
    await settle();
    expect(recomputed.sort()).toEqual(["s1", "s2"]);
    expect(down).toEqual(["i0", "i1", "i2"]);
  });
});
