import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { readdirSync, readlinkSync } from "node:fs";
import net from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { waitFor } from "@harbor/testkit";
import { nativeModule, type NativeModule } from "./native.js";
import { NativePairTable, nativePairs, nodePairs, type Pair, type PairCarrier } from "./pairs.js";

// Both carriers run every test; "native" throws here, failing the file, when the module is not built.
const native = nativeModule("native") as NativeModule;
// Three records per call into JavaScript (the worker's table takes 1,024): a turn with more is delivered in several.
const table = new NativePairTable(native, 3);
const CARRIERS: PairCarrier[] = [nativePairs(table), nodePairs];

/** Bytes the native module has spliced (through pipes, not copied), and its pipes in use; zeros for the Node carrier. */
const splicing = (carrier: PairCarrier) => {
  if (carrier.name !== "native") return { bytes: 0, inUse: 0 };
  const { open, spare, splicedBytes } = native.pipes();
  return { bytes: splicedBytes, inUse: open - spare };
};

const cleanup: Array<() => unknown> = [];
afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

async function listen(server: net.Server): Promise<number> {
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  cleanup.push(() => new Promise((resolve) => server.close(resolve)));
  return (server.address() as net.AddressInfo).port;
}

/**
 * A proxy as the worker builds one: accepted paused, upstream dialled, then
 * joined by `carrier`. Every pair's end is recorded, then `onEnd` runs.
 */
async function proxyTo(carrier: PairCarrier, backendPort: number, onEnd = () => {}) {
  const ended: Array<{ toBackend: number; toClient: number }> = [];
  const pairs: Pair[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (client) => {
    client.on("error", () => undefined);
    sockets.add(client);
    const upstream = net.connect({ host: "127.0.0.1", port: backendPort, allowHalfOpen: true });
    sockets.add(upstream);
    upstream.once("connect", () =>
      pairs.push(
        carrier.join(client, upstream, (toBackend, toClient) => {
          ended.push({ toBackend, toClient });
          onEnd();
        }),
      ),
    );
  });
  const port = await listen(server);
  // Before the server's close (cleanups run in reverse), which waits for its connections.
  cleanup.push(() => sockets.forEach((s) => s.destroy()));
  return { port, ended, pairs };
}

/** A backend that runs `onConnection` for each connection (half-open allowed). */
async function backend(onConnection: (socket: net.Socket) => void): Promise<number> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    sockets.add(socket);
    socket.on("error", () => undefined);
    onConnection(socket);
  });
  const port = await listen(server);
  cleanup.push(() => sockets.forEach((s) => s.destroy()));
  return port;
}

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: "127.0.0.1", port, allowHalfOpen: true }, () => resolve(socket));
    socket.once("error", reject);
    cleanup.push(() => socket.destroy());
  });
}

/** Everything a socket receives, and whether the other side finished (FIN or reset; half-open sockets stay open after a FIN). */
function collect(socket: net.Socket) {
  const state = { chunks: [] as Buffer[], ended: false, closed: false, bytes: 0, get finished() { return state.ended || state.closed; } };
  socket.on("data", (chunk: Buffer) => {
    state.chunks.push(chunk);
    state.bytes += chunk.length;
  });
  socket.on("end", () => (state.ended = true));
  socket.on("close", () => (state.closed = true));
  socket.on("error", () => undefined);
  return state;
}

const sha = (buffers: Buffer[]) => createHash("sha256").update(Buffer.concat(buffers)).digest("hex");

