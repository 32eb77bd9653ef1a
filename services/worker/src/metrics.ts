import { Counter, Gauge, Histogram, type MetricsRegistry } from "@harbor/runtime";

/**
 * Plain numbers the data plane bumps on its hot paths (no label lookups per
 * packet); Prometheus reads them at scrape time.
 */
export class DataPlaneCounters {
  tcpProxied = 0;
  tcpNoBackend = 0;
  tcpOverLimit = 0;
  tcpAllBackendsFailed = 0;
  tcpBytesToBackend = 0;
  tcpBytesToClient = 0;
  tcpBackendFailures = 0;
  /** With relays: connections a relay took, and those this process carried because none could (behind or restarting). */
  tcpToRelays = 0;
  tcpRelaysBusy = 0;
  udpToBackend = 0;
  udpToClient = 0;
  udpDropped = 0;
  udpBackendUnreachable = 0;
}

/** A counter whose values, by one label, are totals the data plane keeps itself; read at scrape. */
function totals(registers: MetricsRegistry[], name: string, help: string, label: string, read: () => Record<string, number>): void {
  new Counter({
    name,
    help,
    labelNames: [label],
    registers,
    collect() {
      this.reset();
      for (const [value, total] of Object.entries(read())) this.inc({ [label]: value }, total);
    },
  });
}

export interface ListenerGauges {
  openConnections(): number;
  udpSessions(): number;
  listeningPorts(): number;
  /** Kernel mode: flows the kernel sent on, from the nftables counters (read at scrape). */
  kernelFlows?(): Promise<{ tcp: number; udp: number }>;
  /** Native data path: the pipes bulk TCP flows are spliced through, in this process. */
  splicePipes?(): { open: number; spare: number };
}


/** The worker's metrics, on the process's registry (a private one when none is given, as in tests). */
export function workerMetrics(counters: DataPlaneCounters, gauges: ListenerGauges, registry?: MetricsRegistry) {
  const registers = registry ? [registry] : [];
  totals(registers, "harbor_worker_tcp_connections_total", "TCP connections accepted, by outcome", "outcome", () => ({
    proxied: counters.tcpProxied,
    no_backend: counters.tcpNoBackend,
    over_limit: counters.tcpOverLimit,
    all_backends_failed: counters.tcpAllBackendsFailed,
  }));
  totals(registers, "harbor_worker_tcp_bytes_total", "Bytes carried over TCP (counted when a connection closes)", "direction", () => ({
    to_backend: counters.tcpBytesToBackend,
    to_client: counters.tcpBytesToClient,
  }));
  totals(registers, "harbor_worker_relay_handoffs_total", "With relays: TCP connections handed to a relay, or carried by the worker because no relay could take one (behind or restarting)", "outcome", () => ({
    relayed: counters.tcpToRelays,
    carried_here: counters.tcpRelaysBusy,
  }));
  totals(registers, "harbor_worker_udp_datagrams_total", "UDP datagrams, by direction; dropped = no backend", "direction", () => ({
    to_backend: counters.udpToBackend,
    to_client: counters.udpToClient,
    dropped: counters.udpDropped,
  }));
  totals(registers, "harbor_worker_backend_errors_total", "Backends that refused a TCP connection or were unreachable over UDP", "protocol", () => ({
    tcp: counters.tcpBackendFailures,
    udp: counters.udpBackendUnreachable,
  }));
  const kernelFlows = gauges.kernelFlows;
  if (kernelFlows) {
    new Counter({
      name: "harbor_worker_kernel_flows_total",
      help: "Kernel mode: new TCP connections and UDP flows the node's nftables rules sent on (or refused), by protocol",
      labelNames: ["protocol"],
      registers,
      async collect() {
        const flows = await kernelFlows();
        this.reset();
        this.inc({ protocol: "tcp" }, flows.tcp);
        this.inc({ protocol: "udp" }, flows.udp);
      },
    });
  }
  const splicePipes = gauges.splicePipes;
  if (splicePipes) {
    new Gauge({
      name: "harbor_worker_splice_pipes",
      help: "Pipes the native data path splices bulk TCP flows through (two descriptors each), in_use or spare (kept empty for the next)",
      labelNames: ["state"],
      registers,
      collect() {
        const { open, spare } = splicePipes();
        this.set({ state: "in_use" }, open - spare);
        this.set({ state: "spare" }, spare);
      },
    });
  }
  new Gauge({
    name: "harbor_worker_tcp_connections_open",
    help: "TCP connections open now",
    registers,
    collect() {
      this.set(gauges.openConnections());
    },
  });
  new Gauge({
    name: "harbor_worker_udp_sessions",
    help: "UDP sessions open now",
    registers,
    collect() {
      this.set(gauges.udpSessions());
    },
  });
  new Gauge({
    name: "harbor_worker_listening_ports",
    help: "Ports (per protocol) the worker listens on",
    registers,
    collect() {
      this.set(gauges.listeningPorts());
    },
  });
  return {
    bindFailures: new Counter({
      name: "harbor_worker_bind_failures_total",
      help: "Times a worker could not listen on a service's port",
      labelNames: ["protocol"] as const,
      registers,
    }),
    propagation: new Histogram({
      name: "harbor_worker_propagation_seconds",
      help: "From a change reaching the registry (an instance registered or gone) to the worker applying the new backend set",
      // Fine from 1 to 20 ms: the target is a p99 of 10 ms.
      buckets: [0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
      registers,
    }),
  };
}
