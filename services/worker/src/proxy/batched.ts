import { lookup } from "node:dns/promises";
import { isIP, isIPv4 } from "node:net";
import { constants } from "node:os";
import type { DatagramIo, Payload, PortHandlers, PortSocket, Source, Upstream, UpstreamHandlers } from "./datagram.js";
import { errnoError as errno, type NativeModule } from "./native.js";

/** What the module returns for "would block": nothing more to read, or no room to send. */
const EAGAIN = -constants.errno.EAGAIN;

/** Batches read per readable event before the event loop gets a turn (other ports, timers). */
const BATCHES_PER_TURN = 4;

/** An IPv4 client as one number: address × 65536 + port. */
const sourceOf = (ipv4: number, port: number): number => (ipv4 >>> 0) * 65_536 + port;

function dotted(ipv4: number): string {
  return `${ipv4 >>> 24}.${(ipv4 >>> 16) & 255}.${(ipv4 >>> 8) & 255}.${ipv4 & 255}`;
}

/**
 * Batched native I/O: one recvmmsg per up to BATCH datagrams, one sendmmsg
 * per run of them to the same place. IPv4 ports only (a client's address
 * and port fit one number); backends of either family.
 */
export function batchedIo(io: NativeModule): DatagramIo {
  // Shared by every socket: a batch is read, forwarded and done before the next recv (the module's invariant).
  const meta = new Int32Array(io.BATCH * 3);
  return {
    name: "native",
    async bind(host, port, handlers, receiveBufferBytes) {
      if (!isIPv4(host)) throw new Error(`batched UDP I/O binds IPv4 addresses only, not ${host}`);
      const fd = io.socket(4);
      if (fd < 0) throw errno(fd, "socket");
      const bound = io.bind(fd, host, port);
      if (bound < 0) {
        io.close(fd);
        throw errno(bound, "bind", `${host}:${port}`);
      }
      const buffer = io.receiveBuffer(fd, receiveBufferBytes);
      if (buffer < 0) {
        io.close(fd);
        throw errno(buffer, "setsockopt SO_RCVBUF");
      }
      return new BatchedPort(io, meta, fd, handlers, buffer);
    },
  };
}

class BatchedPort implements PortSocket {
  private readonly poller: unknown;
  /** Upstreams with a run of this batch still to send. */
  private readonly unsent: BatchedUpstream[] = [];
  private closed = false;

  constructor(
    private readonly io: NativeModule,
    private readonly meta: Int32Array,
    private readonly fd: number,
    private readonly handlers: PortHandlers,
    readonly receiveBufferBytes: number,
  ) {
    this.poller = io.poll(fd, () => this.readable());
  }

  private readable(): void {
    const { io, meta, handlers } = this;
    for (let turn = 0; turn < BATCHES_PER_TURN && !this.closed; turn++) {
      const n = io.recv(this.fd, meta);
      if (n < 0) {
        if (n !== EAGAIN) handlers.error(errno(n, "recvmmsg"));
        return;
      }
      for (let i = 0; i < n; i++) handlers.datagram(i, sourceOf(meta[i * 3 + 2] as number, meta[i * 3 + 1] as number));
      // Before the next recv overwrites the arena.
      for (const upstream of this.unsent) upstream.flush();
      this.unsent.length = 0;
      if (n < io.BATCH) return;
    }
  }

  /** Called by an upstream when it starts a run in this batch. */
  queued(upstream: BatchedUpstream): void {
    this.unsent.push(upstream);
  }

  describe(source: Source): { address: string; port: number } {
    const key = source as number;
    return { address: dotted(Math.floor(key / 65_536)), port: key % 65_536 };
  }

  reply(batch: Payload, source: Source): void {
    const key = source as number;
    // Replies are dropped, not queued, when the port's send buffer is full (as the kernel would drop them later).
    this.io.sendTo(this.fd, 0, batch as number, Math.floor(key / 65_536) | 0, key % 65_536);
  }

  connect(host: string, port: number, handlers: UpstreamHandlers, connected: (err?: Error) => void): Upstream {
    const upstream = new BatchedUpstream(this.io, this.meta, this, handlers);
    if (isIP(host)) connected(upstream.open(host, port));
    else {
      // As node:dgram does for a name: an IPv4 socket, so the name's IPv4 address.
      lookup(host, { family: 4 }).then(
        ({ address }) => connected(upstream.open(address, port)),
        (err: Error) => connected(err),
      );
    }
    return upstream;
  }

  hold(payload: Payload): Buffer {
    return typeof payload === "number" ? this.io.copy(payload) : payload;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.io.unpoll(this.poller);
    this.io.close(this.fd);
  }
}

class BatchedUpstream implements Upstream {
  private fd = -1;
  private poller: unknown;
  /** The run of this batch's slots waiting to go out: first, count. */
  private first = 0;
  private count = 0;
  private closed = false;

  constructor(
    private readonly io: NativeModule,
    private readonly meta: Int32Array,
    private readonly port: BatchedPort,
    private readonly handlers: UpstreamHandlers,
  ) {}

  /** Connects to an address; the error if it cannot. */
  open(address: string, port: number): Error | undefined {
    // A name resolved after the session ended: nothing to open.
    if (this.closed) return undefined;
    const fd = this.io.socket(isIP(address) === 6 ? 6 : 4);
    if (fd < 0) return errno(fd, "socket");
    const r = this.io.connect(fd, address, port);
    if (r < 0) {
      this.io.close(fd);
      return errno(r, "connect");
    }
    this.fd = fd;
    this.poller = this.io.poll(fd, () => this.readable());
    return undefined;
  }

  send(payload: Payload): void {
    if (this.fd < 0) return;
    if (typeof payload !== "number") {
      this.flush();
      this.check(this.io.sendBuffer(this.fd, payload), "send");
      return;
    }
    if (this.count > 0 && this.first + this.count === payload) {
      this.count++;
      return;
    }
    if (this.count > 0) this.flush();
    else this.port.queued(this);
    this.first = payload;
    this.count = 1;
  }

  flush(): void {
    if (this.count === 0 || this.fd < 0) return;
    const count = this.count;
    this.count = 0;
    this.check(this.io.send(this.fd, this.first, count), "sendmmsg");
  }

  /** A full socket buffer drops the datagram, as a full queue in the kernel would; other errors go to the session. */
  private check(result: number, syscall: string): void {
    if (result < 0 && result !== EAGAIN) this.handlers.error(errno(result, syscall));
  }

  private readable(): void {
    for (let turn = 0; turn < BATCHES_PER_TURN && !this.closed; turn++) {
      const n = this.io.recv(this.fd, this.meta);
      if (n < 0) {
        if (n !== EAGAIN) this.handlers.error(errno(n, "recvmmsg"));
        return;
      }
      if (n > 0) this.handlers.replies(n, n);
      if (n < this.io.BATCH) return;
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.count = 0;
    if (this.fd < 0) return;
    this.io.unpoll(this.poller);
    this.io.close(this.fd);
    this.fd = -1;
  }
}
