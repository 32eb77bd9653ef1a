import type { Clock } from "./clock.js";

/**
 * Backends out of rotation, by `host:port`: for a while after a refused or
 * reset connection (passive), or until active checks see them healthy again.
 * Pure; the clock is injected.
 */
export class Ejections {
  private readonly until = new Map<string, number>();

  constructor(
    private readonly clock: Clock,
    /** How long a passive ejection lasts before the backend is tried again. */
    private readonly passiveMs: number,
  ) {}

  /**
   * Out of rotation for the passive period (or until `restore`, with
   * `indefinitely`). An ejection already in force that ends later stays: a
   * refused try of a backend a health check took out (tried because every
   * backend was out) must not shorten its ejection to the passive period.
   */
  eject(key: string, indefinitely = false): void {
    const until = indefinitely ? Number.POSITIVE_INFINITY : this.clock.now() + this.passiveMs;
    this.until.set(key, Math.max(until, this.until.get(key) ?? 0));
  }

  restore(key: string): void {
    this.until.delete(key);
  }

  isEjected(key: string): boolean {
    if (this.until.size === 0) return false;
    const until = this.until.get(key);
    if (until === undefined) return false;
    if (until > this.clock.now()) return true;
    this.until.delete(key);
    return false;
  }

  /** Entries held, expired ones included until asked about: a cheap "any at all?" for per-connection paths. */
  get size(): number {
    return this.until.size;
  }

  /**
   * Ejections in force now, expired ones dropped first: one of a backend
   * nobody asks about again (it left the set, or sits behind a healthy
   * primary) would otherwise count for ever, and callers skip work on 0.
   */
  get active(): number {
    if (this.until.size === 0) return 0;
    const now = this.clock.now();
    for (const [key, until] of this.until) if (until <= now) this.until.delete(key);
    return this.until.size;
  }
}
