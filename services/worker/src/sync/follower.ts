import type { Logger } from "pino";
import { subscribeMessages, type Bus, type BusSubscription, type Subjects } from "@harbor/bus";
import {
  BackendSet,
  BindingEvent,
  NodeEvent,
  PortServiceEvent,
  msFromTimestamp,
  type BackendRegistryClient,
  type PortAllocatorClient,
} from "@harbor/proto";
import { invoke, tokenMetadata } from "@harbor/runtime";
import { isIP } from "node:net";
import { serviceView, type NodeView } from "../domain/node-view.js";
import { backendSetProblem, serviceProblem } from "../domain/validate.js";

export interface FollowerOptions {
  nodeId: string;
  view: NodeView;
  bus: Bus;
  subjects: Subjects;
  allocator: PortAllocatorClient;
  registry: BackendRegistryClient;
  resyncIntervalMs: number;
  /** Bearer token for the control plane's API. */
  token?: string;
  /** Observes, for each set applied from the bus, the time since its change reached the registry. */
  propagation?: { observe(seconds: number): void };
  logger: Logger;
  /** Called after every change of the view, with the services it touched (none: look at all), so listeners follow. */
  onChange: (serviceIds?: readonly string[]) => void;
}

type Event = { kind: "created" | "updated" | "deleted"; event: PortServiceEvent } | { kind: "bound"; event: BindingEvent } | { kind: "set"; set: BackendSet; fetched?: boolean } | { kind: "node"; event: NodeEvent };

const RETRY_MS = 1_000;
/** How long a deleted service's last event sequence is remembered, to drop a late repeat. */
const SEQUENCE_MEMORY_MS = 10 * 60_000;
/**
 * Reasons that mean events were missed. A snapshot under way when one comes
 * may have read the control plane before those events: another follows it.
 * (A periodic snapshot just joins the one under way.)
 */
const MISSED_EVENTS = new Set(["nats-reconnected", "revision-gap", "set-fetch-failed"]);
/**
 * One snapshot in this many (and the first) reads everything whatever the
 * digests say: besides missed events, it guards against the view drifting.
 */
const FULL_EVERY = 10;

/** The service an event is about; undefined for node changes, which concern every listener. */
function touched(e: Event): string | undefined {
  switch (e.kind) {
    case "set":
      return e.set.serviceId;
    case "node":
      return undefined;
    default:
      return e.event.service?.name;
  }
}

function problemOf(e: Event): string | undefined {
  switch (e.kind) {
    case "created":
    case "updated":
    case "bound":
    case "deleted":
      return serviceProblem(e.event.service);
    case "set":
      return backendSetProblem(e.set);
    case "node":
      return e.event.node && isIP(e.event.node.host) === 0 ? "node host is not an IP address" : undefined;
  }
}

const noop = () => undefined;

function isGap(held: bigint, revision: string): boolean {
  try {
    return BigInt(revision) > held + 1n;
  } catch {
    return false;
  }
}

/**
 * Keeps the node view in step with the control plane: a snapshot over gRPC
 * (node, services, backend sets), then NATS events. Events that arrive
 * during a snapshot are held and applied after it. A snapshot is taken at
 * start, on NATS reconnect and on a timer; while the control plane is away
 * the last view stays in force (the data plane keeps forwarding).
 */
export class Follower {
  private subscriptions: BusSubscription[] = [];
  private held: Event[] | undefined;
  private timer: NodeJS.Timeout | undefined;
  private retry: NodeJS.Timeout | undefined;
  private syncing: Promise<void> | undefined;
  /** The snapshot to take after the one under way, when events were missed meanwhile. */
  private followUp: Promise<void> | undefined;
  private stopped = false;
  /** The digests of the last snapshot's services and sets: unchanged ones are not sent again. */
  private digests = { services: "", sets: "" };
  private snapshots = 0;
  /** Per service whose set is being fetched (too large for the bus): the highest revision announced meanwhile, and when its change was. */
  private readonly fetching = new Map<string, { revision: bigint; changedAt: BackendSet["changedAt"] }>();
  /** The highest allocator event sequence received per service, and when. */
  private readonly sequences = new Map<string, { sequence: bigint; at: number }>();
  synced = false;

