import { afterEach, describe, expect, it } from "vitest";
import { pino } from "pino";
import { startNatsLink, uniqueName, waitFor } from "@harbor/testkit";
import { connectBus } from "./connect.js";
import { NatsBus } from "./nats.js";

const NATS = "nats://127.0.0.1:4222";

/** A logger whose lines the test can read. */
function recordingLogger() {
  const lines: string[] = [];
  const logger = pino({ level: "debug" }, { write: (line: string) => lines.push(line) });
  return { logger, lines, logged: (event: string) => lines.some((l) => l.includes(`"msg":"${event}"`)) };
}

const within = <T>(promise: Promise<T>, ms: number) =>
  Promise.race([promise.then(() => "done" as const), new Promise<"timeout">((resolve) => setTimeout(() => resolve("timeout"), ms))]);

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => undefined);
});

describe("bus - NATS", () => {
  it("a message NATS refuses (over its size limit) is logged and dropped, never thrown at the caller", async () => {
    const { logger, lines } = recordingLogger();
    const bus = await NatsBus.connect({ url: NATS, logger });
    try {
      expect(() => bus.publish("harbor_test.big", "x".repeat(2 * 1024 * 1024))).not.toThrow();
      expect(lines.some((l) => l.includes('"msg":"bus-publish-failed"') && l.includes('"subject":"harbor_test.big"'))).toBe(true);
      // The connection is still usable.
      const reply = new Promise<string>((resolve) => bus.subscribe("harbor_test.small", (m) => resolve(m.data)));
      await bus.flush();
      bus.publish("harbor_test.small", "ok");
      expect(await reply).toBe("ok");
    } finally {
      await bus.close();
    }
  });

  it("a handler that throws is logged; the subscription and the connection go on", async () => {
    const { logger, lines } = recordingLogger();
    const bus = await NatsBus.connect({ url: NATS, logger });
    cleanups.push(() => bus.close());
    const subject = `${uniqueName("hbt")}.throws`;
    const seen: string[] = [];
    bus.subscribe(subject, (m) => {
      seen.push(m.data);
      if (m.data === "boom") throw new Error("a handler bug");
    });
    await bus.flush();
    for (const data of ["1", "boom", "2"]) bus.publish(subject, data);
    // The client's reader died with the exception: nothing more was read, not even the PONG of a flush.
    expect(await within(bus.flush(), 3_000)).toBe("done");
    await waitFor(() => seen.length === 3, "the message after the one whose handler threw");
    expect(seen).toEqual(["1", "boom", "2"]);
    expect(lines.some((l) => l.includes('"msg":"bus-handler-failed"') && l.includes(subject))).toBe(true);
  });

  it("an answer NATS refuses (over its size limit) is logged, never thrown at the handler", async () => {
    const { logger, logged } = recordingLogger();
    const bus = await NatsBus.connect({ url: NATS, logger });
    cleanups.push(() => bus.close());
    const subject = `${uniqueName("hbt")}.answers`;
    let threw: unknown;
    bus.subscribe(subject, (m) => {
      try {
        m.respond("x".repeat(2 * 1024 * 1024));
      } catch (err) {
        threw = err;
      }
    });
    await bus.flush();
    await bus.request(subject, "hi", 500).catch(() => undefined);
    expect(threw).toBeUndefined();
    expect(logged("bus-respond-failed")).toBe(true);
  });

  it("close() does not hang when NATS stopped answering: the drain gives up and the connection is closed", async () => {
    const proxy = await startNatsLink();
    cleanups.push(() => proxy.close());
    const { logger, logged } = recordingLogger();
    const bus = await NatsBus.connect({ url: proxy.url, logger, drainTimeoutMs: 1_000 });
    bus.subscribe(`${uniqueName("hbt")}.x`, () => undefined);
    await bus.flush();
    // The connection stays open but nothing comes back: the client sees no disconnect for minutes.
    proxy.stall();
    expect(await within(bus.close(), 5_000)).toBe("done");
    expect(bus.isConnected()).toBe(false);
    expect(logged("nats-drain-timed-out")).toBe(true);
    // Idempotent.
    expect(await within(bus.close(), 100)).toBe("done");
  });

  it("close() does not hang while NATS is down", async () => {
    const proxy = await startNatsLink();
    cleanups.push(() => proxy.close());
    const { logger } = recordingLogger();
    const bus = await NatsBus.connect({ url: proxy.url, logger });
    bus.subscribe(`${uniqueName("hbt")}.x`, () => undefined);
    await bus.flush();
    proxy.cut();
    await waitFor(() => !bus.isConnected(), "the disconnect");
    expect(await within(bus.close(), 8_000)).toBe("done");
  });

  it("after a reconnect, subscriptions carry on and every reconnect listener is called, even after one threw", async () => {
    const proxy = await startNatsLink();
    cleanups.push(() => proxy.close());
    const { logger, logged } = recordingLogger();
    const bus = await NatsBus.connect({ url: proxy.url, logger });
    cleanups.push(() => bus.close());
    const direct = await NatsBus.connect({ url: NATS, logger });
    cleanups.push(() => direct.close());
    const subject = `${uniqueName("hbt")}.events`;
    const seen: string[] = [];
    bus.subscribe(subject, (m) => seen.push(m.data), { queue: "harbor-test" });
    let reconnects = 0;
    bus.onReconnect(() => {
      throw new Error("a listener bug");
    });
    bus.onReconnect(() => reconnects++);
    await bus.flush();

    for (let round = 1; round <= 2; round++) {
      proxy.cut();
      await waitFor(() => !bus.isConnected(), "the disconnect");
      proxy.restore();
      await waitFor(() => reconnects === round, `reconnect ${round}`);
      expect(bus.isConnected()).toBe(true);
      // The client sends its subscriptions again on reconnect; a round trip makes sure the server has them.
      await bus.flush();
      direct.publish(subject, `after-${round}`);
      await waitFor(() => seen.includes(`after-${round}`), `an event after reconnect ${round}`);
    }
    expect(logged("nats-reconnect-listener-failed")).toBe(true);
  });
});

describe("bus - connecting", () => {
  it("an explicit NATS_URL is retried until NATS answers, and the retrying stops when aborted", async () => {
    const proxy = await startNatsLink();
    cleanups.push(() => proxy.close());
    proxy.cut();
    const { logger, logged } = recordingLogger();
    const abort = new AbortController();
    const connecting = connectBus({ url: proxy.url, fallbackToInProcess: false, logger, signal: abort.signal });
    connecting.catch(() => undefined);
    await waitFor(() => logged("nats-connect-failed-retrying"), "a failed attempt");
    abort.abort();
    expect(await within(connecting.catch(() => undefined), 2_000)).toBe("done");
    await expect(connecting).rejects.toThrow(/aborted/);
  });

  it("an explicit NATS_URL that comes up later is connected to", async () => {
    const proxy = await startNatsLink();
    cleanups.push(() => proxy.close());
    proxy.cut();
    const { logger, logged } = recordingLogger();
    const connecting = connectBus({ url: proxy.url, fallbackToInProcess: false, logger });
    await waitFor(() => logged("nats-connect-failed-retrying"), "a failed attempt");
    proxy.restore();
    const bus = await connecting;
    cleanups.push(() => bus.close());
    expect(bus.kind).toBe("nats");
    expect(bus.isConnected()).toBe(true);
  });
});
