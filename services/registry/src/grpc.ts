import { isIP } from "node:net";
import type { Logger } from "pino";
import { subscribeMessages, type Bus, type Subjects } from "@harbor/bus";
import { lookup } from "node:dns/promises";
import {
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  describeCaller,
  inNetworks,
  isHostname,
  isUuid,
  requireOperator,
  validateAppName,
  validateInstanceId,
  validateNodeId,
  validatePort,
  type Authenticator,
  type Caller,
} from "@harbor/core";
import {
  BackendRegistryService,
  BackendSet,
  type BackendRegistryServer,
  type PortMapping,
  type RegisterInstanceRequest,
} from "@harbor/proto";
import { callerOf, toGrpcError, unary, type GrpcService } from "@harbor/runtime";
import type { RegistryConfig } from "./config.js";
import type { Registry } from "./registry.js";
import type { Registration, RegistryStore } from "./store.js";

const MAX_MAPPINGS = 64;

/**
 * Validates a registration from any entry point (gRPC or NATS). The host
 * must be inside the backend networks (every address a hostname resolves
 * to), so Harbor cannot be made to forward anywhere.
 */
export async function toRegistration(req: RegisterInstanceRequest, config: RegistryConfig): Promise<Registration> {
  const app = validateAppName(req.app);
  const instanceId = validateInstanceId(req.instanceId);
  if (isIP(req.host) === 0 && !isHostname(req.host)) {
    throw new InvalidArgumentError(`host ${JSON.stringify(req.host.slice(0, 80))} is not an IP address or hostname`);
  }
  const addresses = isIP(req.host) ? [req.host] : await lookup(req.host, { all: true }).then(
    (found) => found.map((a) => a.address),
    () => {
      throw new InvalidArgumentError(`host ${JSON.stringify(req.host)} does not resolve`);
    },
  );
  const outside = addresses.find((a) => !inNetworks(a, config.backendNetworks));
  if (outside !== undefined) {
    throw new PermissionDeniedError(
      `host ${req.host}${outside === req.host ? "" : ` (${outside})`} is outside the backend networks (${config.backendNetworks.map((n) => n.cidr).join(", ")}); an operator sets HARBOR_BACKEND_NETWORKS`,
    );
  }
  if (req.ports.length > MAX_MAPPINGS) throw new InvalidArgumentError(`at most ${MAX_MAPPINGS} port mappings per instance`);
  const seen = new Set<number>();
  const ports: PortMapping[] = req.ports.map((m) => {
    validatePort(m.intPort, "int_port");
    validatePort(m.port, "port");
    if (seen.has(m.intPort)) throw new InvalidArgumentError(`int_port ${m.intPort} is mapped twice`);
    seen.add(m.intPort);
    return { intPort: m.intPort, port: m.port };
  });
  const ttl = req.ttlSeconds === 0 ? config.defaultTtlSeconds : req.ttlSeconds;
  // gRPC decodes a uint32; a NATS request is JSON and may hold anything.
  if (!Number.isInteger(ttl) || ttl < 1) throw new InvalidArgumentError(`ttl_seconds ${JSON.stringify(req.ttlSeconds)} is not valid: use whole seconds from 1 to ${config.maxTtlSeconds} (0 for the default, ${config.defaultTtlSeconds})`);
  if (ttl > config.maxTtlSeconds) throw new InvalidArgumentError(`ttl ${ttl} s is above the maximum of ${config.maxTtlSeconds} s`);
  // The address that was checked, not the name: a name could resolve elsewhere later (DNS rebinding).
  return { app, instanceId, host: addresses[0] as string, ports, ttlSeconds: ttl };
}

/**
 * Instances are registered by operators and by the instance agent of the
 * app's space; an app no space has claimed yet is claimed for the agent's.
 */
export async function authorizeApp(store: RegistryStore, caller: Caller, app: string): Promise<void> {
  if (caller.role === "operator") return;
  if (caller.role !== "agent") throw new PermissionDeniedError(`registering instances is for instance agents; this token belongs to ${describeCaller(caller)}`);
  if ((await store.claimApp(app, caller.space)) !== caller.space) throw new PermissionDeniedError(`app "${app}" belongs to another space`);
}

