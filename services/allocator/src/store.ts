import { randomUUID } from "node:crypto";
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  ResourceExhaustedError,
  nextIntPort,
  type NodeAddress,
  type ProtocolName,
} from "@harbor/core";
import { isUniqueViolation, query, withTransaction, type Pool, type PoolClient } from "@harbor/db";

export interface NodeRecord extends NodeAddress {
  portMin: number;
  portMax: number;
  allocated: number;
  workerSeenAt: Date | null;
}

export interface BindingRecord {
  app: string;
  intPort: number;
  boundAt: Date;
}

export interface ServiceRecord {
  id: string;
  serviceName: string;
  nodeId: string;
  port: number;
  protocol: ProtocolName;
  httpsProxy: boolean;
  createdAt: Date;
  node: NodeAddress;
  /** In the order they were bound. */
  bindings: BindingRecord[];
}

/** What the outbox relay publishes; the payload is built by the caller in the same transaction. */
export type OutboxEvent = "service.created" | "service.deleted" | "service.bound" | "service.unbound" | "node.updated";

export interface NewService {
  serviceName: string;
  protocol: ProtocolName;
  httpsProxy: boolean;
  nodeId?: string;
  port?: number;
}

const SERVICE_SELECT = `
  SELECT s.id, s.service_name, s.node_id, s.port, s.protocol, s.https_proxy, s.created_at,
         n.hostname, n.host, n.ext_hostname, n.ext_host,
         COALESCE(json_agg(json_build_object('app', b.app, 'int_port', b.int_port, 'bound_at', b.bound_at)
                           ORDER BY b.bound_at, b.app) FILTER (WHERE b.app IS NOT NULL), '[]') AS bindings
    FROM port_services s
    JOIN nodes n ON n.node_id = s.node_id
    LEFT JOIN port_bindings b ON b.service_id = s.id`;
const SERVICE_GROUP = ` GROUP BY s.id, n.node_id ORDER BY s.service_name`;

interface ServiceRow {
  id: string;
  service_name: string;
  node_id: string;
  port: number;
  protocol: ProtocolName;
  https_proxy: boolean;
  created_at: Date;
  hostname: string;
  host: string;
  ext_hostname: string;
  ext_host: string;
  bindings: Array<{ app: string; int_port: number; bound_at: string }>;
}

function serviceFromRow(row: ServiceRow): ServiceRecord {
  return {
    id: row.id,
    serviceName: row.service_name,
    nodeId: row.node_id,
    port: row.port,
    protocol: row.protocol,
    httpsProxy: row.https_proxy,
    createdAt: row.created_at,
    node: { nodeId: row.node_id, hostname: row.hostname, host: row.host, extHostname: row.ext_hostname, extHost: row.ext_host },
    bindings: row.bindings.map((b) => ({ app: b.app, intPort: b.int_port, boundAt: new Date(b.bound_at) })),
  };
}

interface NodeRow {
  node_id: string;
  hostname: string;
  host: string;
  ext_hostname: string;
  ext_host: string;
  port_min: number;
  port_max: number;
  allocated: string;
  worker_seen_at: Date | null;
}

const NODE_SELECT = `
  SELECT n.*, (SELECT count(*) FROM port_services s WHERE s.node_id = n.node_id) AS allocated
    FROM nodes n`;

function nodeFromRow(row: NodeRow): NodeRecord {
  return {
    nodeId: row.node_id,
    hostname: row.hostname,
    host: row.host,
    extHostname: row.ext_hostname,
    extHost: row.ext_host,
    portMin: row.port_min,
    portMax: row.port_max,
    allocated: Number(row.allocated),
    workerSeenAt: row.worker_seen_at,
  };
}

/**
 * The allocator's SQL. Postgres decides every race: the unique constraint on
 * (node_id, port) makes a double allocation impossible, and each change
 * commits together with its outbox rows.
 */
export class PortStore {
  constructor(private readonly pool: Pool) {}

  async createService(input: NewService, app: string | undefined, onCreated: AfterChange): Promise<ServiceRecord> {
    return withTransaction(this.pool, async (tx) => {
      const existing = await findServiceByName(tx, input.serviceName);
      if (existing) {
        throw new AlreadyExistsError(
          `a port service named "${existing.serviceName}" already exists (port ${existing.port} on node ${existing.nodeId})`,
        );
      }
      const node = await chooseNode(tx, input);
      const id = randomUUID();
      if (input.port !== undefined) await insertAtPort(tx, id, input, node, input.port);
      else await insertAtRandomFreePort(tx, id, input, node);
      if (app) await bind(tx, id, app);
      const created = (await findServiceById(tx, id)) as ServiceRecord;
      await onCreated(tx, created);
      return created;
    });
  }

