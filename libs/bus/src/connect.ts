import type { Logger } from "pino";
import { redactUrl } from "@harbor/core";
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
  /**
   * Stops the waiting for an explicit URL (a shutdown signalled while NATS
   * is away): connectBus then rejects instead of retrying for ever.
   */
  signal?: AbortSignal;
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
    const { signal } = options;
    for (let attempt = 1; ; attempt++) {
      signal?.throwIfAborted();
      try {
        const bus = await NatsBus.connect({ url: options.url, logger, ...definedOnly(auth) });
        if (signal?.aborted) {
          await bus.close();
          signal.throwIfAborted();
        }
        return bus;
      } catch (err) {
        if (signal?.aborted) throw signal.reason;
        logger.warn({ err, url: redactUrl(options.url, { user: true }), attempt }, "nats-connect-failed-retrying");
        await pause(Math.min(5_000, 250 * attempt), signal);
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
    return new InProcessBus(logger);
  }
}

/** Resolves after `ms`, or at once when `signal` is aborted (the loop then throws). */
function pause(ms: number, signal: AbortSignal | undefined): Promise<void> {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

function definedOnly<T extends Record<string, unknown>>(value: T): Partial<T> {
  return Object.fromEntries(Object.entries(value).filter(([, v]) => v !== undefined)) as Partial<T>;
}
