import type { Logger } from "pino";
import { publishMessage, type Bus, type Subjects } from "@harbor/bus";
import type { Clock } from "@harbor/core";
import { BackendSet, InstanceEvent, type Instance } from "@harbor/proto";
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
  ) {}

  async register(reg: Registration): Promise<{ instance: Instance; created: boolean }> {
    const { instance, created, changed } = await this.store.register(reg, this.clock.now());
    if (created) {
      this.logger.info({ app: reg.app, instanceId: reg.instanceId, host: reg.host, ports: reg.ports }, "instance-up");
      publishMessage(this.bus, this.subjects.instanceUp(reg.app), InstanceEvent, { instance, reason: "registered" });
    }
    // A heartbeat that changes nothing publishes nothing.
    if (changed) await this.recomputeApp(reg.app);
    return { instance, created };
  }

  async deregister(app: string, instanceId: string): Promise<Instance | undefined> {
    const instance = await this.store.deregister(app, instanceId);
    if (instance) await this.instanceDown(instance, "deregistered");
    return instance;
  }

  async expire(): Promise<void> {
    for (const instance of await this.store.expire(this.clock.now())) await this.instanceDown(instance, "expired");
  }

  private async instanceDown(instance: Instance, reason: "deregistered" | "expired"): Promise<void> {
    this.logger.info({ app: instance.app, instanceId: instance.instanceId, reason }, "instance-down");
    publishMessage(this.bus, this.subjects.instanceDown(instance.app), InstanceEvent, { instance, reason });
    await this.recomputeApp(instance.app);
  }

  async recomputeApp(app: string): Promise<void> {
    await Promise.all((await this.store.servicesOfApp(app)).map((id) => this.recompute(id)));
  }

  /** Recomputes every set; covers events that were missed. */
  async reconcile(): Promise<void> {
    await Promise.all((await this.store.allServiceIds()).map((id) => this.recompute(id)));
  }

  recompute(serviceId: string): Promise<void> {
    const run = this.queue.then(async () => {
      const set = await this.store.recompute(serviceId, this.clock.now());
      if (!set) return;
      publishMessage(this.bus, this.subjects.backends(set.nodeId, set.serviceId), BackendSet, set);
      this.logger.debug({ serviceId, revision: set.revision, backends: set.backends.length }, "backend-set-published");
    });
    this.queue = run.catch(() => undefined);
    return run;
  }

  async serviceDeleted(serviceId: string): Promise<void> {
    await this.store.dropSet(serviceId);
  }
}
