import { createRequire } from "node:module";
import { getSystemErrorMap } from "node:util";

/**
 * The worker's native module (`native/`, built by `npm run build` with
 * node-gyp): batched UDP I/O, and TCP accepted, dialled and carried in C. Functions return
 * -errno for a failed syscall; they throw only for arguments of the wrong type.
 */
export interface NativeModule {
  // UDP (native/udp.c)
  readonly BATCH: number;
  socket(family: 4 | 6): number;
  bind(fd: number, address: string, port: number): number;
  /** Sets SO_RCVBUF (bytes 0: leaves it) and returns what the kernel reports now (twice what it granted, on Linux), or -errno. */
  receiveBuffer(fd: number, bytes: number): number;
  connect(fd: number, address: string, port: number): number;
  close(fd: number): number;
  recv(fd: number, meta: Int32Array): number;
  send(fd: number, first: number, count: number): number;
  sendTo(fd: number, first: number, count: number, ipv4: number, port: number): number;
  copy(slot: number): Buffer;
  sendBuffer(fd: number, datagram: Buffer): number;
  poll(fd: number, onReadable: () => void): unknown;
  unpoll(handle: unknown): void;
  // TCP (native/tcp.c)
  listen(address: string, port: number, backlog: number, keepAliveIdleS: number): number;
  accept(fd: number, accepted: Int32Array): number;
  /**
   * Connects to a literal address for an accepted client: the pair's id, or -errno when the connect failed at once (the client is still the caller's).
   * `clientShared` 1: the client came from another process, which may still hold it (a relay's): it leaves the epoll set before it is closed.
   */
  dial(clientFd: number, address: string, port: number, timeoutMs: number, keepAliveIdleS: number, clientShared: 0 | 1): number;
  /** Carries two connected sockets (duplicates of them): the pair's id, or -errno (nothing taken). */
  join(clientFd: number, upstreamFd: number): number;
  /** Closes a pair's sides now; its last record still comes. Only for an id whose last record has not been delivered. */
  cut(id: number): void;
  /**
   * Where pairs' records go (once per process, before the first pair):
   * `onRecords(count)` reads records[0 .. 4 * count) as (id, event, a, b),
   * one call for a poll's connects and one for the idle phase's ends (more
   * when the array fills). `event` is PAIR_CONNECTED when a dial
   * connected; negative (-errno) when it failed, and the client descriptor
   * is the caller's again; PAIR_ENDED when both sides are closed, with the
   * bytes written to the backend (`a`) and to the client (`b`). The failure
   * or the end is a pair's last record; its id is given out again only after
   * the call that delivered it returned.
   */
  pairEvents(records: Float64Array, onRecords: (count: number) => void): void;
  /** The pipes bulk flows are spliced through (two descriptors each), how many wait empty for the next, and the bytes they carried. */
  pipes(): { open: number; spare: number; splicedBytes: number };
  // Hand-off to relay processes (native/handoff.c): one SOCK_SEQPACKET channel per relay, read in the order sent.
  /** A new channel: [the worker's end, the relay's end, the largest control message's bytes it takes], both ends close-on-exec and non-blocking; or -errno. */
  channel(): [number, number, number] | number;
  /** Sends an accepted client with three numbers; 0 when sent (the relay has a duplicate: the caller closes its own), else -errno. */
  sendClient(channel: number, clientFd: number, a: number, b: number, c: number): number;
  /** Sends a control message's bytes; 0, or -errno (nothing sent). */
  sendControl(channel: number, bytes: Buffer): number;
  /**
   * Reads what waits: the count of messages, each HANDOFF_META numbers of
   * `meta` (kind, a, b, c, descriptor); 0 when nothing waits; -EPIPE when the
   * worker's end is closed. A control message's bytes are in `payload` (`a`
   * of them) and end the batch. Kind 0 is a malformed message, its
   * descriptors closed.
   */
  receive(channel: number, meta: Int32Array, payload: Buffer): number;
  readonly HANDOFF_CLIENT: number;
  readonly HANDOFF_CONTROL: number;
  /** A client's numbers whose descriptor did not come (the relay was out of descriptors: the kernel closed it). */
  readonly HANDOFF_CLIENT_LOST: number;
  /** glibc's malloc_trim(0): the C heap's free pages back to the system; 1 when some went. */
  trimMemory(): number;
}

/** Numbers per message in receive's `meta`. */
export const HANDOFF_META = 5;

export const PAIR_ENDED = 0;
export const PAIR_CONNECTED = 1;

/** HARBOR_WORKER_IO: the native module (`native`), Node's own sockets (`node`), or native where it is built (`auto`). */
export type IoSetting = "auto" | "native" | "node";

function load(): NativeModule | Error {
  if (process.platform !== "linux") return new Error(`the native module is for Linux (recvmmsg, sendmmsg); this is ${process.platform}`);
  try {
    // From src/proxy (tests) and dist/proxy (built) alike.
    return createRequire(import.meta.url)("../../build/Release/dataplane.node") as NativeModule;
  } catch (err) {
    return new Error(`the native module is not built (npm run build in services/worker): ${(err as Error).message.split("\n")[0]}`);
  }
}

const loaded = load();

/** Why the native module is not available here, or undefined when it is. */
export const nativeUnavailable: string | undefined = loaded instanceof Error ? loaded.message : undefined;

/** The module per the setting: undefined for `node`, or for `auto` where it is not built; throws for `native` then. */
export function nativeModule(setting: IoSetting): NativeModule | undefined {
  if (setting === "node") return undefined;
  if (!(loaded instanceof Error)) return loaded;
  if (setting === "native") throw new Error(`HARBOR_WORKER_IO=native: ${loaded.message}`);
  return undefined;
}

/** A syscall's -errno as the error Node would have made of it ("listen EADDRINUSE: address already in use 127.0.0.1:80"). */
export function errnoError(code: number, syscall: string, address?: string): NodeJS.ErrnoException {
  const [name, description] = getSystemErrorMap().get(code) ?? [`errno ${-code}`, "unknown error"];
  const err: NodeJS.ErrnoException = new Error(`${syscall} ${name}: ${description}${address ? ` ${address}` : ""}`);
  err.code = name;
  err.errno = code;
  err.syscall = syscall;
  return err;
}
