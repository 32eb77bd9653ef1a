/**
 * A relay process: receives accepted client sockets from the worker, with the
 * backend rotation and where to start in it, and joins each to its backend.
 * Loads no more than it needs (no gRPC, NATS or metrics). Ends when told to
 * stop, or at once when the worker is gone.
 */
import type net from "node:net";
import { createLogger } from "@harbor/runtime/logger";
import { backendKey, dial, type DialHooks, type Endpoint } from "./dial.js";
import { nativeModule } from "./native.js";
import { nativePairs, nodePairs, pairTable, type Pair } from "./pairs.js";
import type { FromRelay, HandOff, Stats, ToRelay } from "./relay-protocol.js";

const logger = createLogger("harbor-relay").child({ component: "relay", relay: Number(process.env.HARBOR_RELAY_INDEX ?? 0) });
const send = (message: FromRelay) => process.send?.(message);
// The worker says which (it loaded the module itself); should this process fail to load it, Node's sockets carry.
const native = process.env.HARBOR_RELAY_IO === "native" ? nativeModule("auto") : undefined;
const pairs = native ? nativePairs(pairTable(native)) : nodePairs;

/** Clients not yet joined to a backend, and joined pairs: what a stopping relay cuts. */
const open = new Set<net.Socket>();
const joined = new Set<Pair>();
/** Each listener's rotation, as the worker last sent it. */
const rotations = new Map<number, Endpoint[]>();
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

type StreamHandle = { reading: boolean; readStop(): number; readStart(): number };
const handleOf = (client: net.Socket) => (client as unknown as { _handle?: StreamHandle })._handle;

/**
 * A received handle becomes a socket that has started reading (in the tick
 * this runs in, nothing is read yet). For native pairs it is stopped here,
 * as the worker accepts paused, so that every byte is still in the kernel
 * when the pair is joined (the module's duplicate would never see what Node
 * had read; `join` would fall back to Node's sockets).
 */
function stopReading(client: net.Socket): void {
  const handle = handleOf(client);
  if (!handle) return;
  handle.reading = false;
  handle.readStop();
}

/** Undoes stopReading when Node's sockets carry the pair after all (the module could not take it). */
function startReading(client: net.Socket): void {
  const handle = handleOf(client);
  if (!handle || handle.reading) return;
  handle.reading = true;
  handle.readStart();
}

function relay(message: HandOff, client: net.Socket): void {
  if (native) stopReading(client);
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
      const pair = pairs.join(c, upstream, (toBackend, toClient) => {
        joined.delete(pair);
        stats.bytesToBackend += toBackend;
        stats.bytesToClient += toClient;
        ended(listener);
      });
      joined.add(pair);
      // A native join destroys both sockets; a live client means Node's sockets carry it, and must read.
      if (native && !c.destroyed) startReading(c);
    },
  };
  // A client that never reached a backend ends here; one that did ends with its pair.
  client.once("close", () => {
    if (!settled) ended(listener);
  });
  // Until it closes: a relay that stops cuts what is still open.
  open.add(client);
  client.once("close", () => open.delete(client));
  const rotation = rotations.get(listener);
  if (rotation) dial(client, rotation, message.s, 0, message.any, hooks);
  else {
    // The worker sends a rotation before its first connection: none is a bug, not a reason to guess.
    logger.error({ listener }, "relay-connection-without-rotation");
    client.destroy();
  }
}

async function stop(deadlineMs: number): Promise<void> {
  if (stopping) return;
  stopping = true;
  const until = Date.now() + deadlineMs;
  while (open.size + joined.size > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
  for (const socket of open) socket.destroy();
  for (const pair of joined) pair.cut();
  // Let the ends land in the last report: a socket's close comes in this turn's close phase, a
  // native pair's end in the next turn's idle phase (100 ms at the most, for a peer that is slow to close).
  for (let wait = 0; wait < 100 && open.size + joined.size > 0; wait++) await new Promise((r) => setTimeout(r, 1));
  clearTimeout(flushTimer);
  flush();
  logger.info({ carried }, "relay-stopped");
  process.disconnect?.();
}

process.on("message", (message: ToRelay, handle?: net.Socket) => {
  if (message.t === "conn") {
    // Whatever becomes of it, the worker counted it open here: it hears of its end.
    if (!handle || stopping) {
      handle?.destroy();
      ended(message.l);
    } else relay(message, handle);
  } else if (message.t === "rotation") rotations.set(message.l, message.b);
  else if (message.t === "forget") rotations.delete(message.l);
  else if (message.t === "stop") void stop(message.deadlineMs);
});
// The worker is gone: nobody is left to account for these connections.
process.on("disconnect", () => {
  for (const socket of open) socket.destroy();
  process.exit(0);
});
// A signal to the whole process group (Ctrl-C, systemd) is the worker's to handle: it drains the relays.
process.on("SIGTERM", () => undefined);
process.on("SIGINT", () => undefined);
send({ t: "ready" });
logger.info({ io: pairs.name }, "relay-started");
