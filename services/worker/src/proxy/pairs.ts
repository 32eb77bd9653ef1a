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
 * cannot take them (no descriptor, out of descriptors, or bytes Node has
 * read already, which the duplicates would never see) Node's sockets carry
 * the pair.
 */
export function nativePairs(module: NativeModule): PairCarrier {
  return {
    name: "native",
    join(client, upstream, onClosed) {
      const clientFd = descriptorOf(client);
      const upstreamFd = descriptorOf(upstream);
      // A client accepted paused, or an upstream that just connected, has nothing read; a client a relay received may have.
      const untouched = clientFd >= 0 && upstreamFd >= 0 && client.readableLength === 0 && upstream.readableLength === 0;
      // A joined pair's only event is its end.
      const handle = untouched ? module.join(clientFd, upstreamFd, (_ended, toBackend, toClient) => onClosed(toBackend, toClient)) : -1;
      if (typeof handle === "number") return nodePairs.join(client, upstream, onClosed);
      client.destroy();
      upstream.destroy();
      // The module frees a pair only after onClosed ran, and the owner forgets the pair there: a cut never meets a freed one.
      return { cut: () => module.cut(handle) };
    },
  };
}
