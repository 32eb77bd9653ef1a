import net from "node:net";
import type { Logger } from "pino";
import { Ejections, RoundRobin, systemClock } from "@harbor/core";
import type { Backend } from "@harbor/proto";
import type { DataPlaneCounters } from "../metrics.js";
import { NativeAcceptor } from "./accept.js";
import { allEjected, backendKey, dial, isLocalFailure, KEEPALIVE_IDLE_MS, type DialHooks, type Endpoint } from "./dial.js";
import type { PortListener } from "./listener.js";
import type { NativeModule } from "./native.js";
import { NativeDialer, type NativeDialHooks, type Resolve } from "./native-dial.js";
import { nativePairs, nodePairs, pairTable, type Pair, type PairCarrier } from "./pairs.js";
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
  /** Relay processes to carry the connections; without them this process carries them. */
  relays?: RelayPool;
  /**
   * The native module: without relays, on a literal IP address, it accepts,
   * dials and carries every connection (JavaScript chooses each one's
   * backend); otherwise it carries the pairs Node's sockets accepted and
   * dialled. Without it Node's sockets do all of it.
   */
  native?: NativeModule;
  /** Resolves a backend's host name to all its addresses (the native path dials addresses); dns.lookup by default. */
  resolve?: Resolve;
}

const BACKLOG = 1024;
const KEEPALIVE_IDLE_S = KEEPALIVE_IDLE_MS / 1000;

/**
 * One TCP port of a service. Each new connection goes to the next backend in
 * round-robin order; a backend that refuses is skipped for the next one. Open
 * connections belong to their pair of sockets, not to the backend set, so no
 * set change ever cuts them. With no backend the client is closed at once.
 * With relays, this listener still accepts and chooses; a relay connects and
 * copies. With the native module, on a literal IP address, a connection is
 * never a Node socket: the module accepts it, JavaScript chooses, and the
 * module dials and carries it (`acceptNative`), or hands it to a relay as
 * a descriptor, which does the same.
 */
