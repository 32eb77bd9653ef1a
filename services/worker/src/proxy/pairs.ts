import type net from "node:net";
// The subpath: relay processes load this module and no more of the runtime than they need.
import { spliceSockets } from "@harbor/runtime/splice";
import type { NativeModule } from "./native.js";

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

/** The descriptor under a connected TCP socket (libuv's; undefined where there is none). */
const descriptorOf = (socket: net.Socket): number => (socket as unknown as { _handle?: { fd?: number } })._handle?.fd ?? -1;

/**
 * The native module carries the bytes: it takes duplicates of both
 * descriptors and Node's sockets are destroyed, so each read and write is a
 * syscall and nothing more (no Buffer, no call into JavaScript). Where it
 * cannot take them (no descriptor, out of descriptors, or a socket Node
 * has read from, whose bytes the duplicates would never see) Node's sockets
 * carry the pair.
 */
export function nativePairs(module: NativeModule): PairCarrier {
  return {
    name: "native",
    join(client, upstream, onClosed) {
      const clientFd = descriptorOf(client);
      const upstreamFd = descriptorOf(upstream);
      // Nothing ever read (a client accepted paused, a relay's client it stopped reading, an upstream just connected).
      const untouched = clientFd >= 0 && upstreamFd >= 0 && unread(client) && unread(upstream);
      let pair: NativePair | undefined;
      // A joined pair's only event is its end.
      const handle = untouched
        ? module.join(clientFd, upstreamFd, (_ended, toBackend, toClient) => {
            pair?.ended();
            onClosed(toBackend, toClient);
          })
        : -1;
      if (typeof handle === "number") return nodePairs.join(client, upstream, onClosed);
      client.destroy();
      upstream.destroy();
      pair = new NativePair(module, handle);
      return pair;
    },
  };
}

const unread = (socket: net.Socket): boolean => socket.bytesRead === 0 && !socket.readableEnded;

/**
 * A pair the module carries. The module frees it once its last callback
 * ran, and that callback marks it ended first: a cut after the end does
 * nothing, rather than reach a freed pair.
 */
export class NativePair implements Pair {
  private live = true;

  constructor(
    private readonly module: NativeModule,
    private readonly handle: unknown,
  ) {}

  /** Called first in the pair's ENDED (or FAILED) callback. */
  ended(): void {
    this.live = false;
  }

  cut(): void {
    if (this.live) this.module.cut(this.handle);
  }
}
