import { describe, expect, it } from "vitest";
import { buildAppEnvironment, buildCredentials, nextIntPort, type NodeAddress } from "./credentials.js";

const privateNode: NodeAddress = { nodeId: "harbor_node_1", hostname: "", host: "10.0.0.5", extHostname: "", extHost: "" };
const publicNode: NodeAddress = { nodeId: "harbor_node_2", hostname: "harbor2.internal", host: "10.0.0.6", extHostname: "ports.example.com", extHost: "203.0.113.7" };

describe("credentials - the seed's keys", () => {
  it("has exactly the documented keys, hostname falling back to the IP, no ext_* on a private node", () => {
    const c = buildCredentials(privateNode, { id: "cf7f868a-8b7b-4ac8-ab4d-9fd87efb7c09", port: 30134 }, 4100);
    expect(c).toEqual({ hostname: "10.0.0.5", host: "10.0.0.5", port: 30134, name: "cf7f868a-8b7b-4ac8-ab4d-9fd87efb7c09", node_id: "harbor_node_1", int_port: 4100 });
    expect(Object.keys(c)).toEqual(["hostname", "host", "port", "name", "node_id", "int_port"]);
  });

  it("a public node adds ext_hostname and ext_host", () => {
    const c = buildCredentials(publicNode, { id: "x", port: 30000 }, 4100);
    expect(c.hostname).toBe("harbor2.internal");
    expect(c.ext_hostname).toBe("ports.example.com");
    expect(c.ext_host).toBe("203.0.113.7");
  });

  it("the seed's example: an external hostname with no external IP shows both keys, ext_host empty", () => {
    const node: NodeAddress = { nodeId: "harbor_node_1", hostname: "", host: "192.168.68.111", extHostname: "ports.example.com", extHost: "" };
    const c = buildCredentials(node, { id: "cf7f868a-8b7b-4ac8-ab4d-9fd87efb7c09", port: 30134 }, 4100);
    expect(JSON.stringify(c)).toBe(
      '{"hostname":"192.168.68.111","host":"192.168.68.111","port":30134,"name":"cf7f868a-8b7b-4ac8-ab4d-9fd87efb7c09","node_id":"harbor_node_1","int_port":4100,"ext_hostname":"ports.example.com","ext_host":""}',
    );
  });
});

describe("credentials - app environment", () => {
  const service = (serviceName: string, intPort: number) => ({ serviceName, credentials: buildCredentials(privateNode, { id: serviceName, port: 30000 + intPort }, intPort) });

  it("one harbor service gives STACKATO_HARBOR and no suffixed variable", () => {
    const env = buildAppEnvironment("port-test", [service("my-port", 4100)]);
    expect(env.STACKATO_HARBOR).toBe("4100");
    expect(Object.keys(env).filter((k) => k.startsWith("STACKATO_HARBOR_"))).toEqual([]);
    expect(JSON.parse(env.STACKATO_SERVICES as string)["my-port"].int_port).toBe(4100);
    expect(env.STACKATO_APP_NAME).toBe("port-test");
    expect(env.STACKATO_APP_NAME_UPCASE).toBe("PORT_TEST");
  });

  it("several give STACKATO_HARBOR_<NAME> each and no STACKATO_HARBOR", () => {
    const env = buildAppEnvironment("game", [service("udp-game", 4100), service("tcp-game", 4101)]);
    expect(env.STACKATO_HARBOR).toBeUndefined();
    expect(env.STACKATO_HARBOR_UDP_GAME).toBe("4100");
    expect(env.STACKATO_HARBOR_TCP_GAME).toBe("4101");
    expect(Object.keys(JSON.parse(env.STACKATO_SERVICES as string))).toEqual(["tcp-game", "udp-game"]);
  });

  it("no service gives an empty STACKATO_SERVICES and no STACKATO_HARBOR", () => {
    const env = buildAppEnvironment("lonely", []);
    expect(env.STACKATO_SERVICES).toBe("{}");
    expect(env.STACKATO_HARBOR).toBeUndefined();
  });

  it("int_ports start at 4100 and fill the lowest gap", () => {
    expect(nextIntPort([])).toBe(4100);
    expect(nextIntPort([4100, 4101])).toBe(4102);
    expect(nextIntPort([4101, 4100, 4103])).toBe(4102);
  });
});
