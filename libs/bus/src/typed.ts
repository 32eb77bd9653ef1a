import type { Logger } from "pino";
import type { Bus, BusSubscription } from "./bus.js";

/** The proto3 JSON half of a ts-proto message type. */
export interface JsonCodec<T> {
  fromJSON(object: unknown): T;
  toJSON(message: T): unknown;
}

/** Publishes a message as proto3 JSON, so `nats sub 'harbor.>'` stays readable. */
export function publishMessage<T>(bus: Bus, subject: string, codec: JsonCodec<T>, message: T): void {
  bus.publish(subject, JSON.stringify(codec.toJSON(message)));
}

export function encodeMessage<T>(codec: JsonCodec<T>, message: T): string {
  return JSON.stringify(codec.toJSON(message));
}

/** Parses proto3 JSON; throws on anything that is not a JSON object. */
export function decodeMessage<T>(codec: JsonCodec<T>, data: string): T {
  const parsed: unknown = JSON.parse(data);
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    throw new Error("payload is not a JSON object");
  }
  return codec.fromJSON(parsed);
}

/**
 * Subscribes with decoding. A payload that does not parse, or that the
 * handler rejects, is logged with its subject and dropped: a malformed
 * message never stops the subscriber.
 */
export function subscribeMessages<T>(
  bus: Bus,
  subject: string,
  codec: JsonCodec<T>,
  logger: Logger,
  handler: (message: T, subject: string) => void | Promise<void>,
  options: { queue?: string } = {},
): BusSubscription {
  return bus.subscribe(subject, (msg) => {
    let message: T;
    try {
      message = decodeMessage(codec, msg.data);
    } catch (err) {
      logger.warn({ subject: msg.subject, err, bytes: msg.data.length }, "bus-message-malformed");
      return;
    }
    try {
      const done = handler(message, msg.subject);
      if (done) done.catch((err: unknown) => logger.warn({ subject: msg.subject, err }, "bus-message-rejected"));
    } catch (err) {
      logger.warn({ subject: msg.subject, err }, "bus-message-rejected");
    }
  }, options);
}
