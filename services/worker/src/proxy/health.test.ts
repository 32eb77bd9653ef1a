import { afterEach, describe, expect, it } from "vitest";
import type { Backend } from "@harbor/proto";
import { createLogger } from "@harbor/runtime";
import { freePort, startEchoBackend, startUdpEchoBackend, waitFor } from "@harbor/testkit";
import { DataPlaneCounters } from "../metrics.js";
import { HealthChecker } from "./health.js";
import { TcpListener } from "./tcp.js";
import { dgramIo } from "./datagram.js";
import { UdpListener } from "./udp.js";

const logger = createLogger("test", "silent");
const cleanup: Array<() => unknown> = [];

afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

describe("health checker", () => {
  it("when stopped (the check changed or was removed), brings back the backends it took out", async () => {
    const good = await startEchoBackend("good");
    cleanup.push(() => good.close());
    const deadPort = await freePort();
    const set: Backend[] = [good.port, deadPort].map((port, i) => ({ instanceId: `i${i}`, app: "a", host: "127.0.0.1", port, availableSince: undefined }));
    const listener = new TcpListener({
      serviceId: "s",
      host: "127.0.0.1",
      port: await freePort(),
      backends: () => set,
      connectTimeoutMs: 1_000,
      maxConnections: 10,
      passiveEjectMs: 60_000,
      counters: new DataPlaneCounters(),
      logger,
    });
    const spec = { intervalMs: 100, timeoutMs: 50, unhealthyThreshold: 1, healthyThreshold: 1, udpProbe: "" };
    const checker = new HealthChecker(listener, spec, () => set, logger);
    checker.start();
    cleanup.push(() => checker.stop());
    await waitFor(() => listener.ejections.isEjected(`127.0.0.1:${deadPort}`), "the dead backend out of rotation");
    expect(listener.ejections.isEjected(`127.0.0.1:${good.port}`)).toBe(false);

    // Its ejection had no end: a replacing checker starts from healthy and would never lift it.
    checker.stop();
    expect(listener.ejections.isEjected(`127.0.0.1:${deadPort}`)).toBe(false);
    // Nor does a round that was in flight eject it again.
    await new Promise((r) => setTimeout(r, 250));
    expect(listener.ejections.isEjected(`127.0.0.1:${deadPort}`)).toBe(false);
  });

  it("a UDP probe whose connect the kernel refuses (a broadcast address) marks that backend unhealthy, and the worker lives on", async () => {
    const good = await startUdpEchoBackend("good");
    cleanup.push(() => good.close());
    const set: Backend[] = [
      { instanceId: "i0", app: "a", host: "127.0.0.1", port: good.port, availableSince: undefined },
      { instanceId: "i1", app: "a", host: "255.255.255.255", port: 9, availableSince: undefined },
    ];
    const listener = new UdpListener({
      serviceId: "s",
      host: "127.0.0.1",
      port: await freePort(),
      backends: () => set,
      sessionIdleMs: 60_000,
      maxSessions: 10,
      passiveEjectMs: 60_000,
      counters: new DataPlaneCounters(),
      logger,
      io: dgramIo,
      receiveBufferBytes: 0,
    });
    // A timeout a loaded machine does not reach for an answer from loopback; the refused connect fails at once.
    const spec = { intervalMs: 100, timeoutMs: 1_000, unhealthyThreshold: 1, healthyThreshold: 1, udpProbe: "ping" };
    const checker = new HealthChecker(listener, spec, () => set, logger);
    checker.start();
    cleanup.push(() => checker.stop());
    await waitFor(() => listener.ejections.isEjected("255.255.255.255:9"), "the broadcast backend out of rotation");
    // Several rounds later the good one is still in: its probes were answered.
    await new Promise((r) => setTimeout(r, 350));
    expect(listener.ejections.isEjected(`127.0.0.1:${good.port}`)).toBe(false);
  });
});
