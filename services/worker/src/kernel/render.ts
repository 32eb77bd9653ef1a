import { createHash } from "node:crypto";
import type { Backend } from "@harbor/proto";

/** One port of the node as the kernel carries it. */
export interface KernelPort {
  port: number;
  protocol: "tcp" | "udp";
  /** In rotation, in order (for UDP the first is the primary). */
  backends: readonly Backend[];
}

/** A port's chain name, and the one rule in it: what the table holds per port. */
export type PortRules = Map<string, { port: number; protocol: "tcp" | "udp"; rule: string }>;

/** Every Harbor table's name starts with this. */
export const TABLE_NAME_START = "harbor_";
const MAX_TABLE_NAME = 60;

/**
 * The node's table: an nftables identifier (letters, digits, underscores) of
 * at most 60 characters. A name that had to be changed to be one gets a hash
 * of the original, so node ids that differ only in replaced characters
 * (`edge-1`, `edge.1`) or past the cut never share, and overwrite, one table.
 */
export function tableName(prefix: string, nodeId: string): string {
  const wanted = `${TABLE_NAME_START}${prefix}_${nodeId}`;
  const safe = wanted.replace(/[^A-Za-z0-9_]/g, "_");
  if (safe === wanted && safe.length <= MAX_TABLE_NAME) return safe;
  const hash = createHash("sha256").update(wanted).digest("hex").slice(0, 8);
  return `${safe.slice(0, MAX_TABLE_NAME - hash.length - 1)}_${hash}`;
}

/** New flows counted per protocol (see `flowCounter`). */
export interface FlowCounts {
  tcp: number;
  udp: number;
}

/** The named counter of a protocol's new flows (NAT rules see only a flow's first packet). */
export const flowCounter = (protocol: "tcp" | "udp") => `flows_${protocol}`;

/** The verdict map that sends a protocol's ports to their chains. */
const portMap = (protocol: "tcp" | "udp") => `${protocol}_ports`;
export const portChain = (p: { protocol: string; port: number }) => `p_${p.protocol}_${p.port}`;

const target = (b: Backend) => `${b.host} . ${b.port}`;

/** The rule in a port's chain; the chain is only entered for that port's packets to the node's host. */
function portRule(p: KernelPort): string {
  // Every port counts into one named counter per protocol, which outlives a port's chain being rewritten.
  const counter = `counter name ${flowCounter(p.protocol)}`;
  if (p.backends.length === 0) {
    // No backend: a TCP client is refused at once; a UDP datagram is answered "port unreachable".
    return p.protocol === "tcp" ? `${counter} reject with tcp reset` : `${counter} reject`;
  }
  // DNAT with a port needs the transport protocol matched in the same rule.
  const l4 = `meta l4proto ${p.protocol} ${counter}`;
  const first = p.backends[0] as Backend;
  if (p.protocol === "udp" || p.backends.length === 1) return `${l4} dnat to ${first.host}:${first.port}`;
  // Per-connection round-robin: conntrack keeps each connection on the backend its first packet got.
  const map = p.backends.map((b, i) => `${i} : ${target(b)}`).join(", ");
  return `${l4} dnat to numgen inc mod ${p.backends.length} map { ${map} }`;
}

export function portRules(ports: readonly KernelPort[]): PortRules {
  const rules: PortRules = new Map();
  for (const p of ports) rules.set(portChain(p), { port: p.port, protocol: p.protocol, rule: portRule(p) });
  return rules;
}

const element = (port: number, chain: string) => `${port} : goto ${chain}`;

/**
 * The whole table for a node, as one nft script: delete and re-create in a
 * single transaction. The flow counters start from `flows` (what the old
 * table had counted), so a rewrite does not set them back to 0. Each port has a chain of its own, reached through a
 * verdict map by port, so a packet costs one lookup however many ports the
 * node has, and a change to one port is a change to one chain (renderDelta).
 * `output` catches connections made on this host (loopback clients);
 * `prerouting` those arriving from elsewhere; `postrouting` masquerades
 * what was DNATed to backends on other hosts, so their replies come back.
 */
export function renderTable(name: string, host: string, rules: PortRules, flows: FlowCounts = { tcp: 0, udp: 0 }): string {
  const sorted = [...rules].sort(([a], [b]) => a.localeCompare(b));
  const dispatch = (["tcp", "udp"] as const).map((protocol) => `    ip daddr ${host} ${protocol} dport vmap @${portMap(protocol)}`);
  const lines = [
    `table ip ${name} {}`,
    `delete table ip ${name}`,
    `table ip ${name} {`,
    `  map ${portMap("tcp")} { type inet_service : verdict; }`,
    `  map ${portMap("udp")} { type inet_service : verdict; }`,
    `  counter ${flowCounter("tcp")} { packets ${flows.tcp} bytes 0 }`,
    `  counter ${flowCounter("udp")} { packets ${flows.udp} bytes 0 }`,
    ...sorted.map(([chain, r]) => `  chain ${chain} {\n    ${r.rule}\n  }`),
    `  chain prerouting {`,
    `    type nat hook prerouting priority dstnat; policy accept;`,
    ...dispatch,
    `  }`,
    `  chain output {`,
    `    type nat hook output priority -100; policy accept;`,
    ...dispatch,
    `  }`,
    `  chain postrouting {`,
    `    type nat hook postrouting priority srcnat; policy accept;`,
    `    ct status dnat ct original ip daddr ${host} ip daddr != 127.0.0.0/8 masquerade`,
    `  }`,
    `}`,
  ];
  for (const protocol of ["tcp", "udp"] as const) {
    const elements = sorted.filter(([, r]) => r.protocol === protocol).map(([chain, r]) => element(r.port, chain));
    if (elements.length > 0) lines.push(`add element ip ${name} ${portMap(protocol)} { ${elements.join(", ")} }`);
  }
  return lines.join("\n") + "\n";
}

/**
 * The changes from `before` to `after` as one nft transaction (all or
 * nothing): only the ports that came, went or changed. Empty when nothing did.
 */
export function renderDelta(name: string, before: PortRules, after: PortRules): string {
  const lines: string[] = [];
  for (const [chain, r] of before) {
    if (after.has(chain)) continue;
    lines.push(`delete element ip ${name} ${portMap(r.protocol)} { ${r.port} }`, `delete chain ip ${name} ${chain}`);
  }
  for (const [chain, r] of after) {
    const old = before.get(chain);
    if (old?.rule === r.rule) continue;
    if (old) lines.push(`flush chain ip ${name} ${chain}`);
    else lines.push(`add chain ip ${name} ${chain}`);
    lines.push(`add rule ip ${name} ${chain} ${r.rule}`);
    if (!old) lines.push(`add element ip ${name} ${portMap(r.protocol)} { ${element(r.port, chain)} }`);
  }
  return lines.length > 0 ? lines.join("\n") + "\n" : "";
}
