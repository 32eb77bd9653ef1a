import { ANY, subscribeMessages, encodeMessage, type Bus, type BusSubscription, type Subjects } from "@harbor/bus";
import { Authenticator, LOOPBACK_NETWORKS, PermissionDeniedError, errorMessage, systemClock, validateAppName, validateInstanceId, type Clock } from "@harbor/core";
import { migrate, type Pool } from "@harbor/db";
import {
  BindingEvent,
  DeregisterInstanceRequest,
  PortServiceEvent,
  RegisterInstanceRequest,
  RegisterInstanceResponse,
} from "@harbor/proto";
import type { Component, GrpcService, Logger, MetricsRegistry } from "@harbor/runtime";
import { registryMetrics } from "./metrics.js";
import type { RegistryConfig } from "./config.js";
import { createRegistryGrpc, toRegistration } from "./grpc.js";
import { registryMigrations } from "./migrations.js";
import { Registry } from "./registry.js";
import { RegistryStore } from "./store.js";

export interface RegistryDeps {
  pool: Pool;
  bus: Bus;
  subjects: Subjects;
  logger: Logger;
  clock?: Clock;
  /** Who may call; without one every caller is an operator. */
  auth?: Authenticator;
  metrics?: MetricsRegistry;
}

export interface RegistryService extends Component {
  readonly grpc: GrpcService;
  readonly registry: Registry;
}

const SCHEMA_WAIT_MS = 60_000;

const NATS_REGISTRATION_OFF =
  "registration over NATS is off: this Harbor requires API tokens and a NATS message carries none; register with RegisterInstance over gRPC and an agent token, or an operator sets HARBOR_NATS_REGISTRATION=true to let every NATS client register as an operator";

/**
 * The registry: instances over gRPC and NATS, expiry, and backend sets kept
 * published. Follows the allocator's binding events and reconciles all sets
 * at start and on a timer.
 */
export function createRegistry(given: RegistryConfig, deps: RegistryDeps): RegistryService {
  const logger = deps.logger.child({ component: "registry" });
  const auth = deps.auth ?? new Authenticator(new Map());
  // With tokens on, a space's agent must not reach the node's own loopback services (the embedded
  // Postgres with trust auth, NATS, the API) through its port: loopback only where the operator says so.
  const withoutLoopback = auth.enabled && !given.backendNetworksGiven;
  const config = withoutLoopback ? { ...given, backendNetworks: given.backendNetworks.filter((n) => !LOOPBACK_NETWORKS.includes(n.cidr)) } : given;
  const store = new RegistryStore(deps.pool);
  const registry = new Registry(store, deps.bus, deps.subjects, deps.clock ?? systemClock, logger, registryMetrics(store, deps.metrics));
  const subscriptions: BusSubscription[] = [];
  const timers: NodeJS.Timeout[] = [];
  let sweeping: Promise<void> | undefined;
  /** NATS registrations being handled: stop() lets them finish and answer, rather than leave them to a closing pool. */
  const inFlight = new Set<Promise<void>>();

  const every = (ms: number, task: () => Promise<void>, event: string) => {
    let busy = false;
    timers.push(
      setInterval(() => {
        if (busy) return;
        busy = true;
        const run = task()
          .catch((err: unknown) => logger.warn({ err }, event))
          .finally(() => {
            busy = false;
          });
        sweeping = run;
      }, ms),
    );
  };

  return {
    name: "registry",
    grpc: createRegistryGrpc(registry, store, deps.bus, deps.subjects, config, auth, logger),
    registry,
    async start() {
      await waitForAllocatorSchema(store, logger);
      await migrate(deps.pool, "registry", registryMigrations, logger);
      const s = deps.subjects;
      // A NATS message carries no Harbor token: with tokens on, registering over NATS would let
      // anyone who may publish there add backends to, or take them from, any space's apps.
      const natsRegistration = config.natsRegistration ?? !auth.enabled;
      if (natsRegistration && auth.enabled) logger.warn("nats-registration-unauthenticated");
      if (withoutLoopback) logger.info({ backendNetworks: config.backendNetworks.map((n) => n.cidr) }, "backend-networks-without-loopback");
      const refuseOverNats = () => {
        if (!natsRegistration) throw new PermissionDeniedError(NATS_REGISTRATION_OFF);
      };
      /** A request over NATS, answered with `handle`'s reply or `{ error }`; stop() waits for those being handled. */
      const answerOverNats = (subject: string, rejected: string, handle: (data: string) => Promise<string>) =>
        deps.bus.subscribe(
          subject,
          (msg) => {
            const task = (async () => {
              try {
                refuseOverNats();
                msg.respond(await handle(msg.data));
              } catch (err) {
                logger.warn({ subject: msg.subject, err }, rejected);
                msg.respond(JSON.stringify({ error: errorMessage(err) }));
              }
            })().catch((err: unknown) => logger.warn({ subject: msg.subject, err }, "bus-reply-failed"));
            inFlight.add(task);
            void task.finally(() => inFlight.delete(task));
          },
          { queue: "harbor-registry" },
        );
      const onBinding = (event: BindingEvent) => (event.service ? registry.recompute(event.service.name) : undefined);
      subscriptions.push(
        subscribeMessages(deps.bus, s.serviceBound(ANY), BindingEvent, logger, onBinding),
        subscribeMessages(deps.bus, s.serviceUnbound(ANY), BindingEvent, logger, onBinding),
        subscribeMessages(deps.bus, s.serviceDeleted(ANY), PortServiceEvent, logger, (event) =>
          event.service ? registry.serviceDeleted(event.service.name) : undefined,
        ),
        // Instance agents may register over NATS; replicas share the subject as a queue group.
        answerOverNats(s.registerInstance(), "bus-register-rejected", async (data) => {
          const req = RegisterInstanceRequest.fromJSON(JSON.parse(data));
          // Only NATS's own credentials stand here (an operator's choice); the backend networks still apply.
          return encodeMessage(RegisterInstanceResponse, await registry.register(await toRegistration(req, config)));
        }),
        answerOverNats(s.deregisterInstance(), "bus-deregister-rejected", async (data) => {
          const req = DeregisterInstanceRequest.fromJSON(JSON.parse(data));
          const gone = await registry.deregister(validateAppName(req.app), validateInstanceId(req.instanceId));
          return JSON.stringify({ deregistered: gone !== undefined });
        }),
      );
      deps.bus.onReconnect(() => void registry.reconcile().catch((err: unknown) => logger.warn({ err }, "reconcile-failed")));
      await registry.expire();
      await registry.reconcile();
      every(config.sweepIntervalMs, () => registry.expire(), "expiry-sweep-failed");
      every(config.reconcileIntervalMs, () => registry.reconcile(), "reconcile-failed");
      logger.info({ defaultTtlSeconds: config.defaultTtlSeconds }, "registry-started");
    },
    async stop() {
      for (const timer of timers.splice(0)) clearInterval(timer);
      for (const sub of subscriptions.splice(0)) sub.unsubscribe();
      await Promise.all([sweeping, ...inFlight]);
    },
  };
}

async function waitForAllocatorSchema(store: RegistryStore, logger: Logger): Promise<void> {
  const until = Date.now() + SCHEMA_WAIT_MS;
  let logged = false;
  for (;;) {
    try {
      if (await store.allocatorSchemaReady()) return;
    } catch (err) {
      if (Date.now() > until) throw err;
    }
    if (Date.now() > until) throw new Error("the allocator's tables did not appear within 60 s; start the allocator against the same DATABASE_URL");
    if (!logged) logger.info("waiting-for-allocator-schema");
    logged = true;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}
