import { lookup, type LookupAddress } from "node:dns";
import net from "node:net";
import { constants } from "node:os";
import type { Logger } from "pino";
import { Ejections, RoundRobin, systemClock } from "@harbor/core";
import type { Backend } from "@harbor/proto";
import type { DataPlaneCounters } from "../metrics.js";
import { NativeAcceptor } from "./accept.js";
import { allEjected, backendKey, dial, isLocalFailure, KEEPALIVE_IDLE_MS, nextAttempt, type DialHooks, type Endpoint } from "./dial.js";
import type { PortListener } from "./listener.js";
import { errnoError, type NativeModule } from "./native.js";
import { nativePairs, nodePairs, pairTable, type NativePairTable, type Pair, type PairCarrier, type PairHandler } from "./pairs.js";
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
  resolve?: (host: string, done: (err: Error | null, addresses: LookupAddress[]) => void) => void;
}

const resolveAll: NonNullable<TcpListenerOptions["resolve"]> = (host, done) => lookup(host, { all: true }, done);

/** A host name's addresses not dialled yet, and when its dial's time is up. */
interface MoreAddresses {
  addresses: string[];
  deadline: number;
}

const BACKLOG = 1024;
/** What the module's dial returns for an address that is not a literal IPv4 or IPv6 one. */
const EINVAL = -constants.errno.EINVAL;
const KEEPALIVE_IDLE_S = KEEPALIVE_IDLE_MS / 1000;
/** How long one of a host name's addresses may take to answer while others are left (Node's autoSelectFamilyAttemptTimeout). */
const ADDRESS_ATTEMPT_MS = 250;

/**
 * One TCP port of a service. Each new connection goes to the next backend in
 * round-robin order; a backend that refuses is skipped for the next one. Open
 * connections belong to their pair of sockets, not to the backend set, so no
 * set change ever cuts them. With no backend the client is closed at once.
 * With relays, this listener still accepts and chooses; a relay connects and
 * copies. With the native module and no relays, a connection is never a Node
 * socket: the module accepts it, JavaScript chooses, the module dials and
 * carries (`acceptNative`).
 */
export class TcpListener implements PortListener, DialHooks, RelayedListener, NativeDialOwner {
  readonly protocol = "tcp" as const;
  /** Node's sockets accept (with relays, on a host name, or without the native module)... */
  private readonly server: net.Server | undefined;
  private readonly pairs: PairCarrier;
  /** The module's pairs, where there is the module. */
  readonly table: NativePairTable | undefined;
  /** ...or the native module does. */
  private acceptor: NativeAcceptor | undefined;
  private readonly rotation = new RoundRobin();
  /** Pairs carried here: connected, or (native) dialling. */
  private readonly open = new Set<Pair>();
  /** Node-accepted clients whose backend is being dialled. */
  private readonly pending = new Set<net.Socket>();
  /** Native-accepted clients waiting for a backend's host name to resolve. */
  private resolving = 0;
  /** Connections handed to relays and not yet reported ended. */
  private relayed = 0;
  private relayId: number | undefined;
  private closed = false;
  /** drain() has cut what was open: a client whose backend's name resolves after that is closed. */
  private drained = false;
  /** When a connect that failed for a reason of this host was last logged. */
  private localFailureLoggedAt = 0;
  listening = false;
  error: string | undefined;
  readonly ejections: Ejections;