  async getService(name: string): Promise<ServiceRecord> {
    const { rows } = await query<ServiceRow>(this.pool, `${SERVICE_SELECT} WHERE lower(s.service_name) = lower($1)${SERVICE_GROUP}`, [name]);
    const row = rows[0];
    if (!row) throw notFound(name);
    return serviceFromRow(row);
  }

  async listServices(filter: { nodeId?: string; app?: string }): Promise<ServiceRecord[]> {
    const { rows } = await query<ServiceRow>(
      this.pool,
      `${SERVICE_SELECT}
        WHERE ($1::text IS NULL OR s.node_id = $1)
          AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM port_bindings x WHERE x.service_id = s.id AND x.app = $2))
       ${SERVICE_GROUP}`,
      [filter.nodeId ?? null, filter.app ?? null],
    );
    return rows.map(serviceFromRow);
  }

  async deleteService(name: string, onDeleted: AfterChange): Promise<ServiceRecord> {
    return withTransaction(this.pool, async (tx) => {
      const service = await findServiceByName(tx, name, true);
      if (!service) throw notFound(name);
      await tx.query("DELETE FROM port_services WHERE id = $1", [service.id]);
      await onDeleted(tx, service);
      return service;
    });
  }

  async bindService(name: string, app: string, onBound: (tx: PoolClient, service: ServiceRecord, intPort: number) => Promise<void>): Promise<ServiceRecord> {
    return withTransaction(this.pool, async (tx) => {
      const service = await findServiceByName(tx, name, true);
      if (!service) throw notFound(name);
      const already = service.bindings.find((b) => b.app === app);
      if (already) {
        throw new AlreadyExistsError(`port service "${service.serviceName}" is already bound to app "${app}" (int_port ${already.intPort})`);
      }
      const intPort = await bind(tx, service.id, app);
      const bound = (await findServiceById(tx, service.id)) as ServiceRecord;
      await onBound(tx, bound, intPort);
      return bound;
    });
  }

  async unbindService(name: string, app: string, onUnbound: (tx: PoolClient, service: ServiceRecord, intPort: number) => Promise<void>): Promise<void> {
    await withTransaction(this.pool, async (tx) => {
      const service = await findServiceByName(tx, name, true);
      if (!service) throw notFound(name);
      const { rows } = await tx.query<{ int_port: number }>(
        "DELETE FROM port_bindings WHERE service_id = $1 AND app = $2 RETURNING int_port",
        [service.id, app],
      );
      const removed = rows[0];
      if (!removed) throw new NotFoundError(`port service "${service.serviceName}" is not bound to app "${app}"`);
      const after = (await findServiceById(tx, service.id)) as ServiceRecord;
      await onUnbound(tx, after, removed.int_port);
    });
  }

  async listNodes(): Promise<NodeRecord[]> {
    const { rows } = await query<NodeRow>(this.pool, `${NODE_SELECT} ORDER BY n.node_id`);
    return rows.map(nodeFromRow);
  }

  /**
   * Creates a node or changes the given fields of one. A range may not shrink
   * past ports that are allocated: those services would be stranded.
   */
  async upsertNode(
    node: { nodeId: string } & Partial<Omit<NodeRecord, "nodeId" | "allocated" | "workerSeenAt">>,
    onUpdated: (tx: PoolClient, node: NodeRecord) => Promise<void>,
  ): Promise<NodeRecord> {
    return withTransaction(this.pool, async (tx) => {
      const { rows: current } = await tx.query<NodeRow>(`${NODE_SELECT} WHERE n.node_id = $1 FOR UPDATE OF n`, [node.nodeId]);
      const before = current[0] ? nodeFromRow(current[0]) : undefined;
      const merged = {
        hostname: node.hostname ?? before?.hostname ?? "",
        host: node.host ?? before?.host,
        extHostname: node.extHostname ?? before?.extHostname ?? "",
        extHost: node.extHost ?? before?.extHost ?? "",
        portMin: node.portMin ?? before?.portMin,
        portMax: node.portMax ?? before?.portMax,
      };
      if (!merged.host) throw new InvalidArgumentError(`node ${node.nodeId} is new: give its internal IP address (host)`);
      if (merged.portMin === undefined || merged.portMax === undefined) {
        throw new InvalidArgumentError(`node ${node.nodeId} is new: give its port range (e.g. 30000-32767)`);
      }
      if (before) {
        const { rows: stranded } = await tx.query<{ port: number }>(
          "SELECT port FROM port_services WHERE node_id = $1 AND port NOT BETWEEN $2 AND $3 ORDER BY port LIMIT 5",
          [node.nodeId, merged.portMin, merged.portMax],
        );
        if (stranded.length > 0) {
          throw new FailedPreconditionError(
            `range ${merged.portMin}-${merged.portMax} would leave allocated ports outside it ` +
              `(${stranded.map((r) => r.port).join(", ")}${stranded.length === 5 ? ", …" : ""}); delete those services first`,
          );
        }
      }
      await tx.query(
        `INSERT INTO nodes (node_id, hostname, host, ext_hostname, ext_host, port_min, port_max)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (node_id) DO UPDATE SET hostname = $2, host = $3, ext_hostname = $4, ext_host = $5,
           port_min = $6, port_max = $7, updated_at = now()`,
        [node.nodeId, merged.hostname, merged.host, merged.extHostname, merged.extHost, merged.portMin, merged.portMax],
      );
      const { rows } = await tx.query<NodeRow>(`${NODE_SELECT} WHERE n.node_id = $1`, [node.nodeId]);
      const after = nodeFromRow(rows[0] as NodeRow);
      const changed = !before || (["hostname", "host", "extHostname", "extHost", "portMin", "portMax"] as const).some((k) => before[k] !== after[k]);
      if (changed) await onUpdated(tx, after);
      return after;
    });
  }

