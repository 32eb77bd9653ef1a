import type { Logger } from "pino";
import type { Bus } from "./bus.js";
import { InProcessBus } from "./memory.js";
import { NatsBus } from "./nats.js";

export const LOCAL_NATS_URL = "nats://127.0.0.1:4222";

export interface BusConnectOptions {
  /** An explicit NATS_URL: connect there and never fall back. */
  url?: string;
  /** Without a url: try the local server, else use the in-process bus. */
  fallbackToInProcess: boolean;
  logger: Logger;
  token?: string;
  user?: string;
  pass?: string;
}

/**
 * An explicit URL is waited for (retrying until NATS answers); without one, a
 * local server on 127.0.0.1:4222 is used if it answers at once, else the
 * in-process bus (one-process mode only).
 */
export async function connectBus(options: BusConnectOptions): Promise<Bus> {
  const { logger } = options;
  const auth = { token: options.token, user: options.user, pass: options.pass };
  if (options.url) {
    for (let attempt = 1; ; attempt++) {
      try {
        return await NatsBus.connect({ url: options.url, logger, ...definedOnly(auth) });
      } catch (err) {
        logger.warn({ err, url: options.url, attempt }, "nats-connect-failed-retrying");
        await new Promise((resolve) => setTimeout(resolve, Math.min(5_000, 250 * attempt)));
      }
    }
  }
  if (!options.fallbackToInProcess) {
    return NatsBus.connect({ url: LOCAL_NATS_URL, logger, ...definedOnly(auth) });
  }
  try {
    return await NatsBus.connect({ url: LOCAL_NATS_URL, logger, connectTimeoutMs: 1_000, ...definedOnly(auth) });
  } catch {
    logger.info({ tried: LOCAL_NATS_URL }, "nats-not-found-using-in-process-bus");
    return new InProcessBus();
  }
}

function definedOnly<T extends Record<string, unknown>>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}
