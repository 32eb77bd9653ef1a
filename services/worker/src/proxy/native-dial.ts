import { lookup, type LookupAddress } from "node:dns";
import { constants } from "node:os";
import { backendKey, nextAttempt, type Endpoint } from "./dial.js";
import { errnoError } from "./native.js";
import type { NativePairTable, Pair, PairHandler } from "./pairs.js";

/** Resolves a backend's host name to all its addresses (the module dials addresses only). */
export type Resolve = (host: string, done: (err: Error | null, addresses: LookupAddress[]) => void) => void;

const resolveAll: Resolve = (host, done) => lookup(host, { all: true }, done);

/** What a native dial needs from whoever owns the client: a listener, or a relay's listener. */
export interface NativeDialHooks {
  readonly connectTimeoutMs: number;
  /** Out of rotation (passively or by active checks); cheap when nothing is. */
  isEjected(backend: Endpoint): boolean;
  /** Refused, timed out or unresolvable; the dial goes on with the next backend. */
  backendFailed(backend: Endpoint, err: Error): void;
  /** Every backend was tried or is out of rotation; the client has been closed. Its last word. */
  allFailed(): void;
  /** A dial connected: the module carries the pair from now on. */
  connected(): void;
  /** A carried pair's both sides are closed, with the bytes written to each. Its last word. */
  ended(toBackend: number, toClient: number): void;
  /** The client was closed before it reached a backend, by a drain. Its last word. */
  dropped(): void;
}

/** An accepted client being dialled: what every attempt of it shares. */
interface Client {
  fd: number;
  backends: readonly Endpoint[];
  /** Where it starts in the rotation. */
  start: number;
  /** Every backend is out of rotation: try them all. */
  anyBackend: boolean;
  hooks: NativeDialHooks;
}

/** A host name's addresses not dialled yet, and when its dial's time is up. */
interface MoreAddresses {
  addresses: string[];
  deadline: number;
}

/** What the module's dial returns for an address that is not a literal IPv4 or IPv6 one. */
const EINVAL = -constants.errno.EINVAL;
/** How long one of a host name's addresses may take to answer while others are left (Node's autoSelectFamilyAttemptTimeout). */
const ADDRESS_ATTEMPT_MS = 250;

/**
 * Dials accepted clients' backends with the native module, which then
 * carries each pair: the backend `attempt` places on from the client's start
 * in the rotation, the next one when it refuses or times out, passing over
 * backends out of rotation unless every one is. A host name is resolved
 * first, then dialled at each of its addresses in turn until one answers, as
 * Node's sockets do. Used by a listener that carries its own connections and
 * by a relay process for the clients the worker hands it.
 */
export class NativeDialer {
  /** Dials under way and pairs carried: what a drain cuts. */
  private readonly open = new Set<NativeDial>();
  /** Clients waiting for a backend's host name to resolve. */
  private resolving = 0;
  /** cutAll() has run: a client whose backend's name resolves after that is closed. */
  private drained = false;

  constructor(
    readonly table: NativePairTable,
    private readonly keepAliveIdleS: number,
    options: {
      /** dns.lookup by default. */
      resolve?: Resolve;
      /** The clients came from another process (a relay's, from the worker), which may hold them a moment longer. */
      clientsShared?: boolean;
    } = {},
  ) {
    this.resolve = options.resolve ?? resolveAll;
    this.clientsShared = options.clientsShared ?? false;
  }

  private readonly resolve: Resolve;
  private readonly clientsShared: boolean;

  /** Clients being dialled or resolved, and pairs carried. */
  get connections(): number {
    return this.open.size + this.resolving;
  }

  /** Takes the accepted client `fd`: it is this dialer's to connect or close from now on. */
  dial(fd: number, backends: readonly Endpoint[], start: number, anyBackend: boolean, hooks: NativeDialHooks): void {
    this.dialFrom({ fd, backends, start, anyBackend, hooks }, 0);
  }

  /** Closes everything open now (a drain's deadline); each still gets its last word. */
  cutAll(): void {
    this.drained = true;
    for (const dial of this.open) dial.cut();
  }

