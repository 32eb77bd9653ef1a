import type { Logger } from "pino";
import { Ejections, systemClock } from "@harbor/core";
import type { Backend } from "@harbor/proto";
import type { DataPlaneCounters } from "../metrics.js";
import type { DatagramIo, Payload, PortSocket, Source, Upstream } from "./datagram.js";
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
  /** The port's sockets: batched native I/O, or node:dgram. */
  io: DatagramIo;
  /** The port socket's receive buffer, which absorbs bursts while the worker is busy; 0: the system's default. */
  receiveBufferBytes: number;
}

interface Session {
  source: Source;
  clientAddress: string;
  clientPort: number;
  backendKey: string;
  /** Unset until connect returns (a connect may succeed or fail before it does). */
  upstream: Upstream | undefined;
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
  private socket: PortSocket | undefined;
  private readonly sessions = new Map<Source, Session>();
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

  /** The port socket's receive buffer as the kernel reports it (twice what it granted, on Linux); undefined while not listening. */
  get receiveBufferBytes(): number | undefined {
    return this.socket?.receiveBufferBytes;
  }

  async listen(): Promise<boolean> {
    const { host, port, logger, serviceId, io, receiveBufferBytes } = this.options;
    try {
      this.socket = await io.bind(
        host,
        port,
        {
          datagram: (payload, source) => this.fromClient(payload, source),
          error: (err) => logger.warn({ serviceId, port, err }, "udp-listener-error"),
        },
        receiveBufferBytes,
      );
    } catch (err) {
      this.error = (err as Error).message;
      logger.warn({ serviceId, host, port, err }, "udp-listener-bind-failed");
      return false;
    }
    this.listening = true;
    this.error = undefined;
    this.sweeper = setInterval(() => this.sweep(), Math.min(1_000, this.options.sessionIdleMs));
    this.sweeper.unref();
    logger.info({ serviceId, host, port, io: io.name, receiveBufferBytes: this.socket.receiveBufferBytes }, "udp-listener-opened");
    return true;
  }

  private fromClient(payload: Payload, source: Source): void {
    const port = this.socket;
    if (!port) return; // closing
    let session = this.sessions.get(source);
    if (!session) {
      const backend = this.primary();
      if (!backend) {
        this.options.counters.udpDropped++;
        return;
      }
      session = this.openSession(port, source, backend);
    }
    session.lastSeen = Date.now();
    if (session.pending) {
      if (session.pending.length < MAX_PENDING) session.pending.push(port.hold(payload));
      return;
    }
    this.forward(session, payload);
  }

  private forward(session: Session, payload: Payload): void {
    this.options.counters.udpToBackend++;
    try {
      session.upstream?.send(payload);
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

  private openSession(port: PortSocket, source: Source, backend: Backend): Session {
    if (this.sessions.size >= this.options.maxSessions) {
      const oldest = this.sessions.keys().next().value as Source;
      this.closeSession(oldest);
    }
    const client = port.describe(source);
    const session: Session = {
      source,
      clientAddress: client.address,
      clientPort: client.port,
      backendKey: backendKey(backend),
      upstream: undefined,
      lastSeen: Date.now(),
      pending: [],
    };
    // In the map before connecting: a connect may fail (and close the session) before it returns.
    this.sessions.set(source, session);
    session.upstream = port.connect(
      backend.host,
      backend.port,
      {
        replies: (batch, count) => {
          session.lastSeen = Date.now();
          this.options.counters.udpToClient += count;
          this.socket?.reply(batch, source, session.clientAddress, session.clientPort);
        },
        error: (err) => this.upstreamFailed(session, err),
      },
      (err?: Error) => {
        if (err) {
          this.ejections.eject(session.backendKey);
          this.endSession(session);
          return;
        }
        const held = session.pending ?? [];
        session.pending = undefined;
        for (const msg of held) this.forward(session, msg);
      },
    );
    return session;
  }

  private upstreamFailed(session: Session, err: NodeJS.ErrnoException): void {
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
      if (this.shouldMove(session, this.backendKeys(), primary)) this.endSession(session);
      return;
    }
    this.options.logger.debug({ err: err.message, backend: session.backendKey }, "udp-session-error");
    this.endSession(session);
  }

  /** Closes `session` if it is still its client's: a late callback of an old one leaves the new one alone. */
  private endSession(session: Session): void {
    if (this.sessions.get(session.source) === session) this.closeSession(session.source);
  }

  private closeSession(source: Source): void {
    const session = this.sessions.get(source);
    if (!session) return;
    this.sessions.delete(source);
    session.upstream?.close();
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
    // Unset first: a reply that arrives while it closes is not sent from a closing socket.
    const socket = this.socket;
    this.socket = undefined;
    await socket?.close();
    for (const key of [...this.sessions.keys()]) this.closeSession(key);
    this.options.logger.info({ serviceId: this.options.serviceId, port: this.options.port }, "udp-listener-closed");
  }

  async drain(): Promise<void> {
    // UDP has no connections to finish: closing the listener ended every session.
  }
}
