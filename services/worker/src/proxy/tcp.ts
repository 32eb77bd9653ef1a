import net from "node:net";
import type { Logger } from "pino";
import { Ejections, RoundRobin, systemClock } from "@harbor/core";
import { spliceSockets } from "@harbor/runtime";
import type { Backend } from "@harbor/proto";
import type { DataPlaneCounters } from "../metrics.js";
import type { PortListener } from "./listener.js";

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
}

interface Pair {
  client: net.Socket;
  upstream: net.Socket;
}

/**
 * One TCP port of a service. Each new connection goes to the next backend in
 * round-robin order; a backend that refuses is skipped for the next one. Open
 * connections belong to their pair of sockets, not to the backend set, so no
 * set change ever cuts them. With no backend the client is closed at once.
 */
export class TcpListener implements PortListener {
  readonly protocol = "tcp" as const;
  private readonly server: net.Server;
  private readonly rotation = new RoundRobin();
  private readonly open = new Set<Pair>();
  private readonly pending = new Set<net.Socket>();
  listening = false;
  error: string | undefined;
  readonly ejections: Ejections;

  constructor(private readonly options: TcpListenerOptions) {
    this.ejections = new Ejections(systemClock, options.passiveEjectMs);
    this.server = net.createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => this.accept(client));
    this.server.on("error", (err) => {
      // A failed bind is handled (and logged once) by listen().
      if (!this.listening) return;
      this.error = err.message;
      this.options.logger.warn({ err, port: options.port }, "tcp-listener-error");
    });
  }

  get port(): number {
    return this.options.port;
  }

  get connections(): number {
    return this.open.size + this.pending.size;
  }

  /** Binds the port; a failure (e.g. taken by another process) is recorded, not thrown. */
  async listen(): Promise<boolean> {
    const { host, port, logger, serviceId } = this.options;
    try {
      await new Promise<void>((resolve, reject) => {
        const onError = (err: Error) => reject(err);
        this.server.once("error", onError);
        this.server.listen({ host, port, backlog: 1024, exclusive: true }, () => {
          this.server.removeListener("error", onError);
          resolve();
        });
      });
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
    if (!this.listening) return;
    this.listening = false;
    // Stops accepting and frees the port now; server.close()'s callback would wait
    // for every open connection, stalling whoever awaits this (drain() handles those).
    this.server.close();
    this.options.logger.info({ serviceId: this.options.serviceId, port: this.options.port, open: this.connections }, "tcp-listener-closed");
  }

  /** Connections already open stay with their backend; new ones read the set when they start. */
  backendsChanged(): void {}

  /** Waits for open connections to end, up to `deadlineMs`, then cuts the rest. */
  async drain(deadlineMs: number): Promise<void> {
    const until = Date.now() + deadlineMs;
    while (this.connections > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
    for (const pair of this.open) {
      pair.client.destroy();
      pair.upstream.destroy();
    }
    for (const socket of this.pending) socket.destroy();
  }

  private accept(client: net.Socket): void {
    client.on("error", () => undefined); // the pair's close handling tears both down
    if (this.connections >= this.options.maxConnections) {
      this.options.counters.tcpOverLimit++;
      client.destroy();
      return;
    }
    const backends = this.options.backends();
    const start = this.rotation.start(backends.length);
    if (start < 0) {
      this.options.counters.tcpNoBackend++;
      client.destroy();
      return;
    }
    this.pending.add(client);
    client.once("close", () => this.pending.delete(client));
    this.connect(client, backends, start, 0, this.allEjected(backends));
  }

  private allEjected(backends: readonly Backend[]): boolean {
    if (this.ejections.size === 0) return false;
    for (const b of backends) if (!this.ejections.isEjected(`${b.host}:${b.port}`)) return false;
    return true;
  }

  /**
   * Tries the rotation from `start`, `attempt` places on, passing over
   * backends out of rotation — unless every one is (`anyBackend`: better a
   * try than a certain refusal). Nothing is allocated per connection.
   */
  private connect(client: net.Socket, backends: readonly Backend[], start: number, attempt: number, anyBackend: boolean): void {
    if (client.destroyed) return;
    const n = backends.length;
    let i = attempt;
    while (i < n && !anyBackend && this.ejections.size > 0) {
      const candidate = backends[(start + i) % n] as Backend;
      if (!this.ejections.isEjected(`${candidate.host}:${candidate.port}`)) break;
      i++;
    }
    if (i >= n) {
      this.options.counters.tcpAllBackendsFailed++;
      client.destroy();
      return;
    }
    const backend = backends[(start + i) % n] as Backend;
    const upstream = net.connect({ host: backend.host, port: backend.port, allowHalfOpen: true });
    const timer = setTimeout(() => upstream.destroy(new Error(`connect timed out after ${this.options.connectTimeoutMs} ms`)), this.options.connectTimeoutMs);
    const abandon = () => {
      clearTimeout(timer);
      upstream.destroy();
    };
    client.once("close", abandon);
    upstream.once("error", (err) => {
      clearTimeout(timer);
      client.removeListener("close", abandon);
      const key = `${backend.host}:${backend.port}`;
      // Refused or timed out: out of rotation for a while, then tried again.
      if (!this.ejections.isEjected(key)) this.options.logger.info({ serviceId: this.options.serviceId, backend: key, err: err.message }, "backend-ejected");
      this.ejections.eject(key);
      this.options.counters.tcpBackendFailures++;
      this.connect(client, backends, start, i + 1, anyBackend);
    });
    upstream.once("connect", () => {
      clearTimeout(timer);
      client.removeListener("close", abandon);
      upstream.removeAllListeners("error");
      this.splice(client, upstream);
    });
  }

  private splice(client: net.Socket, upstream: net.Socket): void {
    this.pending.delete(client);
    const pair: Pair = { client, upstream };
    this.open.add(pair);
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    this.options.counters.tcpProxied++;
    spliceSockets(client, upstream, () => {
      this.open.delete(pair);
      // Counted once, at close: nothing is added up per chunk.
      this.options.counters.tcpBytesToBackend += upstream.bytesWritten;
      this.options.counters.tcpBytesToClient += client.bytesWritten;
    });
    client.resume();
  }
}
