import { mkdtempSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { pino } from "pino";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { NatsBus, createSubjects } from "@harbor/bus";
import { connectLines, freePort, startEchoBackend, waitFor, type EchoBackend } from "@harbor/testkit";
import { makeCertificate } from "./certs.js";
import { reach, spread, type ServiceJson } from "./cluster.js";
import { startHarbor, type Background, type Harbor } from "./harbor.js";

let harbor: Harbor;
let backend: EchoBackend;
let service: ServiceJson;
const cleanup: Array<() => unknown> = [];

beforeAll(async () => {
  harbor = await startHarbor();
  service = await harbor.json<ServiceJson>("create-service", "sturdy", "--app", "sturdy");
  backend = await startEchoBackend("sturdy-0");
  cleanup.push(() => backend.close());
  expect((await harbor.cli("register-instance", "sturdy", "s-0", "--host", "127.0.0.1", "--port", String(backend.port))).code).toBe(0);
  await waitFor(async () => (await reach(service.port).catch(() => "")) === "sturdy-0", "traffic");
});

afterAll(async () => {
  for (const c of cleanup.reverse()) await c();
  await harbor?.stop();
});

describe("e2e bad input - the bus", () => {
  it("garbage on every subject Harbor listens to is dropped and logged: no crash, no state change", async () => {
    const bus = await NatsBus.connect({ url: harbor.env.NATS_URL!, logger: pino({ level: "silent" }) });
    cleanup.push(() => bus.close());
    const s = createSubjects(harbor.env.HARBOR_NATS_PREFIX);
    const before = {
      services: await harbor.json<ServiceJson[]>("services"),
      nodes: await harbor.json<Array<{ blocked: unknown[] }>>("nodes"),
      instances: await harbor.json<unknown[]>("instances"),
    };
    const node = "harbor_node_1";
    const subjects = [
      s.serviceCreated(node), s.serviceDeleted(node), s.serviceBound(node), s.serviceUnbound(node),
      s.backends(node, service.name), s.nodeUpdated(node), s.workerHeartbeat(node), s.portBindFailed(node),
      s.registerInstance(), s.deregisterInstance(),
    ];
    const payloads = [
      "", "not json", "[]", "null", "42", '{"service": 5}', '{"service": {"name": "x", "port": "abc"}}',
      JSON.stringify({ serviceId: service.name, nodeId: node, revision: "999999", backends: [{ host: {}, port: 5 }] }),
      JSON.stringify({ serviceId: service.name, nodeId: node, revision: "abc", backends: [] }),
      JSON.stringify({ service: { name: service.name, nodeId: node, port: 70000, protocol: "PROTOCOL_TCP" } }),
      JSON.stringify({ node: { nodeId: node, host: "not an ip" } }),
      JSON.stringify({ nodeId: node, port: 70000, error: "x" }),
      JSON.stringify({ app: "x y", instanceId: "../../", host: "8.8.8.8" }),
      "x".repeat(512 * 1024),
    ];
    for (const subject of subjects) for (const payload of payloads) bus.publish(subject, payload);
    await bus.flush();
    await waitFor(() => harbor.logs().includes("bus-message-malformed") && harbor.logs().includes("bus-event-invalid"), "the garbage logged");
    await new Promise((r) => setTimeout(r, 500));

    // Still serving, and nothing changed.
    expect(await spread(service.port, 3)).toEqual({ "sturdy-0": 3 });
    expect(await harbor.json<ServiceJson[]>("services")).toEqual(before.services);
    expect((await harbor.json<Array<{ blocked: unknown[] }>>("nodes"))[0]!.blocked).toEqual(before.nodes[0]!.blocked);
    expect(await harbor.json<unknown[]>("instances")).toEqual(before.instances);
  });
});

describe("e2e bad input - the API", () => {
  it("an oversized request is refused with a clear error", async () => {
    const huge = await harbor.cli("create-service", "x".repeat(100_000));
    expect(huge.code).toBe(1);
    expect(huge.stderr.trim().split("\n")).toHaveLength(1);
    expect(huge.stderr).toMatch(/larger than max|not valid/);
    const bad = await harbor.cli("register-instance", "sturdy", "s-1", "--host", "127.0.0.1", "--port", "99999");
    expect(bad.code).toBe(2);
    expect(bad.stderr).toMatch(/port "99999" is not valid/);
  });
});

describe("e2e bad input - harbor serve", () => {
  // `harbor serve <target>` alone skips the verbs' parser (see services/cli/src/main.ts): both paths must refuse alike.
  it("an unknown target, and a bad setting on the parser-free path, are one line on stderr and exit 2", async () => {
    const unknown = await harbor.cli("serve", "nowhere");
    expect(unknown.code).toBe(2);
    expect(unknown.stderr.trim().split("\n")).toHaveLength(1);
    expect(unknown.stderr).toMatch(/serve target "nowhere" is not one of all, control-plane/);

    const run = harbor.spawnCli(["serve", "worker"], { env: { HARBOR_NATS_PREFIX: "no spaces allowed" } });
    await waitFor(() => run.child.exitCode !== null, "harbor serve worker to refuse its setting");
    expect(run.child.exitCode).toBe(2);
    expect(run.output().trim().split("\n")).toHaveLength(1);
    expect(run.output()).toMatch(/^harbor: .*HARBOR_NATS_PREFIX=no spaces allowed: use letters, digits, - and _ only/);

    const help = await harbor.cli("serve", "--help");
    expect(help.code).toBe(0);
    expect(help.stdout).toMatch(/run Harbor: all/);
  });
});

describe("e2e bad input - TCP clients", () => {
  it("half-close passes through: a client that stops sending still gets the answer", async () => {
    const answer = await new Promise<string>((resolve, reject) => {
      const socket = net.connect({ port: service.port, host: "127.0.0.1", allowHalfOpen: true });
      let data = "";
      socket.setEncoding("utf8");
      socket.on("data", (d: string) => (data += d));
      socket.on("end", () => {
        socket.end();
        resolve(data);
      });
      socket.on("error", reject);
      socket.on("connect", () => socket.end("last words\n"));
    });
    expect(answer).toBe("sturdy-0\nlast words\n");
  });

  it("a client that resets, or connects and goes away mid-stream, leaves nothing open behind it", async () => {
    const opened = backend.accepted;
    for (let i = 0; i < 5; i++) {
      const client = await connectLines(service.port);
      await client.nextLine();
      client.socket.resetAndDestroy();
    }
    await waitFor(() => backend.accepted >= opened + 5 && backend.open === 0, "the backend's sockets closed");
  });

  it("a slow client, one byte at a time, is carried", async () => {
    const client = await connectLines(service.port);
    expect(await client.nextLine()).toBe("sturdy-0");
    for (const ch of "slow\n") {
      client.socket.write(ch);
      await new Promise((r) => setTimeout(r, 30));
    }
    expect(await client.nextLine()).toBe("slow");
    client.close();
  });

  it("the container proxy drops a client that never finishes its TLS handshake", async () => {
    const dir = mkdtempSync(join(tmpdir(), "harbor-handshake-"));
    makeCertificate(join(dir, "certs"), "harbor", "slow.example");
    const port = await freePort();
    const proxy: Background = harbor.spawnCli(["serve", "container-proxy"], {
      env: {
        HARBOR_PROXY_SERVICE: "slow-https", HARBOR_PROXY_LISTEN_PORT: String(port), HARBOR_PROXY_LISTEN_HOST: "127.0.0.1",
        HARBOR_PROXY_APP_PORT: String(backend.port), HARBOR_APP_ROOT: dir, HARBOR_PROXY_HANDSHAKE_TIMEOUT_MS: "300",
      },
    });
    cleanup.push(() => proxy.stop());
    await waitFor(() => proxy.output().includes("container-proxy-listening"), "the proxy listening");
    const silent = net.connect(port, "127.0.0.1");
    silent.on("error", () => undefined);
    const closed = new Promise<void>((r) => silent.once("close", () => r()));
    await waitFor(async () => (await Promise.race([closed.then(() => true), new Promise((r) => setTimeout(() => r(false), 100))])) as boolean, "the silent client dropped", 5_000);
  });
});
