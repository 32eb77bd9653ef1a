import { fork, type ChildProcess } from "node:child_process";
import type net from "node:net";
import { constants } from "node:os";
import { fileURLToPath } from "node:url";
import type { Logger } from "pino";
import type { DataPlaneCounters } from "../metrics.js";
import { KEEPALIVE_IDLE_MS, type Endpoint } from "./dial.js";
import { errnoError, type NativeModule } from "./native.js";
import { descriptorOf } from "./pairs.js";
import { CONTROL_MAX_BYTES, type FromRelay, type HandOff, type Rotation, type ToRelay } from "./relay-protocol.js";

const RELAY_MAIN = fileURLToPath(new URL("./relay-main.js", import.meta.url));
const { EAGAIN, ECONNRESET, EMSGSIZE, ENOBUFS, ENOMEM, EPIPE } = constants.errno;
/** How soon control messages that found the channel full (or memory short) are tried again. */
const RETRY_UNSENT_MS = 10;
/** A message that cannot be sent is logged at most this often per relay. */
const UNSENT_LOG_MS = 10_000;
/**
 * A dead relay is restarted after RESTART_FIRST_MS; one that died young (within LIVED_LONG_MS of
 * its start) waits twice as long as its last restart did, up to RESTART_MAX_MS, so a relay that
 * cannot run does not fork and log twice a second for ever.
 */
const RESTART_FIRST_MS = 500;
const RESTART_MAX_MS = 30_000;
const LIVED_LONG_MS = 10_000;

/** What the pool tells a listener about the connections it handed off. */
export interface RelayedListener {
  /** `count` of its connections ended in a relay (or a relay died with them). */
  relayEnded(count: number): void;
  /** A relay found this backend refusing or unreachable. */
  backendFailed(backend: Endpoint, err: Error): void;
}

interface Relay {
  index: number;
  child: ChildProcess;
  /** Open connections per listener id, to settle the accounts if the relay dies. */
  open: Map<number, number>;
  /**
   * The rotation last sent for each listener id (the listener's own array: a
   * new set is a new array), and the backends out of it (joined). `sent`
   * covers one still waiting in `unsent` (it reaches the relay before any
   * client); `refused` when it can never be sent (too big for the channel),
   * so that the next clients do not build it again to find that out;
   * `failed` when its send failed: the next client sends it again. A record
   * of any state means the relay may hold some rotation of that listener,
   * so `unregister` sends it a forget.
   */
  rotations: Map<number, { backends: readonly Endpoint[]; ejected: string; state: "sent" | "refused" | "failed" }>;
  /** Exited (its IPC channel may still look connected for a moment): takes nothing more. */
  dead: boolean;
  /** Clients handed over whose send has not completed: Node queues handles, and a relay that dies drops its queue without a word. */
  sending: Set<net.Socket>;
  exited: Promise<void>;
  /** The worker's end of the hand-off channel, with the native module. */
  channel: number | undefined;
  /** The largest control message the channel and the relay take, in bytes. */
  controlMaxBytes: number;
  /**
   * Messages the channel had no room for, in order: sent before anything
   * else, and until they are, the relay takes no client. `rotationOf` names
   * the listener a rotation is for, whose record is marked failed if it
   * cannot be sent; `failed` is set on a message whose send failed.
   */
  unsent: Array<{ bytes: Buffer; rotationOf?: number; failed?: boolean }>;
  retryTimer: NodeJS.Timeout | undefined;
  /** When a message that could not be sent was last logged. */
  unsentLoggedAt: number;
}

/**
 * Relay processes that carry the bytes of the TCP connections this worker
 * accepts (HARBOR_WORKER_RELAYS > 0). The worker process keeps the
 * listening sockets, the backend sets and the round-robin counters, so every
 * choice stays exact; connections go to the relays in turn. A relay that dies
 * takes its open connections with it and is replaced. With the native module
 * clients go as descriptors over a hand-off channel per relay (handOff);
 * without it, as Node sockets over Node's IPC (dispatch).
 */
export class RelayPool {
  private readonly relays: Relay[] = [];
  /** Each relay slot's last restart delay. */
  private readonly restartDelays: number[] = [];
  private readonly listeners = new Map<number, RelayedListener>();
  private nextListener = 1;
  private turn = 0;
  private stopping = false;

