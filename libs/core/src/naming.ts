import { InvalidArgumentError } from "./errors.js";

/** Protocols a port service carries; mirrors harbor.v1.Protocol without importing it. */
export type ProtocolName = "tcp" | "udp" | "both";

// Names end up in env var names (STACKATO_HARBOR_<NAME>) and NATS subject
// tokens, so they are DNS-label-like: no dots, spaces or underscores.
const SERVICE_NAME = /^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$/;
const APP_NAME = /^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?$/;
const INSTANCE_ID = /^[A-Za-z0-9](?:[A-Za-z0-9_.:-]{0,127})$/;
const NODE_ID = /^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})$/;

function quote(value: string): string {
  return value.length > 80 ? JSON.stringify(value.slice(0, 80) + "…") : JSON.stringify(value);
}

export function validateServiceName(name: string): string {
  if (!SERVICE_NAME.test(name)) {
    throw new InvalidArgumentError(
      `service name ${quote(name)} is not valid: use 1-63 letters, digits and hyphens, ` +
        `starting and ending with a letter or digit (e.g. debug-port, udp-dns, both-game, custom-cert-https)`,
    );
  }
  return name;
}

export function validateAppName(app: string): string {
  if (!APP_NAME.test(app)) {
    throw new InvalidArgumentError(
      `app name ${quote(app)} is not valid: use 1-63 letters, digits, hyphens and underscores, ` +
        `starting and ending with a letter or digit (e.g. port-test)`,
    );
  }
  return app;
}

export function validateInstanceId(id: string): string {
  if (!INSTANCE_ID.test(id)) {
    throw new InvalidArgumentError(
      `instance id ${quote(id)} is not valid: use 1-128 letters, digits and . _ : -, starting with a letter or digit`,
    );
  }
  return id;
}

export function validateNodeId(id: string): string {
  if (!NODE_ID.test(id)) {
    throw new InvalidArgumentError(
      `node id ${quote(id)} is not valid: use 1-64 letters, digits, hyphens and underscores (e.g. harbor_node_1)`,
    );
  }
  return id;
}

export function validatePort(port: number, what = "port"): number {
  if (!Number.isInteger(port) || port < 1 || port > 65535) {
    throw new InvalidArgumentError(`${what} ${port} is not valid: use a whole number from 1 to 65535`);
  }
  return port;
}

/** `udp…` is UDP; `both…` (or `multi…`, another spelling the seed does not name) is TCP and UDP on one port; anything else TCP. */
export function protocolFromName(name: string): ProtocolName {
  const lower = name.toLowerCase();
  if (lower.startsWith("udp")) return "udp";
  if (lower.startsWith("both") || lower.startsWith("multi")) return "both";
  return "tcp";
}

/**
 * The HTTPS container proxy is asked for by a name ending in `https`
 * (`custom-cert-https`) or holding `https` as a whole hyphen-separated word
 * (`harbor-https-custom-1`), as the seed's examples do.
 */
export function wantsHttpsProxy(name: string): boolean {
  const lower = name.toLowerCase();
  return lower.endsWith("https") || lower.split("-").includes("https");
}

/** The env var form of a name: upper-cased, hyphens replaced by underscores. */
export function envSuffix(name: string): string {
  return name.toUpperCase().replace(/-/g, "_");
}

/** Expands `${name}` in a manifest's service name to the app's name. */
export function expandAppName(template: string, app: string): string {
  return template.replace(/\$\{name\}/g, app);
}

const HOSTNAME = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A DNS hostname (labels of letters, digits and hyphens). */
export function isHostname(value: string): boolean {
  return HOSTNAME.test(value);
}

/** A service id: what the seed calls the instance's `name`. */
export function isUuid(value: string): boolean {
  return UUID.test(value);
}