  constructor(private readonly o: FollowerOptions) {}

  start(): Promise<void> {
    const { bus, subjects, nodeId, logger } = this.o;
    this.subscriptions = [
      subscribeMessages(bus, subjects.serviceCreated(nodeId), PortServiceEvent, logger, (event) => this.receive({ kind: "created", event })),
      subscribeMessages(bus, subjects.serviceDeleted(nodeId), PortServiceEvent, logger, (event) => this.receive({ kind: "deleted", event })),
      // A changed health check: the service's checker is replaced, its listener and connections stay.
      subscribeMessages(bus, subjects.serviceUpdated(nodeId), PortServiceEvent, logger, (event) => this.receive({ kind: "updated", event })),
      // A bind to a service created before this worker knew it; also makes sure the service is known.
      subscribeMessages(bus, subjects.serviceBound(nodeId), BindingEvent, logger, (event) => this.receive({ kind: "bound", event })),
      subscribeMessages(bus, subjects.backendsOfNode(nodeId), BackendSet, logger, (set) => this.receive({ kind: "set", set })),
      subscribeMessages(bus, subjects.backendsElidedOfNode(nodeId), BackendSet, logger, (set) => this.receive({ kind: "set", set })),
      subscribeMessages(bus, subjects.nodeUpdated(nodeId), NodeEvent, logger, (event) => this.receive({ kind: "node", event })),
    ];
    bus.onReconnect(() => void this.resync("nats-reconnected"));
    this.timer = setInterval(() => void this.resync("timer"), this.o.resyncIntervalMs);
    return this.resync("start");
  }

  stop(): void {
    this.stopped = true;
    clearInterval(this.timer);
    clearTimeout(this.retry);
    for (const sub of this.subscriptions) sub.unsubscribe();
    this.subscriptions = [];
  }

  private receive(event: Event): void {
    const problem = problemOf(event);
    if (problem) {
      // Malformed: dropped and logged, the view unchanged.
      this.o.logger.warn({ kind: event.kind, problem }, "bus-event-invalid");
      return;
    }
    if (this.isStale(event)) {
      this.o.logger.debug({ kind: event.kind, serviceId: touched(event) }, "bus-event-stale");
      return;
    }
    if (event.kind === "set" && event.set.elided) void this.fetchSet(event.set);
    else this.take(event);
  }

  /** Applies a valid event now, or holds it while a snapshot is under way. */
  private take(event: Event): void {
    if (this.held) this.held.push(event);
    else if (this.apply(event)) {
      const id = touched(event);
      this.o.onChange(id === undefined ? undefined : [id]);
    }
  }

