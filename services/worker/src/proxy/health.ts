import dgram from "node:dgram";
import net from "node:net";
import { isIPv6 } from "node:net";
import type { Logger } from "pino";
import type { HealthCheckSpec } from "@harbor/core";
import type { Backend } from "@harbor/proto";
import { backendKey } from "./dial.js";
import type { PortListener } from "./listener.js";

interface Streak {
  failures: number;
  successes: number;
  healthy: boolean;
}

/**
 * Active checks of one listener's backends: a TCP connect, or for UDP a
 * probe datagram that must get an answer. Thresholds in a row move a backend
 * out of rotation (indefinitely) and back in.
 */
export class HealthChecker {
  private timer: NodeJS.Timeout | undefined;
  private readonly streaks = new Map<string, Streak>();
  private running = false;
  /** A round still in flight when stopped must not eject anything: nobody would restore it. */
  private stopped = false;

  constructor(
    private readonly listener: PortListener,
    readonly spec: HealthCheckSpec,
    private readonly backends: () => readonly Backend[],
    private readonly logger: Logger,
  ) {}

  start(): void {
    this.timer = setInterval(() => void this.round(), this.spec.intervalMs);
    this.timer.unref();
    void this.round();
  }

  /**
   * Stops checking. Backends this checker took out come back: its
   * ejections last until it says otherwise, and a checker that replaces it
   * starts from healthy, so it would never restore them.
   */
  stop(): void {
    clearInterval(this.timer);
    this.stopped = true;
    let restored = false;
    for (const [key, streak] of this.streaks) {
      if (streak.healthy) continue;
      this.listener.ejections.restore(key);
      restored = true;
    }
    this.streaks.clear();
    if (restored) this.listener.backendsChanged();
  }

  private async round(): Promise<void> {
    if (this.running) return;
    this.running = true;
    try {
      const backends = this.backends();
      const present = new Set(backends.map(backendKey));
      for (const key of this.streaks.keys()) {
        if (!present.has(key)) {
          this.streaks.delete(key);
          this.listener.ejections.restore(key);
        }
      }
      await Promise.all(backends.map(async (b) => this.record(backendKey(b), await this.check(b))));
    } finally {
      this.running = false;
    }
  }

  private check(backend: Backend): Promise<boolean> {
    if (this.listener.protocol === "tcp") return tcpCheck(backend, this.spec.timeoutMs);
    // UDP without a probe has no active check: ICMP unreachable still ejects it passively.
    return this.spec.udpProbe ? udpProbe(backend, this.spec.udpProbe, this.spec.timeoutMs) : Promise.resolve(true);
  }

  private record(key: string, ok: boolean): void {
    if (this.stopped) return;
    const streak = this.streaks.get(key) ?? { failures: 0, successes: 0, healthy: true };
    this.streaks.set(key, streak);
    if (ok) {
      streak.successes++;
      streak.failures = 0;
      if (!streak.healthy && streak.successes >= this.spec.healthyThreshold) {
        streak.healthy = true;
        this.listener.ejections.restore(key);
        this.logger.info({ backend: key, protocol: this.listener.protocol, port: this.listener.port }, "backend-healthy");
        this.listener.backendsChanged();
      }
    } else {
      streak.failures++;
      streak.successes = 0;
      if (streak.healthy && streak.failures >= this.spec.unhealthyThreshold) {
        streak.healthy = false;
        this.listener.ejections.eject(key, true);
        this.logger.warn({ backend: key, protocol: this.listener.protocol, port: this.listener.port }, "backend-unhealthy");
        this.listener.backendsChanged();
      }
    }
  }
}

function tcpCheck(backend: Backend, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: backend.host, port: backend.port });
    const done = (ok: boolean) => {
      clearTimeout(timer);
      socket.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    socket.once("connect", () => done(true));
    socket.once("error", () => done(false));
  });
}

function udpProbe(backend: Backend, probe: string, timeoutMs: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = dgram.createSocket(isIPv6(backend.host) ? "udp6" : "udp4");
    let settled = false;
    const done = (ok: boolean) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      socket.close();
      resolve(ok);
    };
    const timer = setTimeout(() => done(false), timeoutMs);
    socket.once("message", () => done(true));
    socket.once("error", () => done(false));
    // A connect the kernel refuses (a broadcast address, no route) comes to this callback: sending
    // on the unconnected socket would throw from a callback nothing catches, and end the worker.
    // (Node passes the connect error to this callback, though its types declare none.)
    socket.connect(backend.port, backend.host, (...args: unknown[]) => (args[0] ? done(false) : socket.send(probe, (sendErr) => sendErr && done(false))));
  });
}
