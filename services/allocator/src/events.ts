import { BindingEvent, NodeEvent, PortServiceEvent } from "@harbor/proto";
import type { PoolClient } from "@harbor/db";
import { serviceFromRow, writeOutbox, type NodeRecord, type ServiceRecord, type ServiceRow } from "./store.js";
import { toNode, toPortService } from "./mapping.js";

/**
 * The events of allocator changes, written to the outbox inside the change's
 * transaction. Payloads are proto3 JSON; the relay adds `sequence`.
 * service.created is not here: the store writes it as a snapshot of the
 * service, which the relay renders with `renderSnapshot`.
 */
export interface AllocatorEvents {
  serviceDeleted(tx: PoolClient, service: ServiceRecord): Promise<void>;
  serviceBound(tx: PoolClient, service: ServiceRecord, app: string, intPort: number): Promise<void>;
  serviceUnbound(tx: PoolClient, service: ServiceRecord, app: string, intPort: number): Promise<void>;
  nodeUpdated(tx: PoolClient, node: NodeRecord): Promise<void>;
}

const portServiceEvent = (service: ServiceRecord) => PortServiceEvent.toJSON({ service: toPortService(service), sequence: "0" }) as Record<string, unknown>;

/** The payload of an outbox row written as a snapshot of a service's row (a PortServiceEvent). */
export const renderSnapshot = (row: ServiceRow): Record<string, unknown> => portServiceEvent(serviceFromRow(row));

export const allocatorEvents: AllocatorEvents = {
  serviceDeleted: (tx, service) => writeOutbox(tx, "service.deleted", service.nodeId, portServiceEvent(service)),
  serviceBound: (tx, service, app, intPort) =>
    writeOutbox(tx, "service.bound", service.nodeId, BindingEvent.toJSON({ service: toPortService(service, app), app, intPort, sequence: "0" })),
  serviceUnbound: (tx, service, app, intPort) =>
    writeOutbox(tx, "service.unbound", service.nodeId, BindingEvent.toJSON({ service: toPortService(service), app, intPort, sequence: "0" })),
  nodeUpdated: (tx, node) => writeOutbox(tx, "node.updated", node.nodeId, NodeEvent.toJSON({ node: toNode(node), sequence: "0" })),
};
