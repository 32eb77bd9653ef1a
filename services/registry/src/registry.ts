import type { Logger } from "pino";
import { publishMessage, type Bus, type Subjects } from "@harbor/bus";
import type { Clock } from "@harbor/core";
import { BackendSet, InstanceEvent, timestampFromMs, type Instance } from "@harbor/proto";
import type { RegistryMetrics } from "./metrics.js";
import type { Registration, RegistryStore } from "./store.js";

/**
 * What the registry does, behind both gRPC and NATS: registrations and
 * heartbeats, expiry, and keeping every backend set published. Recomputes
 * of one service run one at a time (a queue), so sets are published in
 * revision order.
 */
export class Registry {
  private queue: Promise<void> = Promise.resolve();

  constructor(
    private readonly store: RegistryStore,
    private readonly bus: Bus,
    private readonly subjects: Subjects,
    private readonly clock: Clock,
    private readonly logger: Logger,
    private readonly metrics: RegistryMetrics,
  ) {}

  async register(reg: Registration): Promise<{ instance: Instance; created: boolean }> {
    const at = this.clock.now();
    const { instance, created, changed } = await this.store.register(reg, at);
    this.metrics.registrations.inc({ kind: created ? "new" : changed ? "changed" : "heartbeat" });
    if (created) {
      this.logger.info({ app: reg.app, instanceId: reg.instanceId, host: reg.host, ports: reg.ports }, "instance-up");
      publishMessage(this.bus, this.subjects.instanceUp(reg.app), InstanceEvent, { instance, reason: "registered" });
    }
    // A heartbeat that changes nothing publishes nothing.
    if (changed) await this.recomputeApp(reg.app, at);
    return { instance, created };
  }

  async deregister(app: string, instanceId: string): Promise<Instance | undefined> {
    const at = this.clock.now();
    const instance = await this.store.deregister(app, instanceId);
    if (instance) await this.instanceDown(instance, "deregistered", at);
    return instance;
  }

  async expire(): Promise<void> {
    const at = this.clock.now();
    for (const instance of await this.store.expire(at)) await this.instanceDown(instance, "expired", at);
  }

  private async instanceDown(instance: Instance, reason: "deregistered" | "expired", at: number): Promise<void> {
    this.logger.info({ app: instance.app, instanceId: instance.instanceId, reason }, "instance-down");
    this.metrics.departures.inc({ reason });
    publishMessage(this.bus, this.subjects.instanceDown(instance.app), InstanceEvent, { instance, reason });
    await this.recomputeApp(instance.app, at);
  }

  async recomputeApp(app: string, at: number): Promise<void> {
    await Promise.all((await this.store.servicesOfApp(app)).map((id) => this.recompute(id, at)));
  }

  /** Recomputes every set; covers events that were missed. */
  async reconcile(): Promise<void> {
    await Promise.all((await this.store.allServiceIds()).map((id) => this.recompute(id)));
  }

  /** `changedAt`: when the change that calls for this recompute reached the registry. */
  recompute(serviceId: string, changedAt = this.clock.now()): Promise<void> {
    const run = this.queue.then(async () => {
      const set = await this.store.recompute(serviceId, this.clock.now());
      if (!set) return;
      publishMessage(this.bus, this.subjects.backends(set.nodeId, set.serviceId), BackendSet, { ...set, changedAt: timestampFromMs(changedAt) });
      this.metrics.setsPublished.inc();
      this.logger.debug({ serviceId, revision: set.revision, backends: set.backends.length }, "backend-set-published");
    });
    this.queue = run.catch(() => undefined);
    return run;
  }

  async serviceDeleted(serviceId: string): Promise<void> {
    await this.store.dropSet(serviceId);
  }
}
