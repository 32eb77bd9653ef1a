import { isIPv4 } from "node:net";
import { Ejections, systemClock } from "@harbor/core";
import type { Backend } from "@harbor/proto";
import { backendKey } from "../proxy/dial.js";
import type { PortListener } from "../proxy/listener.js";
import type { KernelPort } from "./render.js";
import type { KernelTable } from "./table.js";

export interface KernelListenerOptions {
  serviceId: string;
  port: number;
  protocol: "tcp" | "udp";
  backends: () => readonly Backend[];
  passiveEjectMs: number;
  table: KernelTable;
}

/**
 * A service port carried by the kernel: its "listening" is a rule in the
 * node's table. Health checks eject backends through `ejections` as in
 * userspace; there is no passive retry of a refused connection (the kernel
 * does not see refusals), which active checks cover.
 */
export class KernelListener implements PortListener {
  readonly ejections: Ejections;
  listening = false;
  error: string | undefined;

  constructor(private readonly options: KernelListenerOptions) {
    this.ejections = new Ejections(systemClock, options.passiveEjectMs);
  }

  get port(): number {
    return this.options.port;
  }

  /** Open connections live in conntrack; the table's own drain waits for them. */
  get connections(): number {
    return 0;
  }

  get protocol(): "tcp" | "udp" {
    return this.options.protocol;
  }

  get key(): string {
    return `${this.options.serviceId}/${this.options.protocol}`;
  }

  /** Backends in rotation: those not ejected, or all when every one is. */
  current(): KernelPort {
    // The table is `ip` (IPv4): an IPv6 backend would make the whole table invalid.
    const all = this.options.backends().filter((b) => isIPv4(b.host));
    const healthy = this.ejections.active === 0 ? all : all.filter((b) => !this.ejections.isEjected(backendKey(b)));
    return { port: this.options.port, protocol: this.options.protocol, backends: healthy.length > 0 ? healthy : all };
  }

  async listen(): Promise<boolean> {
    this.options.table.add(this);
    this.error = await this.options.table.update();
    this.listening = this.error === undefined;
    if (!this.listening) this.options.table.remove(this.key);
    return this.listening;
  }

  async close(): Promise<void> {
    if (!this.listening) return;
    this.listening = false;
    this.options.table.remove(this.key);
    await this.options.table.update();
  }

  async drain(): Promise<void> {
    // Open connections live in conntrack, not here.
  }

  backendsChanged(): void {
    if (this.listening) void this.options.table.update();
  }
}
