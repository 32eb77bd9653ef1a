import { execFileSync, spawn } from "node:child_process";
import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import type { Backend } from "@harbor/proto";
import { createLogger } from "@harbor/runtime";
import { connectLines, freePort, startEchoBackend, startSilentPort, waitFor, type EchoBackend } from "@harbor/testkit";
import { DataPlaneCounters } from "../metrics.js";
import { nativeModule, type NativeModule } from "./native.js";
import type { RelayPool } from "./relays.js";
import { TcpListener, type TcpListenerOptions } from "./tcp.js";

const logger = createLogger("test", "silent");
/**
 * Both data paths run every test: the native module accepting, dialling and
 * carrying (with relays it carries only the pairs Node's sockets made), and
 * Node's sockets doing all of it. "native" throws here, failing the file,
 * when the module is not built.
 */
const PATHS: Array<{ name: string; native: NativeModule | undefined }> = [
  { name: "native", native: nativeModule("native") },
  { name: "node", native: undefined },
];
const cleanup: Array<() => unknown> = [];

afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

/** A listening TcpListener on 127.0.0.1 over backends on 127.0.0.1 at `ports`, closed after the test. */
async function listenerOver(native: NativeModule | undefined, ports: number[], options: Partial<TcpListenerOptions> = {}, backendHost = "127.0.0.1") {
  const set: Backend[] = ports.map((port, i) => ({ instanceId: `i${i}`, app: "a", host: backendHost, port, availableSince: undefined }));
  const counters = new DataPlaneCounters();
  const listener = new TcpListener({
    serviceId: "s",
    host: "127.0.0.1",
    port: await freePort(),
    backends: () => set,
    connectTimeoutMs: 1_000,
    maxConnections: 100,
    passiveEjectMs: 5_000,
    counters,
    logger,
    native,
    ...options,
  });
  expect(await listener.listen()).toBe(true);
  cleanup.push(() => listener.close());
  return { listener, counters };
}

/** A client's first line through `port` (the backend's greeting); the client is closed after the test. */
async function greeting(port: number): Promise<string> {
  const client = await connectLines(port);
  cleanup.push(() => client.close());
  return client.nextLine();
}

/**
 * A pool whose relays are all restarting: it takes no connection. (Real
 * relays are forked from the built relay-main.js; the e2e-relays ring runs them.)
 */
function unavailableRelays(): RelayPool & { offered: number } {
  const pool = {
    offered: 0,
    register: () => 1,
    unregister: () => undefined,
    dispatch: () => {
      pool.offered++;
      return false;
    },
  };
  return pool as unknown as RelayPool & { offered: number };
}

describe.each(PATHS)("tcp listener ($name) - no relay can take a connection", ({ native }) => {
  it("the worker carries it itself, in the same exact turns", async () => {
    const backends: EchoBackend[] = [];
    for (const name of ["t0", "t1", "t2"]) {
      const b = await startEchoBackend(name);
      backends.push(b);
      cleanup.push(() => b.close());
    }
    const relays = unavailableRelays();
    const { listener, counters } = await listenerOver(native, backends.map((b) => b.port), { relays });

    const reached: Record<string, number> = {};
    for (let i = 0; i < 9; i++) {
      const client = await connectLines(listener.port);
      const name = await client.nextLine();
      reached[name] = (reached[name] ?? 0) + 1;
      expect(await client.roundTrip(`hello ${i}`)).toBe(`hello ${i}`);
      client.close();
    }
    expect(reached).toEqual({ t0: 3, t1: 3, t2: 3 });
    expect(relays.offered).toBe(9);
    expect(counters.tcpProxied).toBe(9);
    await waitFor(() => listener.connections === 0, "every connection closed");
  });
});

describe.each(PATHS)("tcp listener ($name) - a backend that never answers", ({ native }) => {
  it("is given up at the connect timeout: the next backend carries the connection, and the silent one is passed over after", async () => {
    const silent = await startSilentPort();
    cleanup.push(() => silent.close());
    const answering = await startEchoBackend("t1");
    cleanup.push(() => answering.close());
    const { listener, counters } = await listenerOver(native, [silent.port, answering.port], { connectTimeoutMs: 300, passiveEjectMs: 60_000 });

    for (let i = 0; i < 3; i++) {
      expect(await greeting(listener.port)).toBe("t1");
    }
    // Only the first connection waited for the silent backend; it was ejected then.
    expect(counters.tcpBackendFailures).toBe(1);
    expect(counters.tcpProxied).toBe(3);
  });
});

