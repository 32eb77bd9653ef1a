import { sameHealthCheck } from "@harbor/core";
import { Protocol, type Backend, type BackendSet, type HealthCheck, type PortService } from "@harbor/proto";

/** What the data plane needs of a port service. */
export interface ServiceView {
  id: string;
  name: string;
  port: number;
  protocol: Protocol;
  healthCheck?: HealthCheck;
}

export interface BackendView {
  revision: bigint;
  backends: Backend[];
}

export function serviceView(service: PortService): ServiceView {
  return { id: service.name, name: service.serviceName, port: service.port, protocol: service.protocol, healthCheck: service.healthCheck };
}

function sameService(a: ServiceView, b: ServiceView): boolean {
  return a.name === b.name && a.port === b.port && a.protocol === b.protocol && sameHealthCheck(a.healthCheck, b.healthCheck);
}

/** The protocols a service needs listeners for: `both` is TCP and UDP on one port number. */
export function protocolsOf(service: ServiceView): Array<"tcp" | "udp"> {
  switch (service.protocol) {
    case Protocol.PROTOCOL_TCP:
      return ["tcp"];
    case Protocol.PROTOCOL_UDP:
      return ["udp"];
    case Protocol.PROTOCOL_BOTH:
      return ["tcp", "udp"];
    default:
      return [];
  }
}

/**
 * The worker's picture of its node: which services it serves and each one's
 * backend set. Pure. A set is applied only when its revision is newer than
 * the one held (state, not deltas: the set replaces the old one whole).
 */
export class NodeView {
  private readonly services = new Map<string, ServiceView>();
  private readonly sets = new Map<string, BackendView>();
  host: string | undefined;

  listServices(): ServiceView[] {
    return [...this.services.values()];
  }

  service(id: string): ServiceView | undefined {
    return this.services.get(id);
  }

  upsertService(service: ServiceView): void {
    this.services.set(service.id, service);
  }

  removeService(id: string): void {
    this.services.delete(id);
    this.sets.delete(id);
  }

  /**
   * Replaces the services with a snapshot's; sets of services that are gone
   * are dropped. Returns the ids of the services that came, went or changed:
   * the only ones whose listeners need a look.
   */
  replaceServices(services: ServiceView[]): string[] {
    const changed: string[] = [];
    const present = new Set<string>();
    for (const s of services) {
      present.add(s.id);
      const held = this.services.get(s.id);
      if (!held || !sameService(held, s)) changed.push(s.id);
      this.services.set(s.id, s);
    }
    for (const id of this.services.keys()) {
      if (present.has(id)) continue;
      this.services.delete(id);
      changed.push(id);
    }
    for (const id of this.sets.keys()) if (!this.services.has(id)) this.sets.delete(id);
    return changed;
  }

  /** Applies a set if newer than the one held; returns whether it did. */
  applySet(set: BackendSet): boolean {
    let revision: bigint;
    try {
      revision = BigInt(set.revision);
    } catch {
      return false;
    }
    const held = this.sets.get(set.serviceId);
    if (held && held.revision >= revision) return false;
    this.sets.set(set.serviceId, { revision, backends: set.backends });
    return true;
  }

  backends(serviceId: string): Backend[] {
    return this.sets.get(serviceId)?.backends ?? [];
  }

  revision(serviceId: string): bigint {
    return this.sets.get(serviceId)?.revision ?? 0n;
  }
}
