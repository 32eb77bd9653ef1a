import { isIP } from "node:net";
import {
  HarborError,
  InvalidArgumentError,
  isHostname,
  PermissionDeniedError,
  describeCaller,
  normalizeHealthCheck,
  requireOperator,
  type Authenticator,
  type Caller,
  buildAppEnvironment,
  buildCredentials,
  protocolFromName,
  validateAppName,
  validateNodeId,
  validatePort,
  validateServiceName,
  wantsHttpsProxy,
} from "@harbor/core";
import { PortAllocatorService, type PortAllocatorServer } from "@harbor/proto";
import { unary, type GrpcService, type Logger } from "@harbor/runtime";
import type { AllocatorEvents } from "./events.js";
import { toNode, toPortService } from "./mapping.js";
import { OPERATOR_SCOPE, type PortStore, type Scope } from "./store.js";

function optionalHostname(value: string, what: string): string {
  if (value !== "" && !isHostname(value)) throw new InvalidArgumentError(`${what} ${JSON.stringify(value.slice(0, 80))} is not a valid hostname`);
  return value;
}

function ipAddress(value: string, what: string, required: boolean): string {
  if (value === "" && !required) return value;
  if (isIP(value) === 0) throw new InvalidArgumentError(`${what} ${JSON.stringify(value.slice(0, 80))} is not an IP address (e.g. 10.0.0.5)`);
  return value;
}

function optional(value: string, validate: (v: string) => string): string | undefined {
  return value === "" ? undefined : validate(value);
}

