import { ConfigError } from "@harbor/core";

export interface PortRange {
  min: number;
  max: number;
}

/**
 * Reads configuration from environment variables. Every problem is collected
 * with its variable name and `finish()` throws them all at once, before any
 * I/O starts.
 */
export class EnvReader {
  private readonly problems: string[] = [];
  constructor(private readonly env: Record<string, string | undefined> = process.env) {}

  private raw(name: string): string | undefined {
    const value = this.env[name];
    return value === undefined || value.trim() === "" ? undefined : value.trim();
  }

  string(name: string, fallback: string): string {
    return this.raw(name) ?? fallback;
  }

  optional(name: string): string | undefined {
    return this.raw(name);
  }

  int(name: string, fallback: number, min = 0, max = Number.MAX_SAFE_INTEGER): number {
    const value = this.raw(name);
    if (value === undefined) return fallback;
    const n = Number(value);
    if (!/^-?\d+$/.test(value) || n < min || n > max) {
      this.problems.push(`${name}=${value}: expected a whole number from ${min} to ${max}`);
      return fallback;
    }
    return n;
  }

  bool(name: string, fallback: boolean): boolean {
    const value = this.raw(name)?.toLowerCase();
    if (value === undefined) return fallback;
    if (["1", "true", "yes", "on"].includes(value)) return true;
    if (["0", "false", "no", "off"].includes(value)) return false;
    this.problems.push(`${name}=${value}: expected true or false`);
    return fallback;
  }

  /** `host:port`; the port may be 0 (any free port). */
  address(name: string, fallback: string): string {
    const value = this.raw(name) ?? fallback;
    if (parseAddress(value) === undefined) {
      this.problems.push(`${name}=${value}: expected host:port, e.g. 127.0.0.1:7300`);
      return fallback;
    }
    return value;
  }

  range(name: string, fallback: PortRange): PortRange {
    const value = this.raw(name);
    if (value === undefined) return fallback;
    const range = parseRange(value);
    if (!range) {
      this.problems.push(`${name}=${value}: expected MIN-MAX with 1 <= MIN <= MAX <= 65535, e.g. 30000-32767`);
      return fallback;
    }
    return range;
  }

  /** Adds a problem found by a check across several variables. */
  problem(message: string): void {
    this.problems.push(message);
  }

  finish(): void {
    if (this.problems.length > 0) throw new ConfigError(this.problems);
  }
}

export function parseAddress(value: string): { host: string; port: number } | undefined {
  const match = /^(\[[^\]]+\]|[^:]+):(\d{1,5})$/.exec(value);
  if (!match) return undefined;
  const port = Number(match[2]);
  if (port > 65535) return undefined;
  return { host: (match[1] as string).replace(/^\[|\]$/g, ""), port };
}

export function parseRange(value: string): PortRange | undefined {
  const match = /^(\d{1,5})-(\d{1,5})$/.exec(value.trim());
  if (!match) return undefined;
  const min = Number(match[1]);
  const max = Number(match[2]);
  if (min < 1 || max > 65535 || min > max) return undefined;
  return { min, max };
}

/** Where `harbor serve` listens and every other verb connects, unless HARBOR_API or --api says otherwise. */
export const DEFAULT_API_ADDRESS = "127.0.0.1:7300";
