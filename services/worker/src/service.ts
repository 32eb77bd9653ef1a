import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { isIPv4 } from "node:net";
import { publishMessage, type Bus, type Subjects } from "@harbor/bus";
import { BackendRegistryClient, PortAllocatorClient, PortBindFailed, Protocol, WorkerHeartbeat, timestampFromMs } from "@harbor/proto";
import { DataPlaneCounters, workerMetrics } from "./metrics.js";
import { CLIENT_OPTIONS, grpc, type Component, type Logger, type MetricsRegistry } from "@harbor/runtime";
import type { WorkerConfig } from "./config.js";
import { NodeView, protocolsOf, type ServiceView } from "./domain/node-view.js";
import type { PortListener } from "./proxy/listener.js";
import { TcpListener } from "./proxy/tcp.js";
import { UdpListener } from "./proxy/udp.js";
import { batchedIo } from "./proxy/batched.js";
import { dgramIo } from "./proxy/datagram.js";
import { nativeModule, nativeUnavailable } from "./proxy/native.js";
import { RelayPool } from "./proxy/relays.js";
import { HealthChecker } from "./proxy/health.js";
import { KernelListener } from "./kernel/listener.js";
import { tableName } from "./kernel/render.js";
import { KernelTable, conntrackProblem, kernelHostProblem, kernelModeAvailable, otherHarborTables } from "./kernel/table.js";
import { normalizeHealthCheck, sameHealthCheck } from "@harbor/core";
import { Follower } from "./sync/follower.js";

export interface WorkerDeps {
  bus: Bus;
  subjects: Subjects;
  logger: Logger;
  metrics?: MetricsRegistry;
}

export interface Worker extends Component {
  readonly view: NodeView;
  /** Ports with an open listener. */
  listeningPorts(): number[];
}

/**
 * The data plane of one harbor node. Stateless: everything it serves comes
 * from a snapshot of the control plane and the events that follow.
 */
