import type { Logger } from "pino";
import { encodeMessage, publishMessage, type Bus, type Subjects } from "@harbor/bus";
import type { Clock } from "@harbor/core";
import { BackendSet, InstanceEvent, timestampFromMs, type Instance } from "@harbor/proto";
import type { RegistryMetrics } from "./metrics.js";
import type { Registration, RegistryStore } from "./store.js";

/** Recomputes a reconcile runs at once: the rest of the pool stays free for the ones changes call for. */
const RECONCILE_LANES = 2;

/**
 * What the registry does, behind both gRPC and NATS: registrations and
 * heartbeats, expiry, and keeping every backend set published. Recomputes
 * of one service run one at a time (a chain per service), so its sets are
 * published in revision order; different services' run side by side.
 */
export class Registry {
  /** The last recompute in line for each service with one in flight. */
  private readonly chains = new Map<string, Promise<void>>();
  private reconciling: Promise<void> | undefined;

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
    const { instance, created, changed, boundServices } = await this.store.register(reg, at);
    this.metrics.registrations.inc({ kind: created ? "new" : changed ? "changed" : "heartbeat" });
    if (created) {
      this.logger.info({ app: reg.app, instanceId: reg.instanceId, host: reg.host, ports: reg.ports }, "instance-up");
      publishMessage(this.bus, this.subjects.instanceUp(reg.app), InstanceEvent, { instance, reason: "registered" });
    }
    // A heartbeat that changes nothing publishes nothing.
    if (changed) await this.recomputeAll(boundServices, at);
    return { instance, created };
  }

  async deregister(app: string, instanceId: string): Promise<Instance | undefined> {
    const at = this.clock.now();
    const gone = await this.store.deregister(app, instanceId);
    if (!gone) return undefined;
    this.announceDown(gone.instance, "deregistered");
    await this.recomputeAll(gone.boundServices, at);
    return gone.instance;
  }

  /**
   * Removes the instances whose TTL ran out. One statement takes them all,
   * so each service they were bound to is recomputed once, not once per
   * instance (a node that dies takes hundreds with it).
   */
  async expire(): Promise<void> {
    const at = this.clock.now();
    const expired = await this.store.expire(at);
    for (const gone of expired) this.announceDown(gone.instance, "expired");
    await this.recomputeAll([...new Set(expired.flatMap((gone) => gone.boundServices))], at);
  }

  private announceDown(instance: Instance, reason: "deregistered" | "expired"): void {
    this.logger.info({ app: instance.app, instanceId: instance.instanceId, reason }, "instance-down");
    this.metrics.departures.inc({ reason });
    publishMessage(this.bus, this.subjects.instanceDown(instance.app), InstanceEvent, { instance, reason });
  }

  /** An app's services side by side (each still in its own chain). */
  private async recomputeAll(serviceIds: string[], at: number): Promise<void> {
    await Promise.all(serviceIds.map((id) => this.recompute(id, at)));
  }

  /**
   * Recomputes every set, covering events that were missed: a few at a
   * time, beside the recomputes that changes call for, which do not wait
   * for it (with one queue for all, a registration at 10,000 services
   * waited 8 s behind a reconcile). One reconcile at a time.
   */
  reconcile(): Promise<void> {
    this.reconciling ??= (async () => {
      try {
        const ids = await this.store.allServiceIds();
        let next = 0;
        const lane = async () => {
          while (next < ids.length) await this.recompute(ids[next++] as string);
        };
        await Promise.all(Array.from({ length: RECONCILE_LANES }, lane));
      } finally {
        this.reconciling = undefined;
      }
    })();
    return this.reconciling;
  }

  /** `changedAt`: when the change that calls for this recompute reached the registry. */
  recompute(serviceId: string, changedAt = this.clock.now()): Promise<void> {
    const run = (this.chains.get(serviceId) ?? Promise.resolve()).then(async () => {
      const set = await this.store.recompute(serviceId, this.clock.now());
      if (!set) return;
      const message = { ...set, changedAt: timestampFromMs(changedAt) };
      const data = encodeMessage(BackendSet, message);
      // Too large for one bus message (~9,000 backends at NATS's default 1 MB): workers get a
      // notice with the revision and fetch the set over gRPC, rather than wait for their snapshot.
      const elided = Buffer.byteLength(data) > this.bus.maxPayloadBytes();
      if (elided) this.bus.publish(this.subjects.backendsElided(set.nodeId, set.serviceId), encodeMessage(BackendSet, { ...message, backends: [], elided: true }));
      else this.bus.publish(this.subjects.backends(set.nodeId, set.serviceId), data);
      this.metrics.setsPublished.inc();
      this.logger.debug({ serviceId, revision: set.revision, backends: set.backends.length, elided }, "backend-set-published");
    });
    const settled = run.catch(() => undefined);
    this.chains.set(serviceId, settled);
    void settled.then(() => {
      if (this.chains.get(serviceId) === settled) this.chains.delete(serviceId);
    });
    return run;
  }

  async serviceDeleted(serviceId: string): Promise<void> {
    await this.store.dropSet(serviceId);
  }
}
