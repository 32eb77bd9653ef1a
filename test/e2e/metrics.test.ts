import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort, startEchoBackend, startUdpEchoBackend, udpClient, waitFor } from "@harbor/testkit";
import { reach, type ServiceJson } from "./cluster.js";
import { KERNEL_MODE, startHarbor, type Harbor } from "./harbor.js";

let harbor: Harbor;
let metricsUrl: string;
const cleanup: Array<() => unknown> = [];

beforeAll(async () => {
  const port = await freePort();
  metricsUrl = `http://127.0.0.1:${port}/metrics`;
  harbor = await startHarbor({ env: { HARBOR_METRICS_ADDRESS: `127.0.0.1:${port}` } });
});

afterAll(async () => {
  for (const c of cleanup.reverse()) await c();
  await harbor?.stop();
});

/** The value of one sample line of the Prometheus text format. */
function sample(text: string, name: string): number {
  const line = text.split("\n").find((l) => l.startsWith(`${name} `));
  if (!line) throw new Error(`no sample ${name}`);
  return Number(line.slice(name.length + 1));
}

describe("e2e metrics - Prometheus on every service", () => {
  it("counts connections, bytes, datagrams, allocations, registrations, and propagation latency", async () => {
    const tcp = await harbor.json<ServiceJson>("create-service", "metered", "--app", "meter");
    const udp = await harbor.json<ServiceJson>("create-service", "udp-metered", "--app", "meter");
    const echo = await startEchoBackend("m-0");
    const udpEcho = await startUdpEchoBackend("m-0", echo.port);
    cleanup.push(() => echo.close(), () => udpEcho.close());
    expect((await harbor.cli("register-instance", "meter", "m-0", "--host", "127.0.0.1", "--port", String(echo.port), "--map", `4101:${echo.port}`)).code).toBe(0);
    await waitFor(async () => (await reach(tcp.port).catch(() => "")) === "m-0", "traffic");
    for (let i = 0; i < 4; i++) await reach(tcp.port);
    const client = await udpClient(udp.port);
    cleanup.push(() => client.close());
    for (let i = 0; i < 3; i++) await client.ask(`d${i}`);
    await expect(harbor.cli("create-service", "metered")).resolves.toMatchObject({ code: 1 });

    const text = await waitFor(async () => {
      const body = await (await fetch(metricsUrl)).text();
      return sample(body, 'harbor_worker_tcp_bytes_total{direction="to_client"}') > 0 ? body : undefined;
    }, "byte counts after the connections closed");
    expect(sample(text, 'harbor_worker_tcp_connections_total{outcome="proxied"}')).toBeGreaterThanOrEqual(5);
    expect(sample(text, 'harbor_worker_udp_datagrams_total{direction="to_backend"}')).toBe(3);
    expect(sample(text, 'harbor_worker_udp_datagrams_total{direction="to_client"}')).toBe(3);
    expect(sample(text, "harbor_worker_udp_sessions")).toBe(1);
    expect(sample(text, "harbor_worker_listening_ports")).toBe(2);
    expect(sample(text, "harbor_worker_propagation_seconds_count")).toBeGreaterThanOrEqual(1);
    // No relays here: nothing handed off, nothing carried for want of one (the relay tests count both).
    expect(sample(text, 'harbor_worker_relay_handoffs_total{outcome="relayed"}')).toBe(0);
    expect(sample(text, 'harbor_worker_relay_handoffs_total{outcome="carried_here"}')).toBe(0);
    expect(sample(text, 'harbor_allocator_creates_total{result="created"}')).toBe(2);
    expect(sample(text, 'harbor_allocator_creates_total{result="already-exists"}')).toBe(1);
    expect(sample(text, 'harbor_registry_registrations_total{kind="new"}')).toBe(1);
    expect(sample(text, "harbor_registry_backend_sets_published_total")).toBeGreaterThanOrEqual(2);
    expect(sample(text, "harbor_registry_instances")).toBe(1);
    expect(sample(text, "harbor_allocator_outbox_pending")).toBe(0);
    expect(sample(text, "harbor_nats_reconnects_total")).toBe(0);
    expect(text).toMatch(/^process_resident_memory_bytes \d+/m);
    // The native data path (userspace mode's default here) reports its splice pipes; none is held by a closed connection.
    if (!KERNEL_MODE) expect(sample(text, 'harbor_worker_splice_pipes{state="in_use"}')).toBe(0);
  });
});
