import { spawn } from "node:child_process";
import dgram from "node:dgram";
import net from "node:net";

/**
 * A port free on 127.0.0.1 right now for TCP and for UDP alike (tests bind
 * UDP listeners and backends on it too, and the kernel's TCP pick says
 * nothing of UDP sockets on the same number).
 */
export async function freePort(): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = await new Promise<number>((resolve, reject) => {
      const server = net.createServer();
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => {
        const address = server.address() as net.AddressInfo;
        server.close(() => resolve(address.port));
      });
    });
    if (await isFreeForUdp(port)) return port;
  }
  throw new Error("no port free for both TCP and UDP found");
}

function isFreeForUdp(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = dgram.createSocket("udp4");
    socket.once("error", () => {
      socket.close();
      resolve(false);
    });
    socket.bind({ port, address: "127.0.0.1", exclusive: true }, () => socket.close(() => resolve(true)));
  });
}

/**
 * A block of `size` consecutive ports, all free for TCP and UDP on 127.0.0.1 now,
 * below the ephemeral range; for a harbor node's range in a test. Random, so
 * parallel test files do not pick the same block.
 */
export async function freePortBlock(size: number): Promise<{ min: number; max: number }> {
  for (let attempt = 0; attempt < 50; attempt++) {
    const min = 20_000 + Math.floor(Math.random() * ((32_000 - 20_000 - size) / size)) * size;
    const ports = Array.from({ length: size }, (_, i) => min + i);
    const free = await Promise.all(ports.map(async (p) => (await isFree(p)) && (await isFreeForUdp(p))));
    if (free.every(Boolean)) return { min, max: min + size - 1 };
  }
  throw new Error(`no block of ${size} free ports found`);
}

function isFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once("error", () => resolve(false));
    server.listen({ port, host: "127.0.0.1", exclusive: true }, () => server.close(() => resolve(true)));
  });
}

export interface EchoBackend {
  name: string;
  port: number;
  /** Connections accepted so far. */
  accepted: number;
  /** Connections open now. */
  readonly open: number;
  close(): Promise<void>;
}

/**
 * A TCP backend that greets each connection with `<name>\n` and then echoes
 * what it receives: the greeting tells a test which backend it reached.
 */
export async function startEchoBackend(name: string, port = 0): Promise<EchoBackend> {
  const sockets = new Set<net.Socket>();
  const backend: EchoBackend = {
    name,
    port: 0,
    accepted: 0,
    get open() {
      return sockets.size;
    },
    close: async () => undefined,
  };
  const server = net.createServer({ allowHalfOpen: true }, (socket) => {
    backend.accepted++;
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => undefined);
    socket.write(`${name}\n`);
    socket.pipe(socket);
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(port, "127.0.0.1", () => resolve());
  });
  backend.port = (server.address() as net.AddressInfo).port;
  backend.close = () =>
    new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    });
  return backend;
}

export interface LineClient {
  socket: net.Socket;
  /** The next line received (without the newline). */
  nextLine(timeoutMs?: number): Promise<string>;
  /** Sends a line and waits for it to come back. */
  roundTrip(line: string, timeoutMs?: number): Promise<string>;
  close(): void;
  /** Resolves when the peer closes the connection. */
  closed: Promise<void>;
}

/** A line-oriented TCP client for talking to echo backends through a proxy. */
export function connectLines(port: number, host = "127.0.0.1"): Promise<LineClient> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ port, host });
    let buffer = "";
    const lines: string[] = [];
    const waiters: Array<(line: string) => void> = [];
    const closed = new Promise<void>((r) => socket.once("close", () => r()));
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      buffer += chunk;
      let index: number;
      while ((index = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, index);
        buffer = buffer.slice(index + 1);
        const waiter = waiters.shift();
        if (waiter) waiter(line);
        else lines.push(line);
      }
    });
    socket.once("error", reject);
    const nextLine = (timeoutMs = 5_000) =>
      new Promise<string>((res, rej) => {
        const queued = lines.shift();
        if (queued !== undefined) return res(queued);
        const timer = setTimeout(() => rej(new Error(`no line from port ${port} within ${timeoutMs} ms`)), timeoutMs);
        waiters.push((line) => {
          clearTimeout(timer);
          res(line);
        });
        void closed.then(() => {
          clearTimeout(timer);
          rej(new Error(`port ${port} closed the connection`));
        });
      });
    socket.once("connect", () =>
      resolve({
        socket,
        nextLine,
        roundTrip: (line, timeoutMs) => {
          socket.write(`${line}\n`);
          return nextLine(timeoutMs);
        },
        close: () => socket.destroy(),
        closed,
      }),
    );
  });
}

/** A port on 127.0.0.1 whose connects get no answer (a black-holed host), until `close`. */
export interface SilentPort {
  port: number;
  close(): void;
}

/**
 * The kernel drops a SYN when the listener's accept queue is full: a
 * listener with a backlog of one, in a stopped process that never accepts,
 * filled by two held connections, leaves every further connect waiting.
 */
export async function startSilentPort(): Promise<SilentPort> {
  const child = spawn(
    process.execPath,
    ["-e", "require('net').createServer().listen({ port: 0, host: '127.0.0.1', backlog: 1 }, function () { console.log(this.address().port); process.kill(process.pid, 'SIGSTOP'); })"],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  const port = await new Promise<number>((resolve, reject) => {
    child.stdout.once("data", (d: Buffer) => resolve(Number(String(d).trim())));
    child.once("exit", (code) => reject(new Error(`silent port process exited ${code}`)));
  });
  const held: net.Socket[] = [];
  let silent = false;
  // Connects until one hangs: the queue is full from there on.
  for (let i = 0; i < 8 && !silent; i++) {
    const socket = net.connect({ port, host: "127.0.0.1" });
    socket.on("error", () => undefined);
    held.push(socket);
    const answered = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 300);
      socket.once("connect", () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    silent = !answered;
  }
  if (!silent) {
    for (const socket of held) socket.destroy();
    child.kill("SIGKILL");
    throw new Error(`port ${port} kept answering: its listener's queue never filled`);
  }
  return {
    port,
    close() {
      for (const socket of held) socket.destroy();
      child.kill("SIGKILL");
    },
  };
}
