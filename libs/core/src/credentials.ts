import { envSuffix } from "./naming.js";

/** What the allocator knows of a node, as credentials need it. */
export interface NodeAddress {
  nodeId: string;
  hostname: string;
  host: string;
  extHostname: string;
  extHost: string;
}

/** The `$STACKATO_SERVICES` object of one harbor service, with the seed's keys in its order. */
export interface Credentials {
  hostname: string;
  host: string;
  port: number;
  name: string;
  node_id: string;
  int_port: number;
  ext_hostname?: string;
  ext_host?: string;
}

export function isPublicNode(node: NodeAddress): boolean {
  return node.extHostname !== "" || node.extHost !== "";
}

/**
 * `hostname` falls back to the node's IP where no hostname is configured;
 * `ext_*` appear only for a public node.
 */
export function buildCredentials(
  node: NodeAddress,
  service: { id: string; port: number },
  intPort: number,
): Credentials {
  const credentials: Credentials = {
    hostname: node.hostname || node.host,
    host: node.host,
    port: service.port,
    name: service.id,
    node_id: node.nodeId,
    int_port: intPort,
  };
  if (isPublicNode(node)) {
    credentials.ext_hostname = node.extHostname;
    credentials.ext_host = node.extHost;
  }
  return credentials;
}

export interface BoundService {
  serviceName: string;
  credentials: Credentials;
}

/**
 * The variables an instance of `app` gets: STACKATO_SERVICES, then
 * STACKATO_HARBOR when exactly one harbor service is bound, else
 * STACKATO_HARBOR_<NAME> for each; STACKATO_APP_NAME and its upcase form.
 */
export function buildAppEnvironment(app: string, services: BoundService[]): Record<string, string> {
  const sorted = [...services].sort((a, b) => a.serviceName.localeCompare(b.serviceName));
  const stackatoServices: Record<string, Credentials> = {};
  for (const s of sorted) stackatoServices[s.serviceName] = s.credentials;
  const env: Record<string, string> = {
    STACKATO_SERVICES: JSON.stringify(stackatoServices),
    STACKATO_APP_NAME: app,
    STACKATO_APP_NAME_UPCASE: envSuffix(app),
  };
  const only = sorted.length === 1 ? sorted[0] : undefined;
  if (only) {
    env.STACKATO_HARBOR = String(only.credentials.int_port);
  } else {
    for (const s of sorted) env[`STACKATO_HARBOR_${envSuffix(s.serviceName)}`] = String(s.credentials.int_port);
  }
  return env;
}

/** The first int_port an app's harbor services get; each further one takes the next free. */
export const FIRST_INT_PORT = 4100;

/** The lowest int_port at or above FIRST_INT_PORT that the app does not use yet. */
export function nextIntPort(used: Iterable<number>): number {
  const taken = new Set(used);
  let candidate = FIRST_INT_PORT;
  while (taken.has(candidate)) candidate++;
  return candidate;
}
