import { LOOPBACK_NETWORKS, PRIVATE_NETWORKS, parseNetwork, type Network } from "@harbor/core";
import { EnvReader } from "@harbor/runtime";

export interface RegistryConfig {
  /** TTL of an instance that does not give its own; it should heartbeat at a third of it. */
  defaultTtlSeconds: number;
  maxTtlSeconds: number;
  /** How often expired instances are removed. */
  sweepIntervalMs: number;
  /** How often every backend set is recomputed, covering any missed event. */
  reconcileIntervalMs: number;
  /** Backends may only be registered at addresses inside these networks. */
  backendNetworks: Network[];
  /**
   * Whether HARBOR_BACKEND_NETWORKS set them. The default holds loopback, for
   * one machine without tokens; with tokens on it is left out (see createRegistry).
   */
  backendNetworksGiven: boolean;
  /**
   * Whether instance agents may register and deregister over NATS. A NATS
   * message carries no Harbor token, so whoever may publish there acts as an
   * operator: undefined means on only while API tokens are off.
   */
  natsRegistration?: boolean;
}

export const DEFAULT_TTL_SECONDS = 30;

export function loadRegistryConfig(env: Record<string, string | undefined> = process.env): RegistryConfig {
  const reader = new EnvReader(env);
  const config: RegistryConfig = {
    defaultTtlSeconds: reader.int("HARBOR_INSTANCE_TTL_SECONDS", DEFAULT_TTL_SECONDS, 1, 3600),
    maxTtlSeconds: reader.int("HARBOR_INSTANCE_MAX_TTL_SECONDS", 3600, 1, 86_400),
    sweepIntervalMs: reader.int("HARBOR_EXPIRY_SWEEP_MS", 1_000, 50, 60_000),
    reconcileIntervalMs: reader.int("HARBOR_RECONCILE_INTERVAL_MS", 30_000, 1_000, 3_600_000),
    backendNetworks: [],
    backendNetworksGiven: reader.optional("HARBOR_BACKEND_NETWORKS") !== undefined,
    natsRegistration: reader.optional("HARBOR_NATS_REGISTRATION") === undefined ? undefined : reader.bool("HARBOR_NATS_REGISTRATION", false),
  };
  const networks = reader.string("HARBOR_BACKEND_NETWORKS", [...LOOPBACK_NETWORKS, ...PRIVATE_NETWORKS].join(","));
  for (const cidr of networks.split(",").filter((n) => n.trim() !== "")) {
    const network = parseNetwork(cidr);
    if (network) config.backendNetworks.push(network);
    else reader.problem(`HARBOR_BACKEND_NETWORKS: ${JSON.stringify(cidr.trim())} is not a CIDR network (e.g. 10.0.0.0/8)`);
  }
  if (config.defaultTtlSeconds > config.maxTtlSeconds) {
    reader.problem(`HARBOR_INSTANCE_TTL_SECONDS=${config.defaultTtlSeconds} is above HARBOR_INSTANCE_MAX_TTL_SECONDS=${config.maxTtlSeconds}`);
  }
  reader.finish();
  return config;
}
