import { validateNodeId } from "@harbor/core";
import { DEFAULT_API_ADDRESS, EnvReader } from "@harbor/runtime";
import type { IoSetting } from "./proxy/native.js";

export interface WorkerConfig {
  nodeId: string;
  allocatorAddress: string;
  registryAddress: string;
  /** Listen here instead of the node's `host` (e.g. 0.0.0.0 in a container). */
  listenHost?: string;
  resyncIntervalMs: number;
  heartbeatIntervalMs: number;
  connectTimeoutMs: number;
  /** On stop, how long open connections may finish before they are cut. */
  drainTimeoutMs: number;
  udpSessionIdleMs: number;
  udpMaxSessions: number;
  /** SO_RCVBUF of each UDP port's socket, in bytes (0: the system's default); the kernel caps it at net.core.rmem_max. */
  udpReceiveBufferBytes: number;
  /** How long a backend that refused (or was unreachable) stays out of rotation. */
  passiveEjectMs: number;
  /** Open TCP connections per port at most; more are refused. */
  maxConnectionsPerPort: number;
  /** Bearer token for the control plane's API (an operator token when tokens are on). */
  token?: string;
  /** userspace: the worker copies the bytes; kernel: it programs nftables (needs CAP_NET_ADMIN). */
  mode: "userspace" | "kernel";
  /** Userspace mode: processes that carry TCP connections for the worker (0: the worker carries them). */
  relays: number;
  /** Userspace: the native module carries UDP ports and TCP pairs (`native`), Node's sockets do (`node`), or native where it is built (`auto`). */
  io: IoSetting;
}

/**
 * 4 MiB: at 100,000 datagrams/s the system's usual 208 KiB holds about 2 ms of
 * 64-byte datagrams (each costs the kernel ~1 KiB), less than one time slice
 * of another process on a busy 2-core host. Memory is charged only while
 * datagrams wait, and the kernel's udp_mem bounds all ports together.
 */
export const UDP_RECEIVE_BUFFER_DEFAULT = 4 << 20;

export function loadWorkerConfig(env: Record<string, string | undefined> = process.env): WorkerConfig {
  const reader = new EnvReader(env);
  const api = reader.address("HARBOR_API", DEFAULT_API_ADDRESS);
  const config: WorkerConfig = {
    nodeId: reader.string("HARBOR_NODE_ID", "harbor_node_1"),
    allocatorAddress: reader.address("HARBOR_ALLOCATOR_API", api),
    registryAddress: reader.address("HARBOR_REGISTRY_API", api),
    listenHost: reader.optional("HARBOR_WORKER_LISTEN_HOST"),
    resyncIntervalMs: reader.int("HARBOR_RESYNC_INTERVAL_MS", 30_000, 100, 3_600_000),
    heartbeatIntervalMs: reader.int("HARBOR_HEARTBEAT_INTERVAL_MS", 5_000, 100, 600_000),
    connectTimeoutMs: reader.int("HARBOR_CONNECT_TIMEOUT_MS", 5_000, 10, 120_000),
    drainTimeoutMs: reader.int("HARBOR_DRAIN_TIMEOUT_MS", 10_000, 0, 600_000),
    udpSessionIdleMs: reader.int("HARBOR_UDP_SESSION_IDLE_MS", 60_000, 100, 3_600_000),
    udpMaxSessions: reader.int("HARBOR_UDP_MAX_SESSIONS", 10_000, 1, 1_000_000),
    udpReceiveBufferBytes: reader.int("HARBOR_UDP_RECEIVE_BUFFER_BYTES", UDP_RECEIVE_BUFFER_DEFAULT, 0, 1 << 30),
    passiveEjectMs: reader.int("HARBOR_PASSIVE_EJECT_MS", 10_000, 0, 3_600_000),
    maxConnectionsPerPort: reader.int("HARBOR_MAX_CONNECTIONS_PER_PORT", 10_000, 1, 1_000_000),
    token: reader.optional("HARBOR_TOKEN"),
    mode: "userspace",
    relays: reader.int("HARBOR_WORKER_RELAYS", 0, 0, 64),
    io: "auto",
  };
  const mode = reader.string("HARBOR_WORKER_MODE", "userspace");
  if (mode === "userspace" || mode === "kernel") config.mode = mode;
  else reader.problem(`HARBOR_WORKER_MODE=${mode}: use userspace or kernel`);
  const io = reader.string("HARBOR_WORKER_IO", "auto");
  if (io === "auto" || io === "native" || io === "node") config.io = io;
  else reader.problem(`HARBOR_WORKER_IO=${io}: use auto, native or node`);
  try {
    validateNodeId(config.nodeId);
  } catch (err) {
    reader.problem(`HARBOR_NODE_ID=${config.nodeId}: ${(err as Error).message}`);
  }
  reader.finish();
  return config;
}
