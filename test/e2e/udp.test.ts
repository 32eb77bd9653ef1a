import { readFileSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { startEchoBackend, startUdpEchoBackend, udpClient, waitFor, type EchoBackend, type UdpEchoBackend } from "@harbor/testkit";
import { spread, type ServiceJson } from "./cluster.js";
import { KERNEL_MODE, startHarbor, type Harbor } from "./harbor.js";

let harbor: Harbor;
const closers: Array<{ close(): Promise<void> }> = [];

beforeAll(async () => {
  harbor = await startHarbor();
});

afterAll(async () => {
  for (const c of closers) await c.close();
  await harbor?.stop();
});

async function register(app: string, id: string, port: number): Promise<void> {
  const r = await harbor.cli("register-instance", app, id, "--host", "127.0.0.1", "--port", String(port));
  expect(r.code, r.stderr).toBe(0);
}

describe("e2e udp - FIFO primary", () => {
  it("all datagrams reach the first instance; replies come from the service's port; when it goes the next takes over", async () => {
    const service = await harbor.json<ServiceJson>("create-service", "udp-dns", "--app", "dns");
    expect(service.protocol).toBe("udp");
    const backends: UdpEchoBackend[] = [];
    for (const name of ["first", "second", "third"]) {
      const backend = await startUdpEchoBackend(name);
      backends.push(backend);
      closers.push(backend);
      await register("dns", `dns-${name}`, backend.port);
    }
    const client = await udpClient(service.port);
    await waitFor(async () => (await client.ask("warm", 300).catch(() => undefined))?.text === "first:warm", "the primary answering");
    for (let i = 0; i < 6; i++) {
      const reply = await client.ask(`q${i}`);
      expect(reply.text).toBe(`first:q${i}`);
      expect(reply.fromPort).toBe(service.port);
    }
    // A second client is a second session, to the same primary.
    const other = await udpClient(service.port);
    expect((await other.ask("hello")).text).toBe("first:hello");
    expect(backends[1]!.received + backends[2]!.received).toBe(0);

    // The primary stops: the next in the queue takes over. In userspace its process is
    // just gone (found dead by "port unreachable"); the kernel sees no ICMP, so there it is
    // deregistered (or a --udp-probe health check finds it).
    await backends[0]!.close();
    if (KERNEL_MODE) expect((await harbor.cli("deregister-instance", "dns", "dns-first")).code).toBe(0);
    await waitFor(async () => (await client.ask("after", 300).catch(() => undefined))?.text === "second:after", "the second taking over");
    expect((await other.ask("again").catch(() => other.ask("again"))).text).toBe("second:again");

    // The second is deregistered: the third takes over, replies still from the service's port.
    expect((await harbor.cli("deregister-instance", "dns", "dns-second")).code).toBe(0);
    await waitFor(async () => (await client.ask("later", 300).catch(() => undefined))?.text === "third:later", "the third taking over");
    const reply = await client.ask("port?");
    expect(reply.fromPort).toBe(service.port);

    // The second comes back: it joins the back of the queue, no flapping.
    await register("dns", "dns-second", backends[1]!.port);
    await new Promise((r) => setTimeout(r, 300));
    for (let i = 0; i < 3; i++) expect((await client.ask(`steady${i}`)).text).toBe(`third:steady${i}`);
    client.close();
    other.close();
  });

  it("garbage datagrams with no backend are dropped without harm", async () => {
    const service = await harbor.json<ServiceJson>("create-service", "udp-void");
    const client = await udpClient(service.port);
    await expect(client.ask("\u0000\u00ff garbage", 300)).rejects.toThrow(/no UDP reply/);
    client.close();
    const nodes = await harbor.json<Array<{ worker_live: boolean }>>("nodes");
    expect(nodes[0]!.worker_live).toBe(true);
  });
});

describe("e2e both - TCP and UDP on one port number", () => {
  it("answers TCP round-robin and UDP FIFO on the same port", async () => {
    const service = await harbor.json<ServiceJson>("create-service", "both-game", "--app", "game");
    expect(service.protocol).toBe("both");
    const shown = await harbor.json<ServiceJson>("service", "both-game");
    expect(shown.protocol).toBe("both");
    const tcp: EchoBackend[] = [];
    for (const name of ["g0", "g1", "g2"]) {
      const backend = await startEchoBackend(name);
      const udp = await startUdpEchoBackend(name, backend.port);
      tcp.push(backend);
      closers.push(backend, udp);
      await register("game", `game-${name}`, backend.port);
    }
    await waitFor(async () => Object.keys(await spread(service.port, 3)).length === 3, "three TCP backends in rotation");
    expect(await spread(service.port, 9)).toEqual({ g0: 3, g1: 3, g2: 3 });
    const client = await udpClient(service.port);
    for (let i = 0; i < 5; i++) {
      const reply = await client.ask(`d${i}`);
      expect(reply.text).toBe(`g0:d${i}`);
      expect(reply.fromPort).toBe(service.port);
    }
    client.close();
  });
});

describe.skipIf(KERNEL_MODE)("e2e udp - the port's receive buffer (userspace)", () => {
  const rmemMax = Number(readFileSync("/proc/sys/net/core/rmem_max", "utf8").trim());

  it("a UDP port gets HARBOR_UDP_RECEIVE_BUFFER_BYTES (4 MiB), as far as net.core.rmem_max lets it", async () => {
    const service = await harbor.json<ServiceJson>("create-service", "udp-buffered", "--app", "buffered");
    const opened = await waitFor(
      () => harbor.logs().split("\n").find((l) => l.includes('"msg":"udp-listener-opened"') && l.includes(`"port":${service.port},`)),
      "the port's listener opened",
    );
    // Linux reports twice what it granted.
    expect(JSON.parse(opened).receiveBufferBytes).toBe(2 * Math.min(4 << 20, rmemMax));
  });

  it("asking for more than net.core.rmem_max is said once at start, with the fix", async () => {
    const asking = rmemMax + 4096;
    const other = await startHarbor({ env: { HARBOR_UDP_RECEIVE_BUFFER_BYTES: String(asking) } });
    try {
      const line = await waitFor(() => other.logs().split("\n").find((l) => l.includes('"msg":"udp-receive-buffer-capped"')), "the warning");
      expect(JSON.parse(line)).toMatchObject({ requestedBytes: asking, rmemMax, fix: `sysctl -w net.core.rmem_max=${asking}, or a smaller HARBOR_UDP_RECEIVE_BUFFER_BYTES` });
      expect(other.logs().split("udp-receive-buffer-capped").length - 1).toBe(1);
    } finally {
      await other.stop();
    }
  });
});
