import { buildCredentials, type Credentials } from "@harbor/core";
import { msFromTimestamp, protocolName, type Instance, type Node, type PortService } from "@harbor/proto";

/** What `create-service`, `service` and `services` print: the seed's credentials, with the service's name and protocol beside them. */
export interface ServiceOutput extends Credentials {
  service_name: string;
  protocol: string;
  https_proxy: boolean;
  apps: string[];
  health_check?: { interval_ms: number; timeout_ms: number; unhealthy_threshold: number; healthy_threshold: number; udp_probe: string };
}

/** The seed's credentials object of a service, as `$STACKATO_SERVICES` holds it. */
export function credentialsOf(s: PortService): Credentials {
  return buildCredentials(
    { nodeId: s.nodeId, hostname: s.hostname, host: s.host, extHostname: s.extHostname, extHost: s.extHost },
    { id: s.name, port: s.port },
    s.intPort,
  );
}

export function serviceOutput(s: PortService): ServiceOutput {
  return {
    ...credentialsOf(s),
    service_name: s.serviceName,
    protocol: protocolName(s.protocol),
    https_proxy: s.httpsProxy,
    apps: s.bindings.map((b) => b.app),
    ...(s.healthCheck
      ? {
          health_check: {
            interval_ms: s.healthCheck.intervalMs,
            timeout_ms: s.healthCheck.timeoutMs,
            unhealthy_threshold: s.healthCheck.unhealthyThreshold,
            healthy_threshold: s.healthCheck.healthyThreshold,
            udp_probe: s.healthCheck.udpProbe,
          },
        }
      : {}),
  };
}

export function nodeOutput(n: Node, nowMs: number, liveWithinMs: number) {
  const seen = msFromTimestamp(n.workerSeenAt);
  return {
    node_id: n.nodeId,
    hostname: n.hostname || n.host,
    host: n.host,
    ext_hostname: n.extHostname,
    ext_host: n.extHost,
    public: n.extHostname !== "" || n.extHost !== "",
    port_min: n.portMin,
    port_max: n.portMax,
    allocated: n.allocated,
    worker_live: seen !== undefined && nowMs - seen <= liveWithinMs,
    worker_seen_at: seen === undefined ? null : new Date(seen).toISOString(),
    blocked: n.blocked.map((b) => ({ ports: b.portMin === b.portMax ? String(b.portMin) : `${b.portMin}-${b.portMax}`, reason: b.reason })),
  };
}

export function instanceOutput(i: Instance) {
  return {
    app: i.app,
    instance_id: i.instanceId,
    host: i.host,
    ports: i.ports.map((p) => ({ int_port: p.intPort, port: p.port })),
    ttl_seconds: i.ttlSeconds,
    available_since: isoOf(i.availableSince),
    expires_at: isoOf(i.expiresAt),
  };
}

function isoOf(t: Instance["availableSince"]): string | null {
  const ms = msFromTimestamp(t);
  return ms === undefined ? null : new Date(ms).toISOString();
}

/** A plain text table: a header row and aligned columns. */
export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i] ?? 0)).join("  ").trimEnd();
  return [line(headers), ...rows.map(line)].join("\n") + "\n";
}

/** A value on one line: arrays comma-separated, objects as `key=value` pairs. */
export function inline(value: unknown): string {
  if (Array.isArray(value)) return value.map(inline).join(", ");
  if (value !== null && typeof value === "object") {
    return Object.entries(value)
      .map(([k, v]) => `${k}=${inline(v)}`)
      .join(" ");
  }
  return String(value);
}

/** Key: value lines, for one object. */
export function keyValues(record: object): string {
  const width = Math.max(...Object.keys(record).map((k) => k.length));
  return (
    Object.entries(record)
      .map(([k, v]) => `${(k + ":").padEnd(width + 1)} ${inline(v)}`)
      .join("\n") + "\n"
  );
}

/** Errors are one line on stderr: whatever a message carries after a newline joins the line. */
export function oneLine(message: string): string {
  return message.trim().replace(/\s*\n\s*/g, " ");
}