describe.each(CARRIERS)("proxied pairs ($name) - carrying bytes", (carrier) => {
  it("carries 8 MiB each way unchanged, and reports the bytes written to each side once, when both are closed", async () => {
    const port = await backend((s) => s.pipe(s));
    const proxy = await proxyTo(carrier, port);
    const client = await connect(proxy.port);
    const got = collect(client);
    const splicedBefore = splicing(carrier).bytes;
    const payload = Buffer.alloc(8 * 1024 * 1024);
    for (let i = 0; i < payload.length; i += 4) payload.writeUInt32LE(i, i);
    client.end(payload);
    await waitFor(() => got.finished, "the echo back and its end", 20_000);
    expect(got.bytes).toBe(payload.length);
    expect(sha(got.chunks)).toBe(sha([payload]));
    await waitFor(() => proxy.ended.length === 1, "the pair's end reported");
    expect(proxy.ended).toEqual([{ toBackend: payload.length, toClient: payload.length }]);
    if (carrier.name === "native") {
      // Bulk goes by splice: most of the 16 MiB never passed through the process. Its pipes are back.
      expect(splicing(carrier).bytes - splicedBefore).toBeGreaterThan(payload.length);
      expect(splicing(carrier).inUse).toBe(0);
    }
  });

  it("passes a half-close on: a client that has finished sending still gets the whole answer", async () => {
    const port = await backend((s) => {
      const received: Buffer[] = [];
      s.on("data", (c: Buffer) => received.push(c));
      s.on("end", () => s.end(`got ${Buffer.concat(received).toString()}; bye`));
    });
    const proxy = await proxyTo(carrier, port);
    const client = await connect(proxy.port);
    const got = collect(client);
    client.end("hello");
    await waitFor(() => got.ended, "the backend's answer and end");
    expect(Buffer.concat(got.chunks).toString()).toBe("got hello; bye");
  });

  it("holds a fast backend while the client does not read, and loses nothing (backpressure)", async () => {
    const size = 24 * 1024 * 1024;
    const blob = Buffer.alloc(size, 0x5a);
    blob.write("end", size - 3);
    const port = await backend((s) => s.end(blob));
    const proxy = await proxyTo(carrier, port);
    const client = await connect(proxy.port);
    const splicedBefore = splicing(carrier).bytes;
    client.pause();
    // Far more than the socket buffers hold: the carrier must queue and stop reading the backend.
    await new Promise((r) => setTimeout(r, 300));
    const got = collect(client);
    client.resume();
    await waitFor(() => got.ended, "the whole blob", 20_000);
    expect(got.bytes).toBe(size);
    expect(sha(got.chunks)).toBe(sha([blob]));
    // What the paused client refused waited in a pipe (native), and came out whole.
    if (carrier.name === "native") expect(splicing(carrier).bytes - splicedBefore).toBeGreaterThan(size / 2);
  });
});

describe.each(CARRIERS)("proxied pairs ($name) - ends", (carrier) => {
  it("a reset on the backend's side closes the client's, and the end is reported once", async () => {
    const port = await backend((s) => s.once("data", () => s.resetAndDestroy()));
    const proxy = await proxyTo(carrier, port);
    const client = await connect(proxy.port);
    const got = collect(client);
    client.write("anything");
    await waitFor(() => got.finished, "the client's side finished");
    await waitFor(() => proxy.ended.length === 1, "the pair's end reported");
    await new Promise((r) => setTimeout(r, 100));
    expect(proxy.ended).toHaveLength(1);
  });

  it("cut closes both sides at once (a drain's deadline), and the end is still reported once", async () => {
    let backendSide: ReturnType<typeof collect> | undefined;
    const port = await backend((s) => (backendSide = collect(s)));
    const proxy = await proxyTo(carrier, port);
    const client = await connect(proxy.port);
    const got = collect(client);
    client.write("x");
    await waitFor(() => proxy.pairs.length === 1 && (backendSide?.bytes ?? 0) === 1, "the pair carrying");
    proxy.pairs[0]!.cut();
    proxy.pairs[0]!.cut(); // a second cut before the end is reported changes nothing
    await waitFor(() => got.finished && backendSide!.finished, "both sides finished");
    await waitFor(() => proxy.ended.length === 1, "the pair's end reported");
    expect(proxy.ended[0]!.toBackend).toBe(1);
  });
});

