import { isIP } from "node:net";
import { isHostname, isUuid } from "@harbor/core";
import { Protocol, type BackendSet, type PortService } from "@harbor/proto";

const PROTOCOLS = new Set([Protocol.PROTOCOL_TCP, Protocol.PROTOCOL_UDP, Protocol.PROTOCOL_BOTH]);

const validPort = (port: number) => Number.isInteger(port) && port >= 1 && port <= 65535;

/**
 * Why a backend set from the bus cannot be applied, if it cannot: a
 * malformed message must change nothing, however it was decoded.
 */
export function backendSetProblem(set: BackendSet): string | undefined {
  if (!isUuid(set.serviceId)) return "service_id is not a UUID";
  if (!/^\d{1,20}$/.test(set.revision) || set.revision === "0") return "revision is not a positive number";
  if (set.backends.length > 10_000) return "too many backends";
  for (const b of set.backends) {
    if (isIP(b.host) === 0 && !isHostname(b.host)) return `backend host ${JSON.stringify(b.host.slice(0, 80))} is not an address`;
    if (!validPort(b.port)) return `backend port ${b.port} is not valid`;
  }
  return undefined;
}

/** Why a port service from the bus cannot be served, if it cannot. */
export function serviceProblem(service: PortService | undefined): string | undefined {
  if (!service) return "no service";
  if (!isUuid(service.name)) return "name (the service id) is not a UUID";
  if (!validPort(service.port)) return `port ${service.port} is not valid`;
  if (!PROTOCOLS.has(service.protocol)) return "protocol is not TCP, UDP or both";
  return undefined;
}
