import { readFileSync } from "node:fs";
import { ANY, publishMessage, subscribeMessages, type Bus, type Subjects } from "@harbor/bus";
import { migrate, type Pool } from "@harbor/db";
import { DriftReport, PortBindFailed, WorkerHeartbeat, msFromTimestamp, timestampFromMs } from "@harbor/proto";
import { Counter, Gauge, type Component, type GrpcService, type Logger, type MetricsRegistry, type PortRange } from "@harbor/runtime";
import type { BusSubscription } from "@harbor/bus";
import type { AllocatorConfig } from "./config.js";
import { allocatorEvents, renderSnapshot } from "./events.js";
import { createAllocatorGrpc } from "./grpc.js";
import { allocatorMigrations } from "./migrations.js";
import { OutboxRelay } from "./outbox.js";
import { OPERATOR_SCOPE, PortStore } from "./store.js";
import { Authenticator } from "@harbor/core";

export interface AllocatorDeps {
  pool: Pool;
  bus: Bus;
  subjects: Subjects;
  logger: Logger;
  /** Who may call; without one every caller is an operator. */
  auth?: Authenticator;
  metrics?: MetricsRegistry;
}

export interface Allocator extends Component {
  readonly grpc: GrpcService;
  readonly store: PortStore;
}

/**
 * The allocator: migrations, the default node, the outbox relay, and the
 * PortAllocator gRPC service (served by whoever composes it).
 */
export function createAllocator(config: AllocatorConfig, deps: AllocatorDeps): Allocator {
  const logger = deps.logger.child({ component: "allocator" });
  const relay = new OutboxRelay(deps.pool, deps.bus, deps.subjects, logger.child({ component: "outbox-relay" }), config.outboxPollMs, renderSnapshot);
  const store = new PortStore(deps.pool, config.portCooldownSeconds, () => relay.kick());
  new Gauge({
    name: "harbor_allocator_outbox_pending",
    help: "Events written but not yet relayed to NATS (read from Postgres at scrape)",
    registers: deps.metrics ? [deps.metrics] : [],
    async collect() {
      const { rows } = await deps.pool.query<{ n: string }>("SELECT count(*) AS n FROM outbox");
      this.set(Number(rows[0]?.n ?? 0));
    },
  });
  const subscriptions: BusSubscription[] = [];
  /** The last heartbeat of each node's worker, for the repair pass. */
  const lastBeats = new Map<string, WorkerHeartbeat>();
  let repairTimer: NodeJS.Timeout | undefined;

  return {
    name: "allocator",
    grpc: createAllocatorGrpc(
      store,
      allocatorEvents,
      deps.auth ?? new Authenticator(new Map()),
      { spacePortQuota: config.spacePortQuota },
      new Counter({
        name: "harbor_allocator_creates_total",
        help: "CreatePortService calls, by result (created, resource-exhausted, invalid-argument, …)",
        labelNames: ["result"] as const,
        registers: deps.metrics ? [deps.metrics] : [],
      }),
      logger,
    ),
    store,
    async start() {
      await migrate(deps.pool, "allocator", allocatorMigrations, logger);
      await ensureDefaultNode(store, config, logger);
      await relay.start();
      subscriptions.push(
        // A worker's heartbeat marks its node live for `harbor nodes`, and ports it listens on are offered again.
        subscribeMessages(deps.bus, deps.subjects.workerHeartbeat(ANY), WorkerHeartbeat, logger, async (beat) => {
          const at = msFromTimestamp(beat.at);
          if (!beat.nodeId || at === undefined) return;
          lastBeats.set(beat.nodeId, beat);
          await store.markWorkerSeen(beat.nodeId, new Date(Math.min(at, Date.now())));
          await store.unblockListening(beat.nodeId, [...beat.listeningTcp, ...beat.listeningUdp]);
        }),
        // A port a worker cannot bind is not offered to new services.
        subscribeMessages(deps.bus, deps.subjects.portBindFailed(ANY), PortBindFailed, logger, async (event) => {
          if (!event.nodeId || !event.port) return;
          if (await store.blockFailedPort(event.nodeId, event.port, event.error)) {
            logger.warn({ nodeId: event.nodeId, port: event.port, serviceId: event.serviceId, error: event.error }, "port-blocked-bind-failed");
          }
        }),
      );
      repairTimer = setInterval(() => void repair(store, lastBeats, deps, logger).catch((err: unknown) => logger.warn({ err }, "repair-failed")), config.repairIntervalMs);
    },
    async stop() {
      clearInterval(repairTimer);
      for (const sub of subscriptions.splice(0)) sub.unsubscribe();
      await relay.stop();
    },
  };
}

