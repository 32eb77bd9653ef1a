import { buildCredentials } from "@harbor/core";
import { protocolToProto, timestampFromMs, type Node, type PortService } from "@harbor/proto";
import type { NodeRecord, ServiceRecord } from "./store.js";

/**
 * A service as the API shows it: the seed's credentials, with int_port for
 * `app`, or without an app for the first binding. 0 when there is none: an
 * app the service is not bound to has no int_port, and another app's would mislead.
 */
export function toPortService(record: ServiceRecord, app?: string): PortService {
  const binding = app ? record.bindings.find((b) => b.app === app) : record.bindings[0];
  const credentials = buildCredentials(record.node, record, binding?.intPort ?? 0);
  return {
    hostname: credentials.hostname,
    host: credentials.host,
    port: credentials.port,
    name: credentials.name,
    nodeId: credentials.node_id,
    intPort: credentials.int_port,
    extHostname: credentials.ext_hostname ?? "",
    extHost: credentials.ext_host ?? "",
    serviceName: record.serviceName,
    protocol: protocolToProto(record.protocol),
    httpsProxy: record.httpsProxy,
    bindings: record.bindings.map((b) => ({ app: b.app, intPort: b.intPort, boundAt: timestampFromMs(b.boundAt.getTime()) })),
    createdAt: timestampFromMs(record.createdAt.getTime()),
    space: record.space,
    healthCheck: record.healthCheck ?? undefined,
  };
}

export function toNode(record: NodeRecord): Node {
  return {
    nodeId: record.nodeId,
    hostname: record.hostname,
    host: record.host,
    extHostname: record.extHostname,
    extHost: record.extHost,
    portMin: record.portMin,
    portMax: record.portMax,
    allocated: record.allocated,
    workerSeenAt: record.workerSeenAt ? timestampFromMs(record.workerSeenAt.getTime()) : undefined,
    blocked: record.blocked.map((b) => ({ portMin: b.min, portMax: b.max, reason: b.reason })),
  };
}
