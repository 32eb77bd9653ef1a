/**
 * A relay process: receives accepted clients from the worker, with the
 * backend rotation and where to start in it, and joins each to its backend.
 * With the native module the clients come as descriptors on the hand-off
 * channel, and the module dials and carries them; without it, as Node
 * sockets over IPC. Loads no more than it needs (no gRPC, NATS or metrics).
 * Ends when told to stop, or at once when the worker is gone.
 */
import type net from "node:net";
import { constants } from "node:os";
import { createLogger } from "@harbor/runtime/logger";
import { backendKey, dial, KEEPALIVE_IDLE_MS, type DialHooks, type Endpoint } from "./dial.js";
import { errnoError, HANDOFF_META, nativeModule, type NativeModule } from "./native.js";
import { NativeDialer, type NativeDialHooks } from "./native-dial.js";
import { nodePairs, pairTable, type Pair } from "./pairs.js";
import { CONTROL_MAX_BYTES, parseChannelControl, RELAY_CHANNEL_FD, type FromRelay, type HandOff, type Rotation, type Stats, type ToRelay } from "./relay-protocol.js";

const logger = createLogger("harbor-relay").child({ component: "relay", relay: Number(process.env.HARBOR_RELAY_INDEX ?? 0) });
const send = (message: FromRelay) => process.send?.(message);
// The worker says which: with the module (it loaded it itself) clients come as descriptors on the channel.
const channelled = process.env.HARBOR_RELAY_IO === "native";
const native = channelled ? nativeModule("auto") : undefined;
/** Dials and carries the clients that come as descriptors. */
const dialer = native && new NativeDialer(pairTable(native), KEEPALIVE_IDLE_MS / 1000, { clientsShared: true });

/** Clients that came over IPC not yet joined to a backend, and joined pairs: what a stopping relay cuts. */
const open = new Set<net.Socket>();
const joined = new Set<Pair>();
/** Each listener's rotation and the backends out of it, as the worker last sent them. */
const listeners = new Map<number, Listener>();
/** Connections this relay joined to a backend, for its last log line. */
let carried = 0;
const connectTimeoutMs = Number(process.env.HARBOR_RELAY_CONNECT_TIMEOUT_MS) || 5_000;
let stopping = false;
let stats: Stats = { t: "stats", closed: [], proxied: 0, allFailed: 0, bytesToBackend: 0, bytesToClient: 0 };
const closedBy = new Map<number, number>();
let flushTimer: NodeJS.Timeout | undefined;

/** Counts go to the worker in one message per 100 ms at most, and only when something happened. */
function flushSoon(): void {
  flushTimer ??= setTimeout(flush, 100);
}
function flush(): void {
  flushTimer = undefined;
  stats.closed = [...closedBy];
  closedBy.clear();
  send(stats);
  stats = { t: "stats", closed: [], proxied: 0, allFailed: 0, bytesToBackend: 0, bytesToClient: 0 };
}
function ended(listener: number): void {
  closedBy.set(listener, (closedBy.get(listener) ?? 0) + 1);
  flushSoon();
}

/** A client that came as a Node socket over IPC (the worker has no native module): Node's sockets carry it. */
function relay(message: HandOff, client: net.Socket): void {
  // Received handles become sockets that close on the first FIN; a proxy must pass half-closes on.
  client.allowHalfOpen = true;
  client.on("error", () => undefined); // the pair's close handling tears both down
  const listener = message.l;
  const ejected = message.e ? new Set(message.e) : undefined;
  let settled = false;
  const hooks: DialHooks = {
    connectTimeoutMs,
    isEjected: (b: Endpoint) => ejected !== undefined && ejected.has(backendKey(b)),
    backendFailed(b, err) {
      ejected?.add(backendKey(b));
      send({ t: "failed", l: listener, host: b.host, port: b.port, err: err.message });
    },
    allFailed() {
      stats.allFailed++;
    },
    connected(c, upstream) {
      settled = true;
      stats.proxied++;
      carried++;
      const pair = nodePairs.join(c, upstream, (toBackend, toClient) => {
        joined.delete(pair);
        stats.bytesToBackend += toBackend;
        stats.bytesToClient += toClient;
        ended(listener);
      });
      joined.add(pair);
    },
  };
  // A client that never reached a backend ends here; one that did ends with its pair.
  client.once("close", () => {
    if (!settled) ended(listener);
  });
  // Until it closes: a relay that stops cuts what is still open.
  open.add(client);
  client.once("close", () => open.delete(client));
  const rotation = listeners.get(listener)?.backends;
  if (rotation) dial(client, rotation, message.s, 0, message.any, hooks);
  else {
    // The worker sends a rotation before its first connection: none is a bug, not a reason to guess.
    logger.error({ listener }, "relay-connection-without-rotation");
    client.destroy();
  }
}

/** A listener as the worker last described it, and what its native dials tell the worker. */
class Listener implements NativeDialHooks {
  readonly connectTimeoutMs = connectTimeoutMs;
  /** Out of rotation as the worker last said (`host:port`). */
  ejected: ReadonlySet<string> | undefined;

  constructor(
    readonly listener: number,
    /** The rotation. */
    public backends: Endpoint[],
  ) {}

  isEjected(backend: Endpoint): boolean {
    return this.ejected !== undefined && this.ejected.has(backendKey(backend));
  }

  backendFailed(backend: Endpoint, err: Error): void {
    send({ t: "failed", l: this.listener, host: backend.host, port: backend.port, err: err.message });
  }