export function createRegistryGrpc(
  registry: Registry,
  store: RegistryStore,
  bus: Bus,
  subjects: Subjects,
  config: RegistryConfig,
  auth: Authenticator,
  logger: Logger,
): GrpcService {
  const implementation: BackendRegistryServer = {
    registerInstance: unary(logger, auth, "RegisterInstance", async (req, caller) => {
      const registration = await toRegistration(req, config);
      await authorizeApp(store, caller, registration.app);
      return registry.register(registration);
    }),

    deregisterInstance: unary(logger, auth, "DeregisterInstance", async (req, caller) => {
      const app = validateAppName(req.app);
      const instanceId = validateInstanceId(req.instanceId);
      await authorizeApp(store, caller, app);
      const gone = await registry.deregister(app, instanceId);
      if (!gone) throw new NotFoundError(`no instance "${instanceId}" of app "${app}" is registered`);
      return {};
    }),

    listInstances: unary(logger, auth, "ListInstances", async (req, caller) => {
      const instances = await store.listInstances(req.app === "" ? undefined : validateAppName(req.app));
      if (caller.role === "operator") return { instances };
      const mine = await store.appsOfSpace(caller.space);
      return { instances: instances.filter((i) => mine.has(i.app)) };
    }),

    listBackends: unary(logger, auth, "ListBackends", async (req, caller) => {
      requireOperator(caller, "listing backends");
      const nodeId = req.nodeId === "" ? undefined : validateNodeId(req.nodeId);
      if (req.serviceId !== "" && !isUuid(req.serviceId)) throw new InvalidArgumentError("service_id is the service's UUID (its `name` credential)");
      if (req.unlessDigest !== "" && (nodeId === undefined || req.serviceId !== "")) {
        throw new InvalidArgumentError("unless_digest goes with node_id alone (the digest covers all of a node's sets)");
      }
      const digest = nodeId !== undefined && req.serviceId === "" ? await store.setsDigest(nodeId) : "";
      if (digest !== "" && req.unlessDigest === digest) return { sets: [], digest, unchanged: true };
      return { sets: await store.listSets({ nodeId, serviceId: req.serviceId === "" ? undefined : req.serviceId }), digest, unchanged: false };
    }),

    // A snapshot of the node's sets, then each change as the registry publishes it.
    // Changes that arrive while the snapshot is read are held and sent after it.
    watchBackends: (call) => {
      let nodeId: string;
      try {
        requireOperator(callerOf(call, auth), "watching backends");
        nodeId = validateNodeId(call.request.nodeId);
      } catch (err) {
        call.emit("error", toGrpcError(err, logger, "WatchBackends"));
        return;
      }
      let held: BackendSet[] | undefined = [];
      const send = (set: BackendSet) => {
        if (held) held.push(set);
        else call.write({ snapshot: false, sets: [set] });
      };
      const subs = [
        subscribeMessages(bus, subjects.backendsOfNode(nodeId), BackendSet, logger, send),
        // A set too large for the bus came as a notice: the watcher gets the set itself.
        subscribeMessages(bus, subjects.backendsElidedOfNode(nodeId), BackendSet, logger, (notice) =>
          store.listSets({ nodeId, serviceId: notice.serviceId }).then(
            (sets) => sets.forEach(send),
            (err: unknown) => logger.warn({ serviceId: notice.serviceId, err }, "watch-backends-fetch-failed"),
          ),
        ),
      ];
      const unsubscribe = () => subs.forEach((sub) => sub.unsubscribe());
      call.on("cancelled", unsubscribe);
      call.on("close", unsubscribe);
      store.listSets({ nodeId }).then(
        (sets) => {
          call.write({ snapshot: true, sets });
          for (const set of held ?? []) call.write({ snapshot: false, sets: [set] });
          held = undefined;
        },
        (err: unknown) => {
          unsubscribe();
          call.emit("error", toGrpcError(err, logger, "WatchBackends"));
        },
      );
    },
  };
  return {
    fullName: "harbor.v1.BackendRegistry",
    definition: BackendRegistryService,
    implementation: implementation as unknown as GrpcService["implementation"],
  };
}
