import { randomUUID } from "node:crypto";
import { publishMessage, type Bus, type Subjects } from "@harbor/bus";
import { BackendRegistryClient, PortAllocatorClient, WorkerHeartbeat, timestampFromMs } from "@harbor/proto";
import { grpc, type Component, type Logger } from "@harbor/runtime";
import type { WorkerConfig } from "./config.js";
import { NodeView, carriesTcp } from "./domain/node-view.js";
import { TcpListener } from "./proxy/tcp.js";
import { Follower } from "./sync/follower.js";

export interface WorkerDeps {
  bus: Bus;
  subjects: Subjects;
  logger: Logger;
}

export interface Worker extends Component {
  readonly view: NodeView;
  /** Ports with an open listener. */
  listeningPorts(): number[];
  /** Resolves once a snapshot has been applied and listeners reconciled. */
  whenSynced(): Promise<void>;
}

/**
 * The data plane of one harbor node. Stateless: everything it serves comes
 * from a snapshot of the control plane and the events that follow.
 */
export function createWorker(config: WorkerConfig, deps: WorkerDeps): Worker {
  const logger = deps.logger.child({ component: "worker", nodeId: config.nodeId });
  const workerId = randomUUID();
  const view = new NodeView();
  const listeners = new Map<string, TcpListener>();
  let listenHost: string | undefined;
  let reconciling = Promise.resolve();
  let heartbeat: NodeJS.Timeout | undefined;
  let stopped = false;
  const allocator = new PortAllocatorClient(config.allocatorAddress, grpc.credentials.createInsecure());
  const registry = new BackendRegistryClient(config.registryAddress, grpc.credentials.createInsecure());

  /** Opens a listener for every TCP service of the node, closes the rest; on a host change, reopens all. */
  const reconcile = async () => {
    if (stopped) return;
    const host = config.listenHost ?? view.host;
    if (!host) return;
    if (host !== listenHost) {
      if (listenHost !== undefined) logger.info({ from: listenHost, to: host }, "listen-host-changed");
      await Promise.all([...listeners.values()].map((l) => l.close()));
      listeners.clear();
      listenHost = host;
    }
    const wanted = new Map(view.listServices().filter(carriesTcp).map((s) => [s.id, s]));
    for (const [id, listener] of listeners) {
      const service = wanted.get(id);
      if (!service || service.port !== listener.port) {
        listeners.delete(id);
        await listener.close();
      }
    }
    for (const [id, service] of wanted) {
      let listener = listeners.get(id);
      if (!listener) {
        listener = new TcpListener({
          serviceId: id,
          host,
          port: service.port,
          backends: () => view.backends(id),
          connectTimeoutMs: config.connectTimeoutMs,
          logger,
        });
        listeners.set(id, listener);
      }
      if (!listener.listening) await listener.listen();
    }
  };
  // Reconciles run one after another, so listeners are never opened twice.
  const scheduleReconcile = () => {
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
    logger,
    onChange: () => void scheduleReconcile(),
  });

  const publishHeartbeat = () => {
    publishMessage(deps.bus, deps.subjects.workerHeartbeat(config.nodeId), WorkerHeartbeat, {
      nodeId: config.nodeId,
      workerId,
      at: timestampFromMs(Date.now()),
      listeners: [...listeners].map(([id, l]) => ({
        serviceId: id,
        port: l.port,
        protocol: view.service(id)?.protocol ?? 0,
        listening: l.listening,
        error: l.error ?? "",
        backends: view.backends(id).length,
        revision: String(view.revision(id)),
      })),
    });
  };

  return {
    name: "worker",
    view,
    listeningPorts: () => [...listeners.values()].filter((l) => l.listening).map((l) => l.port),
    whenSynced: async () => {
      while (!follower.synced) await new Promise((r) => setTimeout(r, 20));
      await scheduleReconcile();
    },
    async start() {
      await follower.start();
      await scheduleReconcile();
      publishHeartbeat();
      // Each beat also retries listeners whose port could not be bound.
      heartbeat = setInterval(() => {
        publishHeartbeat();
        void scheduleReconcile();
      }, config.heartbeatIntervalMs);
      logger.info({ workerId, listening: listeners.size }, "worker-started");
    },
    async stop() {
      if (stopped) return;
      stopped = true;
      clearInterval(heartbeat);
      follower.stop();
      await reconciling;
      const all = [...listeners.values()];
      await Promise.all(all.map((l) => l.close()));
      await Promise.all(all.map((l) => l.drain(config.drainTimeoutMs)));
      allocator.close();
      registry.close();
      logger.info("worker-stopped");
    },
  };
}
