import type net from "node:net";
// The subpath: relay processes load this module and no more of the runtime than they need.
import { spliceSockets } from "@harbor/runtime/splice";
import { PAIR_CONNECTED, PAIR_ENDED, type NativeModule } from "./native.js";

/** A proxied connection's pair of sockets, being carried. */
export interface Pair {
  /** Closes both sides now (a drain's deadline); `onClosed` still runs, once. */
  cut(): void;
}

/**
 * Carries a connected client and upstream until both are closed: Node's
 * sockets (`spliceSockets`), or the native module. `onClosed` gets the bytes
 * written to each side, once. Either way half-close passes through, an error
 * on one side closes both, and backpressure holds the faster side.
 */
export interface PairCarrier {
  readonly name: "native" | "node";
  join(client: net.Socket, upstream: net.Socket, onClosed: (toBackend: number, toClient: number) => void): Pair;
}

export const nodePairs: PairCarrier = {
  name: "node",
  join(client, upstream, onClosed) {
    spliceSockets(client, upstream, () => onClosed(upstream.bytesWritten, client.bytesWritten));
    // Accepted paused, so that nothing is read before there is somewhere to send it.
    client.resume();
    return {
      cut: () => {
        client.destroy();
        upstream.destroy();
      },
    };
  },
};

/** The descriptor under a connected TCP socket (libuv's; -1 where there is none). */
export const descriptorOf = (socket: net.Socket): number => (socket as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;

/** What a native pair's records reach: its own handler, found by the pair's id. */
export interface PairHandler {
  /** The pair's id, set when the module took it. */
  id: number;
  /** A dial connected. */
  connected(): void;
  /** Both sides are closed, with the bytes written to each. Last. */
  ended(toBackend: number, toClient: number): void;
  /** A dial failed (-errno); the client descriptor is the caller's again. Last. */
  failed(errno: number): void;
}

/** Records delivered per call at most (a turn with more makes more calls). */
const RECORDS_PER_CALL = 1024;

/**
 * The module's pairs and their handlers, by id: one table per process (the
 * module takes one pairEvents). Records come in batches (a poll's connects,
 * the idle phase's ends), so a connection costs no call into JavaScript of
 * its own, and no handle, reference or async context in the module.
 */
export class NativePairTable {
  private readonly handlers: (PairHandler | undefined)[] = [];

  private readonly records: Float64Array;

  /** Once per process: the module takes one table. `recordsPerCall` is for tests of a turn with more records than a call holds. */
  constructor(
    readonly module: NativeModule,
    recordsPerCall = RECORDS_PER_CALL,
  ) {
    this.records = new Float64Array(4 * recordsPerCall);
    module.pairEvents(this.records, (count) => this.deliver(count));
  }

  /** As module.dial, the handler getting the pair's records; -errno when nothing was started. */
  dial(clientFd: number, address: string, port: number, timeoutMs: number, keepAliveIdleS: number, clientShared: boolean, handler: PairHandler): number {
    return this.started(this.module.dial(clientFd, address, port, timeoutMs, keepAliveIdleS, clientShared ? 1 : 0), handler);
  }

  /** As module.join, the handler getting the pair's records; -errno when nothing was taken. */
  join(clientFd: number, upstreamFd: number, handler: PairHandler): number {
    return this.started(this.module.join(clientFd, upstreamFd), handler);
  }

  /** Closes the handler's pair now, unless its last record came already; that record still comes, once. */
  cut(handler: PairHandler): void {
    if (this.handlers[handler.id] === handler) this.module.cut(handler.id);
  }

  private started(id: number, handler: PairHandler): number {
    if (id >= 0) {
      handler.id = id;
      this.handlers[id] = handler;
    }
    return id;
  }

  /** Every record reaches its handler, even past one that throws (the module frees the pairs of all of them); the first error is thrown after. */
  private deliver(count: number): void {
    const records = this.records;
    let failure: unknown;
    for (let i = 0; i < 4 * count; i += 4) {
      const id = records[i] as number;
      const event = records[i + 1] as number;
      const handler = this.handlers[id] as PairHandler;
      // Dropped before the handler runs at a pair's last record: a cut from it, or after it, does nothing.
      if (event !== PAIR_CONNECTED) this.handlers[id] = undefined;
      try {
        if (event === PAIR_CONNECTED) handler.connected();
        else if (event === PAIR_ENDED) handler.ended(records[i + 2] as number, records[i + 3] as number);
        else handler.failed(event);
      } catch (err) {
        failure ??= err;
      }
    }
    if (failure !== undefined) throw failure;
  }
}

const tables = new WeakMap<NativeModule, NativePairTable>();

/** The process's table of the module's pairs, made at first use. */
export function pairTable(module: NativeModule): NativePairTable {
  let table = tables.get(module);
  if (!table) tables.set(module, (table = new NativePairTable(module)));
  return table;
}

/**
 * The native module carries the bytes: it takes duplicates of both
 * descriptors and Node's sockets are destroyed, so each read and write is a
 * syscall and nothing more (no Buffer, no call into JavaScript). Where it
 * cannot take them (no descriptor, out of descriptors, or a socket Node
 * has read from, whose bytes the duplicates would never see) Node's sockets
 * carry the pair.
 */
export function nativePairs(table: NativePairTable): PairCarrier {
  return {
    name: "native",
    join(client, upstream, onClosed) {
      const clientFd = descriptorOf(client);
      const upstreamFd = descriptorOf(upstream);
      // Nothing ever read (a client accepted paused, a relay's client it stopped reading, an upstream just connected).
      const untouched = clientFd >= 0 && upstreamFd >= 0 && unread(client) && unread(upstream);
      if (!untouched) return nodePairs.join(client, upstream, onClosed);
      const pair = new JoinedPair(table, onClosed);
      if (table.join(clientFd, upstreamFd, pair) < 0) return nodePairs.join(client, upstream, onClosed);
      client.destroy();
      upstream.destroy();
      return pair;
    },
  };
}

const unread = (socket: net.Socket): boolean => socket.bytesRead === 0 && !socket.readableEnded;

/** A joined pair the module carries: its only record is its end. */
class JoinedPair implements Pair, PairHandler {
  id = -1;

  constructor(
    private readonly table: NativePairTable,
    private readonly onClosed: (toBackend: number, toClient: number) => void,
  ) {}

  connected(): void {}

  ended(toBackend: number, toClient: number): void {
    this.onClosed(toBackend, toClient);
  }

  /** Never comes for a joined pair (nothing is dialled); an end all the same if it did. */
  failed(): void {
    this.onClosed(0, 0);
  }

  cut(): void {
    this.table.cut(this);
  }
}
