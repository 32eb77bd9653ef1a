import net from "node:net";
import { afterAll, describe, expect, it } from "vitest";
import { connectLines, createTestDatabase, freePort, freePortBlock, startEchoBackend, startNatsServer, waitFor, type EchoBackend, type NatsServer, type TestDatabase } from "@harbor/testkit";
import { reach, spread, type ServiceJson } from "./cluster.js";
import { spawn } from "node:child_process";
import { HARBOR_BIN, startHarbor, type Background, type Harbor } from "./harbor.js";

const stoppers: Array<() => Promise<unknown>> = [];
afterAll(async () => {
  for (const stop of stoppers.reverse()) await stop().catch(() => undefined);
});

async function echo(name: string): Promise<EchoBackend> {
  const b = await startEchoBackend(name);
  stoppers.push(() => b.close());
  return b;
}

async function register(harbor: Harbor, app: string, id: string, port: number, ttl = "60"): Promise<void> {
  const r = await harbor.cli("register-instance", app, id, "--host", "127.0.0.1", "--port", String(port), "--map", `4101:${port}`, "--ttl", ttl);
  expect(r.code, r.stderr).toBe(0);
}

const only = async (port: number, name: string) => {
  const counts = await spread(port, 4).catch(() => ({}));
  return Object.keys(counts).length === 1 && (counts as Record<string, number>)[name] === 4;
};

describe("e2e faults - NATS away", () => {
  it("workers keep forwarding while NATS is down, and every worker converges to the truth when it is back", async () => {
    const nats: NatsServer = await startNatsServer();
    stoppers.push(() => nats.stop());
    const harbor = await startHarbor({ env: { NATS_URL: nats.url } });
    stoppers.push(() => harbor.stop());
    const range = await freePortBlock(20);
    expect((await harbor.cli("set-node", "edge-2", "--range", `${range.min}-${range.max}`, "--host", "127.0.0.1")).code).toBe(0);
    const worker: Background = harbor.spawnCli(["serve", "worker"], { env: { HARBOR_NODE_ID: "edge-2" } });
    stoppers.push(() => worker.stop());

    const alpha = await harbor.json<ServiceJson>("create-service", "alpha", "--node", "harbor_node_1", "--app", "shop");
    const bravo = await harbor.json<ServiceJson>("create-service", "bravo", "--node", "edge-2", "--app", "shop");
    const old = await echo("old");
    await register(harbor, "shop", "shop-old", old.port);
    await waitFor(async () => (await only(alpha.port, "old")) && (await only(bravo.port, "old")), "both workers forwarding");

    await nats.stop();
    // Static stability: with the bus gone, both workers forward on their last state.
    expect(await only(alpha.port, "old")).toBe(true);
    expect(await only(bravo.port, "old")).toBe(true);
    // The truth changes while nobody can hear about it.
    const fresh = await echo("fresh");
    await register(harbor, "shop", "shop-fresh", fresh.port);
    expect((await harbor.cli("deregister-instance", "shop", "shop-old")).code).toBe(0);
    const charlie = await harbor.json<ServiceJson>("create-service", "charlie", "--node", "edge-2", "--app", "kiosk");
    const kiosk = await echo("kiosk");
    await register(harbor, "kiosk", "kiosk-0", kiosk.port);
    // Longer than a NATS client's default reconnect budget (10 attempts) at Harbor's 0.5 s wait.
    await new Promise((r) => setTimeout(r, 8_000));
    await nats.start();

    await waitFor(async () => (await only(alpha.port, "fresh")) && (await only(bravo.port, "fresh")), "both workers on the new backend set", 20_000);
    await waitFor(async () => (await reach(charlie.port).catch(() => "")) === "kiosk", "the service created during the outage open on edge-2", 20_000);
    expect(harbor.logs()).toMatch(/"msg":"nats-connection-reconnected"/);
    expect(worker.output()).toMatch(/"reason":"nats-reconnected"[^\n]*"msg":"worker-synced"/);
  });
});

