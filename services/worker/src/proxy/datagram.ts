import dgram from "node:dgram";
import { isIPv6 } from "node:net";

/**
 * The sockets of a UDP port, behind one interface so that the port's logic
 * (sessions, FIFO, ejections) is written once: `node:dgram`, or batched
 * native I/O (`batched.ts`). A payload is opaque to the port's logic: valid
 * only inside the handler that was given it, unless `hold` copied it.
 */
export type Payload = Buffer | number;

/** Identifies a client by address and port: equal for equal clients, cheap to compare. */
export type Source = string | number;

export interface PortHandlers {
  datagram(payload: Payload, source: Source): void;
  error(err: Error): void;
}

export interface UpstreamHandlers {
  /** `count` replies from the backend, to pass whole to `PortSocket.reply`. */
  replies(batch: Payload, count: number): void;
  /** ECONNREFUSED is the backend's "port unreachable"; anything else ends the session. */
  error(err: NodeJS.ErrnoException): void;
}

/** A session's connected socket to its backend. */
export interface Upstream {
  send(payload: Payload): void;
  close(): void;
}

export interface PortSocket {
  /** The port's receive buffer as the kernel reports it (on Linux twice what it granted). */
  readonly receiveBufferBytes: number;
  /** Where a client is; asked when its session opens, not per datagram. */
  describe(source: Source): { address: string; port: number };
  /** Sends a backend's replies back to the client, from the port's own address. */
  reply(batch: Payload, source: Source, address: string, port: number): void;
  /** A socket connected to the backend; `connected` may run before this returns. */
  connect(host: string, port: number, handlers: UpstreamHandlers, connected: (err?: Error) => void): Upstream;
  /** A copy of a payload that outlives its handler (held while a session connects). */
  hold(payload: Payload): Buffer;
  close(): Promise<void>;
}

export interface DatagramIo {
  readonly name: "native" | "dgram";
  /**
   * Binds the port, asking for a receive buffer of `receiveBufferBytes` (0:
   * the system's default); rejects when it cannot (taken, bad address).
   */
  bind(host: string, port: number, handlers: PortHandlers, receiveBufferBytes: number): Promise<PortSocket>;
}

/** `node:dgram`: every platform, every address family; a JavaScript call per datagram each way. */
export const dgramIo: DatagramIo = {
  name: "dgram",
  async bind(host, port, handlers, receiveBufferBytes) {
    const socket = dgram.createSocket({ type: isIPv6(host) ? "udp6" : "udp4" });
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once("error", reject);
        socket.bind({ address: host, port, exclusive: true }, () => {
          socket.removeListener("error", reject);
          resolve();
        });
      });
      if (receiveBufferBytes > 0) socket.setRecvBufferSize(receiveBufferBytes);
    } catch (err) {
      socket.close();
      throw err;
    }
    socket.on("error", (err) => handlers.error(err));
    socket.on("message", (msg, rinfo) => handlers.datagram(msg, `${rinfo.address}|${rinfo.port}`));
    return new DgramPort(socket);
  },
};

class DgramPort implements PortSocket {
  constructor(private readonly socket: dgram.Socket) {}

  get receiveBufferBytes(): number {
    return this.socket.getRecvBufferSize();
  }

  describe(source: Source): { address: string; port: number } {
    const key = source as string;
    const bar = key.lastIndexOf("|");
    return { address: key.slice(0, bar), port: Number(key.slice(bar + 1)) };
  }

  reply(batch: Payload, _source: Source, address: string, port: number): void {
    this.socket.send(batch as Buffer, port, address);
  }

  connect(host: string, port: number, handlers: UpstreamHandlers, connected: (err?: Error) => void): Upstream {
    const upstream = dgram.createSocket({ type: isIPv6(host) ? "udp6" : "udp4" });
    // A connected socket: the kernel only passes replies from the backend.
    // A failed connect (e.g. a name that does not resolve) comes to the callback, not as "error".
    upstream.connect(port, host, connected);
    upstream.on("message", (reply) => handlers.replies(reply, 1));
    upstream.on("error", (err) => handlers.error(err));
    return {
      send: (payload) => upstream.send(payload as Buffer),
      close: () => {
        try {
          upstream.close();
        } catch {
          // already closed
        }
      },
    };
  }

  hold(payload: Payload): Buffer {
    return payload as Buffer;
  }

  close(): Promise<void> {
    return new Promise<void>((resolve) => this.socket.close(() => resolve()));
  }
}
