import dgram from "node:dgram";
import { isIPv6 } from "node:net";
import type { Logger } from "pino";
import { Ejections, systemClock } from "@harbor/core";
import type { Backend } from "@harbor/proto";
import type { DataPlaneCounters } from "../metrics.js";
import { backendKey } from "./dial.js";
import type { PortListener } from "./listener.js";

export interface UdpListenerOptions {
  serviceId: string;
  host: string;
  port: number;
  /** The service's backends in FIFO order, read when a session starts or the set changes. */
  backends: () => readonly Backend[];
  /** A session with no datagram either way for this long is closed. */
  sessionIdleMs: number;
  /** At most this many sessions; the least recently started goes first. */
  maxSessions: number;
  /** A backend that answered "port unreachable" is out of rotation for this long. */
  passiveEjectMs: number;
  counters: DataPlaneCounters;
  logger: Logger;
}

interface Session {
  clientAddress: string;
  clientPort: number;
  backendKey: string;
  upstream: dgram.Socket;
  lastSeen: number;
  /** Datagrams that arrived before the upstream socket was connected; undefined once it is. */
  pending: Buffer[] | undefined;
}

/** Datagrams held per session while its upstream socket connects. */
const MAX_PENDING = 64;

/**
 * One UDP port of a service. FIFO: the first backend available is the
 * primary and every new client session goes to it. A session per client
 * address has its own upstream socket, so replies are matched to the client
 * and sent back from the service's port (clients such as dig reject replies
 * from any other). When a session's backend leaves the set, only that
 * session moves, to the current primary; sessions on backends that remain
 * stay where they are.
 */
export class UdpListener implements PortListener {
  readonly protocol = "udp" as const;
  private socket: dgram.Socket | undefined;
  private readonly sessions = new Map<string, Session>();
  readonly ejections: Ejections;
  private sweeper: NodeJS.Timeout | undefined;
  listening = false;
  error: string | undefined;

  constructor(private readonly options: UdpListenerOptions) {
    this.ejections = new Ejections(systemClock, options.passiveEjectMs);
  }

  get port(): number {
    return this.options.port;
  }

  /** Sessions end when the listener closes: nothing of it outlives close(). */
  get connections(): number {
    return 0;
  }

  get sessionCount(): number {
    return this.sessions.size;
  }

