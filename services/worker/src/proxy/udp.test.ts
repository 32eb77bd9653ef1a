import { afterEach, describe, expect, it } from "vitest";
import type { Backend } from "@harbor/proto";
import { createLogger } from "@harbor/runtime";
import { freePort, startUdpEchoBackend, udpClient, waitFor, type UdpClient, type UdpEchoBackend } from "@harbor/testkit";
import { DataPlaneCounters } from "../metrics.js";
import { UdpListener } from "./udp.js";

const logger = createLogger("test", "silent");
const cleanup: Array<() => unknown> = [];

afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

async function setup(names: string[], options: { sessionIdleMs?: number; maxSessions?: number; passiveEjectMs?: number } = {}) {
  const backends: UdpEchoBackend[] = [];
  for (const name of names) {
    const b = await startUdpEchoBackend(name);
    backends.push(b);
    cleanup.push(() => b.close());
  }
  let set: Backend[] = backends.map((b, i) => ({ instanceId: `i${i}`, app: "a", host: "127.0.0.1", port: b.port, availableSince: undefined }));
  const port = await freePort();
  const counters = new DataPlaneCounters();
  const listener = new UdpListener({
    serviceId: "s",
    host: "127.0.0.1",
    port,
    backends: () => set,
    sessionIdleMs: options.sessionIdleMs ?? 60_000,
    maxSessions: options.maxSessions ?? 100,
    passiveEjectMs: options.passiveEjectMs ?? 5_000,
    counters,
    logger,
  });
  expect(await listener.listen()).toBe(true);
  cleanup.push(() => listener.close());
  const clients: UdpClient[] = [];
  const client = async () => {
    const c = await udpClient(port);
    clients.push(c);
    cleanup.push(() => c.close());
    return c;
  };
  return {
    listener,
    counters,
    backends,
    client,
    setBackends: (next: Backend[]) => {
      set = next;
      listener.backendsChanged();
    },
    current: () => set,
  };
}

describe("udp listener - sessions", () => {
  it("a session stays on its backend while that backend remains, even when another becomes primary", async () => {
    const { client, setBackends, current } = await setup(["a", "b"]);
    const early = await client();
    expect((await early.ask("x")).text).toBe("a:x");
    // b is put first (a re-ordered set): new sessions go to b, the open one stays on a.
    setBackends([current()[1]!, current()[0]!]);
    const late = await client();
    expect((await late.ask("y")).text).toBe("b:y");
    expect((await early.ask("z")).text).toBe("a:z");
    // a leaves: only its session moves.
    setBackends([current()[0]!]);
    expect((await early.ask("moved")).text).toBe("b:moved");
  });

  it("a backend that stops answering moves the session to the next one in rotation", async () => {
    const { client, backends, counters } = await setup(["a", "b"]);
    const c = await client();
    expect((await c.ask("x")).text).toBe("a:x");
    await backends[0]!.close();
    await waitFor(async () => (await c.ask("after", 300).catch(() => undefined))?.text === "b:after", "the session moving to b");
    expect(counters.udpBackendUnreachable).toBeGreaterThan(0);
  });

  it("with nowhere else to go a session keeps its socket, so a backend that comes back sees the same client", async () => {
    const { listener, client, backends, counters } = await setup(["a"]);
    const c = await client();
    expect((await c.ask("x")).text).toBe("a:x");
    const before = backends[0]!.lastPeerPort;
    const port = backends[0]!.port;
    await backends[0]!.close();
    // Each datagram now meets "port unreachable"; the only backend is out of rotation.
    await waitFor(async () => {
      await c.ask("lost", 100).catch(() => undefined);
      return counters.udpBackendUnreachable > 0;
    }, "port unreachable seen");
    listener.backendsChanged(); // as the listener's sweep does while a backend is out of rotation
    const back = await startUdpEchoBackend("a-again", port);
    cleanup.push(() => back.close());
    await waitFor(async () => (await c.ask("back", 300).catch(() => undefined))?.text === "a-again:back", "the backend answering again");
    expect(back.lastPeerPort).toBe(before);
    expect(listener.sessionCount).toBe(1);
  });

  it("a session left where it was because every backend was out of rotation moves once another's ejection runs out", async () => {
    const { listener, client, backends } = await setup(["a", "b"], { passiveEjectMs: 300 });
    const c = await client();
    expect((await c.ask("x")).text).toBe("a:x");
    listener.ejections.eject(`127.0.0.1:${backends[0]!.port}`, true); // as a failing health check does
    listener.ejections.eject(`127.0.0.1:${backends[1]!.port}`); // passively, for 300 ms
    listener.backendsChanged();
    expect((await c.ask("stays")).text).toBe("a:stays"); // nowhere better: a still answers
    // Nobody is told when b's ejection runs out; the sweep looks.
    await waitFor(async () => (await c.ask("later", 300).catch(() => undefined))?.text === "b:later", "the session moving to b", 5_000);
  });

  it("keeps at most maxSessions, closing the oldest first", async () => {
    const { listener, client } = await setup(["a"], { maxSessions: 2 });
    for (let i = 0; i < 3; i++) await (await client()).ask(`c${i}`);
    expect(listener.sessionCount).toBe(2);
  });

  it("closes sessions idle for sessionIdleMs", async () => {
    const { listener, client } = await setup(["a"], { sessionIdleMs: 200 });
    await (await client()).ask("hello");
    expect(listener.sessionCount).toBe(1);
    await waitFor(() => listener.sessionCount === 0, "the idle session closed", 3_000);
  });

  it("drops datagrams when there is no backend, and counts them", async () => {
    const { counters, client, setBackends } = await setup(["a"]);
    setBackends([]);
    await expect((await client()).ask("lost", 200)).rejects.toThrow(/no UDP reply/);
    expect(counters.udpDropped).toBe(1);
    expect(counters.udpToBackend).toBe(0);
  });
});
