import net from "node:net";
import { createHash } from "node:crypto";
import { afterEach, describe, expect, it } from "vitest";
import { spliceSockets } from "./splice.js";

/** A proxy on loopback that splices each client to `backendPort`; counts pairs closed. */
async function proxyTo(backendPort: number) {
  const state = { closed: 0 };
  const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => {
    const upstream = net.connect({ port: backendPort, host: "127.0.0.1", allowHalfOpen: true }, () => {
      spliceSockets(client, upstream, () => state.closed++);
      client.resume();
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { port: (server.address() as net.AddressInfo).port, state, server };
}

async function listen(handler: (s: net.Socket) => void) {
  const server = net.createServer({ allowHalfOpen: true }, handler);
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { port: (server.address() as net.AddressInfo).port, server };
}

const servers: net.Server[] = [];
afterEach(() => {
  for (const s of servers.splice(0)) s.close();
});

describe("spliceSockets", () => {
  it("passes a half-close on: a client that ends its side still gets the whole answer", async () => {
    // The backend answers only after the client's FIN: the digest of all it received.
    const backend = await listen((s) => {
      const hash = createHash("sha256");
      s.on("data", (d) => hash.update(d));
      s.on("end", () => s.end(hash.digest("hex")));
    });
    const proxy = await proxyTo(backend.port);
    servers.push(backend.server, proxy.server);
    const payload = Buffer.alloc(8 << 20, 7); // more than any socket buffer: backpressure both ways
    const client = net.connect({ port: proxy.port, host: "127.0.0.1", allowHalfOpen: true });
    let answer = "";
    client.on("data", (d) => (answer += d));
    const ended = new Promise((r) => client.on("end", r));
    client.end(payload);
    await ended;
    expect(answer).toBe(createHash("sha256").update(payload).digest("hex"));
    client.destroy();
    await expect.poll(() => proxy.state.closed).toBe(1);
  });

  it("carries bulk data intact toward the client through backpressure", async () => {
    const size = 16 << 20;
    const backend = await listen((s) => {
      const chunk = Buffer.alloc(64 << 10, 1);
      let sent = 0;
      const pump = () => {
        while (sent < size) {
          sent += chunk.length;
          if (!s.write(chunk)) return void s.once("drain", pump);
        }
        s.end();
      };
      pump();
    });
    const proxy = await proxyTo(backend.port);
    servers.push(backend.server, proxy.server);
    const client = net.connect({ port: proxy.port, host: "127.0.0.1" });
    client.pause(); // a slow reader at first
    let received = 0;
    setTimeout(() => client.on("data", (d: Buffer) => (received += d.length)).resume(), 200);
    await new Promise((r) => client.on("end", r));
    expect(received).toBe(size);
  });

  it("a reset on one side tears down the other, and onClosed runs once", async () => {
    let backendSide: net.Socket | undefined;
    const backend = await listen((s) => (backendSide = s));
    const proxy = await proxyTo(backend.port);
    servers.push(backend.server, proxy.server);
    const client = net.connect({ port: proxy.port, host: "127.0.0.1" });
    await expect.poll(() => backendSide !== undefined).toBe(true);
    const clientClosed = new Promise((r) => client.on("close", r));
    client.on("error", () => undefined);
    backendSide!.resetAndDestroy();
    await clientClosed;
    await expect.poll(() => proxy.state.closed).toBe(1);
    await new Promise((r) => setTimeout(r, 50));
    expect(proxy.state.closed).toBe(1);
  });
});