export function createAllocatorGrpc(
  store: PortStore,
  events: AllocatorEvents,
  auth: Authenticator,
  limits: { spacePortQuota: number },
  allocations: { inc(labels: { result: string }): void },
  logger: Logger,
): GrpcService {
  const scopeOf = (caller: Caller): Scope => {
    if (caller.role === "agent") throw new PermissionDeniedError(`${describeCaller(caller)} may only register instances`);
    return caller.role === "operator" ? OPERATOR_SCOPE : { space: caller.space, quota: limits.spacePortQuota };
  };
  const implementation: PortAllocatorServer = {
    createPortService: unary(logger, auth, "CreatePortService", async (req, caller) => {
      const serviceName = validateServiceName(req.name);
      const nodeId = optional(req.nodeId, validateNodeId);
      const app = optional(req.app, validateAppName);
      const port = req.port === 0 ? undefined : validatePort(req.port);
      const protocol = protocolFromName(serviceName);
      const httpsProxy = wantsHttpsProxy(serviceName);
      if (protocol === "udp" && httpsProxy) {
        throw new InvalidArgumentError(`service name "${serviceName}" asks for UDP (udp…) and the HTTPS container proxy (https): TLS needs TCP; use both… for TCP and UDP, or drop https`);
      }
      const created = await store
        .createService(
        {
          serviceName,
          protocol,
          httpsProxy,
          nodeId,
          port,
          healthCheck: normalizeHealthCheck(req.healthCheck),
        },
        app,
        scopeOf(caller),
        async (tx, service) => {
          const binding = service.bindings[0];
          if (binding) await events.serviceBound(tx, service, binding.app, binding.intPort);
        },
      )
        .catch((err: unknown) => {
          allocations.inc({ result: err instanceof HarborError ? err.kind : "internal" });
          throw err;
        });
      allocations.inc({ result: "created" });
      logger.info({ serviceId: created.id, serviceName, nodeId: created.nodeId, port: created.port, app }, "port-service-created");
      return { service: toPortService(created, app) };
    }),

    getPortService: unary(logger, auth, "GetPortService", async (req, caller) => {
      const name = validateServiceName(req.name);
      const app = optional(req.app, validateAppName);
      return { service: toPortService(await store.getService(name, scopeOf(caller)), app) };
    }),

    listPortServices: unary(logger, auth, "ListPortServices", async (req, caller) => {
      const nodeId = optional(req.nodeId, validateNodeId);
      const app = optional(req.app, validateAppName);
      if (req.unlessDigest !== "" && (nodeId === undefined || app !== undefined)) {
        throw new InvalidArgumentError("unless_digest goes with node_id alone (the digest covers all of a node's services)");
      }
      // A digest covers all of a node's services: asked for by a worker, which sees them all.
      const digest = nodeId !== undefined && app === undefined && caller.role === "operator" ? await store.servicesDigest(nodeId) : "";
      if (digest !== "" && req.unlessDigest === digest) return { services: [], digest, unchanged: true };
      const services = await store.listServices({ nodeId, app }, scopeOf(caller));
      return { services: services.map((s) => toPortService(s, app)), digest, unchanged: false };
    }),

    deletePortService: unary(logger, auth, "DeletePortService", async (req, caller) => {
      const name = validateServiceName(req.name);
      const deleted = await store.deleteService(name, scopeOf(caller), (tx, service) => events.serviceDeleted(tx, service));
      logger.info({ serviceId: deleted.id, serviceName: deleted.serviceName, port: deleted.port }, "port-service-deleted");
      return {};
    }),

    bindPortService: unary(logger, auth, "BindPortService", async (req, caller) => {
      const name = validateServiceName(req.name);
      const app = validateAppName(req.app);
      const bound = await store.bindService(name, app, scopeOf(caller), (tx, service, intPort) => events.serviceBound(tx, service, app, intPort));
      logger.info({ serviceId: bound.id, app }, "port-service-bound");
      return { service: toPortService(bound, app) };
    }),

    unbindPortService: unary(logger, auth, "UnbindPortService", async (req, caller) => {
      const name = validateServiceName(req.name);
      const app = validateAppName(req.app);
      await store.unbindService(name, app, scopeOf(caller), (tx, service, intPort) => events.serviceUnbound(tx, service, app, intPort));
      logger.info({ serviceName: name, app }, "port-service-unbound");
      return {};
    }),

    setHealthCheck: unary(logger, auth, "SetHealthCheck", async (req, caller) => {
      const name = validateServiceName(req.name);
      const healthCheck = normalizeHealthCheck(req.healthCheck);
      const { service, changed } = await store.setHealthCheck(name, healthCheck, scopeOf(caller));
      if (changed) logger.info({ serviceId: service.id, serviceName: service.serviceName, healthCheck: healthCheck ?? "passive" }, "port-service-health-check-set");
      return { service: toPortService(service) };
    }),

    getAppEnvironment: unary(logger, auth, "GetAppEnvironment", async (req, caller) => {
      const app = validateAppName(req.app);
      const scope = scopeOf(caller);
      const owner = await store.appSpace(app);
      if (scope.space !== undefined && owner !== undefined && owner !== scope.space) throw new PermissionDeniedError(`app "${app}" belongs to another space`);
      const services = await store.listServices({ app }, scope);
      const variables = buildAppEnvironment(
        app,
        services.map((s) => {
          const binding = s.bindings.find((b) => b.app === app);
          return { serviceName: s.serviceName, credentials: buildCredentials(s.node, s, binding?.intPort ?? 0) };
        }),
      );
      return { variables };
    }),

    listNodes: unary(logger, auth, "ListNodes", async (_req, caller) => {
      requireOperator(caller, "listing nodes");
      return { nodes: (await store.listNodes()).map(toNode) };
    }),

    upsertNode: unary(logger, auth, "UpsertNode", async (req, caller) => {
      requireOperator(caller, "changing nodes");
      const node = req.node;
      if (!node) throw new InvalidArgumentError("give the node to create or change");
      const nodeId = validateNodeId(node.nodeId);
      if (node.portMin === 0 || node.portMax === 0 || node.portMin > node.portMax || node.portMax > 65535) {
        throw new InvalidArgumentError(`port range ${node.portMin}-${node.portMax} is not valid: use MIN-MAX with 1 <= MIN <= MAX <= 65535`);
      }
      if (node.blocked.length > 100) throw new InvalidArgumentError("at most 100 reserved ranges per node");
      // Ports blocked because a worker could not bind them are the allocator's to manage; the rest are the operator's reservations.
      const reserved = node.blocked
        .filter((b) => !b.reason.startsWith("bind failed"))
        .map((b) => {
          if (b.portMin < 1 || b.portMax > 65535 || b.portMin > b.portMax) {
            throw new InvalidArgumentError(`reserved range ${b.portMin}-${b.portMax} is not valid: use MIN-MAX with 1 <= MIN <= MAX <= 65535`);
          }
          return { min: b.portMin, max: b.portMax, reason: b.reason.slice(0, 200) || "reserved" };
        });
      const saved = await store.upsertNode(
        {
          nodeId,
          reserved,
          hostname: optionalHostname(node.hostname, "hostname"),
          host: ipAddress(node.host, "host", true),
          extHostname: optionalHostname(node.extHostname, "ext_hostname"),
          extHost: ipAddress(node.extHost, "ext_host", false),
          portMin: node.portMin,
          portMax: node.portMax,
        },
        (tx, record) => events.nodeUpdated(tx, record),
      );
      logger.info({ nodeId, range: `${saved.portMin}-${saved.portMax}`, host: saved.host }, "node-upserted");
      return { node: toNode(saved) };
    }),
  };
  return {
    fullName: "harbor.v1.PortAllocator",
    definition: PortAllocatorService,
    implementation: implementation as unknown as GrpcService["implementation"],
  };
}