  async listen(): Promise<boolean> {
    const { host, port, logger, serviceId } = this.options;
    const socket = dgram.createSocket({ type: isIPv6(host) ? "udp6" : "udp4" });
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once("error", reject);
        socket.bind({ address: host, port, exclusive: true }, () => {
          socket.removeListener("error", reject);
          resolve();
        });
      });
    } catch (err) {
      socket.close();
      this.error = (err as Error).message;
      logger.warn({ serviceId, host, port, err }, "udp-listener-bind-failed");
      return false;
    }
    socket.on("error", (err) => logger.warn({ serviceId, port, err }, "udp-listener-error"));
    socket.on("message", (msg, rinfo) => this.fromClient(msg, rinfo.address, rinfo.port));
    this.socket = socket;
    this.listening = true;
    this.error = undefined;
    this.sweeper = setInterval(() => this.sweep(), Math.min(1_000, this.options.sessionIdleMs));
    this.sweeper.unref();
    logger.info({ serviceId, host, port }, "udp-listener-opened");
    return true;
  }

  private fromClient(msg: Buffer, address: string, port: number): void {
    const key = `${address}|${port}`;
    let session = this.sessions.get(key);
    if (!session) {
      const backend = this.primary();
      if (!backend) {
        this.options.counters.udpDropped++;
        return;
      }
      session = this.openSession(address, port, backend);
      if (!session) return;
    }
    session.lastSeen = Date.now();
    if (session.pending) {
      if (session.pending.length < MAX_PENDING) session.pending.push(msg);
      return;
    }
    this.forward(session, msg);
  }

  private forward(session: Session, msg: Buffer): void {
    this.options.counters.udpToBackend++;
    try {
      session.upstream.send(msg);
    } catch (err) {
      this.options.logger.debug({ err: (err as Error).message, backend: session.backendKey }, "udp-send-failed");
    }
  }

  /** The first backend in FIFO order that is in rotation; the first of all when none is. */
  private primary(): Backend | undefined {
    const backends = this.options.backends();
    for (const b of backends) if (!this.ejections.isEjected(backendKey(b))) return b;
    return backends[0];
  }

  private openSession(clientAddress: string, clientPort: number, backend: Backend): Session | undefined {
    if (this.sessions.size >= this.options.maxSessions) {
      const oldest = this.sessions.keys().next().value as string;
      this.closeSession(oldest);
    }
    const upstream = dgram.createSocket({ type: isIPv6(backend.host) ? "udp6" : "udp4" });
    const session: Session = { clientAddress, clientPort, backendKey: backendKey(backend), upstream, lastSeen: Date.now(), pending: [] };
    const key = `${clientAddress}|${clientPort}`;
    // A connected socket: the kernel only passes replies from the backend.
    upstream.connect(backend.port, backend.host, (err?: Error) => {
      // A failed connect (e.g. a name that does not resolve) comes here, not as "error".
      if (err) {
        this.ejections.eject(session.backendKey);
        this.closeSession(key);
        return;
      }
      const held = session.pending ?? [];
      session.pending = undefined;
      for (const msg of held) this.forward(session, msg);
    });
    upstream.on("message", (reply) => {
      session.lastSeen = Date.now();
      this.options.counters.udpToClient++;
      this.socket?.send(reply, clientPort, clientAddress);
    });
    upstream.on("error", (err: NodeJS.ErrnoException) => {
      if (err.code === "ECONNREFUSED") {
        // ICMP port unreachable: the backend is gone, for now at least. It leaves rotation
        // (a health check's longer ejection is kept), logged once per ejection, not per datagram.
        this.options.counters.udpBackendUnreachable++;
        if (!this.ejections.isEjected(session.backendKey)) {
          this.ejections.eject(session.backendKey);
          this.options.logger.info({ serviceId: this.options.serviceId, backend: session.backendKey }, "udp-backend-unreachable");
        }
        // Per datagram while the backend is down (loopback ICMP is not rate-limited):
        // a session already on the primary has nowhere better to go, and no set is built.
        const primary = this.primary();
        if (primary !== undefined && backendKey(primary) === session.backendKey) return;
        if (this.shouldMove(session, this.backendKeys(), primary)) this.closeSession(key);
        return;
      }
      this.options.logger.debug({ err: err.message, backend: session.backendKey }, "udp-session-error");
      this.closeSession(key);
    });
    this.sessions.set(key, session);
    return session;
  }

  private closeSession(key: string): void {
    const session = this.sessions.get(key);
    if (!session) return;
    this.sessions.delete(key);
    try {
      session.upstream.close();
    } catch {
      // already closed
    }
  }

  /**
   * Ends idle sessions; and while any backend is out of rotation, moves the
   * sessions that now have somewhere better to go: an ejection that runs out
   * tells nobody.
   */
  private sweep(): void {
    const idleBefore = Date.now() - this.options.sessionIdleMs;
    for (const [key, session] of this.sessions) if (session.lastSeen < idleBefore) this.closeSession(key);
    if (this.sessions.size > 0 && this.ejections.active > 0) this.backendsChanged();
  }

  private backendKeys(): Set<string> {
    return new Set(this.options.backends().map(backendKey));
  }

  /**
   * A session moves (is closed, so its client's next datagram opens one on
   * the primary) when its backend left the set, or is out of rotation and
   * another backend in rotation can take it. With nowhere better to go it
   * keeps its socket: a backend that answers again sees the same client
   * address, which servers that connect() to their peer (iperf3, some game
   * servers) need to go on with the flow.
   */
  private shouldMove(session: Session, present: ReadonlySet<string>, primary: Backend | undefined): boolean {
    if (!present.has(session.backendKey)) return true;
    if (!this.ejections.isEjected(session.backendKey)) return false;
    return primary !== undefined && backendKey(primary) !== session.backendKey && !this.ejections.isEjected(backendKey(primary));
  }

  /** Sessions whose backend left the set or was taken out of rotation move; the rest stay where they are. */
  backendsChanged(): void {
    const present = this.backendKeys();
    const primary = this.primary();
    for (const [key, session] of this.sessions) if (this.shouldMove(session, present, primary)) this.closeSession(key);
  }

  async close(): Promise<void> {
    if (!this.listening) return;
    this.listening = false;
    clearInterval(this.sweeper);
    await new Promise<void>((resolve) => this.socket?.close(() => resolve()) ?? resolve());
    this.socket = undefined;
    for (const key of [...this.sessions.keys()]) this.closeSession(key);
    this.options.logger.info({ serviceId: this.options.serviceId, port: this.options.port }, "udp-listener-closed");
  }

  async drain(): Promise<void> {
    // UDP has no connections to finish: closing the listener ended every session.
  }
}
