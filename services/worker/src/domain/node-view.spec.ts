import { describe, expect, it } from "vitest";
import { Protocol, type BackendSet } from "@harbor/proto";
import { NodeView, protocolsOf } from "./node-view.js";

const set = (revision: string, ...ports: number[]): BackendSet => ({
  serviceId: "s1",
  nodeId: "n1",
  serviceName: "debug-port",
  port: 30000,
  protocol: Protocol.PROTOCOL_TCP,
  revision,
  backends: ports.map((port, i) => ({ instanceId: `i${i}`, app: "demo", host: "127.0.0.1", port, availableSince: undefined })),
  elided: false,
});

describe("node view - backend sets", () => {
  it("applies newer revisions and ignores equal or older ones", () => {
    const view = new NodeView();
    expect(view.applySet(set("2", 1, 2))).toBe(true);
    expect(view.applySet(set("1", 9))).toBe(false);
    expect(view.applySet(set("2", 9))).toBe(false);
    expect(view.backends("s1").map((b) => b.port)).toEqual([1, 2]);
    expect(view.applySet(set("10", 3))).toBe(true);
    expect(view.backends("s1").map((b) => b.port)).toEqual([3]);
  });

  it("compares revisions as numbers beyond 2^53", () => {
    const view = new NodeView();
    view.applySet(set("9007199254740993", 1));
    expect(view.applySet(set("9007199254740992", 2))).toBe(false);
  });

  it("ignores a revision that is not a number", () => {
    expect(new NodeView().applySet(set("abc", 1))).toBe(false);
  });

  it("a snapshot drops the sets of services that are gone", () => {
    const view = new NodeView();
    view.applySet(set("1", 1));
    view.replaceServices([{ id: "s2", name: "other", port: 30001, protocol: Protocol.PROTOCOL_TCP }]);
    expect(view.backends("s1")).toEqual([]);
    expect(view.listServices().map((s) => s.id)).toEqual(["s2"]);
  });

  it("a snapshot names only the services that came, went or changed", () => {
    const view = new NodeView();
    const tcp = (id: string, port: number, healthCheck?: { intervalMs: number }) => ({
      id,
      name: id,
      port,
      protocol: Protocol.PROTOCOL_TCP,
      ...(healthCheck ? { healthCheck: { timeoutMs: 0, unhealthyThreshold: 2, healthyThreshold: 2, udpProbe: "", ...healthCheck } } : {}),
    });
    expect(view.replaceServices([tcp("a", 1), tcp("b", 2), tcp("c", 3)]).sort()).toEqual(["a", "b", "c"]);
    // The same snapshot again (new objects, same content): nothing to look at.
    expect(view.replaceServices([tcp("a", 1), tcp("b", 2), tcp("c", 3)])).toEqual([]);
    // b moved port, c went, d came, a got a health check.
    expect(view.replaceServices([tcp("a", 1, { intervalMs: 500 }), tcp("b", 9), tcp("d", 4)]).sort()).toEqual(["a", "b", "c", "d"]);
    expect(view.replaceServices([tcp("a", 1, { intervalMs: 500 }), tcp("b", 9), tcp("d", 4)])).toEqual([]);
    expect(view.replaceServices([tcp("a", 1, { intervalMs: 900 }), tcp("b", 9), tcp("d", 4)])).toEqual(["a"]);
  });
});

describe("node view - protocols", () => {
  it("both is a TCP and a UDP listener on one port", () => {
    const service = (protocol: Protocol) => ({ id: "s", name: "n", port: 1, protocol });
    expect(protocolsOf(service(Protocol.PROTOCOL_TCP))).toEqual(["tcp"]);
    expect(protocolsOf(service(Protocol.PROTOCOL_UDP))).toEqual(["udp"]);
    expect(protocolsOf(service(Protocol.PROTOCOL_BOTH))).toEqual(["tcp", "udp"]);
    expect(protocolsOf(service(Protocol.PROTOCOL_UNSPECIFIED))).toEqual([]);
  });
});
