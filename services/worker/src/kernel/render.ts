import type { Backend } from "@harbor/proto";

/** One port of the node as the kernel carries it. */
export interface KernelPort {
  port: number;
  protocol: "tcp" | "udp";
  /** In rotation, in order (for UDP the first is the primary). */
  backends: readonly Backend[];
}

/** An nftables identifier from any string (letters, digits, underscores). */
export function tableName(prefix: string, nodeId: string): string {
  return `harbor_${prefix}_${nodeId}`.replace(/[^A-Za-z0-9_]/g, "_").slice(0, 60);
}

const target = (b: Backend) => `${b.host} . ${b.port}`;

function rule(p: KernelPort, host: string): string {
  const match = `ip daddr ${host} ${p.protocol} dport ${p.port}`;
  if (p.backends.length === 0) {
    // No backend: a TCP client is refused at once; a UDP datagram is answered "port unreachable".
    return p.protocol === "tcp" ? `${match} counter reject with tcp reset` : `${match} counter reject`;
  }
  if (p.protocol === "udp" || p.backends.length === 1) return `${match} counter dnat to ${(p.backends[0] as Backend).host}:${(p.backends[0] as Backend).port}`;
  // Per-connection round-robin: conntrack keeps each connection on the backend its first packet got.
  const map = p.backends.map((b, i) => `${i} : ${target(b)}`).join(", ");
  return `${match} counter dnat to numgen inc mod ${p.backends.length} map { ${map} }`;
}

/**
 * The whole table for a node, as one nft script: delete and re-create in a
 * single transaction, so a set change replaces every rule atomically.
 * `output` catches connections made on this host (loopback clients);
 * `prerouting` those arriving from elsewhere; `postrouting` masquerades
 * what was DNATed to backends on other hosts, so their replies come back.
 */
export function renderTable(name: string, host: string, ports: readonly KernelPort[]): string {
  const rules = [...ports].sort((a, b) => a.port - b.port || a.protocol.localeCompare(b.protocol)).map((p) => `    ${rule(p, host)}`);
  return [
    `table ip ${name} {}`,
    `delete table ip ${name}`,
    `table ip ${name} {`,
    `  chain prerouting {`,
    `    type nat hook prerouting priority dstnat; policy accept;`,
    ...rules,
    `  }`,
    `  chain output {`,
    `    type nat hook output priority -100; policy accept;`,
    ...rules,
    `  }`,
    `  chain postrouting {`,
    `    type nat hook postrouting priority srcnat; policy accept;`,
    `    ct status dnat ct original ip daddr ${host} ip daddr != 127.0.0.0/8 masquerade`,
    `  }`,
    `}`,
    "",
  ].join("\n");
}