  /** Creates the node if missing; returns whether it was created. */
  async ensureNode(node: Omit<NodeRecord, "allocated" | "workerSeenAt">): Promise<boolean> {
    const { rowCount } = await query(
      this.pool,
      `INSERT INTO nodes (node_id, hostname, host, ext_hostname, ext_host, port_min, port_max)
       VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (node_id) DO NOTHING`,
      [node.nodeId, node.hostname, node.host, node.extHostname, node.extHost, node.portMin, node.portMax],
    );
    return rowCount === 1;
  }

  async markWorkerSeen(nodeId: string, at: Date): Promise<void> {
    await query(this.pool, "UPDATE nodes SET worker_seen_at = $2 WHERE node_id = $1 AND (worker_seen_at IS NULL OR worker_seen_at < $2)", [nodeId, at]);
  }

}

/** Writes the outbox rows of a change, inside its transaction. */
export type AfterChange = (tx: PoolClient, service: ServiceRecord) => Promise<void>;

export async function writeOutbox(tx: PoolClient, event: OutboxEvent, nodeId: string, payload: unknown): Promise<void> {
  await tx.query("INSERT INTO outbox (event, node_id, payload) VALUES ($1, $2, $3)", [event, nodeId, JSON.stringify(payload)]);
  // Wakes the relay at once instead of at its next poll (delivered on commit).
  await tx.query("NOTIFY harbor_outbox");
}

function notFound(name: string): NotFoundError {
  return new NotFoundError(`no port service named "${name}"; \`harbor services\` lists them`);
}

async function findServiceByName(tx: PoolClient, name: string, lock = false): Promise<ServiceRecord | undefined> {
  if (lock) await tx.query("SELECT 1 FROM port_services WHERE lower(service_name) = lower($1) FOR UPDATE", [name]);
  const { rows } = await tx.query<ServiceRow>(`${SERVICE_SELECT} WHERE lower(s.service_name) = lower($1)${SERVICE_GROUP}`, [name]);
  return rows[0] ? serviceFromRow(rows[0]) : undefined;
}

async function findServiceById(tx: PoolClient, id: string): Promise<ServiceRecord | undefined> {
  const { rows } = await tx.query<ServiceRow>(`${SERVICE_SELECT} WHERE s.id = $1${SERVICE_GROUP}`, [id]);
  return rows[0] ? serviceFromRow(rows[0]) : undefined;
}

interface ChosenNode {
  node_id: string;
  port_min: number;
  port_max: number;
}

async function chooseNode(tx: PoolClient, input: NewService): Promise<ChosenNode> {
  if (input.nodeId) {
    const { rows } = await tx.query<ChosenNode>("SELECT node_id, port_min, port_max FROM nodes WHERE node_id = $1", [input.nodeId]);
    const node = rows[0];
    if (!node) throw new NotFoundError(`no harbor node "${input.nodeId}"; \`harbor nodes\` lists them`);
    if (input.port !== undefined && (input.port < node.port_min || input.port > node.port_max)) {
      throw new InvalidArgumentError(`port ${input.port} is outside node ${node.node_id}'s range ${node.port_min}-${node.port_max}`);
    }
    return node;
  }
  if (input.port !== undefined) {
    const { rows } = await tx.query<ChosenNode>(
      "SELECT node_id, port_min, port_max FROM nodes WHERE $1 BETWEEN port_min AND port_max ORDER BY node_id LIMIT 1",
      [input.port],
    );
    if (!rows[0]) {
      const ranges = await describeRanges(tx);
      throw new InvalidArgumentError(`port ${input.port} is in no node's range (${ranges})`);
    }
    return rows[0];
  }
  // The node with the most free ports takes a new service.
  const { rows } = await tx.query<ChosenNode & { free: string }>(
    `SELECT n.node_id, n.port_min, n.port_max,
            (n.port_max - n.port_min + 1) -
            (SELECT count(*) FROM port_services s WHERE s.node_id = n.node_id AND s.port BETWEEN n.port_min AND n.port_max) AS free
       FROM nodes n ORDER BY free DESC, n.node_id LIMIT 1`,
  );
  const best = rows[0];
  if (!best) throw new FailedPreconditionError("no harbor node is configured; an operator adds one with `harbor set-node`");
  if (Number(best.free) <= 0) throw new ResourceExhaustedError(`no free port on any harbor node (${await describeRanges(tx)})`);
  return best;
}

