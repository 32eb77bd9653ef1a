import { describe, expect, it } from "vitest";
import { pino } from "pino";
import { NatsBus } from "./nats.js";

describe("bus - NATS", () => {
  it("a message NATS refuses (over its size limit) is logged and dropped, never thrown at the caller", async () => {
    const lines: string[] = [];
    const logger = pino({ level: "info" }, { write: (line: string) => lines.push(line) });
    const bus = await NatsBus.connect({ url: "nats://127.0.0.1:4222", logger });
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
});
