import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectLines, freePort, startEchoBackend, waitFor, type EchoBackend } from "@harbor/testkit";
import { reach, spread, type ServiceJson } from "./cluster.js";
import { KERNEL_MODE, RELAYS, startHarbor, type Harbor } from "./harbor.js";

let harbor: Harbor;
let metricsUrl: string;
const backends: EchoBackend[] = [];

beforeAll(async () => {
  const metricsAddress = `127.0.0.1:${await freePort()}`;
  metricsUrl = `http://${metricsAddress}/metrics`;
  harbor = await startHarbor({ env: { HARBOR_METRICS_ADDRESS: metricsAddress } });
});

afterAll(async () => {
  for (const b of backends) await b.close();
  await harbor?.stop();
});

describe("e2e tcp - a port that works end to end", () => {
  it("create, bind, three instances: round-robin 3/3/3; one deregistered: others only, while an open connection keeps echoing", async () => {
    const created = await harbor.json<ServiceJson>("create-service", "debug-port");
    expect(Object.keys(created).slice(0, 6)).toEqual(["hostname", "host", "port", "name", "node_id", "int_port"]);
    expect(created).toMatchObject({ hostname: "127.0.0.1", host: "127.0.0.1", node_id: "harbor_node_1", service_name: "debug-port", protocol: "tcp" });
    expect(created.port).toBeGreaterThanOrEqual(harbor.range.min);
    expect(created.port).toBeLessThanOrEqual(harbor.range.max);
    const bound = await harbor.json<ServiceJson>("bind-service", "debug-port", "demo");
    expect(bound.int_port).toBe(4100);

    for (const name of ["alpha", "bravo", "charlie"]) {
      const backend = await startEchoBackend(name);
      backends.push(backend);
      const registered = await harbor.cli("register-instance", "demo", `demo-${name}`, "--host", "127.0.0.1", "--port", String(backend.port));
      expect(registered.code, registered.stderr).toBe(0);
    }
    // The worker follows NATS: wait until every instance is in rotation.
    const seen = new Set<string>();
    await waitFor(async () => {
      seen.add(await reach(created.port).catch(() => "none"));
      return seen.has("alpha") && seen.has("bravo") && seen.has("charlie");
    }, "all three backends in rotation");

    expect(await spread(created.port, 9)).toEqual({ alpha: 3, bravo: 3, charlie: 3 });
    // Thirty at once: still exact (with relays, the worker still makes every choice).
    const together: Record<string, number> = {};
    for (const name of await Promise.all(Array.from({ length: 30 }, () => reach(created.port)))) together[name] = (together[name] ?? 0) + 1;
    expect(together).toEqual({ alpha: 10, bravo: 10, charlie: 10 });

    const open = await connectLines(created.port);
    const held = await open.nextLine();
    expect(await open.roundTrip("before")).toBe("before");

    const gone = await harbor.cli("deregister-instance", "demo", `demo-${held}`);
    expect(gone.code, gone.stderr).toBe(0);
    const others = ["alpha", "bravo", "charlie"].filter((n) => n !== held);
    await waitFor(async () => {
      const counts = await spread(created.port, 4);
      return !(held in counts);
    }, "the deregistered backend out of rotation");
    const after = await spread(created.port, 6);
    expect(Object.keys(after).sort()).toEqual(others.sort());
    expect(Object.values(after)).toEqual([3, 3]);

    // The connection opened before the change is still up and still echoing.
    expect(await open.roundTrip("still-here")).toBe("still-here");
    open.close();
  });

  // Kernel mode cannot retry a refused connection on another backend (the kernel never sees the refusal).
  it.skipIf(KERNEL_MODE)("a backend that refuses is skipped for the next; with no backend the client is closed at once", async () => {
    const created = await harbor.json<ServiceJson>("create-service", "flaky-port", "--app", "flaky");
    const live = await startEchoBackend("live");
    backends.push(live);
    const dead = await startEchoBackend("dead");
    const deadPort = dead.port;
    await dead.close();
    expect((await harbor.cli("register-instance", "flaky", "f-dead", "--host", "127.0.0.1", "--port", String(deadPort))).code).toBe(0);
    expect((await harbor.cli("register-instance", "flaky", "f-live", "--host", "127.0.0.1", "--port", String(live.port))).code).toBe(0);
    await waitFor(async () => (await reach(created.port).catch(() => "none")) === "live", "the live backend reachable");
    expect(await spread(created.port, 6)).toEqual({ live: 6 });

    expect((await harbor.cli("deregister-instance", "flaky", "f-dead")).code).toBe(0);
    expect((await harbor.cli("deregister-instance", "flaky", "f-live")).code).toBe(0);
    await waitFor(async () => {
      const client = await connectLines(created.port);
      const started = Date.now();
      await client.closed;
      return Date.now() - started < 1_000;
    }, "connections closed at once with no backend");
  });

  it("a service deleted while a connection is open does not hold up the next service's port", async () => {
    const old = await harbor.json<ServiceJson>("create-service", "short-lived", "--app", "holder");
    const backend = await startEchoBackend("holder-0");
    backends.push(backend);
    expect((await harbor.cli("register-instance", "holder", "h-0", "--host", "127.0.0.1", "--port", String(backend.port))).code).toBe(0);
    const held = await waitFor(async () => {
      const c = await connectLines(old.port).catch(() => undefined);
      return c && (await c.nextLine().then(() => c, () => undefined));
    }, "a connection through the port");
    expect((await harbor.cli("delete-service", "short-lived")).code).toBe(0);
    const next = await harbor.json<ServiceJson>("create-service", "next-one", "--app", "follower");
    expect((await harbor.cli("register-instance", "follower", "f-0", "--host", "127.0.0.1", "--port", String(backend.port))).code).toBe(0);
    await waitFor(async () => (await reach(next.port).catch(() => "")) !== "", "the new service's port open while the old connection is still up");
    expect(await held.roundTrip("still")).toBe("still");
    held.close();
  });

  it("with no backend, a client's connection is closed at once", async () => {
    const created = await harbor.json<ServiceJson>("create-service", "empty-port", "--app", "nobody");
    await waitFor(async () => {
      const client = await connectLines(created.port).catch(() => undefined);
      if (!client) return true; // refused (kernel mode resets at once)
      const started = Date.now();
      await client.closed;
      return Date.now() - started < 1_000;
    }, "connections closed at once with no backend");
  });

  it("the CLI answers bad input with one line on stderr and a non-zero exit, and --json everywhere", async () => {
    const bad = await harbor.cli("create-service", "not valid!");
    expect(bad.code).not.toBe(0);
    expect(bad.stderr.trim().split("\n")).toHaveLength(1);
    expect(bad.stderr).toMatch(/^harbor: service name "not valid!" is not valid/);
    const missing = await harbor.cli("service", "nope");
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/no port service named "nope"/);
    const usage = await harbor.cli("register-instance", "demo");
    expect(usage.code).toBe(2);

    const services = await harbor.json<ServiceJson[]>("services");
    expect(services.map((s) => s.service_name)).toEqual(KERNEL_MODE ? ["debug-port", "empty-port", "next-one"] : ["debug-port", "empty-port", "flaky-port", "next-one"]);
    const env = await harbor.json<Record<string, string>>("env", "demo");
    expect(env.STACKATO_HARBOR).toBe("4100");
    expect(JSON.parse(env.STACKATO_SERVICES!)["debug-port"].int_port).toBe(4100);
    const nodes = await harbor.json<Array<{ node_id: string; worker_live: boolean }>>("nodes");
    expect(nodes).toMatchObject([{ node_id: "harbor_node_1", worker_live: true }]);
    const stackatoForm = await harbor.json<ServiceJson>("create-service", "harbor", "tcp-legacy", "demo");
    expect(stackatoForm).toMatchObject({ service_name: "tcp-legacy", int_port: 4101 });
  });

  it.runIf(RELAYS > 0)("a relay killed with -9 is replaced, and connections keep flowing, still in exact turns", async () => {
    const started = [...harbor.logs().matchAll(/"pid":(\d+),"name":"harbor-relay".*"msg":"relay-started"/g)].map((m) => Number(m[1]));
    expect(started).toHaveLength(RELAYS);
    process.kill(started[0]!, "SIGKILL");
    await waitFor(async () => /"msg":"relay-died-restarting"/.test(harbor.logs()) && (harbor.logs().match(/"msg":"relay-started"/g)?.length ?? 0) === RELAYS + 1, "the relay replaced");
    const debugPort = (await harbor.json<ServiceJson>("service", "debug-port")).port;
    expect(Object.values(await spread(debugPort, 6))).toEqual([3, 3]);
  });

  it("stops cleanly on SIGTERM", async () => {
    // The mode under test really was the one asked for.
    if (KERNEL_MODE) {
      expect(harbor.logs()).toMatch(/"mode":"kernel"[^\n]*"msg":"worker-started"/);
      expect(harbor.logs()).not.toMatch(/"msg":"tcp-listener-opened"/);
      // The table was written whole once, then changed a port at a time.
      expect(harbor.logs()).toMatch(/"whole":false[^\n]*"msg":"nftables-applied"/);
      // The rules' counters reach the metrics: every connection above was a new flow.
      const tcpFlows = /harbor_worker_kernel_flows_total\{protocol="tcp"\} (\d+)/.exec(await (await fetch(metricsUrl)).text());
      expect(Number(tcpFlows?.[1])).toBeGreaterThanOrEqual(39);
    } else expect(harbor.logs()).toMatch(/"msg":"tcp-listener-opened"/);
    // A connection open at SIGTERM may finish: new ones are refused, it carries on (in kernel
    // mode too, where the table must outlive it), and the worker exits once it is closed.
    const debugPort = (await harbor.json<ServiceJson>("service", "debug-port")).port;
    const open = await connectLines(debugPort);
    await open.nextLine();
    // So may one whose service was deleted before (it outlived its listener).
    const gone = await harbor.json<ServiceJson>("create-service", "gone-before-stop", "--app", "goner");
    const goner = await startEchoBackend("goner-0");
    backends.push(goner);
    expect((await harbor.cli("register-instance", "goner", "g-0", "--host", "127.0.0.1", "--port", String(goner.port))).code).toBe(0);
    const orphan = await waitFor(async () => {
      const c = await connectLines(gone.port).catch(() => undefined);
      return c && (await c.nextLine().then(() => c, () => undefined));
    }, "a connection through the doomed service");
    expect((await harbor.cli("delete-service", "gone-before-stop")).code).toBe(0);
    const stopped = harbor.stop();
    await waitFor(() => connectLines(debugPort).then((c) => void c.close(), () => true), "new connections refused");
    expect(await open.roundTrip("draining")).toBe("draining");
    open.close();
    // The worker waits for the deleted service's connection too (it stopped within ~100 ms without that).
    await new Promise((r) => setTimeout(r, 1_000));
    expect(harbor.logs()).not.toMatch(/"msg":"worker-stopped"/);
    expect(await orphan.roundTrip("still draining")).toBe("still draining");
    orphan.close();
    expect(await stopped).toBe(0);
    expect(harbor.logs()).toMatch(/"msg":"shutdown-complete"/);
    // With relays, every one started, and every one was drained, not killed.
    const relayLogs = (msg: string) => harbor.logs().match(new RegExp(`"name":"harbor-relay".*"msg":"${msg}"`, "g"))?.length ?? 0;
    expect(relayLogs("relay-started")).toBe(RELAYS === 0 ? 0 : RELAYS + 1); // one was replaced above
    expect(relayLogs("relay-stopped")).toBe(RELAYS);
    if (RELAYS > 0) {
      // ... and the relays, not the worker, carried the connections.
      const carried = [...harbor.logs().matchAll(/"carried":(\d+)[^\n]*"msg":"relay-stopped"/g)].map((m) => Number(m[1]));
      expect(carried).toHaveLength(RELAYS);
      expect(carried.every((n) => n > 0)).toBe(true);
    }
  });
});