async function describeRanges(tx: PoolClient): Promise<string> {
  const { rows } = await tx.query<{ node_id: string; port_min: number; port_max: number; used: string }>(
    `SELECT n.node_id, n.port_min, n.port_max, (SELECT count(*) FROM port_services s WHERE s.node_id = n.node_id) AS used
       FROM nodes n ORDER BY n.node_id LIMIT 10`,
  );
  return rows.map((r) => `${r.node_id} ${r.port_min}-${r.port_max}: ${r.used} of ${r.port_max - r.port_min + 1} allocated`).join("; ") || "no nodes";
}

async function insertAtPort(tx: PoolClient, id: string, input: NewService, node: ChosenNode, port: number): Promise<void> {
  try {
    await tx.query(
      `INSERT INTO port_services (id, service_name, node_id, port, protocol, https_proxy) VALUES ($1, $2, $3, $4, $5, $6)`,
      [id, input.serviceName, node.node_id, port, input.protocol, input.httpsProxy],
    );
  } catch (err) {
    if (isUniqueViolation(err, "port_services_node_port_key")) {
      throw new AlreadyExistsError(`port ${port} on node ${node.node_id} is already allocated to another service`, { cause: err });
    }
    throw nameTaken(err, input.serviceName);
  }
}

/**
 * Picks a random free port of the node's range and claims it. A concurrent
 * transaction may claim the same port first: ON CONFLICT then inserts
 * nothing and another free port is tried. Each retry means someone else got
 * a port, so the loop ends; RESOURCE_EXHAUSTED only when none is free.
 */
async function insertAtRandomFreePort(tx: PoolClient, id: string, input: NewService, node: ChosenNode): Promise<void> {
  for (;;) {
    const { rows: candidates } = await tx.query<{ port: number }>(
      `SELECT p AS port FROM generate_series($2::int, $3::int) AS p
        WHERE NOT EXISTS (SELECT 1 FROM port_services s WHERE s.node_id = $1 AND s.port = p)
        ORDER BY random() LIMIT 1`,
      [node.node_id, node.port_min, node.port_max],
    );
    const candidate = candidates[0];
    if (!candidate) {
      throw new ResourceExhaustedError(
        `no free port on node ${node.node_id}: all ${node.port_max - node.port_min + 1} ports of its range ${node.port_min}-${node.port_max} are allocated`,
      );
    }
    let inserted: number;
    try {
      const result = await tx.query(
        `INSERT INTO port_services (id, service_name, node_id, port, protocol, https_proxy) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (node_id, port) DO NOTHING`,
        [id, input.serviceName, node.node_id, candidate.port, input.protocol, input.httpsProxy],
      );
      inserted = result.rowCount ?? 0;
    } catch (err) {
      throw nameTaken(err, input.serviceName);
    }
    if (inserted === 1) return;
  }
}

function nameTaken(err: unknown, name: string): unknown {
  return isUniqueViolation(err, "port_services_name_key") ? new AlreadyExistsError(`a port service named "${name}" already exists`, { cause: err }) : err;
}

/**
 * Binds a service to an app with the app's lowest free int_port (4100, 4101,
 * …). The advisory lock serialises binds of one app; the unique constraint
 * on (app, int_port) stays the guarantee.
 */
async function bind(tx: PoolClient, serviceId: string, app: string): Promise<number> {
  await tx.query("SELECT pg_advisory_xact_lock(hashtext('harbor-app:' || $1))", [app]);
  const { rows } = await tx.query<{ int_port: number }>("SELECT int_port FROM port_bindings WHERE app = $1", [app]);
  const intPort = nextIntPort(rows.map((r) => r.int_port));
  await tx.query("INSERT INTO port_bindings (service_id, app, int_port) VALUES ($1, $2, $3)", [serviceId, app, intPort]);
  return intPort;
}
