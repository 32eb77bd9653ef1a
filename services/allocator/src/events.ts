import { BindingEvent, NodeEvent, PortServiceEvent } from "@harbor/proto";
import type { PoolClient } from "@harbor/db";
import { writeOutbox, type NodeRecord, type ServiceRecord } from "./store.js";
import { toNode, toPortService } from "./mapping.js";

/**
 * The events of every allocator change, written to the outbox inside the
 * change's transaction. Payloads are proto3 JSON; the relay adds `sequence`.
 */
export interface AllocatorEvents {
  serviceCreated(tx: PoolClient, service: ServiceRecord): Promise<void>;
  serviceDeleted(tx: PoolClient, service: ServiceRecord): Promise<void>;
  serviceBound(tx: PoolClient, service: ServiceRecord, app: string, intPort: number): Promise<void>;
  serviceUnbound(tx: PoolClient, service: ServiceRecord, app: string, intPort: number): Promise<void>;
  nodeUpdated(tx: PoolClient, node: NodeRecord): Promise<void>;
}

export const allocatorEvents: AllocatorEvents = {
  serviceCreated: (tx, service) =>
    writeOutbox(tx, "service.created", service.nodeId, PortServiceEvent.toJSON({ service: toPortService(service), sequence: "0" })),
  serviceDeleted: (tx, service) =>
    writeOutbox(tx, "service.deleted", service.nodeId, PortServiceEvent.toJSON({ service: toPortService(service), sequence: "0" })),
  serviceBound: (tx, service, app, intPort) =>
    writeOutbox(tx, "service.bound", service.nodeId, BindingEvent.toJSON({ service: toPortService(service, app), app, intPort, sequence: "0" })),
  serviceUnbound: (tx, service, app, intPort) =>
    writeOutbox(tx, "service.unbound", service.nodeId, BindingEvent.toJSON({ service: toPortService(service), app, intPort, sequence: "0" })),
  nodeUpdated: (tx, node) => writeOutbox(tx, "node.updated", node.nodeId, NodeEvent.toJSON({ node: toNode(node), sequence: "0" })),
};
