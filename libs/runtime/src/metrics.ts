import http from "node:http";
import { createRequire } from "node:module";
import type * as prom from "prom-client";
import type { Component } from "./lifecycle.js";
import type { Logger } from "./logger.js";
import { parseAddress } from "./config.js";

// prom-client's parts one by one, with require (one ESM wrapper per file would cost more than
// it saves): its index also loads the push gateway's HTTP clients, the cluster aggregator and,
// for the CPU metric's exemplars, @opentelemetry/api, none of which Harbor uses; the worker
// idles ~0.5 MiB lower without them (bench/RESULTS.md, "Memory"). metrics.spec.ts checks the
// parts still make prom-client's default metrics.
const requirePart = createRequire(import.meta.url);
const Registry = requirePart("prom-client/lib/registry.js") as typeof prom.Registry;

export type MetricsRegistry = prom.Registry;
// Typed as prom-client's index types them, as values and as types.
export const Counter = requirePart("prom-client/lib/counter.js") as typeof prom.Counter;
export type Counter<T extends string = string> = prom.Counter<T>;
export const Gauge = requirePart("prom-client/lib/gauge.js") as typeof prom.Gauge;
export type Gauge<T extends string = string> = prom.Gauge<T>;
export const Histogram = requirePart("prom-client/lib/histogram.js") as typeof prom.Histogram;
export type Histogram<T extends string = string> = prom.Histogram<T>;

/** A default metric of prom-client's: registers its metrics in the registry. */
type DefaultMetric = (registry: prom.Registry, config: { eventLoopMonitoringPrecision: number }) => void;
/** prom-client's default metrics but its CPU one (registerCpuSeconds), in its order. */
const DEFAULT_METRICS = [
  "processStartTime",
  "osMemoryHeap",
  "processOpenFileDescriptors",
  "processMaxFileDescriptors",
  "eventLoopLag",
  "processResources",
  "processHandles",
  "processRequests",
  "heapSizeAndUsed",
  "heapSpacesSizeAndUsed",
  "version",
  "gc",
].map((name) => requirePart(`prom-client/lib/metrics/${name}.js`) as DefaultMetric);

/** process_cpu_{user,system,}_seconds_total as prom-client names them, without its exemplars. */
function registerCpuSeconds(registry: prom.Registry): void {
  let last = process.cpuUsage();
  const counter = (name: string, help: string, collect?: () => void) => new Counter({ name, help, registers: [registry], collect });
  const user = counter("process_cpu_user_seconds_total", "Total user CPU time spent in seconds.", () => {
    const now = process.cpuUsage();
    user.inc((now.user - last.user) / 1e6);
    system.inc((now.system - last.system) / 1e6);
    total.inc((now.user - last.user + now.system - last.system) / 1e6);
    last = now;
  });
  const system = counter("process_cpu_system_seconds_total", "Total system CPU time spent in seconds.");
  const total = counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.");
}

/** A registry with the process's default metrics (CPU, memory, event loop). */
export function createMetricsRegistry(): MetricsRegistry {
  const registry = new Registry();
  registerCpuSeconds(registry);
  for (const register of DEFAULT_METRICS) register(registry, { eventLoopMonitoringPrecision: 10 });
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
