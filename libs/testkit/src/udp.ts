import dgram from "node:dgram";

export interface UdpEchoBackend {
  name: string;
  port: number;
  /** Datagrams received so far. */
  received: number;
  /** The source port of the last datagram: which socket of the proxy sent it. */
  lastPeerPort: number | undefined;
  close(): Promise<void>;
}

/** A UDP backend that answers each datagram with `<name>:<datagram>`. */
export async function startUdpEchoBackend(name: string, port = 0): Promise<UdpEchoBackend> {
  const socket = dgram.createSocket("udp4");
  const backend: UdpEchoBackend = { name, port: 0, received: 0, lastPeerPort: undefined, close: async () => undefined };
  socket.on("message", (msg, rinfo) => {
    backend.received++;
    backend.lastPeerPort = rinfo.port;
    socket.send(`${name}:${msg.toString()}`, rinfo.port, rinfo.address);
  });
  await new Promise<void>((resolve, reject) => {
    socket.once("error", reject);
    socket.bind(port, "127.0.0.1", () => resolve());
  });
  backend.port = socket.address().port;
  let closing: Promise<void> | undefined;
  backend.close = () => (closing ??= new Promise<void>((resolve) => socket.close(() => resolve())));
  return backend;
}

export interface UdpReply {
  text: string;
  /** Where the reply came from. */
  fromPort: number;
}

export interface UdpClient {
  /** Sends one datagram and waits for the next reply. */
  ask(text: string, timeoutMs?: number): Promise<UdpReply>;
  close(): void;
}

/** A UDP client with one local port, so all its datagrams form one session. */
export async function udpClient(port: number, host = "127.0.0.1"): Promise<UdpClient> {
  const socket = dgram.createSocket("udp4");
  await new Promise<void>((resolve) => socket.bind(0, "127.0.0.1", () => resolve()));
  const waiters: Array<(reply: UdpReply) => void> = [];
  socket.on("message", (msg, rinfo) => waiters.shift()?.({ text: msg.toString(), fromPort: rinfo.port }));
  return {
    ask: (text, timeoutMs = 1_000) =>
      new Promise<UdpReply>((resolve, reject) => {
        const timer = setTimeout(() => {
          const index = waiters.indexOf(done);
          if (index >= 0) waiters.splice(index, 1);
          reject(new Error(`no UDP reply from ${host}:${port} within ${timeoutMs} ms`));
        }, timeoutMs);
        const done = (reply: UdpReply) => {
          clearTimeout(timer);
          resolve(reply);
        };
        waiters.push(done);
        socket.send(text, port, host);
      }),
    close: () => socket.close(),
  };
}
