import { isIP } from "node:net";

/**
 * CIDR networks, for the rule that backends may only be registered inside
 * operator-configured networks (so Harbor cannot be made an open proxy).
 * Pure: addresses are compared as bigints.
 */
export interface Network {
  cidr: string;
  family: 4 | 6;
  base: bigint;
  bits: number;
}

export const LOOPBACK_NETWORKS = ["127.0.0.0/8", "::1/128"];

/** A host name or address that is this machine's loopback (`localhost`, 127.x, ::1). */
export function isLoopbackHost(host: string): boolean {
  return host === "localhost" || host === "::1" || /^127\./.test(host);
}
export const PRIVATE_NETWORKS = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"];

function toBigInt(address: string): { family: 4 | 6; value: bigint } | undefined {
  const family = isIP(address);
  if (family === 4) {
    const parts = address.split(".").map(Number);
    return { family: 4, value: parts.reduce((acc, p) => (acc << 8n) | BigInt(p), 0n) };
  }
  if (family === 6) {
    const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
    if (mapped) return toBigInt(mapped[1] as string);
    // Any other dotted form (::1.2.3.4, …) is refused rather than misread.
    if (address.includes(".")) return undefined;
    const [head, tail] = address.split("::") as [string, string | undefined];
    const h = head ? head.split(":") : [];
    const t = tail ? tail.split(":") : [];
    const groups = tail === undefined ? h : [...h, ...Array(8 - h.length - t.length).fill("0"), ...t];
    return { family: 6, value: groups.reduce((acc, g) => (acc << 16n) | BigInt(parseInt(g || "0", 16)), 0n) };
  }
  return undefined;
}

export function parseNetwork(cidr: string): Network | undefined {
  const [address, bitsText] = cidr.trim().split("/");
  const parsed = address ? toBigInt(address) : undefined;
  if (!parsed) return undefined;
  const width = parsed.family === 4 ? 32 : 128;
  const bits = bitsText === undefined ? width : Number(bitsText);
  if (!Number.isInteger(bits) || bits < 0 || bits > width) return undefined;
  const mask = bits === 0 ? 0n : ((1n << BigInt(bits)) - 1n) << BigInt(width - bits);
  return { cidr: cidr.trim(), family: parsed.family, base: parsed.value & mask, bits };
}

export function inNetworks(address: string, networks: Network[]): boolean {
  const parsed = toBigInt(address);
  if (!parsed) return false;
  const width = parsed.family === 4 ? 32 : 128;
  return networks.some((n) => {
    if (n.family !== parsed.family) return false;
    const mask = n.bits === 0 ? 0n : ((1n << BigInt(n.bits)) - 1n) << BigInt(width - n.bits);
    return (parsed.value & mask) === n.base;
  });
}
