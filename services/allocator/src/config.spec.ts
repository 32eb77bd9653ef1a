import { describe, expect, it } from "vitest";
import { DEFAULT_NODE_ID, DEFAULT_PORT_RANGE, loadAllocatorConfig } from "./config.js";

describe("allocator - config of the default node", () => {
  it("takes the seed's node settings from the environment: hostname, internal IP, public hostname and IP", () => {
    const { defaultNode } = loadAllocatorConfig({
      HARBOR_NODE_ID: "edge-1",
      HARBOR_NODE_HOSTNAME: "harbor1.internal",
      HARBOR_NODE_HOST: "10.0.0.5",
      HARBOR_NODE_EXT_HOSTNAME: "ports.example.com",
      HARBOR_NODE_EXT_HOST: "203.0.113.7",
      HARBOR_PORT_RANGE: "31000-31999",
    });
    expect(defaultNode).toMatchObject({
      nodeId: "edge-1",
      hostname: "harbor1.internal",
      host: "10.0.0.5",
      extHostname: "ports.example.com",
      extHost: "203.0.113.7",
      range: { min: 31000, max: 31999 },
    });
    // What was given is applied over the node's stored settings at start; what was not, is left as stored.
    expect([...defaultNode.explicit].sort()).toEqual(["extHost", "extHostname", "host", "hostname", "range"]);
  });

  it("without them: harbor_node_1 on 127.0.0.1, private, the default range, nothing explicit", () => {
    const { defaultNode } = loadAllocatorConfig({});
    expect(defaultNode).toMatchObject({ nodeId: DEFAULT_NODE_ID, hostname: "", host: "127.0.0.1", extHostname: "", extHost: "", range: DEFAULT_PORT_RANGE });
    expect(defaultNode.explicit.size).toBe(0);
  });

  it("a node id that is not valid is refused, naming the variable", () => {
    expect(() => loadAllocatorConfig({ HARBOR_NODE_ID: "bad id!" })).toThrow(/HARBOR_NODE_ID=bad id!/);
  });
});
