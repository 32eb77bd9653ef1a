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

describe("worker config - HARBOR_UDP_RECEIVE_BUFFER_BYTES", () => {
  it("defaults to 4 MiB; 0 leaves the system's default", () => {
    expect(loadWorkerConfig({}).udpReceiveBufferBytes).toBe(4 << 20);
    expect(loadWorkerConfig({ HARBOR_UDP_RECEIVE_BUFFER_BYTES: "0" }).udpReceiveBufferBytes).toBe(0);
    expect(loadWorkerConfig({ HARBOR_UDP_RECEIVE_BUFFER_BYTES: "1048576" }).udpReceiveBufferBytes).toBe(1 << 20);
  });

  it("refuses what is not a size from 0 to 1 GiB, naming the variable", () => {
    expect(() => loadWorkerConfig({ HARBOR_UDP_RECEIVE_BUFFER_BYTES: "4M" })).toThrow(/HARBOR_UDP_RECEIVE_BUFFER_BYTES/);
    expect(() => loadWorkerConfig({ HARBOR_UDP_RECEIVE_BUFFER_BYTES: "-1" })).toThrow(/HARBOR_UDP_RECEIVE_BUFFER_BYTES/);
    expect(() => loadWorkerConfig({ HARBOR_UDP_RECEIVE_BUFFER_BYTES: String(2 ** 31) })).toThrow(/HARBOR_UDP_RECEIVE_BUFFER_BYTES/);
  });
});