/**
 * The repair pass: compares each node's allocations with what its worker
 * last said it listens on, and reports drift (a log event and a NATS
 * message). It changes nothing: a port is better leaked than handed out twice.
 */
export async function repair(store: PortStore, beats: Map<string, WorkerHeartbeat>, deps: AllocatorDeps, logger: Logger): Promise<DriftReport[]> {
  const reports: DriftReport[] = [];
  for (const [nodeId, beat] of beats) {
    const allocated = new Set((await store.listServices({ nodeId }, OPERATOR_SCOPE)).map((s) => s.port));
    const listening = new Set([...beat.listeningTcp, ...beat.listeningUdp]);
    const report: DriftReport = {
      nodeId,
      missing: [...allocated].filter((p) => !listening.has(p)).sort((a, b) => a - b),
      unexpected: [...listening].filter((p) => !allocated.has(p)).sort((a, b) => a - b),
      failing: [...new Set(beat.listeners.filter((l) => !l.listening && l.error).map((l) => l.port))].sort((a, b) => a - b),
      at: timestampFromMs(Date.now()),
    };
    if (report.missing.length + report.unexpected.length + report.failing.length === 0) continue;
    logger.warn({ nodeId, missing: report.missing, unexpected: report.unexpected, failing: report.failing }, "repair-drift");
    publishMessage(deps.bus, deps.subjects.repairDrift(nodeId), DriftReport, report);
    reports.push(report);
  }
  return reports;
}

/** Creates the configured node if missing; fields whose variables are set are applied at every start. */
async function ensureDefaultNode(store: PortStore, config: AllocatorConfig, logger: Logger): Promise<void> {
  const node = config.defaultNode;
  const created = await store.ensureNode({
    nodeId: node.nodeId,
    hostname: node.hostname,
    host: node.host,
    extHostname: node.extHostname,
    extHost: node.extHost,
    portMin: node.range.min,
    portMax: node.range.max,
  });
  if (!created && node.explicit.size > 0) {
    await store.upsertNode(
      {
        nodeId: node.nodeId,
        ...(node.explicit.has("hostname") ? { hostname: node.hostname } : {}),
        ...(node.explicit.has("host") ? { host: node.host } : {}),
        ...(node.explicit.has("extHostname") ? { extHostname: node.extHostname } : {}),
        ...(node.explicit.has("extHost") ? { extHost: node.extHost } : {}),
        ...(node.explicit.has("range") ? { portMin: node.range.min, portMax: node.range.max } : {}),
      },
      (tx, record) => allocatorEvents.nodeUpdated(tx, record),
    );
  }
  const nodes = await store.listNodes();
  const ephemeral = localEphemeralRange();
  for (const n of nodes) {
    if (ephemeral && n.portMin <= ephemeral.max && n.portMax >= ephemeral.min) {
      logger.warn(
        { nodeId: n.nodeId, range: `${n.portMin}-${n.portMax}`, ephemeral: `${ephemeral.min}-${ephemeral.max}` },
        "node-range-overlaps-ephemeral-ports",
      );
    }
  }
  logger.info({ nodeId: node.nodeId, created, nodes: nodes.length }, "default-node-ready");
}

/** Linux's range for outgoing connections' local ports; a listener there can find its port taken. */
function localEphemeralRange(): PortRange | undefined {
  try {
    const [min, max] = readFileSync("/proc/sys/net/ipv4/ip_local_port_range", "utf8").trim().split(/\s+/).map(Number);
    return min && max ? { min, max } : undefined;
  } catch {
    return undefined;
  }
}