  allFailed(): void {
    stats.allFailed++;
    ended(this.listener);
  }

  connected(): void {
    stats.proxied++;
    carried++;
  }

  ended(toBackend: number, toClient: number): void {
    stats.bytesToBackend += toBackend;
    stats.bytesToClient += toClient;
    ended(this.listener);
  }

  dropped(): void {
    ended(this.listener);
  }
}

/** A client that came as a descriptor: dialled and carried by the module. */
function relayDescriptor(listener: number, start: number, anyBackend: boolean, fd: number): void {
  const known = listeners.get(listener);
  if (stopping || !known) {
    // The worker sends a rotation before its first connection: none is a bug, not a reason to guess.
    if (!stopping) logger.error({ listener }, "relay-connection-without-rotation");
    (native as NativeModule).close(fd);
    ended(listener);
    return;
  }
  (dialer as NativeDialer).dial(fd, known.backends, start, anyBackend, known);
}

function rotationCame(message: Rotation): void {
  let known = listeners.get(message.l);
  if (known) known.backends = message.b;
  else listeners.set(message.l, (known = new Listener(message.l, message.b)));
  known.ejected = message.e ? new Set(message.e) : undefined;
}

const inFlight = () => open.size + joined.size + (dialer?.connections ?? 0);

async function stop(deadlineMs: number): Promise<void> {
  if (stopping) return;
  stopping = true;
  const until = Date.now() + deadlineMs;
  while (inFlight() > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
  for (const socket of open) socket.destroy();
  for (const pair of joined) pair.cut();
  dialer?.cutAll();
  // Let the ends land in the last report: a socket's close comes in this turn's close phase, a
  // native pair's end in the next turn's idle phase (100 ms at the most, for a peer that is slow to close).
  for (let wait = 0; wait < 100 && inFlight() > 0; wait++) await new Promise((r) => setTimeout(r, 1));
  clearTimeout(flushTimer);
  flush();
  logger.info({ carried }, "relay-stopped");
  process.disconnect?.();
}

function control(message: ToRelay): void {
  if (message.t === "rotation") rotationCame(message);
  else if (message.t === "forget") listeners.delete(message.l);
  else if (message.t === "stop") void stop(message.deadlineMs);
}

process.on("message", (message: ToRelay, handle?: net.Socket) => {
  if (message.t === "conn") {
    // Whatever becomes of it, the worker counted it open here: it hears of its end.
    if (!handle || stopping) {
      handle?.destroy();
      ended(message.l);
    } else relay(message, handle);
  } else control(message);
});

// The worker is gone: nobody is left to account for these connections.
function workerGone(): never {
  for (const socket of open) socket.destroy();
  process.exit(0);
}
process.on("disconnect", workerGone);

/**
 * The hand-off channel, where the worker has the module: clients and the
 * worker's messages in the order it sent them, read a batch at a time.
 */
function readChannel(module: NativeModule): void {
  const meta = new Int32Array(HANDOFF_META * 64);
  // The largest control message the worker sends.
  const payload = Buffer.allocUnsafeSlow(CONTROL_MAX_BYTES);
  let malformedLogged = false;
  let lostLogged = false;
  module.poll(RELAY_CHANNEL_FD, () => {
    // A bounded share of the loop per wake-up: the poll is level-triggered, and wakes again for what is left.
    for (let batch = 0; batch < 16; batch++) {
      const n = module.receive(RELAY_CHANNEL_FD, meta, payload);
      if (n === -constants.errno.EPIPE) workerGone();
      if (n === 0) return;
      if (n < 0) {
        // The poll is level-triggered: a channel that cannot be read would spin. Exit: the worker restarts the relay.
        logger.fatal({ err: errnoError(n, "recvmsg", "hand-off channel") }, "relay-channel-read-failed");
        process.exit(1);
      }
      for (let i = 0; i < n * HANDOFF_META; i += HANDOFF_META) {
        const kind = meta[i] as number;
        if (kind === module.HANDOFF_CLIENT) relayDescriptor(meta[i + 1] as number, meta[i + 2] as number, meta[i + 3] === 1, meta[i + 4] as number);
        else if (kind === module.HANDOFF_CLIENT_LOST) {
          // Out of descriptors here: the kernel closed the client. The worker counted it open here; it hears of its end.
          ended(meta[i + 1] as number);
          if (!lostLogged) logger.error({ listener: meta[i + 1] }, "relay-client-lost-out-of-descriptors");
          lostLogged = true;
        } else if (kind === module.HANDOFF_CONTROL) {
          const message = parseChannelControl(payload.toString("utf8", 0, meta[i + 1] as number));
          if (message instanceof Error) logger.error({ err: message }, "relay-channel-message-malformed");
          else control(message);
        } else if (!malformedLogged) {
          // Only the worker holds the other end: a malformed message is a bug, logged once, its descriptors closed.
          malformedLogged = true;
          logger.error({ bytes: meta[i + 1] }, "relay-channel-message-malformed");
        }
      }
    }
  });
}
if (channelled) {
  // The worker loaded the module from the same place: a relay without it could not read a single client.
  if (!native) {
    logger.fatal("relay-without-native-module");
    process.exit(1);
  }
  readChannel(native);
}
// A signal to the whole process group (Ctrl-C, systemd) is the worker's to handle: it drains the relays.
process.on("SIGTERM", () => undefined);
process.on("SIGINT", () => undefined);
send({ t: "ready" });
logger.info({ io: native ? "native" : "node" }, "relay-started");