export class TcpListener implements PortListener, DialHooks, RelayedListener {
  readonly protocol = "tcp" as const;
  /** Node's sockets accept (on a host name, without the native module, or with relays that take Node sockets)... */
  private readonly server: net.Server | undefined;
  private readonly pairs: PairCarrier;
  /** ...or the native module does... */
  private acceptor: NativeAcceptor | undefined;
  /** ...and dials and carries what it accepted, where there is the module. */
  private readonly dialer: NativeDialer | undefined;
  /** What a native dial of this listener's tells it. */
  private readonly nativeHooks: NativeDialHooks;
  private readonly rotation = new RoundRobin();
  /** Pairs of Node-accepted clients carried here. */
  private readonly open = new Set<Pair>();
  /** Node-accepted clients whose backend is being dialled. */
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
    const table = options.native && pairTable(options.native);
    this.pairs = table ? nativePairs(table) : nodePairs;
    this.dialer = table && new NativeDialer(table, KEEPALIVE_IDLE_S, { resolve: options.resolve });
    this.nativeHooks = {
      connectTimeoutMs: options.connectTimeoutMs,
      isEjected: this.isEjected,
      backendFailed: (backend, err) => this.backendFailed(backend, err),
      allFailed: () => this.allFailed(),
      connected: () => options.counters.tcpProxied++,
      ended: (toBackend, toClient) => this.counted(toBackend, toClient),
      dropped: () => undefined,
    };
    this.relayId = options.relays?.register(this);
    // The module accepts on a literal address, unless there are relays that take only Node sockets.
    const descriptorsGo = this.relayId === undefined || options.relays?.takesDescriptors === true;
    if (options.native && descriptorsGo && net.isIP(options.host) !== 0) return;
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => this.accept(client));
    server.on("error", (err) => {
      // A failed bind is handled (and logged once) by listen().
      if (!this.listening) return;
      this.error = err.message;
      this.options.logger.warn({ err, port: options.port }, "tcp-listener-error");
    });
    this.server = server;
  }

  get port(): number {
    return this.options.port;
  }

  get connections(): number {
    return this.open.size + this.pending.size + this.relayed + (this.dialer?.connections ?? 0);
  }

  /** Binds the port; a failure (e.g. taken by another process) is recorded, not thrown. */
  async listen(): Promise<boolean> {
    const { host, port, logger, serviceId } = this.options;
    try {
      const { server, options } = this;
      if (server) {
        await new Promise<void>((resolve, reject) => {
          const onError = (err: Error) => reject(err);
          server.once("error", onError);
          server.listen({ host, port, backlog: BACKLOG, exclusive: true }, () => {
            server.removeListener("error", onError);
            resolve();
          });
        });
      } else {
        this.acceptor = NativeAcceptor.listen(options.native as NativeModule, host, port, BACKLOG, KEEPALIVE_IDLE_S, {
          accepted: (fd) => this.acceptNative(fd),
          acceptFailed: (err) => this.hereFailed("accept-failed", undefined, err),
        });
      }
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
    this.server?.close();
    this.acceptor?.close();
    this.acceptor = undefined;
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
    this.dialer?.cutAll();
  }

  /** Whether a new connection is taken (else it is counted and its owner closes it). */
  private admit(): boolean {
    if (this.connections >= this.options.maxConnections) {
      this.options.counters.tcpOverLimit++;
      return false;
    }
    return true;
  }

  /** The backends, the rotation's start among them, and whether all are out of rotation; undefined (counted) when there is none. */
  private choose(): { backends: readonly Backend[]; start: number; anyBackend: boolean } | undefined {
    const backends = this.options.backends();
    const start = this.rotation.start(backends.length);
    if (start < 0) {
      this.options.counters.tcpNoBackend++;
      return undefined;
    }
    return { backends, start, anyBackend: this.ejections.size > 0 && allEjected(backends, this.isEjected) };
  }

  private accept(client: net.Socket): void {
    client.on("error", () => undefined); // the pair's close handling tears both down
    const chosen = this.admit() ? this.choose() : undefined;
    if (!chosen) {
      client.destroy();
      return;
    }
    const { backends, start, anyBackend } = chosen;
    const { relays } = this.options;
    if (relays && this.relayId !== undefined && this.relayTook(relays.dispatch(this.relayId, client, backends, start, anyBackend, this.ejectedAmong(backends)))) return;
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
      // Out of descriptors or ports here: no backend is to blame.
      this.hereFailed("upstream-connect-failed-here", key, err);
      return;
    }
    // Refused or timed out: out of rotation for a while, then tried again.
    if (!this.ejections.isEjected(key)) this.options.logger.info({ serviceId: this.options.serviceId, backend: key, err: err.message }, "backend-ejected");
    this.ejections.eject(key);
  }

  /** A failure of this host (out of descriptors, ports or memory), logged at most every 10 s. */
  private hereFailed(msg: string, backend: string | undefined, err: Error): void {
    const now = Date.now();
    if (now - this.localFailureLoggedAt < 10_000) return;
    this.localFailureLoggedAt = now;
    this.options.logger.warn({ serviceId: this.options.serviceId, port: this.options.port, backend, err: err.message }, msg);
  }

  /**
   * The backends out of rotation now (`host:port`) that a relay is to pass over, all of them
   * even when every one is (the connection then says so, and tries them all anyway); undefined when none is.
   */
  private ejectedAmong(backends: readonly Endpoint[]): string[] | undefined {
    if (this.ejections.size === 0) return undefined;
    const ejected = backends.filter(this.isEjected).map(backendKey);
    return ejected.length > 0 ? ejected : undefined;
  }

  allFailed(): void {
    this.options.counters.tcpAllBackendsFailed++;
  }

  connected(client: net.Socket, upstream: net.Socket): void {
    this.pending.delete(client);
    this.options.counters.tcpProxied++;
    const pair = this.pairs.join(client, upstream, (toBackend, toClient) => {
      this.open.delete(pair);
      this.counted(toBackend, toClient);
    });
    this.open.add(pair);
  }

  /** A pair's bytes, counted once, at its close: nothing is added up per chunk. */
  private counted(toBackend: number, toClient: number): void {
    this.options.counters.tcpBytesToBackend += toBackend;
    this.options.counters.tcpBytesToClient += toClient;
  }

  // The native path: connections as descriptors, never Node sockets.

  private acceptNative(fd: number): void {
    const chosen = this.admit() ? this.choose() : undefined;
    if (!chosen) {
      (this.options.native as NativeModule).close(fd);
      return;
    }
    const { backends, start, anyBackend } = chosen;
    const { relays } = this.options;
    if (relays && this.relayId !== undefined && this.relayTook(relays.handOff(this.relayId, fd, backends, start, anyBackend, this.ejectedAmong(backends)))) return;
    (this.dialer as NativeDialer).dial(fd, backends, start, anyBackend, this.nativeHooks);
  }

  // RelayedListener, for connections handed to relay processes.

  /** Counts a hand-off and returns `taken`: when no relay could take the connection (one is restarting or behind), this process carries it. */
  private relayTook(taken: boolean): boolean {
    if (taken) {
      this.relayed++;
      this.options.counters.tcpToRelays++;
    } else this.options.counters.tcpRelaysBusy++;
    return taken;
  }

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