  constructor(private readonly options: TcpListenerOptions) {
    this.ejections = new Ejections(systemClock, options.passiveEjectMs);
    this.table = options.native && pairTable(options.native);
    this.pairs = this.table ? nativePairs(this.table) : nodePairs;
    this.relayId = options.relays?.register(this);
    if (options.native && this.relayId === undefined && net.isIP(options.host) !== 0) return;
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
    return this.open.size + this.pending.size + this.relayed + this.resolving;
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
    this.drained = true;
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

  allFailed(): void {
    this.options.counters.tcpAllBackendsFailed++;
  }

  connected(client: net.Socket, upstream: net.Socket): void {
    this.pending.delete(client);
    this.options.counters.tcpProxied++;
    const pair = this.pairs.join(client, upstream, (toBackend, toClient) => this.ended(pair, toBackend, toClient));
    this.open.add(pair);
  }

  private ended(pair: Pair, toBackend: number, toClient: number): void {
    this.open.delete(pair);
    // Counted once, at close: nothing is added up per chunk.
    this.options.counters.tcpBytesToBackend += toBackend;
    this.options.counters.tcpBytesToClient += toClient;
  }

  // The native path: connections as descriptors, never Node sockets.

  private acceptNative(fd: number): void {
    const chosen = this.admit() ? this.choose() : undefined;
    if (!chosen) {
      this.closeClient(fd);
      return;
    }
    this.dialNative(fd, chosen.backends, chosen.start, 0, chosen.anyBackend);
  }

  /** As dial(), with the module connecting: the next backend from `attempt` on, the one after it when that fails. */
  private dialNative(fd: number, backends: readonly Endpoint[], start: number, attempt: number, anyBackend: boolean): void {
    const i = nextAttempt(backends, start, attempt, anyBackend, this);
    if (i < 0) {
      this.closeClient(fd);
      this.allFailed();
      return;
    }
    const backend = backends[(start + i) % backends.length] as Endpoint;
    this.connectNative(fd, backends, start, i, anyBackend, backend, backend);
  }

  /**
   * A host name (the module takes literal addresses only) is resolved first,
   * then dialled at each of its addresses in turn until one answers, as
   * Node's sockets do: each but the last gets ADDRESS_ATTEMPT_MS, all of them
   * together the connect timeout. The backend fails over only when none answers.
   */
  private resolveThenConnect(fd: number, backends: readonly Endpoint[], start: number, i: number, anyBackend: boolean, backend: Endpoint): void {
    this.resolving++;
    (this.options.resolve ?? resolveAll)(backend.host, (err, addresses) => {
      this.resolving--;
      const [first, ...rest] = addresses ?? [];
      if (this.drained) this.closeClient(fd);
      else if (err || !first) this.failedOver(fd, backends, start, i, anyBackend, backend, err ?? new Error(`no address for ${backend.host}`));
      else {
        const more = { addresses: rest.map((a) => a.address), deadline: Date.now() + this.options.connectTimeoutMs };
        this.connectNative(fd, backends, start, i, anyBackend, backend, { host: first.address, port: backend.port }, more);
      }
    });
  }

  /**
   * `more`, for a host name: its addresses not tried yet, each tried in turn
   * when this one fails (any failure: EADDRNOTAVAIL, a local failure
   * otherwise, is what an IPv6 address gives where IPv6 is off), and the
   * deadline all of them share. A literal address has none: its dial is
   * one NativeDial and nothing more.
   */
  private connectNative(fd: number, backends: readonly Endpoint[], start: number, i: number, anyBackend: boolean, backend: Endpoint, address: Endpoint, more?: MoreAddresses): void {
    let timeoutMs = this.options.connectTimeoutMs;
    if (more) {
      const left = Math.max(1, more.deadline - Date.now());
      timeoutMs = more.addresses.length > 0 ? Math.min(ADDRESS_ATTEMPT_MS, left) : left;
    }
    const pair = new NativeDial(this, fd, backends, start, i, anyBackend, backend, address, more);
    const id = (this.table as NativePairTable).dial(fd, address.host, address.port, timeoutMs, KEEPALIVE_IDLE_S, pair);
    if (id < 0) {
      // The module parses the address: a name is told apart there, not by a second parse per connection here.
      if (id === EINVAL && address === backend) this.resolveThenConnect(fd, backends, start, i, anyBackend, backend);
      else this.addressFailed(fd, backends, start, i, anyBackend, backend, errnoError(id, "connect", backendKey(address)), more);
      return;
    }
    this.open.add(pair);
  }

  // NativeDialOwner: a native dial's records.

  nativeConnected(): void {
    this.options.counters.tcpProxied++;
  }

  nativeEnded(pair: NativeDial, toBackend: number, toClient: number): void {
    this.ended(pair, toBackend, toClient);
  }

  nativeFailed(d: NativeDial, errno: number): void {
    this.open.delete(d);
    this.addressFailed(d.fd, d.backends, d.start, d.attempt, d.anyBackend, d.backend, errnoError(errno, "connect", backendKey(d.address)), d.more);
  }

  /** The host name's next address while one is left and time is, else the next backend. */
  private addressFailed(fd: number, backends: readonly Endpoint[], start: number, i: number, anyBackend: boolean, backend: Endpoint, err: Error, more: MoreAddresses | undefined): void {
    const next = more?.addresses[0];
    if (more && next !== undefined && !this.drained && more.deadline > Date.now()) {
      this.connectNative(fd, backends, start, i, anyBackend, backend, { host: next, port: backend.port }, { addresses: more.addresses.slice(1), deadline: more.deadline });
    } else this.failedOver(fd, backends, start, i, anyBackend, backend, err);
  }

  private failedOver(fd: number, backends: readonly Endpoint[], start: number, i: number, anyBackend: boolean, backend: Endpoint, err: Error): void {
    this.backendFailed(backend, err);
    if (this.drained) this.closeClient(fd);
    else this.dialNative(fd, backends, start, i + 1, anyBackend);
  }

  private closeClient(fd: number): void {
    (this.options.native as NativeModule).close(fd);
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

/** Where a native dial's records go: the listener that dialled. */
interface NativeDialOwner {
  readonly table: NativePairTable | undefined;
  nativeConnected(): void;
  nativeEnded(pair: NativeDial, toBackend: number, toClient: number): void;
  nativeFailed(dial: NativeDial, errno: number): void;
}

/**
 * A connection the module dials, then carries: one object per connection,
 * which is what a failed connect needs to go on from (the host name's next
 * address, or the next backend).
 */
class NativeDial implements Pair, PairHandler {
  id = -1;

  constructor(
    private readonly owner: NativeDialOwner,
    readonly fd: number,
    readonly backends: readonly Endpoint[],
    readonly start: number,
    readonly attempt: number,
    readonly anyBackend: boolean,
    readonly backend: Endpoint,
    readonly address: Endpoint,
    readonly more: MoreAddresses | undefined,
  ) {}

  connected(): void {
    this.owner.nativeConnected();
  }

  ended(toBackend: number, toClient: number): void {
    this.owner.nativeEnded(this, toBackend, toClient);
  }

  failed(errno: number): void {
    this.owner.nativeFailed(this, errno);
  }

  cut(): void {
    this.owner.table?.cut(this);
  }
}
