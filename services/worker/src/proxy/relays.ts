import { fork, type ChildProcess } from "node:child_process";
import type net from "node:net";
import { fileURLToPath } from "node:url";
import type { Logger } from "pino";
import type { DataPlaneCounters } from "../metrics.js";
import type { Endpoint } from "./dial.js";
import type { FromRelay, HandOff, ToRelay } from "./relay-protocol.js";

const RELAY_MAIN = fileURLToPath(new URL("./relay-main.js", import.meta.url));

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
  /** The rotation last sent for each listener id (the listener's own array: a new set is a new array). */
  rotations: Map<number, readonly Endpoint[]>;
  /** Exited (its IPC channel may still look connected for a moment): takes nothing more. */
  dead: boolean;
  /** Clients handed over whose send has not completed: Node queues handles, and a relay that dies drops its queue without a word. */
  sending: Set<net.Socket>;
  exited: Promise<void>;
}

/**
 * Relay processes that carry the bytes of the TCP connections this worker
 * accepts (HARBOR_WORKER_RELAYS > 0). The worker process keeps the
 * listening sockets, the backend sets and the round-robin counters, so every
 * choice stays exact; connections go to the relays in turn. A relay that dies
 * takes its open connections with it and is replaced.
 */
export class RelayPool {
  private readonly relays: Relay[] = [];
  private readonly listeners = new Map<number, RelayedListener>();
  private nextListener = 1;
  private turn = 0;
  private stopping = false;

  constructor(
    private readonly size: number,
    private readonly connectTimeoutMs: number,
    private readonly counters: DataPlaneCounters,
    private readonly logger: Logger,
    /** Who carries the relays' pairs: the native module (as in the worker), or Node's sockets. */
    private readonly io: "native" | "node" = "node",
    /** The relay's entry point; tests running from source pass the built one. */
    private readonly relayMain = RELAY_MAIN,
  ) {}

  async start(): Promise<void> {
    await Promise.all(Array.from({ length: this.size }, (_, index) => this.spawn(index)));
    this.logger.info({ relays: this.size }, "relays-started");
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

  /** Hands an accepted client to the next relay; false when none can take it now. */
  dispatch(listener: number, client: net.Socket, backends: readonly Endpoint[], start: number, anyBackend: boolean, ejected?: string[]): boolean {
    const relay = this.nextRelay();
    if (!relay) return false;
    if (relay.rotations.get(listener) !== backends) {
      this.send(relay, { t: "rotation", l: listener, b: backends.map((b) => ({ host: b.host, port: b.port })) });
      relay.rotations.set(listener, backends);
    }
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

  private send(relay: Relay, message: ToRelay): void {
    if (relay.child.connected) relay.child.send(message);
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

  private spawn(index: number): Promise<void> {
    const env = { ...process.env, HARBOR_RELAY_INDEX: String(index), HARBOR_RELAY_CONNECT_TIMEOUT_MS: String(this.connectTimeoutMs), HARBOR_RELAY_IO: this.io };
    const child = fork(this.relayMain, [], { env, stdio: ["ignore", "inherit", "inherit", "ipc"] });
    const relay: Relay = { index, child, open: new Map(), rotations: new Map(), dead: false, sending: new Set(), exited: new Promise((resolve) => child.once("exit", () => resolve())) };
    this.relays[index] = relay;
    child.on("message", (message: FromRelay) => this.receive(relay, message));
    child.on("error", (err) => this.logger.warn({ err, relay: index }, "relay-error"));
    void relay.exited.then(() => {
      relay.dead = true;
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
      this.logger.error({ relay: index, exitCode: child.exitCode, signal: child.signalCode, connectionsLost: lost }, "relay-died-restarting");
      setTimeout(() => {
        // A stop that came meanwhile: a relay started now would never be told to stop, and keep the worker up.
        if (this.stopping) return;
        void this.spawn(index).catch((err: unknown) => this.logger.error({ err, relay: index }, "relay-restart-failed"));
      }, 500).unref();
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
