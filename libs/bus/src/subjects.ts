/**
 * Every NATS subject Harbor uses, built by functions from one prefix; call
 * sites never spell a subject. The first token comes from HARBOR_NATS_PREFIX
 * (default `harbor`) so two deployments can share one NATS. The README lists
 * these for operators.
 */
export interface Subjects {
  readonly prefix: string;
  /** PortServiceEvent. */
  serviceCreated(nodeId: string): string;
  serviceDeleted(nodeId: string): string;
  /** PortServiceEvent: the service as it is after a change of its health check. */
  serviceUpdated(nodeId: string): string;
  /** BindingEvent. */
  serviceBound(nodeId: string): string;
  serviceUnbound(nodeId: string): string;
  /** Every port-service event of one node (created, deleted, updated, bound, unbound). */
  servicesOfNode(nodeId: string): string;
  /** NodeEvent. */
  nodeUpdated(nodeId: string): string;
  /** InstanceEvent. */
  instanceUp(app: string): string;
  instanceDown(app: string): string;
  /** BackendSet: the whole ordered set of one port service with its revision. */
  backends(nodeId: string, serviceId: string): string;
  backendsOfNode(nodeId: string): string;
  /**
   * BackendSet with `elided` and no backends: the set of a revision too large
   * for one message, to fetch with ListBackends. A subject of its own, so a
   * subscriber of `backendsOfNode` never takes the notice for an empty set.
   */
  backendsElided(nodeId: string, serviceId: string): string;
  backendsElidedOfNode(nodeId: string): string;
  /** WorkerHeartbeat. */
  workerHeartbeat(nodeId: string): string;
  /** PortBindFailed: a worker could not listen on a service's port. */
  portBindFailed(nodeId: string): string;
  /** DriftReport: the repair pass's findings for a node. */
  repairDrift(nodeId: string): string;
  /** RegisterInstanceRequest / DeregisterInstanceRequest from instance agents (request-reply optional). */
  registerInstance(): string;
  deregisterInstance(): string;
  /** Everything of this deployment, for `harbor watch`. */
  all(): string;
}

export const DEFAULT_NATS_PREFIX = "harbor";
const TOKEN = /^[A-Za-z0-9_-]+$/;

export function isValidPrefix(prefix: string): boolean {
  return TOKEN.test(prefix);
}

/** Pass as a node id or app to build a pattern that matches any (for subscribing). */
export const ANY = "*";

/** A subject token from a value that may hold characters NATS treats specially. */
function token(value: string): string {
  if (value !== ANY && !TOKEN.test(value)) throw new Error(`not usable in a NATS subject: ${JSON.stringify(value)}`);
  return value;
}

export function createSubjects(prefix: string = DEFAULT_NATS_PREFIX): Subjects {
  const base = `${token(prefix)}.v1`;
  return {
    prefix,
    serviceCreated: (node) => `${base}.services.${token(node)}.created`,
    serviceDeleted: (node) => `${base}.services.${token(node)}.deleted`,
    serviceUpdated: (node) => `${base}.services.${token(node)}.updated`,
    serviceBound: (node) => `${base}.services.${token(node)}.bound`,
    serviceUnbound: (node) => `${base}.services.${token(node)}.unbound`,
    servicesOfNode: (node) => `${base}.services.${token(node)}.*`,
    nodeUpdated: (node) => `${base}.nodes.${token(node)}.updated`,
    instanceUp: (app) => `${base}.instances.${token(app)}.up`,
    instanceDown: (app) => `${base}.instances.${token(app)}.down`,
    backends: (node, service) => `${base}.backends.${token(node)}.${token(service)}`,
    backendsOfNode: (node) => `${base}.backends.${token(node)}.*`,
    backendsElided: (node, service) => `${base}.backends.${token(node)}.${token(service)}.elided`,
    backendsElidedOfNode: (node) => `${base}.backends.${token(node)}.*.elided`,
    workerHeartbeat: (node) => `${base}.workers.${token(node)}.heartbeat`,
    portBindFailed: (node) => `${base}.ports.${token(node)}.bind_failed`,
    repairDrift: (node) => `${base}.repair.${token(node)}.drift`,
    registerInstance: () => `${base}.registry.register`,
    deregisterInstance: () => `${base}.registry.deregister`,
    all: () => `${base}.>`,
  };
}
