import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePortBlock, startEchoBackend, waitFor, type EchoBackend } from "@harbor/testkit";
import { reach, type ServiceJson } from "./cluster.js";
import { startHarbor, type Background, type Harbor } from "./harbor.js";

interface NodeJson {
  node_id: string;
  public: boolean;
  port_min: number;
  port_max: number;
  worker_live: boolean;
  ext_hostname: string;
}

let harbor: Harbor;
let secondWorker: Background | undefined;
const backends: EchoBackend[] = [];

beforeAll(async () => {
  harbor = await startHarbor();
});

afterAll(async () => {
  await secondWorker?.stop();
  for (const b of backends) await b.close();
  await harbor?.stop();
});

describe("e2e nodes - several harbor nodes", () => {
  it("two nodes, one public: ext_* only for the public one; each node's worker serves its ports; new services go to the node with the most free ports", async () => {
    const range = await freePortBlock(40);
    const created = await harbor.json<NodeJson>(
      "set-node", "edge-1", "--range", `${range.min}-${range.max}`, "--host", "127.0.0.1", "--ext-hostname", "ports.example.com", "--ext-host", "203.0.113.7",
    );
    expect(created).toMatchObject({ node_id: "edge-1", public: true, port_min: range.min, port_max: range.max });

    secondWorker = harbor.spawnCli(["serve", "worker"], { env: { HARBOR_NODE_ID: "edge-1" } });
    await waitFor(async () => (await harbor.json<NodeJson[]>("nodes")).every((n) => n.worker_live), "both workers live");

    const internal = await harbor.json<ServiceJson>("create-service", "inside", "--node", "harbor_node_1", "--app", "web");
    expect(internal.node_id).toBe("harbor_node_1");
    expect("ext_hostname" in internal || "ext_host" in internal).toBe(false);

    // edge-1 has more free ports (40 against 20), so it takes a service asked for without a node.
    const outside = await harbor.json<ServiceJson>("create-service", "outside", "--app", "web");
    expect(outside).toMatchObject({ node_id: "edge-1", ext_hostname: "ports.example.com", ext_host: "203.0.113.7" });
    const env = await harbor.json<Record<string, string>>("env", "web");
    const creds = JSON.parse(env.STACKATO_SERVICES!) as Record<string, ServiceJson>;
    expect(creds.outside!.ext_host).toBe("203.0.113.7");
    expect(creds.inside!.ext_host).toBeUndefined();

    // A chosen port is honoured on the node whose range holds it. "outside" took a random port of
    // edge-1's range, so the chosen one must not be that one.
    const chosenPort = outside.port === range.min + 7 ? range.min + 8 : range.min + 7;
    const chosen = await harbor.json<ServiceJson>("create-service", "chosen", "--port", String(chosenPort));
    expect(chosen).toMatchObject({ node_id: "edge-1", port: chosenPort });
    const outOfRange = await harbor.cli("create-service", "nowhere", "--port", "1");
    expect(outOfRange.stderr).toMatch(/port 1 is in no node's range/);

    const backend = await startEchoBackend("web-0");
    backends.push(backend);
    expect((await harbor.cli("register-instance", "web", "web-0", "--host", "127.0.0.1", "--port", String(backend.port), "--map", `4101:${backend.port}`)).code).toBe(0);
    // Each node's worker carries its own ports.
    await waitFor(async () => (await reach(outside.port).catch(() => "")) === "web-0", "edge-1's worker forwarding");
    await waitFor(async () => (await reach(internal.port).catch(() => "")) === "web-0", "harbor_node_1's worker forwarding");
    // A node is private again with --private.
    expect((await harbor.json<NodeJson>("set-node", "edge-1", "--private")).public).toBe(false);
    expect("ext_host" in (await harbor.json<ServiceJson>("service", "outside"))).toBe(false);
  });
});