  constructor(
    private readonly size: number,
    private readonly connectTimeoutMs: number,
    private readonly counters: DataPlaneCounters,
    private readonly logger: Logger,
    /** The native module: clients go over hand-off channels, and relays carry their pairs with it; without it, Node's sockets and IPC. */
    private readonly native: NativeModule | undefined,
    /** The relay's entry point; tests running from source pass the built one. */
    private readonly relayMain = RELAY_MAIN,
  ) {}

  async start(): Promise<void> {
    await Promise.all(Array.from({ length: this.size }, (_, index) => this.spawn(index)));
    this.logger.info({ relays: this.size }, "relays-started");
  }

  /** Whether clients go as descriptors (handOff); else as Node sockets (dispatch). A listener with the module accepts natively only then. */
  get takesDescriptors(): boolean {
    return this.native !== undefined;
  }

  register(listener: RelayedListener): number {
    const id = this.nextListener++;
    this.listeners.set(id, listener);
    return id;
  }

  unregister(id: number): void {
    this.listeners.delete(id);
    for (const relay of this.relays) {
      if (relay.rotations.delete(id)) this.send(relay, { t: "forget", l: id });
    }
  }

  /**
   * Hands an accepted client's descriptor to the next relay that can take
   * it; true when one has it (the descriptor is closed here), false when
   * none can now (it is still the caller's).
   */
  handOff(listener: number, fd: number, backends: readonly Endpoint[], start: number, anyBackend: boolean, ejected?: string[]): boolean {
    if (!this.sendDescriptor(listener, fd, backends, start, anyBackend, ejected)) return false;
    (this.native as NativeModule).close(fd);
    return true;
  }

  /** Sends a duplicate of the client's descriptor to the next relay that can take it; the caller closes its own when this is true. */
  private sendDescriptor(listener: number, fd: number, backends: readonly Endpoint[], start: number, anyBackend: boolean, ejected: string[] | undefined): boolean {
    for (let tried = 0; tried < this.relays.length; tried++) {
      const relay = this.nextRelay();
      if (!relay) return false;
      if (relay.unsent.length > 0 || !this.sendRotation(relay, listener, backends, ejected)) continue;
      // Behind (EAGAIN) or gone (EPIPE): the next relay, or the caller.
      if ((this.native as NativeModule).sendClient(relay.channel as number, fd, listener, start, anyBackend ? 1 : 0) < 0) continue;
      relay.open.set(listener, (relay.open.get(listener) ?? 0) + 1);
      return true;
    }
    return false;
  }

  /** Hands an accepted client to the next relay; false when none can take it now. */
  dispatch(listener: number, client: net.Socket, backends: readonly Endpoint[], start: number, anyBackend: boolean, ejected?: string[]): boolean {
    if (this.native) {
      // Relays' messages go over the hand-off channels: the client must too, to come after its rotation.
      // Accepted paused, the socket has read nothing: the relay's duplicate sees every byte.
      const fd = descriptorOf(client);
      if (fd < 0) return false;
      // As a native listener's clients have from their listening socket (the relay's dial sets only the backend's).
      client.setNoDelay(true);
      client.setKeepAlive(true, KEEPALIVE_IDLE_MS);
      if (!this.sendDescriptor(listener, fd, backends, start, anyBackend, ejected)) return false;
      client.destroy();
      return true;
    }
    const relay = this.nextRelay();
    if (!relay) return false;
    this.sendRotation(relay, listener, backends, undefined);
    const message: HandOff = { t: "conn", l: listener, s: start, any: anyBackend };
    if (ejected) message.e = ejected;
    relay.open.set(listener, (relay.open.get(listener) ?? 0) + 1);
    relay.sending.add(client);
    relay.child.send(message, client, (err) => {
      relay.sending.delete(client);
      if (!err) return;
      // The relay went away before it got the socket: the connection ends here.
      client.destroy();
      this.ended(relay, listener, 1);
    });
    return true;
  }

  /** Asks every relay to finish its connections within the deadline, and waits for them to exit. */
  async stop(deadlineMs: number): Promise<void> {
    this.stopping = true;
    await Promise.all(
      this.relays.map(async (relay) => {
        this.send(relay, { t: "stop", deadlineMs });
        const killed = setTimeout(() => relay.child.kill("SIGKILL"), deadlineMs + 5_000);
        await relay.exited;
        clearTimeout(killed);
      }),
    );
  }

