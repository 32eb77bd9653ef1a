import { InvalidArgumentError } from "./errors.js";

/** Active health checks of a service's backends (the shape of harbor.v1.HealthCheck). */
export interface HealthCheckSpec {
  intervalMs: number;
  timeoutMs: number;
  unhealthyThreshold: number;
  healthyThreshold: number;
  udpProbe: string;
}

/** Whether two health checks ask for the same probing (both absent counts as the same). */
export function sameHealthCheck(a: HealthCheckSpec | undefined, b: HealthCheckSpec | undefined): boolean {
  if (!a || !b) return a === b;
  return (
    a.intervalMs === b.intervalMs &&
    a.timeoutMs === b.timeoutMs &&
    a.unhealthyThreshold === b.unhealthyThreshold &&
    a.healthyThreshold === b.healthyThreshold &&
    a.udpProbe === b.udpProbe
  );
}

/**
 * Fills defaults and checks ranges; undefined when no active check is asked
 * for (interval 0 or no spec).
 */
export function normalizeHealthCheck(spec: HealthCheckSpec | undefined): HealthCheckSpec | undefined {
  if (!spec || spec.intervalMs === 0) return undefined;
  const problem = (message: string) => new InvalidArgumentError(`health check: ${message}`);
  if (spec.intervalMs < 100 || spec.intervalMs > 3_600_000) throw problem(`interval ${spec.intervalMs} ms is not valid: use 100 to 3600000 ms`);
  const timeoutMs = spec.timeoutMs || Math.floor(spec.intervalMs / 2);
  if (timeoutMs < 10 || timeoutMs > spec.intervalMs) throw problem(`timeout ${timeoutMs} ms is not valid: use 10 ms up to the interval`);
  const unhealthyThreshold = spec.unhealthyThreshold || 2;
  const healthyThreshold = spec.healthyThreshold || 2;
  for (const [name, value] of [["unhealthy threshold", unhealthyThreshold], ["healthy threshold", healthyThreshold]] as const) {
    if (value < 1 || value > 100) throw problem(`${name} ${value} is not valid: use 1 to 100`);
  }
  if (Buffer.byteLength(spec.udpProbe) > 512) throw problem("the UDP probe is longer than 512 bytes");
  return { intervalMs: spec.intervalMs, timeoutMs, unhealthyThreshold, healthyThreshold, udpProbe: spec.udpProbe };
}