describe.each(CARRIERS)("proxied pairs ($name) - edges", (carrier) => {
  it("a client's last bytes before it resets still reach the backend", async () => {
    let backendSide: ReturnType<typeof collect> | undefined;
    const port = await backend((s) => (backendSide = collect(s)));
    const proxy = await proxyTo(carrier, port);
    const client = await connect(proxy.port);
    await waitFor(() => proxy.pairs.length === 1, "the pair joined");
    // Written and reset in one turn: both reach the proxy's socket before it is read.
    client.write("last words");
    client.resetAndDestroy();
    await waitFor(() => Buffer.concat(backendSide?.chunks ?? []).toString() === "last words", "the last words at the backend");
    await waitFor(() => backendSide?.finished === true, "the backend told the client is gone");
    // The native carrier sees the reset itself and ends the pair. Node's sockets read it as an
    // EOF (a half-close, passed on) and learn of the reset only at their next write.
    if (carrier.name === "native") await waitFor(() => proxy.ended.length === 1, "the pair's end reported");
  });

  it("a process spawned while pairs are open holds none of their sockets (they close when the pair does)", async () => {
    /** Sockets a child of this process holds: any this process leaks across exec. */
    const socketsOfChild = async (): Promise<number> => {
      const child = spawn("sleep", ["5"], { stdio: "ignore" });
      cleanup.push(() => child.kill());
      await new Promise((resolve) => child.once("spawn", resolve));
      await new Promise((r) => setTimeout(r, 100)); // exec done
      const count = readdirSync(`/proc/${child.pid}/fd`).filter((fd) => {
        try {
          return readlinkSync(`/proc/${child.pid}/fd/${fd}`).startsWith("socket:");
        } catch {
          return false;
        }
      }).length;
      child.kill();
      return count;
    };
    const before = await socketsOfChild();
    const port = await backend(() => undefined);
    const proxy = await proxyTo(carrier, port);
    await connect(proxy.port);
    await waitFor(() => proxy.pairs.length === 1, "the pair joined");
    expect(await socketsOfChild()).toBe(before);
  });
});

describe("proxied pairs (native) - records", () => {
  const carrier = CARRIERS[0] as PairCarrier;

  it("ends of one turn, more than a call holds, each reach their own pair, also while a pair starts in their delivery", async () => {
    let received = 0;
    const port = await backend((s) => s.on("data", (chunk: Buffer) => (received += chunk.length)));
    // A client and upstream connected before the ends, joined by the first end's callback: the
    // new pair must not get the id of a pair whose end is still to be delivered.
    let lateClient: net.Socket | undefined;
    const lateEnded: number[] = [];
    const lateServer = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (c) => (lateClient = c));
    const latePort = await listen(lateServer);
    const lateOuter = await connect(latePort);
    const lateUpstream = await connect(port);
    await waitFor(() => lateClient !== undefined, "the late client accepted");
    let latePair: Pair | undefined;
    const proxy = await proxyTo(carrier, port, () => {
      latePair ??= carrier.join(lateClient as net.Socket, lateUpstream, (toBackend) => lateEnded.push(toBackend));
    });

    // Ten pairs, the i-th carrying i + 1 bytes to the backend; then all cut in one turn.
    for (let i = 0; i < 10; i++) (await connect(proxy.port)).write(Buffer.alloc(i + 1));
    await waitFor(() => proxy.pairs.length === 10 && received === 55, "ten pairs carrying");
    for (const pair of proxy.pairs) pair.cut();
    await waitFor(() => proxy.ended.length === 10, "every end reported");

    expect(proxy.ended.map((e) => e.toBackend).sort((a, b) => a - b)).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    // The late pair is open, and carries.
    expect(latePair).toBeDefined();
    lateOuter.write("z");
    await waitFor(() => received === 56, "the late pair's byte at the backend");
    expect(lateEnded).toEqual([]);
  });
});

describe("native pair module - bad input", () => {
  it("cut of an id that names no live pair, and a second or malformed pairEvents, throw a clear error and change nothing", async () => {
    expect(() => native.cut(-1)).toThrow(RangeError);
    expect(() => native.cut(1_000_000)).toThrow(/cut takes the id of a pair whose last record has not been delivered/);
    expect(() => native.pairEvents(new Float64Array(2), () => undefined)).toThrow(/Float64Array of at least 4 and a function/);
    expect(() => native.pairEvents(new Float64Array(8), () => undefined)).toThrow(/pairEvents was called already/);
    // The table this file made still carries: a pair joined after all of that ends and is reported.
    const port = await backend((s) => s.on("data", () => s.end()));
    const proxy = await proxyTo(CARRIERS[0] as PairCarrier, port);
    (await connect(proxy.port)).end("x");
    await waitFor(() => proxy.ended.length === 1, "the pair's end reported");
    expect(proxy.ended[0]!.toBackend).toBe(1);
  });
});
