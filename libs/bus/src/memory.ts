import type { Logger } from "pino";
import type { Bus, BusMessage, BusSubscription } from "./bus.js";
import { subjectMatches } from "./bus.js";

interface Entry {
  pattern: string;
  handler: (msg: BusMessage) => void;
}

/**
 * The bus of one-process mode when no NATS server is reachable. Delivery is
 * asynchronous (a microtask), like a network bus, so code behaves the same
 * on both.
 */
export class InProcessBus implements Bus {
  readonly kind = "in-process" as const;
  private entries = new Set<Entry>();
  private inbox = 0;

  /** Where a handler that throws is reported (as NatsBus does); without one, on stderr. */
  constructor(private readonly logger?: Logger) {}

  publish(subject: string, data: string, replyTo?: string): void {
    const matching = [...this.entries].filter((e) => subjectMatches(e.pattern, subject));
    queueMicrotask(() => {
      for (const entry of matching) {
        if (!this.entries.has(entry)) continue;
        const msg: BusMessage = {
          subject,
          data,
          respond: (answer) => {
            if (replyTo) this.publish(replyTo, answer);
          },
        };
        // As over NATS, a handler that throws is reported and the others still get
        // the message: thrown from this microtask, it would end the process.
        try {
          entry.handler(msg);
        } catch (err) {
          if (this.logger) this.logger.error({ subject, err }, "bus-handler-failed");
          else process.stderr.write(`bus-handler-failed on ${subject}: ${(err as Error)?.stack ?? String(err)}\n`);
        }
      }
    });
  }

  /** One process holds every member of a queue group, so `queue` changes nothing here. */
  subscribe(subject: string, handler: (msg: BusMessage) => void): BusSubscription {
    const entry = { pattern: subject, handler };
    this.entries.add(entry);
    return { unsubscribe: () => this.entries.delete(entry) };
  }

  request(subject: string, data: string, timeoutMs: number): Promise<string> {
    // As NATS answers a request nobody subscribes to: at once, not at the timeout.
    if (![...this.entries].some((e) => subjectMatches(e.pattern, subject))) return Promise.reject(new Error(`no responders: '${subject}'`));
    const inbox = `_INBOX.${++this.inbox}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        sub.unsubscribe();
        reject(new Error(`no answer on ${subject} within ${timeoutMs} ms`));
      }, timeoutMs);
      const sub = this.subscribe(inbox, (msg) => {
        clearTimeout(timer);
        sub.unsubscribe();
        resolve(msg.data);
      });
      this.publish(subject, data, inbox);
    });
  }

  async flush(): Promise<void> {
    await new Promise((resolve) => setImmediate(resolve));
  }

  isConnected(): boolean {
    return true;
  }

  maxPayloadBytes(): number {
    return Number.POSITIVE_INFINITY;
  }

  onReconnect(): void {
    // Never disconnects.
  }

  async close(): Promise<void> {
    this.entries.clear();
  }
}
