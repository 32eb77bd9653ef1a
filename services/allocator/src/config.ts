import { validateNodeId } from "@harbor/core";
import { EnvReader, type PortRange } from "@harbor/runtime";

/** The harbor node this deployment starts with; an operator adds more with UpsertNode. */
export interface DefaultNodeConfig {
  nodeId: string;
  hostname: string;
  host: string;
  extHostname: string;
  extHost: string;
  range: PortRange;
  /** Fields whose variables were set: those are applied at every start; the rest only seed a new node. */
  explicit: Set<"hostname" | "host" | "extHostname" | "extHost" | "range">;
}

export interface AllocatorConfig {
  defaultNode: DefaultNodeConfig;
  /** How often the outbox relay looks for rows when not kicked by a commit. */
  outboxPollMs: number;
  /** How long a released port is kept from other services. */
  portCooldownSeconds: number;
  /** How often allocations are compared with what workers listen on. */
  repairIntervalMs: number;
  /** Ports a space (a non-operator token) may hold at most. */
  spacePortQuota: number;
}

export const DEFAULT_NODE_ID = "harbor_node_1";
/** Holds the seed's example port (30134) and stays below Linux's ephemeral range (32768-60999). */
export const DEFAULT_PORT_RANGE: PortRange = { min: 30000, max: 32767 };

export function loadAllocatorConfig(env: Record<string, string | undefined> = process.env): AllocatorConfig {
  const reader = new EnvReader(env);
  const explicit = new Set<DefaultNodeConfig["explicit"] extends Set<infer K> ? K : never>();
  const field = (name: string, key: "hostname" | "host" | "extHostname" | "extHost", fallback: string) => {
    const value = reader.optional(name);
    if (value !== undefined) explicit.add(key);
    return value ?? fallback;
  };
  const nodeId = reader.string("HARBOR_NODE_ID", DEFAULT_NODE_ID);
  try {
    validateNodeId(nodeId);
  } catch (err) {
    reader.problem(`HARBOR_NODE_ID=${nodeId}: ${(err as Error).message}`);
  }
  if (reader.optional("HARBOR_PORT_RANGE") !== undefined) explicit.add("range");
  const config: AllocatorConfig = {
    defaultNode: {
      nodeId,
      hostname: field("HARBOR_NODE_HOSTNAME", "hostname", ""),
      host: field("HARBOR_NODE_HOST", "host", "127.0.0.1"),
      extHostname: field("HARBOR_NODE_EXT_HOSTNAME", "extHostname", ""),
      extHost: field("HARBOR_NODE_EXT_HOST", "extHost", ""),
      range: reader.range("HARBOR_PORT_RANGE", DEFAULT_PORT_RANGE),
      explicit,
    },
    outboxPollMs: reader.int("HARBOR_OUTBOX_POLL_MS", 250, 10, 60_000),
    portCooldownSeconds: reader.int("HARBOR_PORT_COOLDOWN_SECONDS", 300, 0, 30 * 86_400),
    repairIntervalMs: reader.int("HARBOR_REPAIR_INTERVAL_MS", 60_000, 1_000, 86_400_000),
    spacePortQuota: reader.int("HARBOR_SPACE_PORT_QUOTA", 50, 0, 1_000_000),
  };
  reader.finish();
  return config;
}