describe.each(PATHS)("tcp listener ($name) - peers that vanish", ({ native }) => {
  it("both sockets of a proxied pair have TCP keep-alive on, so a dead peer is found and its pair closed", async () => {
    const b = await startEchoBackend("k0");
    cleanup.push(() => b.close());
    const { listener } = await listenerOver(native, [b.port]);
    const client = await connectLines(listener.port);
    cleanup.push(() => client.close());
    expect(await client.nextLine()).toBe("k0");
    // ss shows a keep-alive timer on a socket that has SO_KEEPALIVE: the worker's accepted socket
    // (local port = the listener's) and its upstream socket (remote port = the backend's).
    const timers = (filter: string) => execFileSync("ss", ["-tnoH", "state", "established", filter]).toString();
    expect(timers(`( sport = :${listener.port} )`)).toMatch(/timer:\(keepalive,/);
    expect(timers(`( dport = :${b.port} )`)).toMatch(/timer:\(keepalive,/);
  });
});

/** Two echo backends t0 and t1, closed after the test. */
async function twoBackends(): Promise<EchoBackend[]> {
  const backends: EchoBackend[] = [];
  for (const name of ["t0", "t1"]) {
    const b = await startEchoBackend(name);
    backends.push(b);
    cleanup.push(() => b.close());
  }
  return backends;
}

describe.each(PATHS)("tcp listener ($name) - choosing and refusing", ({ native }) => {
  it("passes over a backend that refuses, and takes it out of rotation", async () => {
    const [good] = await twoBackends();
    const refusing = await freePort();
    const { listener, counters } = await listenerOver(native, [refusing, (good as EchoBackend).port], { passiveEjectMs: 60_000 });
    for (let i = 0; i < 4; i++) {
      const client = await connectLines(listener.port);
      expect(await client.nextLine()).toBe("t0");
      client.close();
    }
    expect(counters.tcpBackendFailures).toBe(1);
    expect(counters.tcpProxied).toBe(4);
    expect(listener.ejections.isEjected(`127.0.0.1:${refusing}`)).toBe(true);
  });

  it("closes the client when every backend refuses, and when there is none", async () => {
    const { listener, counters } = await listenerOver(native, [await freePort(), await freePort()]);
    const client = await connectLines(listener.port);
    await client.closed;
    expect(counters.tcpAllBackendsFailed).toBe(1);
    expect(counters.tcpBackendFailures).toBe(2);

    const empty = await listenerOver(native, []);
    const other = await connectLines(empty.listener.port);
    await other.closed;
    expect(empty.counters.tcpNoBackend).toBe(1);
    await waitFor(() => listener.connections === 0 && empty.listener.connections === 0, "nothing left open");
  });

  it("closes a client beyond the port's connection limit at once, and keeps the ones it took", async () => {
    const [b] = await twoBackends();
    const { listener, counters } = await listenerOver(native, [(b as EchoBackend).port], { maxConnections: 2 });
    const kept = [await connectLines(listener.port), await connectLines(listener.port)];
    for (const c of kept) {
      cleanup.push(() => c.close());
      expect(await c.nextLine()).toBe("t0");
    }
    const beyond = await connectLines(listener.port);
    await beyond.closed;
    expect(counters.tcpOverLimit).toBe(1);
    expect(await (kept[0] as Awaited<ReturnType<typeof connectLines>>).roundTrip("still here")).toBe("still here");
  });

  it("reaches a backend given by host name", async () => {
    const [b] = await twoBackends();
    const { listener } = await listenerOver(native, [(b as EchoBackend).port], {}, "localhost");
    const client = await connectLines(listener.port);
    cleanup.push(() => client.close());
    expect(await client.nextLine()).toBe("t0");
    expect(await client.roundTrip("by name")).toBe("by name");
  });

  it("dials a host name's addresses in turn: one that refuses is passed over, and the backend stays in rotation", async () => {
    const [b] = await twoBackends();
    // The backend listens on 127.0.0.1 only: its name's first address, 127.0.0.2, refuses.
    // (The resolver is given here; Node's own sockets resolve, and try each address, themselves.)
    const resolve: TcpListenerOptions["resolve"] = (_host, done) => done(null, [{ address: "127.0.0.2", family: 4 }, { address: "127.0.0.1", family: 4 }]);
    const { listener, counters } = await listenerOver(native, [(b as EchoBackend).port], { resolve }, native ? "backend.example" : "localhost");
    for (let i = 0; i < 2; i++) {
      expect(await greeting(listener.port)).toBe("t0");
    }
    expect(counters.tcpProxied).toBe(2);
    expect(counters.tcpBackendFailures).toBe(0);
    expect(listener.ejections.isEjected(`backend.example:${(b as EchoBackend).port}`)).toBe(false);
  });

  it("passes a half-close through both ways, and counts the bytes each way once the pair ends", async () => {
    const [b] = await twoBackends();
    const { listener, counters } = await listenerOver(native, [(b as EchoBackend).port]);
    const socket = net.connect({ port: listener.port, host: "127.0.0.1", allowHalfOpen: true });
    const received: Buffer[] = [];
    socket.on("data", (chunk: Buffer) => received.push(chunk));
    const ended = new Promise<void>((resolve) => socket.once("end", () => resolve()));
    await new Promise((resolve) => socket.once("connect", resolve));
    socket.end("last words\n");
    // The echo backend pipes to itself: our FIN reaches it, it ends its side, and that FIN comes back.
    await ended;
    expect(Buffer.concat(received).toString()).toBe("t0\nlast words\n");
    socket.destroy();
    await waitFor(() => listener.connections === 0, "the pair ended");
    expect(counters.tcpBytesToBackend).toBe("last words\n".length);
    expect(counters.tcpBytesToClient).toBe("t0\nlast words\n".length);
  });

  it("drain cuts the connections still open at its deadline", async () => {
    const [b] = await twoBackends();
    const { listener } = await listenerOver(native, [(b as EchoBackend).port]);
    const client = await connectLines(listener.port);
    expect(await client.nextLine()).toBe("t0");
    await listener.close();
    await listener.drain(100);
    await client.closed;
    await waitFor(() => listener.connections === 0 && (b as EchoBackend).open === 0, "both sides closed");
  });

  it("listens on an IPv6 address, backends on IPv4 behind it", async () => {
    const [b] = await twoBackends();
    const { listener } = await listenerOver(native, [(b as EchoBackend).port], { host: "::1" });
    const client = await connectLines(listener.port, "::1");
    cleanup.push(() => client.close());
    expect(await client.nextLine()).toBe("t0");
    expect(await client.roundTrip("over v6")).toBe("over v6");
  });

  it("records a port another socket holds as a failed bind, and frees its port at close", async () => {
    const holder = net.createServer();
    await new Promise<void>((resolve) => holder.listen(0, "127.0.0.1", resolve));
    const port = (holder.address() as net.AddressInfo).port;
    const listener = new TcpListener({ serviceId: "s", host: "127.0.0.1", port, backends: () => [], connectTimeoutMs: 1_000, maxConnections: 10, passiveEjectMs: 1_000, counters: new DataPlaneCounters(), logger, native });
    expect(await listener.listen()).toBe(false);
    // The same words either way, as the port's bind_failed event and blocked range carry them.
    expect(listener.error).toBe(`listen EADDRINUSE: address already in use 127.0.0.1:${port}`);
    await new Promise((resolve) => holder.close(resolve));
    expect(await listener.listen()).toBe(true);
    await listener.close();
    // Freed: the port can be bound again at once.
    await new Promise<void>((resolve, reject) => holder.once("error", reject).listen(port, "127.0.0.1", resolve));
    await new Promise((resolve) => holder.close(resolve));
  });
});

// Node's sockets resolve names themselves (every address, a short try each: autoSelectFamily); the native path is given a resolver here.
describe("tcp listener (native) - host names", () => {
  it.each([
    ["does not resolve", new Error("getaddrinfo ENOTFOUND backend.example")],
    ["resolves to no address", null],
  ])("a name that %s fails its backend over: the client is closed, the failure counted", async (_what, error) => {
    const resolve: TcpListenerOptions["resolve"] = (_host, done) => done(error, []);
    const port = await freePort();
    const { listener, counters } = await listenerOver(nativeModule("native"), [port], { resolve }, "backend.example");
    const client = await connectLines(listener.port);
    await client.closed;
    expect(counters.tcpBackendFailures).toBe(1);
    expect(counters.tcpAllBackendsFailed).toBe(1);
    expect(listener.ejections.isEjected(`backend.example:${port}`)).toBe(true);
  });

  it("gives each of a host name's addresses but the last a short try: one that never answers is passed over", async () => {
    // 127.0.0.1:<port> takes no connection (a full accept queue); 127.0.0.2:<port> greets and echoes.
    const silent = await startSilentPort();
    cleanup.push(() => silent.close());
    const other = net.createServer((socket) => {
      socket.on("error", () => undefined);
      socket.write("t0\n");
      socket.pipe(socket);
    });
    await new Promise<void>((resolve) => other.listen(silent.port, "127.0.0.2", resolve));
    cleanup.push(() => new Promise((resolve) => other.close(resolve)));
    const resolve: TcpListenerOptions["resolve"] = (_host, done) => done(null, [{ address: "127.0.0.1", family: 4 }, { address: "127.0.0.2", family: 4 }]);
    const { listener, counters } = await listenerOver(nativeModule("native"), [silent.port], { resolve, connectTimeoutMs: 3_000 }, "backend.example");
    expect(await greeting(listener.port)).toBe("t0");
    expect(counters.tcpBackendFailures).toBe(0);
    expect(counters.tcpProxied).toBe(1);
  });
});

describe("tcp listener (native) - connect timeouts", () => {
  it("times each dial out at its own deadline: a short one set after a long one is not held up by it", async () => {
    const silent = await startSilentPort();
    cleanup.push(() => silent.close());
    const answering = await startEchoBackend("t1");
    cleanup.push(() => answering.close());
    // A dial of a minute, still waiting while the next port's dials of 300 ms run out.
    const slow = await listenerOver(nativeModule("native"), [silent.port], { connectTimeoutMs: 60_000 });
    const waiting = await connectLines(slow.listener.port);
    cleanup.push(() => waiting.close());
    await waitFor(() => slow.listener.connections === 1, "the minute-long dial started");
    const { listener, counters } = await listenerOver(nativeModule("native"), [silent.port, answering.port], { connectTimeoutMs: 300 });
    expect(await greeting(listener.port)).toBe("t1");
    expect(counters.tcpBackendFailures).toBe(1);
    expect(slow.counters.tcpBackendFailures).toBe(0);
    expect(slow.listener.connections).toBe(1);
  });
});

/** A client that connects, waits for a line on stdin, then sends "abc", an urgent "X" and "def" (and its FIN when asked). */
const URGENT_CLIENT = `
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
sys.stdin.readline()
s.send(b"abc"); s.send(b"X", socket.MSG_OOB); s.send(b"def")
if sys.argv[2] == "fin": s.shutdown(socket.SHUT_WR)
sys.stdin.readline()
`;

describe.each(PATHS)("tcp listener ($name) - urgent data", ({ native }) => {
  // Node has no MSG_OOB: the client is python3, which building the native module needs anyway.
  it.each(["open", "fin"])("carries the bytes after an urgent mark (client then: %s); the urgent byte itself is out of band and dropped", async (then) => {
    let received = "";
    let ended = false;
    const accepted: net.Socket[] = [];
    const backend = net.createServer({ allowHalfOpen: true }, (socket) => {
      accepted.push(socket);
      socket.on("data", (chunk: Buffer) => (received += chunk.toString()));
      socket.on("end", () => (ended = true));
      socket.on("error", () => undefined);
    });
    await new Promise<void>((resolve) => backend.listen(0, "127.0.0.1", resolve));
    cleanup.push(() => new Promise((resolve) => backend.close(resolve)));
    // The backend half-closes nothing itself: its side is ended here, or the pair (and close()) would wait for it.
    cleanup.push(() => accepted.forEach((socket) => socket.destroy()));
    const { listener } = await listenerOver(native, [(backend.address() as net.AddressInfo).port]);
    const client = spawn("python3", ["-c", URGENT_CLIENT, String(listener.port), then], { stdio: ["pipe", "ignore", "inherit"] });
    cleanup.push(() => client.kill());
    await waitFor(() => accepted.length === 1, "the pair connected");
    client.stdin.write("go\n");
    // Held here while the client sends, so that one read meets the urgent mark with "def" queued behind it.
    Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 300);
    await waitFor(() => received === "abcdef" && (then === "open" || ended), `"abcdef"${then === "fin" ? " and the client's FIN" : ""} at the backend (got ${JSON.stringify(received)})`, 3_000);
    if (then === "open") expect(ended).toBe(false);
  });
});
