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
