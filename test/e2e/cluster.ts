import type { Credentials } from "@harbor/core";
import { connectLines } from "@harbor/testkit";

/** Opens a TCP connection through a port and returns the greeting: which backend answered. */
export async function reach(port: number): Promise<string> {
  const client = await connectLines(port);
  try {
    return await client.nextLine();
  } finally {
    client.close();
  }
}

/** How many of `connections` new connections reached each backend. */
export async function spread(port: number, connections: number): Promise<Record<string, number>> {
  const counts: Record<string, number> = {};
  for (let i = 0; i < connections; i++) {
    const name = await reach(port);
    counts[name] = (counts[name] ?? 0) + 1;
  }
  return counts;
}

/** The credentials object `create-service --json` and `service --json` print. */
export interface ServiceJson extends Credentials {
  service_name: string;
  protocol: string;
  https_proxy: boolean;
  apps: string[];
  health_check?: { interval_ms: number; timeout_ms: number; unhealthy_threshold: number; healthy_threshold: number; udp_probe: string };
}
