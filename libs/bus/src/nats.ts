import { connect, type NatsConnection } from "@nats-io/transport-node";
import type { Logger } from "pino";
import type { Bus, BusMessage, BusSubscription } from "./bus.js";

export interface NatsOptions {
  url: string;
  logger: Logger;
  /** Give up the first connection after this long; reconnects after that never give up. */
  connectTimeoutMs?: number;
  token?: string;
  user?: string;
  pass?: string;
}

const encoder = new TextEncoder();

/** The bus over a NATS connection that reconnects for as long as it takes. */
export class NatsBus implements Bus {
  readonly kind = "nats" as const;
  private readonly reconnectListeners: Array<() => void> = [];
  private connected = true;
  private closing: Promise<void> | undefined;

  private constructor(
    private readonly nc: NatsConnection,
    private readonly logger: Logger,
  ) {
    void this.watchStatus();
  }

  static async connect(options: NatsOptions): Promise<NatsBus> {
    const nc = await connect({
      servers: options.url.split(","),
      name: "harbor",
      maxReconnectAttempts: -1,
      reconnectTimeWait: 500,
      timeout: options.connectTimeoutMs ?? 5_000,
      ...(options.token ? { token: options.token } : {}),
      ...(options.user ? { user: options.user, pass: options.pass ?? "" } : {}),
    });
    options.logger.info({ server: nc.getServer() }, "nats-connected");
    return new NatsBus(nc, options.logger);
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
          for (const listener of this.reconnectListeners) listener();
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
        handler({
          subject: msg.subject,
          data: msg.string(),
          respond: (answer) => {
            if (msg.reply) msg.respond(encoder.encode(answer));
          },
        });
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

  onReconnect(listener: () => void): void {
    this.reconnectListeners.push(listener);
  }

  close(): Promise<void> {
    this.closing ??= this.nc.drain().catch((err: unknown) => {
      this.logger.debug({ err }, "nats-drain-failed");
    });
    return this.closing;
  }
}
