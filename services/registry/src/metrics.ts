import { Counter, Gauge, type MetricsRegistry } from "@harbor/runtime";
import type { RegistryStore } from "./store.js";

export type RegistryMetrics = ReturnType<typeof registryMetrics>;

/** The registry's metrics, on the process's registry (a private one when none is given). */
export function registryMetrics(store: RegistryStore, registry?: MetricsRegistry) {
  const registers = registry ? [registry] : [];
  new Gauge({
    name: "harbor_registry_instances",
    help: "Instances registered now (all replicas; read from Postgres at scrape)",
    registers,
    async collect() {
      this.set((await store.listInstances()).length);
    },
  });
  return {
    registrations: new Counter({
      name: "harbor_registry_registrations_total",
      help: "RegisterInstance calls: new instances, changed ones, and heartbeats that changed nothing",
      labelNames: ["kind"] as const,
      registers,
    }),
    departures: new Counter({
      name: "harbor_registry_departures_total",
      help: "Instances gone, deregistered or expired",
      labelNames: ["reason"] as const,
      registers,
    }),
    setsPublished: new Counter({
      name: "harbor_registry_backend_sets_published_total",
      help: "Backend sets published with a new revision",
      registers,
    }),
  };
}