describe("e2e faults - restarts", () => {
  let db: TestDatabase | undefined;
  afterAll(async () => {
    await db?.drop();
  });

  it("kill -9 loses no allocation, binding or registration; the restarted worker reopens its ports; SIGTERM drains open connections", async () => {
    db = await createTestDatabase();
    const first = await startHarbor({ database: db });
    const service = await first.json<ServiceJson>("create-service", "durable", "--app", "keeper");
    const backend = await echo("kept");
    await register(first, "keeper", "keeper-0", backend.port);
    await waitFor(() => only(service.port, "kept"), "traffic before the crash");
    const envBefore = await first.json<Record<string, string>>("env", "keeper");

    expect(await first.kill("SIGKILL")).toBe(null);
    const second = await startHarbor({ database: db, like: first });
    stoppers.push(() => second.stop());
    expect(await second.json<Record<string, string>>("env", "keeper")).toEqual(envBefore);
    expect((await second.json<Array<{ instance_id: string }>>("instances", "keeper")).map((i) => i.instance_id)).toEqual(["keeper-0"]);
    await waitFor(() => only(service.port, "kept"), "traffic after the restart");

    // SIGTERM: stop accepting, let the open connection finish, then exit 0.
    const open = await connectLines(service.port);
    expect(await open.nextLine()).toBe("kept");
    const exit = second.stop();
    await waitFor(async () => (await reach(service.port).then(() => false, () => true)), "new connections refused");
    expect(await open.roundTrip("still served")).toBe("still served");
    open.close();
    expect(await exit).toBe(0);
  });
});

describe("e2e faults - a port taken by another process", () => {
  it("the worker reports it as an event and a metric, and the allocator stops offering it", async () => {
    const metricsPort = await freePort();
    const harbor = await startHarbor({ env: { HARBOR_METRICS_ADDRESS: `127.0.0.1:${metricsPort}`, HARBOR_HEARTBEAT_INTERVAL_MS: "500" } });
    stoppers.push(() => harbor.stop());
    const squatter = net.createServer();
    const port = harbor.range.min + 3;
    await new Promise<void>((r) => squatter.listen(port, "127.0.0.1", () => r()));
    stoppers.push(() => new Promise((r) => squatter.close(r)));
    const watch = harbor.spawnCli(["watch", "ports.>", "--json"]);
    stoppers.push(() => watch.stop());
    await waitFor(() => watch.output().includes("watching"), "watch subscribed");

    const service = await harbor.json<ServiceJson>("create-service", "squatted", "--port", String(port));
    const line = await waitFor(() => watch.output().split("\n").find((l) => l.includes("bind_failed")), "the bind_failed event");
    expect(JSON.parse(line).payload).toMatchObject({ nodeId: "harbor_node_1", serviceId: service.name, port, protocol: "PROTOCOL_TCP" });
    const nodes = await waitFor(async () => {
      const list = await harbor.json<Array<{ blocked: Array<{ ports: string; reason: string }> }>>("nodes");
      return list[0]!.blocked.length > 0 ? list : undefined;
    }, "the port blocked");
    expect(nodes[0]!.blocked[0]).toMatchObject({ ports: String(port), reason: expect.stringMatching(/^bind failed: .*EADDRINUSE/) });
    const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/harbor_worker_bind_failures_total\{protocol="tcp"\} 1/);

    // Once the other process lets go, the worker binds on its next beat and the port is offered again.
    await new Promise((r) => squatter.close(r));
    await waitFor(async () => (await harbor.json<Array<{ blocked: unknown[] }>>("nodes"))[0]!.blocked.length === 0, "the port offered again");
    expect(harbor.logs()).toMatch(new RegExp(`"port":${port}[^\\n]*"msg":"tcp-listener-opened"`));
  });
});

