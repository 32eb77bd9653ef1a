import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export * from "./gen/harbor/v1/types.js";
export * from "./gen/harbor/v1/allocator.js";
export * from "./gen/harbor/v1/registry.js";
export * from "./gen/harbor/v1/events.js";
export { Timestamp } from "./gen/google/protobuf/timestamp.js";

/** The folder holding harbor/v1/*.proto, loaded at run time for gRPC reflection. */
export const PROTO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../proto");
export const PROTO_FILES = ["harbor/v1/allocator.proto", "harbor/v1/registry.proto"];

import type { Timestamp as TimestampMessage } from "./gen/google/protobuf/timestamp.js";
import { Protocol } from "./gen/harbor/v1/types.js";

export function timestampFromMs(ms: number): TimestampMessage {
  return { seconds: String(Math.floor(ms / 1000)), nanos: (ms % 1000) * 1_000_000 };
}

export function msFromTimestamp(t: TimestampMessage | undefined): number | undefined {
  return t ? Number(t.seconds) * 1000 + Math.floor(t.nanos / 1_000_000) : undefined;
}

const PROTOCOLS = { tcp: Protocol.PROTOCOL_TCP, udp: Protocol.PROTOCOL_UDP, both: Protocol.PROTOCOL_BOTH } as const;

/** The proto enum of a protocol name from libs/core's naming rules. */
export function protocolToProto(name: "tcp" | "udp" | "both"): Protocol {
  return PROTOCOLS[name];
}

export function protocolName(protocol: Protocol): "tcp" | "udp" | "both" | "unspecified" {
  switch (protocol) {
    case Protocol.PROTOCOL_TCP:
      return "tcp";
    case Protocol.PROTOCOL_UDP:
      return "udp";
    case Protocol.PROTOCOL_BOTH:
      return "both";
    default:
      return "unspecified";
  }
}