export function createWorker(config: WorkerConfig, deps: WorkerDeps): Worker {
  const logger = deps.logger.child({ component: "worker", nodeId: config.nodeId });
  const workerId = randomUUID();
  const view = new NodeView();
  /** Keyed `<service id>/<protocol>`. */
  const listeners = new Map<string, PortListener>();
  /**
   * Listeners closed while connections were open through them (their service
   * went, moved port or host): those connections carry on, and a stop drains
   * them with the rest. Dropped once nothing is open.
   */
  const retired = new Set<PortListener>();
  const retire = (listener: PortListener) => {
    if (listener.connections > 0) retired.add(listener);
  };
  const serviceOf = (key: string) => key.slice(0, key.indexOf("/"));
  /** Listeners whose failure to bind has been reported. */
  const bindFailures = new Set<string>();
  // Throws for HARBOR_WORKER_IO=native where the module is not built: the operator asked for it.
  const native = config.mode === "userspace" ? nativeModule(config.io) : undefined;
  const counters = new DataPlaneCounters();
  const metrics = workerMetrics(
    counters,
    {
      // Retired listeners' connections are open too (UDP and kernel listeners count 0).
      openConnections: () => [...listeners.values(), ...retired].reduce((sum, l) => sum + l.connections, 0),
      udpSessions: () => [...listeners.values()].reduce((sum, l) => sum + (l instanceof UdpListener ? l.sessionCount : 0), 0),
      listeningPorts: () => {
        const { tcp, udp } = listeningByProtocol();
        return tcp.length + udp.length;
      },
      ...(config.mode === "kernel" ? { kernelFlows: () => kernel?.flows() ?? Promise.resolve({ tcp: 0, udp: 0 }) } : {}),
      ...(native ? { splicePipes: () => native.pipes() } : {}),
    },
    deps.metrics,
  );
  const failedBinds = metrics.bindFailures;
  let listenHost: string | undefined;
  let reconciling = Promise.resolve();
  let heartbeat: NodeJS.Timeout | undefined;
  let stopped = false;
  const allocator = new PortAllocatorClient(config.allocatorAddress, grpc.credentials.createInsecure(), CLIENT_OPTIONS);
  const registry = new BackendRegistryClient(config.registryAddress, grpc.credentials.createInsecure(), CLIENT_OPTIONS);

  const kernelTable = tableName(deps.subjects.prefix, config.nodeId);
  const kernel = config.mode === "kernel" ? new KernelTable(kernelTable, () => config.listenHost ?? view.host, logger.child({ component: "nftables" })) : undefined;
  // UDP stays in this process: a client's datagrams keep one session and FIFO stays FIFO.
  const relays = config.mode === "userspace" && config.relays > 0 ? new RelayPool(config.relays, config.connectTimeoutMs, counters, logger, native) : undefined;
  const udpIo = native ? batchedIo(native) : dgramIo;
  if (config.mode === "userspace") {
    logger.info({ io: native ? "native" : "node", ...(!native && config.io === "auto" ? { reason: nativeUnavailable } : {}) }, "worker-io-chosen");
  }
  const createListener = (service: ServiceView, protocol: "tcp" | "udp", host: string): PortListener => {
    if (kernel) {
      return new KernelListener({ serviceId: service.id, port: service.port, protocol, backends: () => view.backends(service.id), passiveEjectMs: config.passiveEjectMs, table: kernel });
    }
    const common = { serviceId: service.id, host, port: service.port, backends: () => view.backends(service.id), passiveEjectMs: config.passiveEjectMs, counters, logger };
    return protocol === "tcp"
      ? new TcpListener({ ...common, connectTimeoutMs: config.connectTimeoutMs, maxConnections: config.maxConnectionsPerPort, relays, native })
      : new UdpListener({
          ...common,
          sessionIdleMs: config.udpSessionIdleMs,
          maxSessions: config.udpMaxSessions,
          io: isIPv4(host) ? udpIo : dgramIo,
          receiveBufferBytes: config.udpReceiveBufferBytes,
        });
  };
  /** Active checks per listener, for services that ask for them. */
  const checkers = new Map<string, HealthChecker>();
  const syncChecker = (key: string, service: ServiceView | undefined, listener: PortListener | undefined) => {
    const spec = service ? normalizeHealthCheck(service.healthCheck) : undefined;
    let existing = checkers.get(key);
    // A changed check replaces the running one.
    if (existing && (!spec || !listener || !sameHealthCheck(existing.spec, spec))) {
      existing.stop();
      checkers.delete(key);
      existing = undefined;
      if (listener) logger.info({ serviceId: service?.id, protocol: listener.protocol, healthCheck: spec ?? "passive" }, spec ? "health-check-replaced" : "health-check-removed");
    }
    if (!existing && spec && listener && service) {
      const checker = new HealthChecker(listener, spec, () => view.backends(service.id), logger.child({ serviceId: service.id }));
      checkers.set(key, checker);
      checker.start();
    }
  };

  /**
   * The heartbeat's lists of listening ports, kept between beats: listeners
   * change only in a reconcile, which drops them when it ends (a beat during
   * one reports it half done, as it always did). Rebuilt every beat, at
   * 10,000 ports they took 2-8 ms of the event loop each time.
   */
  let beatPorts: { tcp: number[]; udp: number[] } | undefined;
  const listeningByProtocol = () => {
    if (beatPorts) return beatPorts;
    beatPorts = { tcp: [], udp: [] };
    for (const l of listeners.values()) if (l.listening) beatPorts[l.protocol].push(l.port);
    return beatPorts;
  };

  /** Opens, keeps or closes the listeners of one service (`service` undefined: it is gone). */
  const reconcileService = async (id: string, service: ServiceView | undefined, host: string) => {
    const wanted = new Set(service ? protocolsOf(service) : []);
    for (const protocol of ["tcp", "udp"] as const) {
      const key = `${id}/${protocol}`;
      let listener = listeners.get(key);
      if (listener && (!service || !wanted.has(protocol) || service.port !== listener.port)) {
        listeners.delete(key);
        bindFailures.delete(key);
        syncChecker(key, undefined, undefined);
        await listener.close();
        retire(listener);
        listener = undefined;
      }
      if (!service || !wanted.has(protocol)) continue;
      if (!listener) {
        listener = createListener(service, protocol, host);
        listeners.set(key, listener);
      }
      if (!listener.listening) {
        if (await listener.listen()) bindFailures.delete(key);
        else if (!bindFailures.has(key)) {
          // Reported once per failure; the heartbeat keeps retrying the bind.
          bindFailures.add(key);
          failedBinds.inc({ protocol: listener.protocol });
          publishMessage(deps.bus, deps.subjects.portBindFailed(config.nodeId), PortBindFailed, {
            nodeId: config.nodeId,
            serviceId: service.id,
            port: service.port,
            protocol: listener.protocol === "tcp" ? Protocol.PROTOCOL_TCP : Protocol.PROTOCOL_UDP,
            error: listener.error ?? "unknown",
            at: timestampFromMs(Date.now()),
          });
        }
      }
      listener.backendsChanged();
      syncChecker(key, service, listener);
    }
  };

  /** Services whose listeners need a look; `all` after a snapshot, a host change, or on the heartbeat's retry pass. */
  const dirty = new Set<string>();
  let dirtyAll = true;

  /**
   * Brings the listeners in line with the view: a listener per protocol of
   * every service of the node. An event touches one service, so only that
   * one is looked at; on a host change every listener is reopened.
   */
  const reconcile = async () => {
    if (stopped) return;
    const host = config.listenHost ?? view.host;
    if (!host) return;
    let all = dirtyAll;
    const ids = [...dirty];
    dirtyAll = false;
    dirty.clear();
    try {
      if (host !== listenHost && kernel && listenHost !== undefined) {
        // The kernel's rules change host in one whole rewrite of the table: no port is ever without its rule.
        logger.info({ from: listenHost, to: host }, "listen-host-changed");
        listenHost = host;
        all = true;
        await kernel.update();
      } else if (host !== listenHost) {
        if (listenHost !== undefined) logger.info({ from: listenHost, to: host }, "listen-host-changed");
        await Promise.all([...listeners.values()].map((l) => l.close()));
        for (const l of listeners.values()) retire(l);
        for (const key of listeners.keys()) syncChecker(key, undefined, undefined);
        listeners.clear();
        bindFailures.clear();
        listenHost = host;
        all = true;
      }
      const todo = all ? new Set([...view.listServices().map((s) => s.id), ...[...listeners.keys()].map(serviceOf)]) : new Set(ids);
      // Kernel mode: the listeners' table changes, made together, become one nft transaction
      // (at start, the whole table with every port) instead of one per port.
      if (kernel) await Promise.all([...todo].map((id) => reconcileService(id, view.service(id), host)));
      else for (const id of todo) await reconcileService(id, view.service(id), host);
    } finally {
      beatPorts = undefined;
    }
  };
  // Reconciles run one after another, so listeners are never opened twice.
  const scheduleReconcile = (serviceIds?: Iterable<string>) => {
    if (serviceIds === undefined) dirtyAll = true;
    else for (const id of serviceIds) dirty.add(id);
    reconciling = reconciling.then(reconcile).catch((err: unknown) => logger.error({ err }, "listener-reconcile-failed"));
    return reconciling;
  };

  const follower = new Follower({
    nodeId: config.nodeId,
    view,
    bus: deps.bus,
    subjects: deps.subjects,
    allocator,
    registry,
    resyncIntervalMs: config.resyncIntervalMs,
    token: config.token,
    propagation: metrics.propagation,
    logger,
    onChange: (serviceIds) => void scheduleReconcile(serviceIds),
  });

  /** Listeners that could not bind: the ones `bindFailures` names, not a pass over every listener. */
  const unbound = (): Array<[string, PortListener]> =>
    [...bindFailures].flatMap((key) => {
      const listener = listeners.get(key);
      return listener && !listener.listening ? [[key, listener] as [string, PortListener]] : [];
    });

  const publishHeartbeat = () => {
    const listening = listeningByProtocol();
    publishMessage(deps.bus, deps.subjects.workerHeartbeat(config.nodeId), WorkerHeartbeat, {
      nodeId: config.nodeId,
      workerId,
      at: timestampFromMs(Date.now()),
      listeningTcp: listening.tcp,
      listeningUdp: listening.udp,
      listeners: unbound().map(([key, l]) => {
        const id = serviceOf(key);
        return {
          serviceId: id,
          port: l.port,
          protocol: l.protocol === "tcp" ? Protocol.PROTOCOL_TCP : Protocol.PROTOCOL_UDP,
          listening: false,
          error: l.error ?? "",
          backends: view.backends(id).length,
          revision: String(view.revision(id)),
        };
      }),
    });
  };

  return {
    name: "worker",
    view,
    listeningPorts: () => {
      const { tcp, udp } = listeningByProtocol();
      return [...new Set([...tcp, ...udp])];
    },
    async start() {
      if (kernel) {
        const problem = await kernelModeAvailable();
        if (problem) throw new Error(`HARBOR_WORKER_MODE=kernel needs nftables and CAP_NET_ADMIN: ${problem}`);
        if (config.listenHost !== undefined && kernelHostProblem(config.listenHost)) {
          throw new Error(`HARBOR_WORKER_MODE=kernel needs HARBOR_WORKER_LISTEN_HOST to be the IPv4 address clients connect to, not ${config.listenHost}`);
        }
        const noConntrack = await conntrackProblem();
        if (noConntrack) logger.warn({ error: noConntrack }, "conntrack-missing-udp-flows-stay-drain-waits-deadline");
        // Not deleted: another worker on this host may own them. Their rules still take the ports they name.
        const others = await otherHarborTables(kernelTable);
        if (others.length > 0) {
          logger.warn({ table: kernelTable, others, remove: "nft delete table ip NAME, for each one no running worker owns" }, "other-harbor-nftables-tables-on-host");
        }
      }
      if (!kernel) warnIfReceiveBufferCapped(config.udpReceiveBufferBytes, logger);
      await relays?.start();
      await follower.start();
      await scheduleReconcile();
      publishHeartbeat();
      heartbeat = setInterval(() => {
        publishHeartbeat();
        for (const l of retired) if (l.connections === 0) retired.delete(l);
        // Each beat also retries the listeners whose port could not be bound, and only
        // those: a pass over every listener stalled 10,000 ports' traffic for ~30 ms.
        const retry = unbound().map(([key]) => serviceOf(key));
        if (retry.length > 0) void scheduleReconcile(retry);
      }, config.heartbeatIntervalMs);
      // Start-up (module loading, the first sync, every listener opened) leaves freed
      // pages in the C heap's arenas: about 0.5 MiB of an idle worker's RSS, given back once.
      nativeModule("auto")?.trimMemory();
      logger.info({ workerId, listening: listeners.size, mode: config.mode, relays: config.mode === "userspace" ? config.relays : 0 }, "worker-started");
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      clearInterval(heartbeat);
      follower.stop();
      await reconciling;
      for (const checker of checkers.values()) checker.stop();
      const all = [...listeners.values(), ...retired];
      await Promise.all(all.map((l) => l.close()));
      // Kernel mode: the table stays until the connections it carries end (or the deadline passes).
      await Promise.all([...all.map((l) => l.drain(config.drainTimeoutMs)), kernel?.drain(config.drainTimeoutMs)]);
      // The drain deadline has passed: relays cut what is left.
      await relays?.stop(0);
      await kernel?.destroy();
      allocator.close();
      registry.close();
      logger.info("worker-stopped");
    },
  };
}

/** The kernel silently caps SO_RCVBUF at net.core.rmem_max: say so once, with the fix, rather than per port. */
function warnIfReceiveBufferCapped(requested: number, logger: Logger): void {
  let rmemMax: number;
  try {
    rmemMax = Number(readFileSync("/proc/sys/net/core/rmem_max", "utf8").trim());
  } catch {
    return; // not Linux, or no /proc: nothing to compare with
  }
  if (requested > rmemMax) {
    logger.warn(
      { requestedBytes: requested, rmemMax, fix: `sysctl -w net.core.rmem_max=${requested}, or a smaller HARBOR_UDP_RECEIVE_BUFFER_BYTES` },
      "udp-receive-buffer-capped",
    );
  }
}
