import { describe, expect, it } from "vitest";
import { loadWorkerConfig } from "./config.js";

describe("worker config - HARBOR_WORKER_IO", () => {
  it("defaults to auto and takes native or node", () => {
    expect(loadWorkerConfig({}).io).toBe("auto");
    expect(loadWorkerConfig({ HARBOR_WORKER_IO: "native" }).io).toBe("native");
    expect(loadWorkerConfig({ HARBOR_WORKER_IO: "node" }).io).toBe("node");
  });

  it("refuses anything else, naming the variable and the values it takes", () => {
    expect(() => loadWorkerConfig({ HARBOR_WORKER_IO: "dgram" })).toThrow(/HARBOR_WORKER_IO=dgram: use auto, native or node/);
  });
});
