import net from "node:net";
import type { Logger } from "pino";
import { Ejections, RoundRobin, systemClock } from "@harbor/core";
import type { Backend } from "@harbor/proto";
import type { DataPlaneCounters } from "../metrics.js";
import { allEjected, backendKey, dial, isLocalFailure, type DialHooks, type Endpoint } from "./dial.js";
import type { PortListener } from "./listener.js";
import type { Pair, PairCarrier } from "./pairs.js";
import type { RelayedListener, RelayPool } from "./relays.js";

export interface TcpListenerOptions {
  serviceId: string;
  host: string;
  port: number;
  /** The service's current backends, read at each new connection. */
  backends: () => readonly Backend[];
  connectTimeoutMs: number;
  /** Open connections at most; a client beyond it is closed at once. */
  maxConnections: number;
  /** How long a backend that refused or timed out stays out of rotation. */
  passiveEjectMs: number;
  counters: DataPlaneCounters;
  logger: Logger;
  /** Relay processes to carry the connections; without them this process carries them, with `pairs`. */
  relays?: RelayPool;
  pairs: PairCarrier;
}

/**
 * One TCP port of a service. Each new connection goes to the next backend in
 * round-robin order; a backend that refuses is skipped for the next one. Open
 * connections belong to their pair of sockets, not to the backend set, so no
 * set change ever cuts them. With no backend the client is closed at once.
 * With relays, this listener still accepts and chooses; a relay connects and
 * copies.
 */
export class TcpListener implements PortListener, DialHooks, RelayedListener {
  readonly protocol = "tcp" as const;
  private readonly server: net.Server;
  private readonly rotation = new RoundRobin();
  private readonly open = new Set<Pair>();
  private readonly pending = new Set<net.Socket>();
  /** Connections handed to relays and not yet reported ended. */
  private relayed = 0;
  private relayId: number | undefined;
  private closed = false;
  /** When a connect that failed for a reason of this host was last logged. */
  private localFailureLoggedAt = 0;
  listening = false;
  error: string | undefined;
  readonly ejections: Ejections;

  constructor(private readonly options: TcpListenerOptions) {
    this.ejections = new Ejections(systemClock, options.passiveEjectMs);
    this.server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => this.accept(client));
    this.server.on("error", (err) => {
      // A failed bind is handled (and logged once) by listen().
      if (!this.listening) return;
      this.error = err.message;
      this.options.logger.warn({ err, port: options.port }, "tcp-listener-error");
    });
    this.relayId = options.relays?.register(this);
  }

  get port(): number {
    return this.options.port;
  }

  get connections(): number {
    return this.open.size + this.pending.size + this.relayed;
  }

  /** Binds the port; a failure (e.g. taken by another process) is recorded, not thrown. */
  async listen(): Promise<boolean> {
    const { host, port, logger, serviceId } = this.options;
    try {
      await new Promise<void>((resolve, reject) => {
        const onError = (err: Error) => reject(err);
        this.server.once("error", onError);
        this.server.listen({ host, port, backlog: 1024, exclusive: true }, () => {
          this.server.removeListener("error", onError);
          resolve();
        });
      });
      this.listening = true;
      this.error = undefined;
      logger.info({ serviceId, host, port }, "tcp-listener-opened");
      return true;
    } catch (err) {
      this.error = (err as Error).message;
      logger.warn({ serviceId, host, port, err }, "tcp-listener-bind-failed");
      return false;
    }
  }

  /** Stops accepting; open connections carry on. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.relayed === 0) this.leaveRelays();
    if (!this.listening) return;
    this.listening = false;
    // Stops accepting and frees the port now; server.close()'s callback would wait
    // for every open connection, stalling whoever awaits this (drain() handles those).
    this.server.close();
    this.options.logger.info({ serviceId: this.options.serviceId, port: this.options.port, open: this.connections }, "tcp-listener-closed");
  }

  /** Connections already open stay with their backend; new ones read the set when they start. */
  backendsChanged(): void {}

  /** Waits for open connections to end, up to `deadlineMs`, then cuts the rest (relays cut their own). */
  async drain(deadlineMs: number): Promise<void> {
    const until = Date.now() + deadlineMs;
    while (this.connections > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    for (const pair of this.open) pair.cut();
    for (const socket of this.pending) socket.destroy();
  }

  private accept(client: net.Socket): void {
    client.on("error", () => undefined); // the pair's close handling tears both down
    if (this.connections >= this.options.maxConnections) {
      this.options.counters.tcpOverLimit++;
      client.destroy();
      return;
    }
    const backends = this.options.backends();
    const start = this.rotation.start(backends.length);
    if (start < 0) {
      this.options.counters.tcpNoBackend++;
      client.destroy();
      return;
    }
    const anyBackend = this.ejections.size > 0 && allEjected(backends, this.isEjected);
    if (this.relayId !== undefined) {
      const ejected = this.ejections.size > 0 && !anyBackend ? backends.filter(this.isEjected).map(backendKey) : undefined;
      if (this.options.relays?.dispatch(this.relayId, client, backends, start, anyBackend, ejected)) {
        this.relayed++;
        return;
      }
      // No relay can take it now (one is restarting): this process carries it.
    }
    this.pending.add(client);
    client.once("close", () => this.pending.delete(client));
    dial(client, backends, start, 0, anyBackend, this);
  }

  // DialHooks, for connections this process carries itself.

  get connectTimeoutMs(): number {
    return this.options.connectTimeoutMs;
  }

  readonly isEjected = (backend: Endpoint): boolean => this.ejections.size > 0 && this.ejections.isEjected(backendKey(backend));

  /** Refused or timed out, here or in a relay. */
  backendFailed(backend: Endpoint, err: Error): void {
    const key = backendKey(backend);
    this.options.counters.tcpBackendFailures++;
    if (isLocalFailure(err)) {
      // Out of descriptors or ports here: no backend is to blame (said at most every 10 s).
      const now = Date.now();
      if (now - this.localFailureLoggedAt >= 10_000) {
        this.localFailureLoggedAt = now;
        this.options.logger.warn({ serviceId: this.options.serviceId, backend: key, err: err.message }, "upstream-connect-failed-here");
      }
      return;
    }
    // Refused or timed out: out of rotation for a while, then tried again.
    if (!this.ejections.isEjected(key)) this.options.logger.info({ serviceId: this.options.serviceId, backend: key, err: err.message }, "backend-ejected");
    this.ejections.eject(key);
  }

  allFailed(): void {
    this.options.counters.tcpAllBackendsFailed++;
  }

  connected(client: net.Socket, upstream: net.Socket): void {
    this.pending.delete(client);
    this.options.counters.tcpProxied++;
    const pair = this.options.pairs.join(client, upstream, (toBackend, toClient) => {
      this.open.delete(pair);
      // Counted once, at close: nothing is added up per chunk.
      this.options.counters.tcpBytesToBackend += toBackend;
      this.options.counters.tcpBytesToClient += toClient;
    });
    this.open.add(pair);
  }

  // RelayedListener, for connections handed to relay processes.

  relayEnded(count: number): void {
    this.relayed -= count;
    if (this.relayed <= 0 && this.closed) this.leaveRelays();
  }

  private leaveRelays(): void {
    if (this.relayId === undefined) return;
    this.options.relays?.unregister(this.relayId);
    this.relayId = undefined;
  }
}