  /**
   * A set too large for one bus message came as a notice of its revision:
   * the set itself is fetched over gRPC. Notices that come while a fetch is
   * under way join it (another fetch follows while the view is older than
   * what they announced); while a snapshot is under way the fetch waits for
   * it, which may bring the set. A failed fetch leaves it to a snapshot.
   */
  private async fetchSet(notice: BackendSet): Promise<void> {
    const { registry, nodeId, logger, view } = this.o;
    const id = notice.serviceId;
    const announced = BigInt(notice.revision);
    const pending = this.fetching.get(id);
    // Notices go up by one per change, as sets do: a jump means some were missed.
    const known = pending && pending.revision > view.revision(id) ? pending.revision : view.revision(id);
    if (known > 0n && isGap(known, notice.revision)) void this.resync("revision-gap");
    if (pending) {
      if (announced > pending.revision) this.fetching.set(id, { revision: announced, changedAt: notice.changedAt });
      return;
    }
    this.fetching.set(id, { revision: announced, changedAt: notice.changedAt });
    const wanted = () => this.fetching.get(id) as { revision: bigint; changedAt: BackendSet["changedAt"] };
    try {
      let fetched = 0n;
      while (!this.stopped && view.revision(id) < wanted().revision) {
        if (this.syncing) {
          await this.syncing;
          continue;
        }
        const { sets } = await invoke(registry, "listBackends", { nodeId, serviceId: id, unlessDigest: "" }, 10_000, tokenMetadata(this.o.token));
        const set = sets.find((s) => s.serviceId === id && s.nodeId === nodeId);
        // The service is gone, or the registry has nothing newer than last time: the snapshot will tell.
        if (!set || BigInt(set.revision) <= fetched || this.stopped) break;
        fetched = BigInt(set.revision);
        logger.info({ serviceId: id, revision: set.revision, backends: set.backends.length }, "backend-set-fetched");
        // The latest notice's time, when the set is the revision it announced (ListBackends carries none).
        const changedAt = set.changedAt ?? (fetched === wanted().revision ? wanted().changedAt : undefined);
        this.take({ kind: "set", set: { ...set, changedAt }, fetched: true });
      }
    } catch (err) {
      logger.warn({ serviceId: id, revision: notice.revision, err: (err as Error).message }, "backend-set-fetch-failed");
      if (!this.stopped) void this.resync("set-fetch-failed");
    } finally {
      this.fetching.delete(id);
    }
  }

  /**
   * Whether an allocator event about a service is older than one already
   * received about it (its outbox sequence is not higher). At-least-once
   * delivery may repeat a batch, and allocator replicas may relay batches out
   * of order: applied, a repeated "created" after "deleted" would reopen the
   * port of a service that is gone, an old node event the node's former
   * host. Sets have their own revisions. (Should
   * sequences ever go back, an allocator database restored from a backup,
   * say, the periodic snapshot still brings every change, which it applies
   * whatever the sequences.)
   */
  private isStale(e: Event): boolean {
    if (e.kind === "set") return false;
    // The node's own events (its host) go through the same outbox.
    const id = e.kind === "node" ? `node:${this.o.nodeId}` : e.event.service?.name;
    let sequence: bigint;
    try {
      sequence = BigInt(e.event.sequence);
    } catch {
      return false;
    }
    // 0: no sequence (not relayed from an outbox); nothing to compare.
    if (id === undefined || sequence <= 0n) return false;
    const seen = this.sequences.get(id);
    if (seen && sequence <= seen.sequence) return true;
    this.sequences.set(id, { sequence, at: Date.now() });
    return false;
  }

  /** Drops what is remembered of services gone for a while: a repeat comes soon after its original. */
  private forgetOldSequences(): void {
    const before = Date.now() - SEQUENCE_MEMORY_MS;
    for (const [id, seen] of this.sequences) if (seen.at < before && !id.startsWith("node:") && !this.o.view.service(id)) this.sequences.delete(id);
  }

  private apply(e: Event): boolean {
    const { view, nodeId } = this.o;
    switch (e.kind) {
      case "created":
      case "updated":
      case "bound": {
        const service = e.event.service;
        if (!service || service.nodeId !== nodeId) return false;
        view.upsertService(serviceView(service));
        return true;
      }
      case "deleted": {
        const service = e.event.service;
        if (!service) return false;
        view.removeService(service.name);
        return true;
      }
      case "set": {
        // A notice without its backends is never applied (see fetchSet).
        if (e.set.nodeId !== nodeId || e.set.elided) return false;
        // Revisions of a set go up by one per change: a jump means events were
        // missed, perhaps for other sets too. The set is whole state, so it is
        // applied anyway, and a snapshot fills in the rest. (A fetched set may
        // jump: its notices were checked for gaps instead, in fetchSet.)
        const held = view.revision(e.set.serviceId);
        if (!e.fetched && held > 0n && isGap(held, e.set.revision)) void this.resync("revision-gap");
        const applied = view.applySet(e.set);
        const changedAt = msFromTimestamp(e.set.changedAt);
        if (applied && changedAt !== undefined) this.o.propagation?.observe(Math.max(0, Date.now() - changedAt) / 1000);
        return applied;
      }
      case "node": {
        const host = e.event.node?.host;
        if (!host || host === view.host) return false;
        view.host = host;
        return true;
      }
    }
  }

