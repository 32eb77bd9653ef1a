import http from "node:http";
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from "prom-client";
import type { Component } from "./lifecycle.js";
import type { Logger } from "./logger.js";
import { parseAddress } from "./config.js";

export type MetricsRegistry = Registry;
export { Counter, Gauge, Histogram };

/** A registry with the process's default metrics (CPU, memory, event loop). */
export function createMetricsRegistry(): MetricsRegistry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  return registry;
}

/** Serves `GET /metrics` in the Prometheus text format. */
export function createMetricsServer(address: string, registry: MetricsRegistry, logger: Logger): Component {
  const { host, port } = parseAddress(address) ?? { host: "127.0.0.1", port: 9300 };
  const server = http.createServer((req, res) => {
    if (req.url !== "/metrics") {
      res.writeHead(404).end("see /metrics\n");
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { "content-type": registry.contentType }).end(text),
      (err: unknown) => res.writeHead(500).end(String(err)),
    );
  });
  return {
    name: "metrics-server",
    async start() {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(port, host, () => resolve());
      });
      logger.info({ address: `${host}:${(server.address() as { port: number }).port}` }, "metrics-listening");
    },
    async stop() {
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
