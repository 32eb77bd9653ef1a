import { connect, type NatsConnection } from "@nats-io/transport-node";
import type { Logger } from "pino";
import type { Bus, BusMessage, BusSubscription } from "./bus.js";

export interface NatsOptions {
  url: string;
  logger: Logger;
  /** Give up the first connection after this long; reconnects after that never give up. */
  connectTimeoutMs?: number;
  /** How long `close()` lets the drain run before closing outright (default 5 s). */
  drainTimeoutMs?: number;
  token?: string;
  user?: string;
  pass?: string;
}

const encoder = new TextEncoder();
const DRAIN_TIMEOUT_MS = 5_000;

/** A NATS server's max_payload unless it is configured otherwise (1 MB). */
const NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024;

/** The bus over a NATS connection that reconnects for as long as it takes. */
export class NatsBus implements Bus {
  readonly kind = "nats" as const;
  private readonly reconnectListeners: Array<() => void> = [];
  private connected = true;
  private closing: Promise<void> | undefined;

  private constructor(
    private readonly nc: NatsConnection,
    private readonly logger: Logger,
    private readonly drainTimeoutMs: number,
  ) {
    void this.watchStatus();
  }

  static async connect(options: NatsOptions): Promise<NatsBus> {
    const nc = await connect({
      servers: options.url.split(","),
      name: "harbor",
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
      // A server that stopped answering (no RST: a hung host, a dropped route) is
      // noticed after two missed pings, ~30 s, not the client's default ~4 min;
      // then the reconnect and the resync that follows it begin.
      pingInterval: 15_000,
      maxPingOut: 2,
      timeout: options.connectTimeoutMs ?? 5_000,
      ...(options.token ? { token: options.token } : {}),
      ...(options.user ? { user: options.user, pass: options.pass ?? "" } : {}),
    });
    options.logger.info({ server: nc.getServer() }, "nats-connected");
    return new NatsBus(nc, options.logger, options.drainTimeoutMs ?? DRAIN_TIMEOUT_MS);
  }

  private async watchStatus(): Promise<void> {
    for await (const status of this.nc.status()) {
      switch (status.type) {
        case "disconnect":
          this.connected = false;
          this.logger.warn({ server: status.server }, "nats-connection-lost");
          break;
        case "reconnect":
          this.connected = true;
          this.logger.info({ server: status.server }, "nats-connection-reconnected");
          // A listener that throws must not end this loop (the bus would stop
          // tracking the connection) nor keep the listeners after it from resyncing.
          for (const listener of this.reconnectListeners) {
            try {
              listener();
            } catch (err) {
              this.logger.error({ err }, "nats-reconnect-listener-failed");
            }
          }
          break;
        case "error":
          this.logger.warn({ err: status.error }, "nats-error");
          break;
        default:
          break;
      }
    }
  }

  /** Never throws at the caller (often a timer): a message NATS refuses is logged and dropped. */
  publish(subject: string, data: string): void {
    try {
      this.nc.publish(subject, encoder.encode(data));
    } catch (err) {
      this.logger.error({ subject, bytes: data.length, err }, "bus-publish-failed");
    }
  }

  subscribe(subject: string, handler: (msg: BusMessage) => void, options: { queue?: string } = {}): BusSubscription {
    const sub = this.nc.subscribe(subject, {
      ...(options.queue ? { queue: options.queue } : {}),
      callback: (err, msg) => {
        if (err) {
          this.logger.warn({ err, subject }, "nats-subscription-error");
          return;
        }
        // The client calls this from its socket reader: an exception escaping
        // here ends the reader, and the connection reads nothing more (no
        // message, no PONG) while it still counts as connected.
        try {
          handler({
            subject: msg.subject,
            data: msg.string(),
            respond: (answer) => {
              if (!msg.reply) return;
              try {
                msg.respond(encoder.encode(answer));
              } catch (respondErr) {
                this.logger.error({ subject: msg.subject, bytes: answer.length, err: respondErr }, "bus-respond-failed");
              }
            },
          });
        } catch (handlerErr) {
          this.logger.error({ subject: msg.subject, err: handlerErr }, "bus-handler-failed");
        }
      },
    });
    return { unsubscribe: () => sub.unsubscribe() };
  }

  async request(subject: string, data: string, timeoutMs: number): Promise<string> {
    const msg = await this.nc.request(subject, encoder.encode(data), { timeout: timeoutMs });
    return msg.string();
  }

  flush(): Promise<void> {
    return this.nc.flush();
  }

  isConnected(): boolean {
    return this.connected && !this.nc.isClosed();
  }

  maxPayloadBytes(): number {
    return this.nc.info?.max_payload ?? NATS_DEFAULT_MAX_PAYLOAD;
  }

  onReconnect(listener: () => void): void {
    this.reconnectListeners.push(listener);
  }

  /**
   * Drains (what was published reaches the server, subscriptions end after
   * their last message), then closes. A NATS that stopped answering without
   * closing the connection never confirms the drain, and the client notices
   * only after minutes of missed pings: past the deadline the connection is
   * closed outright, so a shutdown never waits on NATS.
   */
  close(): Promise<void> {
    this.closing ??= this.drainThenClose();
    return this.closing;
  }

  private async drainThenClose(): Promise<void> {
    let timer: NodeJS.Timeout | undefined;
    const drained = this.nc.drain().then(
      () => "drained" as const,
      (err: unknown) => {
        this.logger.debug({ err }, "nats-drain-failed");
        return "failed" as const;
      },
    );
    const deadline = new Promise<"timeout">((resolve) => {
      timer = setTimeout(() => resolve("timeout"), this.drainTimeoutMs);
    });
    const outcome = await Promise.race([drained, deadline]);
    clearTimeout(timer);
    if (outcome === "timeout") this.logger.warn({ timeoutMs: this.drainTimeoutMs }, "nats-drain-timed-out");
    this.connected = false;
    if (!this.nc.isClosed()) await this.nc.close().catch((err: unknown) => this.logger.debug({ err }, "nats-close-failed"));
  }
}