  /**
   * Takes a snapshot; concurrent calls share one, but a call for missed
   * events during a snapshot gets one that starts after it. A failure keeps
   * the current view and retries soon.
   */
  resync(reason: string): Promise<void> {
    if (this.syncing && MISSED_EVENTS.has(reason)) {
      this.followUp ??= this.syncing.then(noop, noop).then(() => {
        this.followUp = undefined;
        return this.resync(reason);
      });
      return this.followUp;
    }
    this.syncing ??= this.snapshot(reason).finally(() => {
      this.syncing = undefined;
    });
    return this.syncing;
  }

  private async snapshot(reason: string): Promise<void> {
    if (this.stopped) return;
    const { view, nodeId, allocator, registry, logger } = this.o;
    this.held = [];
    try {
      const metadata = tokenMetadata(this.o.token);
      // Most periodic snapshots find nothing new: then the control plane sends a digest, not
      // 10,000 services and sets (decoding those stalled the data plane for ~50 ms each time).
      const digests = this.synced && ++this.snapshots % FULL_EVERY !== 0 ? this.digests : { services: "", sets: "" };
      const [nodes, services, sets] = await Promise.all([
        invoke(allocator, "listNodes", {}, 10_000, metadata),
        invoke(allocator, "listPortServices", { nodeId, app: "", unlessDigest: digests.services }, 10_000, metadata),
        invoke(registry, "listBackends", { nodeId, serviceId: "", unlessDigest: digests.sets }, 10_000, metadata),
      ]);
      const node = nodes.nodes.find((n) => n.nodeId === nodeId);
      if (!node) throw new Error(`node ${nodeId} is not configured in the allocator (\`harbor set-node ${nodeId} …\`)`);
      // Only what the snapshot changed is handed on: at 10,000 services a
      // look at every listener each 30 s stalled the data plane for tens of ms.
      let all = !this.synced || view.host !== node.host;
      view.host = node.host;
      const changed = new Set(services.unchanged ? [] : view.replaceServices(services.services.map(serviceView)));
      for (const set of sets.sets) if (view.applySet(set)) changed.add(set.serviceId);
      this.digests = { services: services.digest, sets: sets.digest };
      if (this.applyHeld(changed)) all = true;
      this.synced = true;
      this.forgetOldSequences();
      logger.info(
        { reason, services: services.services.length, sets: sets.sets.length, unchanged: services.unchanged && sets.unchanged, changed: all ? "all" : changed.size },
        "worker-synced",
      );
      this.handOn(all, changed);
    } catch (err) {
      // Only what the events held meanwhile touched is handed on: this repeats every
      // second while the control plane is away, and a look at every listener is not free.
      const changed = new Set<string>();
      const all = this.applyHeld(changed);
      logger.warn({ reason, err: (err as Error).message }, "worker-sync-failed-keeping-last-state");
      clearTimeout(this.retry);
      if (!this.stopped) this.retry = setTimeout(() => void this.resync("retry"), RETRY_MS);
      this.handOn(all, changed);
    }
  }

  /** Tells the listeners what changed: everything, or only these services (nothing when none). */
  private handOn(all: boolean, changed: ReadonlySet<string>): void {
    if (all) this.o.onChange();
    else if (changed.size > 0) this.o.onChange([...changed]);
  }

  /**
   * Applies the events held while a snapshot was taken, adding the services
   * they changed to `changed`; true when one changed the whole node (its host).
   */
  private applyHeld(changed: Set<string>): boolean {
    const held = this.held ?? [];
    this.held = undefined;
    let all = false;
    for (const event of held) {
      if (!this.apply(event)) continue;
      const id = touched(event);
      if (id === undefined) all = true;
      else changed.add(id);
    }
    return all;
  }
}
