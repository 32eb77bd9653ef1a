import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createPool, type Pool } from "@harbor/db";
import { createLogger } from "@harbor/runtime";
import { startTestAllocator, type TestAllocator } from "./allocator.fixture.js";
import { PortStore } from "./store.js";

let harness: TestAllocator;
let smallPool: Pool;

beforeAll(async () => {
  // The allocator migrates the database and adds node n1; the store under test shares it.
  harness = await startTestAllocator({ HARBOR_NODE_ID: "n1", HARBOR_PORT_RANGE: "30000-30999" });
  smallPool = createPool({ url: harness.db.url, logger: createLogger("test", "silent"), max: 2 });
});

afterAll(async () => {
  await smallPool?.end();
  await harness?.stop();
});

describe("port store - a pool smaller than the creates at once", () => {
  it("creates them all: the first count of free ports runs on a creating client, never waits for another", async () => {
    const store = new PortStore(smallPool);
    const creates = Array.from({ length: 8 }, (_, i) =>
      store.createService({ serviceName: `crowd-${i}`, protocol: "tcp", httpsProxy: false }, undefined, {}, async () => undefined),
    );
    let timer: NodeJS.Timeout | undefined;
    const stuck = new Promise<"stuck">((resolve) => (timer = setTimeout(() => resolve("stuck"), 10_000)));
    const outcome = await Promise.race([Promise.all(creates), stuck]).finally(() => clearTimeout(timer));
    expect(outcome).not.toBe("stuck");
    const ports = (outcome as Array<{ port: number }>).map((s) => s.port);
    expect(new Set(ports).size).toBe(8);
    expect(ports.every((p) => p >= 30000 && p <= 30999)).toBe(true);
  });
});