  private nextRelay(): Relay | undefined {
    for (let tried = 0; tried < this.relays.length; tried++) {
      const relay = this.relays[this.turn++ % this.relays.length] as Relay;
      if (!relay.dead && relay.child.connected) return relay;
    }
    return undefined;
  }

  /** Sends the listener's rotation (on the channel, with the backends out of it) unless the relay has it; false when it could not be sent. */
  private sendRotation(relay: Relay, listener: number, backends: readonly Endpoint[], ejected: string[] | undefined): boolean {
    const ejectedNow = ejected?.join(",") ?? "";
    const last = relay.rotations.get(listener);
    if (last?.backends === backends && last.ejected === ejectedNow && last.state !== "failed") return last.state === "sent";
    const message: Rotation = { t: "rotation", l: listener, b: backends.map((b) => ({ host: b.host, port: b.port })) };
    if (ejected) message.e = ejected;
    const sent = this.send(relay, message, listener);
    // Waiting, it still reaches the relay before any client (none is handed over while messages wait), so it is
    // recorded as sent. A relay that dies first is replaced with no records.
    relay.rotations.set(listener, { backends, ejected: ejectedNow, state: sent === "waiting" ? "sent" : sent });
    return sent === "sent";
  }

  /**
   * A message to the relay, on its hand-off channel (in order with its
   * clients) or Node's IPC: sent, waiting for room in the channel, refused
   * (too big for it: never sent), or failed (the channel would not take it).
   */
  private send(relay: Relay, message: ToRelay, rotationOf?: number): "sent" | "waiting" | "refused" | "failed" {
    if (relay.channel === undefined) {
      if (relay.child.connected) relay.child.send(message);
      return "sent";
    }
    const bytes = Buffer.from(JSON.stringify(message));
    if (bytes.length > relay.controlMaxBytes) {
      this.unsendable(relay, errnoError(-EMSGSIZE, "send", `relay ${relay.index}: a ${bytes.length}-byte message is more than its channel takes (${relay.controlMaxBytes})`));
      return "refused";
    }
    const entry: Relay["unsent"][number] = { bytes, rotationOf };
    relay.unsent.push(entry);
    this.flush(relay);
    if (entry.failed) return "failed";
    return relay.unsent.includes(entry) ? "waiting" : "sent";
  }

  /** Sends the channel's waiting messages in order; what the channel has no room for now is tried again soon. */
  private flush(relay: Relay): void {
    while (relay.unsent.length > 0 && relay.channel !== undefined) {
      const entry = relay.unsent[0] as Relay["unsent"][number];
      const { bytes, rotationOf } = entry;
      const r = (this.native as NativeModule).sendControl(relay.channel, bytes);
      if (r === -EAGAIN || r === -ENOBUFS || r === -ENOMEM) {
        relay.retryTimer ??= setTimeout(() => {
          relay.retryTimer = undefined;
          this.flush(relay);
        }, RETRY_UNSENT_MS);
        return;
      }
      relay.unsent.shift();
      if (r < 0) {
        entry.failed = true;
        // The relay does not have this rotation: the listener's next client sends it again.
        const record = rotationOf === undefined ? undefined : relay.rotations.get(rotationOf);
        if (record) record.state = "failed";
        // The relay is gone, and its exit settles its accounts. Anything else is this message's fault.
        if (!relay.dead && r !== -EPIPE && r !== -ECONNRESET) {
          this.unsendable(relay, errnoError(r, "send", r === -EMSGSIZE ? `relay ${relay.index}: a ${bytes.length}-byte message is more than the channel takes` : `relay ${relay.index}`));
        }
      }
    }
  }

  /** A message no relay can be sent: its listener's connections stay in this process. Logged at most every UNSENT_LOG_MS per relay. */
  private unsendable(relay: Relay, err: Error): void {
    const now = Date.now();
    if (now - relay.unsentLoggedAt < UNSENT_LOG_MS) return;
    relay.unsentLoggedAt = now;
    this.logger.error({ err, relay: relay.index }, "relay-message-not-sent");
  }

  /** Settles `count` ended connections, never more than the relay has open (a late or repeated report counts once). */
  private ended(relay: Relay, listener: number, count: number): void {
    const open = relay.open.get(listener) ?? 0;
    const settled = Math.min(count, open);
    if (settled <= 0) return;
    if (open > settled) relay.open.set(listener, open - settled);
    else relay.open.delete(listener);
    this.listeners.get(listener)?.relayEnded(settled);
  }