describe("e2e faults - NATS unreachable at start", () => {
  it("a worker still waiting for its NATS_URL stops at SIGTERM, cleanly, instead of waiting for NATS", async () => {
    const worker = spawn(process.execPath, [HARBOR_BIN, "serve", "worker"], {
      env: { ...process.env, NATS_URL: `nats://127.0.0.1:${await freePort()}`, HARBOR_NODE_ID: "lonely", HARBOR_API: `127.0.0.1:${await freePort()}` },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let output = "";
    worker.stdout.on("data", (c: Buffer) => (output += c.toString()));
    worker.stderr.on("data", (c: Buffer) => (output += c.toString()));
    const exited = new Promise<number | null>((r) => worker.once("exit", (code) => r(code)));
    stoppers.push(async () => void worker.kill("SIGKILL"));
    await waitFor(() => output.includes("nats-connect-failed-retrying"), "the worker retrying NATS");
    worker.kill("SIGTERM");
    // Before, only a second signal ended it (exit 1): the first waited for the start, which waited for NATS.
    const code = await Promise.race([exited, new Promise<"still running">((r) => setTimeout(() => r("still running"), 10_000))]);
    expect(code).toBe(0);
    expect(output).toMatch(/"msg":"shutdown-complete"/);
    expect(output).not.toMatch(/"level":50/);
  });
});

describe("e2e security - NATS credentials", () => {
  it("runs against a NATS that requires a token", async () => {
    const nats = await startNatsServer({ token: "nats-secret-0123456789" });
    stoppers.push(() => nats.stop());
    const harbor = await startHarbor({ env: { NATS_URL: nats.url, NATS_TOKEN: "nats-secret-0123456789" } });
    stoppers.push(() => harbor.stop());
    const service = await harbor.json<ServiceJson>("create-service", "guarded", "--app", "guarded");
    const backend = await echo("guarded-0");
    await register(harbor, "guarded", "g-0", backend.port);
    // Events went through the authenticated NATS: the worker opened the port and follows the set.
    await waitFor(() => only(service.port, "guarded-0"), "traffic through a token-protected NATS");
    expect(harbor.logs()).not.toContain("nats-secret-0123456789");
  });
});

describe("e2e - the worker's periodic snapshot", () => {
  it("sends digests: an unchanged node costs no listing, a change is listed, and traffic goes on throughout", async () => {
    const harbor = await startHarbor({ env: { HARBOR_RESYNC_INTERVAL_MS: "200" } });
    stoppers.push(() => harbor.stop());
    const service = await harbor.json<ServiceJson>("create-service", "steady-snap", "--app", "snap");
    const first = await echo("snap-0");
    await register(harbor, "snap", "snap-0", first.port);
    await waitFor(() => only(service.port, "snap-0"), "forwarding to the first instance");
    const timerSyncs = (from: number) => [...harbor.logs().slice(from).matchAll(/^.*"reason":"timer".*"msg":"worker-synced".*$/gm)].map((m) => m[0]);
    // Nothing changes: the snapshots come back unchanged, and change nothing.
    await waitFor(() => timerSyncs(0).some((l) => /"unchanged":true,"changed":0/.test(l)), "an unchanged periodic snapshot");

    const mark = harbor.logs().length;
    const second = await echo("snap-1");
    await register(harbor, "snap", "snap-1", second.port);
    await waitFor(async () => Object.keys(await spread(service.port, 4)).length === 2, "both instances in rotation");
    // The next snapshots: one that lists the change (its digest moved), then unchanged again.
    await waitFor(() => {
      const lines = timerSyncs(mark);
      const listed = lines.findIndex((l) => /"unchanged":false/.test(l));
      return listed >= 0 && lines.slice(listed + 1).some((l) => /"unchanged":true/.test(l));
    }, "a snapshot listing the change, then unchanged ones");
    expect(await spread(service.port, 4)).toEqual({ "snap-0": 2, "snap-1": 2 });
  });
});
