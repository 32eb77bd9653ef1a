import { readFileSync } from "node:fs";
import { ANY, subscribeMessages, type Bus, type Subjects } from "@harbor/bus";
import { migrate, type Pool } from "@harbor/db";
import { WorkerHeartbeat, msFromTimestamp } from "@harbor/proto";
import type { Component, GrpcService, Logger, PortRange } from "@harbor/runtime";
import type { BusSubscription } from "@harbor/bus";
import type { AllocatorConfig } from "./config.js";
import { allocatorEvents } from "./events.js";
import { createAllocatorGrpc } from "./grpc.js";
import { allocatorMigrations } from "./migrations.js";
import { OutboxRelay } from "./outbox.js";
import { PortStore } from "./store.js";

export interface AllocatorDeps {
  pool: Pool;
  bus: Bus;
  subjects: Subjects;
  logger: Logger;
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
  const store = new PortStore(deps.pool);
  const relay = new OutboxRelay(deps.pool, deps.bus, deps.subjects, logger.child({ component: "outbox-relay" }), config.outboxPollMs);
  let heartbeats: BusSubscription | undefined;

  return {
    name: "allocator",
    grpc: createAllocatorGrpc(store, allocatorEvents, logger),
    store,
    async start() {
      await migrate(deps.pool, "allocator", allocatorMigrations, logger);
      await ensureDefaultNode(store, config, logger);
      await relay.start();
      // A worker's heartbeat marks its node live for `harbor nodes`.
      heartbeats = subscribeMessages(deps.bus, deps.subjects.workerHeartbeat(ANY), WorkerHeartbeat, logger, async (beat) => {
        const at = msFromTimestamp(beat.at);
        if (!beat.nodeId || at === undefined) return;
        await store.markWorkerSeen(beat.nodeId, new Date(Math.min(at, Date.now())));
      });
    },
    async stop() {
      heartbeats?.unsubscribe();
      heartbeats = undefined;
      await relay.stop();
    },
  };
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
