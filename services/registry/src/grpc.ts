import { isIP } from "node:net";
import type { Logger } from "pino";
import { subscribeMessages, type Bus, type Subjects } from "@harbor/bus";
import { InvalidArgumentError, NotFoundError, validateAppName, validateInstanceId, validateNodeId, validatePort } from "@harbor/core";
import {
  BackendRegistryService,
  BackendSet,
  type BackendRegistryServer,
  type PortMapping,
  type RegisterInstanceRequest,
} from "@harbor/proto";
import { toGrpcError, unary, type GrpcService } from "@harbor/runtime";
import type { RegistryConfig } from "./config.js";
import type { Registry } from "./registry.js";
import type { Registration, RegistryStore } from "./store.js";

const HOSTNAME = /^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$/;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const MAX_MAPPINGS = 64;

/** Validates a registration from any entry point (gRPC or NATS). */
export function toRegistration(req: RegisterInstanceRequest, config: RegistryConfig): Registration {
  const app = validateAppName(req.app);
  const instanceId = validateInstanceId(req.instanceId);
  if (isIP(req.host) === 0 && !HOSTNAME.test(req.host)) {
    throw new InvalidArgumentError(`host ${JSON.stringify(req.host.slice(0, 80))} is not an IP address or hostname`);
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
  if (ttl > config.maxTtlSeconds) throw new InvalidArgumentError(`ttl ${ttl} s is above the maximum of ${config.maxTtlSeconds} s`);
  return { app, instanceId, host: req.host, ports, ttlSeconds: ttl };
}

export function createRegistryGrpc(
  registry: Registry,
  store: RegistryStore,
  bus: Bus,
  subjects: Subjects,
  config: RegistryConfig,
  logger: Logger,
): GrpcService {
  const implementation: BackendRegistryServer = {
    registerInstance: unary(logger, "RegisterInstance", async (req) => registry.register(toRegistration(req, config))),

    deregisterInstance: unary(logger, "DeregisterInstance", async (req) => {
      const app = validateAppName(req.app);
      const instanceId = validateInstanceId(req.instanceId);
      const gone = await registry.deregister(app, instanceId);
      if (!gone) throw new NotFoundError(`no instance "${instanceId}" of app "${app}" is registered`);
      return {};
    }),

    listInstances: unary(logger, "ListInstances", async (req) => ({
      instances: await store.listInstances(req.app === "" ? undefined : validateAppName(req.app)),
    })),

    listBackends: unary(logger, "ListBackends", async (req) => {
      const nodeId = req.nodeId === "" ? undefined : validateNodeId(req.nodeId);
      if (req.serviceId !== "" && !UUID.test(req.serviceId)) throw new InvalidArgumentError("service_id is the service's UUID (its `name` credential)");
      return { sets: await store.listSets({ nodeId, serviceId: req.serviceId === "" ? undefined : req.serviceId }) };
    }),

    // A snapshot of the node's sets, then each change as the registry publishes it.
    // Changes that arrive while the snapshot is read are held and sent after it.
    watchBackends: (call) => {
      let nodeId: string;
      try {
        nodeId = validateNodeId(call.request.nodeId);
      } catch (err) {
        call.emit("error", toGrpcError(err, logger, "WatchBackends"));
        return;
      }
      let held: BackendSet[] | undefined = [];
      const sub = subscribeMessages(bus, subjects.backendsOfNode(nodeId), BackendSet, logger, (set) => {
        if (held) held.push(set);
        else call.write({ snapshot: false, sets: [set] });
      });
      call.on("cancelled", () => sub.unsubscribe());
      call.on("close", () => sub.unsubscribe());
      store.listSets({ nodeId }).then(
        (sets) => {
          call.write({ snapshot: true, sets });
          for (const set of held ?? []) call.write({ snapshot: false, sets: [set] });
          held = undefined;
        },
        (err: unknown) => {
          sub.unsubscribe();
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
