import dgram from "node:dgram";
import { readFileSync } from "node:fs";
import { afterEach, describe, expect, it } from "vitest";
import type { Backend } from "@harbor/proto";
import { createLogger } from "@harbor/runtime";
import { freePort, startUdpEchoBackend, udpClient, waitFor, type UdpClient, type UdpEchoBackend } from "@harbor/testkit";
import { DataPlaneCounters } from "../metrics.js";
import { batchedIo } from "./batched.js";
import { dgramIo, type DatagramIo } from "./datagram.js";
import { nativeModule, type NativeModule } from "./native.js";
import { UdpListener } from "./udp.js";

// Both kinds of sockets run every test; "native" throws here, failing the file, when the module is not built.
const NATIVE = nativeModule("native") as NativeModule;
const IOS: DatagramIo[] = [batchedIo(NATIVE), dgramIo];

const logger = createLogger("test", "silent");
const cleanup: Array<() => unknown> = [];

afterEach(async () => {
  for (const c of cleanup.splice(0)) await c();
});

async function setup(io: DatagramIo, names: string[], options: { sessionIdleMs?: number; maxSessions?: number; passiveEjectMs?: number; receiveBufferBytes?: number } = {}) {
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
    io,
    receiveBufferBytes: options.receiveBufferBytes ?? 0,
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

describe.each(IOS)("udp listener ($name sockets) - sessions", (io) => {
  it("a session stays on its backend while that backend remains, even when another becomes primary", async () => {
    const { client, setBackends, current } = await setup(io, ["a", "b"]);
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
    const { client, backends, counters } = await setup(io, ["a", "b"]);
    const c = await client();
    expect((await c.ask("x")).text).toBe("a:x");
    await backends[0]!.close();
    await waitFor(async () => (await c.ask("after", 300).catch(() => undefined))?.text === "b:after", "the session moving to b");
    expect(counters.udpBackendUnreachable).toBeGreaterThan(0);
  });

  it("with nowhere else to go a session keeps its socket, so a backend that comes back sees the same client", async () => {
    const { listener, client, backends, counters } = await setup(io, ["a"]);
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
    const { listener, client, backends } = await setup(io, ["a", "b"], { passiveEjectMs: 300 });
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
    const { listener, client } = await setup(io, ["a"], { maxSessions: 2 });
    for (let i = 0; i < 3; i++) await (await client()).ask(`c${i}`);
    expect(listener.sessionCount).toBe(2);
  });

  it("closes sessions idle for sessionIdleMs", async () => {
    const { listener, client } = await setup(io, ["a"], { sessionIdleMs: 200 });
    await (await client()).ask("hello");
    expect(listener.sessionCount).toBe(1);
    await waitFor(() => listener.sessionCount === 0, "the idle session closed", 3_000);
  });

  it("drops datagrams when there is no backend, and counts them", async () => {
    const { counters, client, setBackends } = await setup(io, ["a"]);
    setBackends([]);
    await expect((await client()).ask("lost", 200)).rejects.toThrow(/no UDP reply/);
    expect(counters.udpDropped).toBe(1);
    expect(counters.udpToBackend).toBe(0);
  });
});

describe.each(IOS)("udp listener ($name sockets) - datagrams", (io) => {
  /** A socket bound on loopback, and everything it receives. */
  async function socketOn(port = 0): Promise<{ socket: dgram.Socket; port: number; received: Buffer[] }> {
    const socket = dgram.createSocket("udp4");
    const received: Buffer[] = [];
    socket.on("message", (msg) => received.push(msg));
    await new Promise<void>((resolve) => socket.bind(port, "127.0.0.1", () => resolve()));
    cleanup.push(() => socket.close());
    return { socket, port: socket.address().port, received };
  }

  it("datagrams of several clients sent at once keep each client's session, order and bytes", async () => {
    const { listener } = await setup(io, ["a"]);
    const clients = await Promise.all([0, 1, 2].map(() => socketOn()));
    // Interleaved and back to back, so the listener reads them in batches that mix clients.
    for (let i = 0; i < 40; i++) for (const [k, c] of clients.entries()) c.socket.send(`c${k}-${i}`, listener.port, "127.0.0.1");
    await waitFor(() => clients.every((c) => c.received.length === 40), "every reply back");
    for (const [k, c] of clients.entries()) expect(c.received.map(String)).toEqual(Array.from({ length: 40 }, (_, i) => `a:c${k}-${i}`));
    expect(listener.sessionCount).toBe(3);
  });

  it("the largest IPv4 datagram (65,507 bytes) goes through whole, both ways", async () => {
    const mirror = await socketOn();
    mirror.socket.on("message", (msg, rinfo) => mirror.socket.send(msg, rinfo.port, rinfo.address));
    const { listener, setBackends } = await setup(io, []);
    setBackends([{ instanceId: "m", app: "a", host: "127.0.0.1", port: mirror.port, availableSince: undefined }]);
    const c = await socketOn();
    const big = Buffer.alloc(65_507, 7);
    big.write("first", 0);
    big.write("last", big.length - 4);
    c.socket.send(big, listener.port, "127.0.0.1");
    await waitFor(() => c.received.length === 1, "the datagram back");
    expect(c.received[0]!.equals(big)).toBe(true);
  });

  it("a backend named by a host name is reached at its IPv4 address", async () => {
    const { client, backends, setBackends } = await setup(io, ["a"]);
    setBackends([{ instanceId: "i0", app: "a", host: "localhost", port: backends[0]!.port, availableSince: undefined }]);
    expect((await (await client()).ask("named")).text).toBe("a:named");
  });
});

describe("udp listener - batched native sockets", () => {
  it("bind IPv4 addresses only: an IPv6 port is refused with the reason (the worker gives such ports node:dgram)", async () => {
    await expect(batchedIo(NATIVE).bind("::1", 0, { datagram: () => undefined, error: () => undefined }, 0)).rejects.toThrow(/IPv4 addresses only/);
  });
});

const sysctl = (name: string) => Number(readFileSync(`/proc/sys/net/core/${name}`, "utf8").trim());
const RMEM_MAX = sysctl("rmem_max");
const RMEM_DEFAULT = sysctl("rmem_default");
const BIG = 4 << 20;

describe.each(IOS)("udp listener ($name sockets) - receive buffer", (io) => {
  it("the port's socket gets the buffer asked for, capped at net.core.rmem_max; 0 leaves the system's default", async () => {
    // Linux reports twice what it granted (the rest is its bookkeeping).
    expect((await setup(io, ["a"], { receiveBufferBytes: 1 << 20 })).listener.receiveBufferBytes).toBe(2 * Math.min(1 << 20, RMEM_MAX));
    expect((await setup(io, ["a"], { receiveBufferBytes: 0 })).listener.receiveBufferBytes).toBe(RMEM_DEFAULT);
  });

  /** Sends `count` datagrams from one socket without letting the event loop run, then counts what the listener took once it could. */
  async function burst(receiveBufferBytes: number, count: number): Promise<number> {
    const { listener, counters } = await setup(io, ["a"], { receiveBufferBytes });
    const fd = NATIVE.socket(4);
    cleanup.push(() => NATIVE.close(fd));
    expect(NATIVE.connect(fd, "127.0.0.1", listener.port)).toBe(0);
    const datagram = Buffer.alloc(64, 1);
    // One first, so the session exists and the burst is forwarded as it is read.
    expect(NATIVE.sendBuffer(fd, datagram)).toBe(0);
    await waitFor(() => counters.udpToBackend === 1, "the first datagram forwarded");
    for (let i = 0; i < count; i++) expect(NATIVE.sendBuffer(fd, datagram)).toBe(0);
    // Settled: the count has not moved for 300 ms.
    let last = -1;
    await waitFor(async () => {
      const now = counters.udpToBackend;
      if (now === last) return true;
      last = now;
      await new Promise((r) => setTimeout(r, 300));
      return false;
    }, "the burst read", 20_000);
    return counters.udpToBackend - 1;
  }

  // Each 64-byte datagram costs the kernel ~1 KiB of buffer: 2,000 overflow the usual 208 KiB.
  it.skipIf(RMEM_MAX < BIG || RMEM_DEFAULT > 256 << 10)(
    "a burst that arrives while the worker is busy waits in a 4 MiB buffer: all 2,000 get through, where the system's default drops some",
    async () => {
      expect(await burst(BIG, 2_000)).toBe(2_000);
      expect(await burst(0, 2_000)).toBeLessThan(2_000);
    },
  );
});
