import { Counter, type MetricsRegistry } from "@harbor/runtime";

/** The worker's metrics, on the process's registry (a private one when none is given, as in tests). */
export function workerMetrics(registry?: MetricsRegistry) {
  const registers = registry ? [registry] : [];
  return {
    bindFailures: new Counter({
      name: "harbor_worker_bind_failures_total",
      help: "Times a worker could not listen on a service's port",
      labelNames: ["protocol"] as const,
      registers,
    }),
  };
}
