import { spawn, type ChildProcess } from "node:child_process";
import { existsSync } from "node:fs";
import net from "node:net";
import { freePort } from "./net.js";

export interface NatsServer {
  url: string;
  port: number;
  /** Stops the server (SIGTERM) and waits for it to exit. */
  stop(): Promise<void>;
  /** Starts it again on the same port. */
  start(): Promise<void>;
}

function binary(): string {
  for (const candidate of [process.env.NATS_SERVER_BIN, "/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]) {
    if (candidate && existsSync(candidate)) return candidate;
  }
  throw new Error("nats-server not found (set NATS_SERVER_BIN); the fault tests stop and start a NATS of their own");
}

/** A private nats-server on a free port, for tests that stop NATS without disturbing the machine's. */
export async function startNatsServer(options: { token?: string } = {}): Promise<NatsServer> {
  const port = await freePort();
  const bin = binary();
  let child: ChildProcess | undefined;
  const server: NatsServer = {
    url: `nats://127.0.0.1:${port}`,
    port,
    async start() {
      child = spawn(bin, ["-a", "127.0.0.1", "-p", String(port), ...(options.token ? ["--auth", options.token] : [])], { stdio: "ignore" });
      const until = Date.now() + 10_000;
      while (!(await accepts(port))) {
        if (Date.now() > until) throw new Error(`nats-server did not listen on ${port}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    },
    async stop() {
      const running = child;
      child = undefined;
      if (!running || running.exitCode !== null) return;
      const exited = new Promise((r) => running.once("exit", r));
      running.kill("SIGTERM");
      await exited;
    },
  };
  await server.start();
  return server;
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.once("connect", () => {
      socket.destroy();
      resolve(true);
    });
    socket.once("error", () => resolve(false));
  });
}

export interface NatsLink {
  /** nats://127.0.0.1:<port>: connect here to reach NATS through the link. */
  url: string;
  /** NATS down: every connection closed, new ones refused. */
  cut(): void;
  /**
   * NATS hung, or a network that drops packets: connections stay open and
   * nothing passes; what clients send is held, as TCP's retransmissions hold it.
   */
  stall(): void;
  /** The network came back before the client gave up: what was held passes on, and all after it. */
  heal(): void;
  /** New connections pass again; what a stall held is dropped. */
  restore(): void;
  close(): Promise<void>;
}

/**
 * A TCP link in front of a NATS (the machine's by default) that a test can
 * break without stopping that NATS, which other tests use.
 */
export async function startNatsLink(target = { host: "127.0.0.1", port: 4222 }): Promise<NatsLink> {
  type Pair = { client: net.Socket; upstream: net.Socket; held: Buffer[] };
  const pairs = new Set<Pair>();
  let mode: "forward" | "refuse" | "stall" = "forward";
  const server = net.createServer((client) => {
    client.on("error", () => undefined);
    if (mode !== "forward") {
      client.destroy();
      return;
    }
    const upstream = net.connect(target.port, target.host);
    upstream.on("error", () => undefined);
    const pair: Pair = { client, upstream, held: [] };
    pairs.add(pair);
    client.on("data", (chunk: Buffer) => (mode === "stall" ? pair.held.push(chunk) : upstream.write(chunk)));
    upstream.on("data", (chunk: Buffer) => mode !== "stall" && client.write(chunk));
    const done = () => {
      client.destroy();
      upstream.destroy();
      pairs.delete(pair);
    };
    client.on("close", done);
    upstream.on("close", done);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const destroyAll = () => {
    for (const { client, upstream } of pairs) {
      client.destroy();
      upstream.destroy();
    }
    pairs.clear();
  };
  return {
    url: `nats://127.0.0.1:${(server.address() as net.AddressInfo).port}`,
    cut() {
      mode = "refuse";
      destroyAll();
    },
    stall() {
      mode = "stall";
    },
    heal() {
      mode = "forward";
      for (const pair of pairs) for (const chunk of pair.held.splice(0)) pair.upstream.write(chunk);
    },
    restore() {
      mode = "forward";
      for (const pair of pairs) pair.held.length = 0;
    },
    close() {
      mode = "refuse";
      destroyAll();
      return new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