  /** Async, so that a fork that throws is a rejection like any other failure to start. */
  private async spawn(index: number): Promise<void> {
    const native = this.native;
    let channel: number | undefined;
    let theirs: number | undefined;
    let controlMaxBytes = CONTROL_MAX_BYTES;
    if (native) {
      const ends = native.channel();
      if (typeof ends === "number") throw errnoError(ends, "socketpair", `relay ${index}'s hand-off channel`);
      let channelMax: number;
      [channel, theirs, channelMax] = ends;
      controlMaxBytes = Math.min(CONTROL_MAX_BYTES, channelMax);
    }
    // With the module the relay reads its clients and messages from the channel at RELAY_CHANNEL_FD.
    const env = { ...process.env, HARBOR_RELAY_INDEX: String(index), HARBOR_RELAY_CONNECT_TIMEOUT_MS: String(this.connectTimeoutMs), HARBOR_RELAY_IO: native ? "native" : "node" };
    let child: ChildProcess;
    try {
      // The relay's end becomes its descriptor RELAY_CHANNEL_FD (after stdio and IPC); this process keeps only its own.
      child = fork(this.relayMain, [], { env, stdio: ["ignore", "inherit", "inherit", "ipc", ...(theirs === undefined ? [] : [theirs])] });
    } catch (err) {
      if (channel !== undefined) native?.close(channel);
      throw err;
    } finally {
      if (theirs !== undefined) native?.close(theirs);
    }
    const startedAt = Date.now();
    const relay: Relay = {
      index,
      child,
      open: new Map(),
      rotations: new Map(),
      dead: false,
      sending: new Set(),
      exited: new Promise((resolve) => child.once("exit", () => resolve())),
      channel,
      controlMaxBytes,
      unsent: [],
      retryTimer: undefined,
      unsentLoggedAt: 0,
    };
    this.relays[index] = relay;
    child.on("message", (message: FromRelay) => this.receive(relay, message));
    child.on("error", (err) => this.logger.warn({ err, relay: index }, "relay-error"));
    void relay.exited.then(() => {
      relay.dead = true;
      // Clients still in the channel are closed with it: they are among its open ones, settled below.
      clearTimeout(relay.retryTimer);
      relay.unsent = [];
      if (relay.channel !== undefined) native?.close(relay.channel);
      relay.channel = undefined;
      let lost = 0;
      for (const [listener, count] of relay.open) {
        this.listeners.get(listener)?.relayEnded(count);
        lost += count;
      }
      relay.open.clear();
      // Clients still queued for it never reached it: they end here (counted among its open ones above).
      for (const client of relay.sending) client.destroy();
      relay.sending.clear();
      if (this.stopping) return;
      // Its connections are gone with it; the next ones need somewhere to go.
      const young = Date.now() - startedAt < LIVED_LONG_MS;
      const restartInMs = young ? Math.min(RESTART_MAX_MS, 2 * (this.restartDelays[index] ?? RESTART_FIRST_MS / 2)) : RESTART_FIRST_MS;
      this.restartDelays[index] = restartInMs;
      this.logger.error({ relay: index, exitCode: child.exitCode, signal: child.signalCode, connectionsLost: lost, restartInMs }, "relay-died-restarting");
      setTimeout(() => {
        // A stop that came meanwhile: a relay started now would never be told to stop, and keep the worker up.
        if (this.stopping) return;
        void this.spawn(index).catch((err: unknown) => this.logger.error({ err, relay: index }, "relay-restart-failed"));
      }, restartInMs).unref();
    });
    return new Promise((resolve, reject) => {
      const onExit = () => reject(new Error(`relay ${index} exited before it was ready`));
      child.once("exit", onExit);
      // Its first message says it is ready.
      child.once("message", () => {
        child.removeListener("exit", onExit);
        resolve();
      });
    });
  }

  private receive(relay: Relay, message: FromRelay): void {
    if (typeof message !== "object" || message === null) return;
    if (message.t === "stats") {
      for (const [listener, count] of message.closed) this.ended(relay, listener, count);
      this.counters.tcpProxied += message.proxied;
      this.counters.tcpAllBackendsFailed += message.allFailed;
      this.counters.tcpBytesToBackend += message.bytesToBackend;
      this.counters.tcpBytesToClient += message.bytesToClient;
    } else if (message.t === "failed") {
      this.listeners.get(message.l)?.backendFailed({ host: message.host, port: message.port }, new Error(message.err));
    }
  }
}