  private dialFrom(client: Client, attempt: number): void {
    const { backends, start, anyBackend, hooks } = client;
    const i = nextAttempt(backends, start, attempt, anyBackend, hooks);
    if (i < 0) {
      this.table.module.close(client.fd);
      hooks.allFailed();
      return;
    }
    const backend = backends[(start + i) % backends.length] as Endpoint;
    this.connect(client, i, backend, backend);
  }

  private resolveThenConnect(client: Client, i: number, backend: Endpoint): void {
    this.resolving++;
    this.resolve(backend.host, (err, addresses) => {
      this.resolving--;
      const [first, ...rest] = addresses ?? [];
      if (this.drained) this.drop(client);
      else if (err || !first) this.failedOver(client, i, backend, err ?? new Error(`no address for ${backend.host}`));
      else {
        const more = { addresses: rest.map((a) => a.address), deadline: Date.now() + client.hooks.connectTimeoutMs };
        this.connect(client, i, backend, { host: first.address, port: backend.port }, more);
      }
    });
  }

  /**
   * `more`, for a host name: its addresses not tried yet, each tried in turn
   * when this one fails (any failure: EADDRNOTAVAIL, a local failure
   * otherwise, is what an IPv6 address gives where IPv6 is off), and the
   * deadline all of them share; each but the last gets ADDRESS_ATTEMPT_MS. A
   * literal address has none: its dial is one NativeDial and nothing more.
   */
  private connect(client: Client, i: number, backend: Endpoint, address: Endpoint, more?: MoreAddresses): void {
    let timeoutMs = client.hooks.connectTimeoutMs;
    if (more) {
      const left = Math.max(1, more.deadline - Date.now());
      timeoutMs = more.addresses.length > 0 ? Math.min(ADDRESS_ATTEMPT_MS, left) : left;
    }
    const dial = new NativeDial(this, client, i, backend, address, more);
    const id = this.table.dial(client.fd, address.host, address.port, timeoutMs, this.keepAliveIdleS, this.clientsShared, dial);
    if (id < 0) {
      // The module parses the address: a name is told apart there, not by a second parse per connection here.
      if (id === EINVAL && address === backend) this.resolveThenConnect(client, i, backend);
      else this.addressFailed(client, i, backend, errnoError(id, "connect", backendKey(address)), more);
      return;
    }
    this.open.add(dial);
  }

  /** A dial's last record: its pair ended, or its connect failed (the client is the dialer's again). */
  settled(dial: NativeDial, errno?: number): void {
    this.open.delete(dial);
    if (errno !== undefined) this.addressFailed(dial.client, dial.attempt, dial.backend, errnoError(errno, "connect", backendKey(dial.address)), dial.more);
  }

  /** The host name's next address while one is left and time is, else the next backend. */
  private addressFailed(client: Client, i: number, backend: Endpoint, err: Error, more: MoreAddresses | undefined): void {
    const next = more?.addresses[0];
    if (more && next !== undefined && !this.drained && more.deadline > Date.now()) {
      this.connect(client, i, backend, { host: next, port: backend.port }, { addresses: more.addresses.slice(1), deadline: more.deadline });
    } else this.failedOver(client, i, backend, err);
  }

  private failedOver(client: Client, i: number, backend: Endpoint, err: Error): void {
    client.hooks.backendFailed(backend, err);
    if (this.drained) this.drop(client);
    else this.dialFrom(client, i + 1);
  }

  private drop(client: Client): void {
    this.table.module.close(client.fd);
    client.hooks.dropped();
  }
}

/**
 * One attempt at a backend address, then (connected) the pair the module
 * carries: what a failed connect needs to go on from (the host name's next
 * address, or the next backend).
 */
class NativeDial implements Pair, PairHandler {
  id = -1;

  constructor(
    private readonly dialer: NativeDialer,
    readonly client: Client,
    readonly attempt: number,
    readonly backend: Endpoint,
    readonly address: Endpoint,
    readonly more: MoreAddresses | undefined,
  ) {}

  connected(): void {
    this.client.hooks.connected();
  }

  ended(toBackend: number, toClient: number): void {
    this.dialer.settled(this);
    this.client.hooks.ended(toBackend, toClient);
  }

  failed(errno: number): void {
    this.dialer.settled(this, errno);
  }

  cut(): void {
    this.dialer.table.cut(this);
  }
}
