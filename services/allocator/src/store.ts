import { randomUUID } from "node:crypto";
import {
  AlreadyExistsError,
  FailedPreconditionError,
  InvalidArgumentError,
  NotFoundError,
  PermissionDeniedError,
  ResourceExhaustedError,
  nextIntPort,
  type HealthCheckSpec,
  type NodeAddress,
  type ProtocolName,
} from "@harbor/core";
import { isUniqueViolation, query, withTransaction, type Pool, type PoolClient } from "@harbor/db";

export interface BlockedRange {
  min: number;
  max: number;
  reason: string;
}

export interface NodeRecord extends NodeAddress {
  portMin: number;
  portMax: number;
  allocated: number;
  workerSeenAt: Date | null;
  /** Operator reservations and ports a worker could not bind. */
  blocked: BlockedRange[];
}

export interface BindingRecord {
  app: string;
  intPort: number;
  boundAt: Date;
}

/**
 * Whose view a store call takes: `space` undefined is an operator (sees and
 * may do everything); a space sees and changes only its own services and apps.
 */
export interface Scope {
  space?: string;
  /** Ports a space may hold at most. */
  quota?: number;
}

export const OPERATOR_SCOPE: Scope = {};

export interface ServiceRecord {
  id: string;
  space: string;
  serviceName: string;
  nodeId: string;
  port: number;
  protocol: ProtocolName;
  httpsProxy: boolean;
  healthCheck: HealthCheckSpec | null;
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
  healthCheck?: HealthCheckSpec;
  nodeId?: string;
  port?: number;
}

const SERVICE_SELECT = `
  SELECT s.id, s.space, s.service_name, s.node_id, s.port, s.protocol, s.https_proxy, s.health_check, s.created_at,
         n.hostname, n.host, n.ext_hostname, n.ext_host,
         COALESCE(json_agg(json_build_object('app', b.app, 'int_port', b.int_port, 'bound_at', b.bound_at)
                           ORDER BY b.bound_at, b.app) FILTER (WHERE b.app IS NOT NULL), '[]') AS bindings
    FROM port_services s
    JOIN nodes n ON n.node_id = s.node_id
    LEFT JOIN port_bindings b ON b.service_id = s.id`;
const SERVICE_GROUP = ` GROUP BY s.id, n.node_id ORDER BY s.service_name`;

interface ServiceRow {
  id: string;
  space: string;
  service_name: string;
  node_id: string;
  port: number;
  protocol: ProtocolName;
  https_proxy: boolean;
  health_check: HealthCheckSpec | null;
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
    space: row.space,
    serviceName: row.service_name,
    nodeId: row.node_id,
    port: row.port,
    protocol: row.protocol,
    httpsProxy: row.https_proxy,
    healthCheck: row.health_check,
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
  blocked: Array<{ min: number; max: number; reason: string }>;
}

const NODE_SELECT = `
  SELECT n.*, (SELECT count(*) FROM port_services s WHERE s.node_id = n.node_id) AS allocated,
         COALESCE((SELECT json_agg(json_build_object('min', b.port_min, 'max', b.port_max, 'reason', b.reason) ORDER BY b.port_min)
                     FROM blocked_ports b WHERE b.node_id = n.node_id), '[]') AS blocked
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
    blocked: row.blocked,
  };
}

/**
 * The allocator's SQL. Postgres decides every race: the unique constraint on
 * (node_id, port) makes a double allocation impossible, and each change
 * commits together with its outbox rows.
 */
export class PortStore {
  /**
   * Free ports per node, counted at most once a second: counting every node
   * on every create costs O(allocations). The choice is a heuristic; the
   * unique constraint decides.
   */
  private nodeLoad: { at: number; nodes: Array<ChosenNode & { free: number }> } | undefined;

  constructor(
    private readonly pool: Pool,
    /** How long a released port is kept from other services. */
    private readonly cooldownSeconds = 300,
    /** Runs after each committed change (they all write outbox rows): wakes the relay. */
    private readonly afterCommit: () => void = () => undefined,
  ) {}

  /** A change and its outbox rows, in one transaction. */
  private async change<T>(fn: (tx: PoolClient) => Promise<T>): Promise<T> {
    const result = await withTransaction(this.pool, fn);
    this.afterCommit();
    return result;
  }

  async createService(input: NewService, app: string | undefined, scope: Scope, onCreated: AfterChange): Promise<ServiceRecord> {
    try {
      return await this.insertService(input, app, scope, onCreated);
    } catch (err) {
      // The unique index on the name decides; the message names what holds it.
      if (!(err instanceof AlreadyExistsError) || !/^a port service named/.test(err.message)) throw err;
      const { rows } = await query<{ service_name: string; port: number; node_id: string; space: string }>(
        this.pool,
        "SELECT service_name, port, node_id, space FROM port_services WHERE lower(service_name) = lower($1)",
        [input.serviceName],
      );
      // Another space's service is named, never located.
      const holder = rows[0] && visible(rows[0].space, scope) ? rows[0] : undefined;
      throw holder ? new AlreadyExistsError(`a port service named "${holder.service_name}" already exists (port ${holder.port} on node ${holder.node_id})`) : err;
    }
  }

  private async insertService(input: NewService, app: string | undefined, scope: Scope, onCreated: AfterChange): Promise<ServiceRecord> {
    return this.change(async (tx) => {
      const space = scope.space ?? "";
      if (scope.space !== undefined && scope.quota !== undefined) await checkQuota(tx, scope.space, scope.quota);
      if (app) await claimApp(tx, app, scope);
      const id = randomUUID();
      // A service re-created soon after its deletion gets its old port back when it is free.
      const previous = await takePreviousPort(tx, input);
      const guessed = !previous && input.nodeId === undefined && input.port === undefined;
      const node = previous ? previous.node : guessed ? await this.leastLoadedNode(tx, input) : await chooseNode(tx, input);
      if (input.port !== undefined) await insertAtPort(tx, id, input, node, input.port, this.cooldownSeconds);
      else if (!(previous && (await tryInsertAt(tx, id, input, node, previous.port)))) {
        try {
          await insertAtRandomFreePort(tx, id, input, node, this.cooldownSeconds);
        } catch (err) {
          // The cached counts were stale and that node is full: choose again, exactly.
          if (!(guessed && err instanceof ResourceExhaustedError)) throw err;
          this.nodeLoad = undefined;
          const exact = await chooseNode(tx, input);
          if (exact.node_id === node.node_id) throw err;
          await insertAtRandomFreePort(tx, id, input, exact, this.cooldownSeconds);
        }
      }
      if (space !== "" || input.healthCheck) {
        await tx.query("UPDATE port_services SET space = $2, health_check = $3 WHERE id = $1", [id, space, input.healthCheck ? JSON.stringify(input.healthCheck) : null]);
      }
      if (app) await bind(tx, id, app);
      const created = (await findServiceById(tx, id)) as ServiceRecord;
      await onCreated(tx, created);
      return created;
    });
  }

  async getService(name: string, scope: Scope): Promise<ServiceRecord> {
    const { rows } = await query<ServiceRow>(this.pool, `${SERVICE_SELECT} WHERE lower(s.service_name) = lower($1)${SERVICE_GROUP}`, [name]);
    const row = rows[0];
    // Another space's service is as good as absent: its name is not disclosed.
    if (!row || !visible(row.space, scope)) throw notFound(name);
    return serviceFromRow(row);
  }

  async listServices(filter: { nodeId?: string; app?: string }, scope: Scope): Promise<ServiceRecord[]> {
    const { rows } = await query<ServiceRow>(
      this.pool,
      `${SERVICE_SELECT}
        WHERE ($1::text IS NULL OR s.node_id = $1)
          AND ($2::text IS NULL OR EXISTS (SELECT 1 FROM port_bindings x WHERE x.service_id = s.id AND x.app = $2))
          AND ($3::text IS NULL OR s.space = $3)
       ${SERVICE_GROUP}`,
      [filter.nodeId ?? null, filter.app ?? null, scope.space ?? null],
    );
    return rows.map(serviceFromRow);
  }

  /** The space an app belongs to, if any has claimed it. */
  async appSpace(app: string): Promise<string | undefined> {
    const { rows } = await query<{ space: string }>(this.pool, "SELECT space FROM app_spaces WHERE app = $1", [app]);
    return rows[0]?.space;
  }

  async deleteService(name: string, scope: Scope, onDeleted: AfterChange): Promise<ServiceRecord> {
    return this.change(async (tx) => {
      const service = await findServiceByName(tx, name, true);
      if (!service || !visible(service.space, scope)) throw notFound(name);
      await tx.query("DELETE FROM port_services WHERE id = $1", [service.id]);
      await tx.query(
        `INSERT INTO released_ports (node_id, port, service_name) VALUES ($1, $2, $3)
         ON CONFLICT (node_id, port) DO UPDATE SET service_name = $3, released_at = now()`,
        [service.nodeId, service.port, service.serviceName],
      );
      await onDeleted(tx, service);
      return service;
    });
  }

  async bindService(name: string, app: string, scope: Scope, onBound: (tx: PoolClient, service: ServiceRecord, intPort: number) => Promise<void>): Promise<ServiceRecord> {
    return this.change(async (tx) => {
      const service = await findServiceByName(tx, name, true);
      if (!service || !visible(service.space, scope)) throw notFound(name);
      await claimApp(tx, app, scope);
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

  async unbindService(name: string, app: string, scope: Scope, onUnbound: (tx: PoolClient, service: ServiceRecord, intPort: number) => Promise<void>): Promise<void> {
    await this.change(async (tx) => {
      const service = await findServiceByName(tx, name, true);
      if (!service || !visible(service.space, scope)) throw notFound(name);
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
    node: { nodeId: string } & Partial<Omit<NodeRecord, "nodeId" | "allocated" | "workerSeenAt" | "blocked">> & { reserved?: BlockedRange[] },
    onUpdated: (tx: PoolClient, node: NodeRecord) => Promise<void>,
  ): Promise<NodeRecord> {
    return this.change(async (tx) => {
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
      if (node.reserved) {
        await tx.query("DELETE FROM blocked_ports WHERE node_id = $1 AND kind = 'reserved'", [node.nodeId]);
        for (const r of node.reserved) {
          await tx.query(
            "INSERT INTO blocked_ports (node_id, port_min, port_max, kind, reason) VALUES ($1, $2, $3, 'reserved', $4) ON CONFLICT DO NOTHING",
            [node.nodeId, r.min, r.max, r.reason || "reserved"],
          );
        }
      }
      const { rows } = await tx.query<NodeRow>(`${NODE_SELECT} WHERE n.node_id = $1`, [node.nodeId]);
      const after = nodeFromRow(rows[0] as NodeRow);
      const changed =
        !before ||
        (["hostname", "host", "extHostname", "extHost", "portMin", "portMax"] as const).some((k) => before[k] !== after[k]) ||
        JSON.stringify(before.blocked) !== JSON.stringify(after.blocked);
      if (changed) await onUpdated(tx, after);
      return after;
    });
  }

  private async leastLoadedNode(tx: PoolClient, input: NewService): Promise<ChosenNode> {
    if (!this.nodeLoad || Date.now() - this.nodeLoad.at > 1_000) {
      const { rows } = await tx.query<ChosenNode & { free: string }>(`${NODE_FREE_SELECT}`);
      this.nodeLoad = { at: Date.now(), nodes: rows.map((r) => ({ ...r, free: Number(r.free) })) };
    }
    let best: (ChosenNode & { free: number }) | undefined;
    for (const n of this.nodeLoad.nodes) if (!best || n.free > best.free) best = n;
    if (!best || best.free <= 0) return chooseNode(tx, input);
    best.free--;
    return best;
  }

  /** Creates the node if missing; returns whether it was created. */
  async ensureNode(node: Omit<NodeRecord, "allocated" | "workerSeenAt" | "blocked">): Promise<boolean> {
    const { rowCount } = await query(
      this.pool,
      `INSERT INTO nodes (node_id, hostname, host, ext_hostname, ext_host, port_min, port_max)
       VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (node_id) DO NOTHING`,
      [node.nodeId, node.hostname, node.host, node.extHostname, node.extHost, node.portMin, node.portMax],
    );
    return rowCount === 1;
  }

  /** A worker could not bind this port: stop offering it until a worker reports it listening. */
  async blockFailedPort(nodeId: string, port: number, error: string): Promise<boolean> {
    const { rowCount } = await query(
      this.pool,
      `INSERT INTO blocked_ports (node_id, port_min, port_max, kind, reason)
       SELECT $1, $2, $2, 'bind-failed', $3 WHERE EXISTS (SELECT 1 FROM nodes WHERE node_id = $1)
       ON CONFLICT (node_id, kind, port_min, port_max) DO NOTHING`,
      [nodeId, port, `bind failed: ${error.slice(0, 200)}`],
    );
    return rowCount === 1;
  }

  /** Ports a worker now listens on are offered again. */
  async unblockListening(nodeId: string, ports: number[]): Promise<void> {
    if (ports.length === 0) return;
    await query(this.pool, "DELETE FROM blocked_ports WHERE node_id = $1 AND kind = 'bind-failed' AND port_min = ANY($2::int[])", [nodeId, ports]);
  }

  async markWorkerSeen(nodeId: string, at: Date): Promise<void> {
    await query(this.pool, "UPDATE nodes SET worker_seen_at = $2 WHERE node_id = $1 AND (worker_seen_at IS NULL OR worker_seen_at < $2)", [nodeId, at]);
  }

}

/** Writes the outbox rows of a change, inside its transaction. */
export type AfterChange = (tx: PoolClient, service: ServiceRecord) => Promise<void>;

/**
 * No NOTIFY here: Postgres serialises the commits of every notifying
 * transaction, which capped creates at a few hundred a second. The allocator
 * wakes its own relay after a commit; other replicas' relays poll.
 */
export async function writeOutbox(tx: PoolClient, event: OutboxEvent, nodeId: string, payload: unknown): Promise<void> {
  await tx.query("INSERT INTO outbox (event, node_id, payload) VALUES ($1, $2, $3)", [event, nodeId, JSON.stringify(payload)]);
}

function visible(space: string, scope: Scope): boolean {
  return scope.space === undefined || scope.space === space;
}

/**
 * Claims an app for the scope's space if no space has it yet; a space may
 * not use another space's app. Operators use any app (an unclaimed one
 * becomes the operators', space "").
 */
export async function claimApp(tx: PoolClient, app: string, scope: Scope): Promise<void> {
  await tx.query("INSERT INTO app_spaces (app, space) VALUES ($1, $2) ON CONFLICT (app) DO NOTHING", [app, scope.space ?? ""]);
  if (scope.space === undefined) return;
  const { rows } = await tx.query<{ space: string }>("SELECT space FROM app_spaces WHERE app = $1", [app]);
  if (rows[0]?.space !== scope.space) throw new PermissionDeniedError(`app "${app}" belongs to another space`);
}

/** A space holds at most `quota` ports; the advisory lock keeps concurrent creates of one space from both passing. */
async function checkQuota(tx: PoolClient, space: string, quota: number): Promise<void> {
  await tx.query("SELECT pg_advisory_xact_lock(hashtext('harbor-space:' || $1))", [space]);
  const { rows } = await tx.query<{ used: string }>("SELECT count(*) AS used FROM port_services WHERE space = $1", [space]);
  if (Number(rows[0]?.used ?? 0) >= quota) {
    throw new ResourceExhaustedError(`space "${space}" holds ${quota} ports, its quota; delete one, or ask an operator to raise HARBOR_SPACE_PORT_QUOTA`);
  }
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

/** Every node with how many ports of its range are not allocated. */
const NODE_FREE_SELECT = `
  SELECT n.node_id, n.port_min, n.port_max,
         (n.port_max - n.port_min + 1) -
         (SELECT count(*) FROM port_services s WHERE s.node_id = n.node_id AND s.port BETWEEN n.port_min AND n.port_max) AS free
    FROM nodes n`;

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
  const { rows } = await tx.query<ChosenNode & { free: string }>(`${NODE_FREE_SELECT} ORDER BY free DESC, n.node_id LIMIT 1`);
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

/**
 * Drops this name's claims on released ports and returns the most recent one
 * when it can be offered again (in its node's range, not blocked) and no
 * node or port was asked for; in the transaction, so a failed create keeps
 * the claim.
 */
async function takePreviousPort(tx: PoolClient, input: NewService): Promise<{ node: ChosenNode; port: number } | undefined> {
  const { rows } = await tx.query<ChosenNode & { port: number }>(
    `WITH released AS (DELETE FROM released_ports WHERE lower(service_name) = lower($1) RETURNING node_id, port, released_at)
     SELECT n.node_id, n.port_min, n.port_max, r.port
       FROM released r JOIN nodes n ON n.node_id = r.node_id
      WHERE r.port BETWEEN n.port_min AND n.port_max
        AND NOT EXISTS (SELECT 1 FROM blocked_ports b WHERE b.node_id = r.node_id AND r.port BETWEEN b.port_min AND b.port_max)
      ORDER BY r.released_at DESC LIMIT 1`,
    [input.serviceName],
  );
  const row = rows[0];
  if (!row || input.nodeId !== undefined || input.port !== undefined) return undefined;
  return { node: { node_id: row.node_id, port_min: row.port_min, port_max: row.port_max }, port: row.port };
}

/** Claims a port if nobody holds it; false if someone does. */
async function tryInsertAt(tx: PoolClient, id: string, input: NewService, node: ChosenNode, port: number): Promise<boolean> {
  try {
    const result = await tx.query(
      `INSERT INTO port_services (id, service_name, node_id, port, protocol, https_proxy) VALUES ($1, $2, $3, $4, $5, $6)
       ON CONFLICT (node_id, port) DO NOTHING`,
      [id, input.serviceName, node.node_id, port, input.protocol, input.httpsProxy],
    );
    return result.rowCount === 1;
  } catch (err) {
    throw nameTaken(err, input.serviceName);
  }
}

/** Why a port may not be handed to this service now, if it may not: reserved, or cooling down for another. */
async function refusal(tx: PoolClient, node: ChosenNode, port: number, serviceName: string, cooldownSeconds: number): Promise<string | undefined> {
  const { rows: blocked } = await tx.query<{ reason: string }>(
    "SELECT reason FROM blocked_ports WHERE node_id = $1 AND $2 BETWEEN port_min AND port_max LIMIT 1",
    [node.node_id, port],
  );
  if (blocked[0]) return `port ${port} on node ${node.node_id} is not offered (${blocked[0].reason})`;
  const { rows: cooling } = await tx.query<{ service_name: string; until: Date }>(
    `SELECT service_name, released_at + make_interval(secs => $3) AS until FROM released_ports
      WHERE node_id = $1 AND port = $2 AND released_at > now() - make_interval(secs => $3) AND lower(service_name) <> lower($4)`,
    [node.node_id, port, cooldownSeconds, serviceName],
  );
  if (cooling[0]) {
    return `port ${port} on node ${node.node_id} was released by "${cooling[0].service_name}" and is kept for it until ${cooling[0].until.toISOString()}`;
  }
  return undefined;
}

async function insertAtPort(tx: PoolClient, id: string, input: NewService, node: ChosenNode, port: number, cooldownSeconds: number): Promise<void> {
  const refused = await refusal(tx, node, port, input.serviceName, cooldownSeconds);
  if (refused) throw new FailedPreconditionError(refused);
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
/**
 * Picks a random free port of the node's range and claims it. A concurrent
 * transaction may claim the same port first: ON CONFLICT then inserts
 * nothing and another free port is tried. Each retry means someone else got
 * a port, so the loop ends; RESOURCE_EXHAUSTED only when none is free.
 */
async function insertAtRandomFreePort(tx: PoolClient, id: string, input: NewService, node: ChosenNode, cooldownSeconds: number): Promise<void> {
  for (;;) {
    const candidate = await randomFreePort(tx, node, cooldownSeconds);
    if (candidate === undefined) throw await exhausted(tx, node);
    if (await tryInsertAt(tx, id, input, node, candidate)) return;
  }
}

/** Free: not allocated, not blocked, not cooling down after a release. */
const FREE = `
  NOT EXISTS (SELECT 1 FROM port_services s WHERE s.node_id = $1 AND s.port = p)
  AND NOT EXISTS (SELECT 1 FROM blocked_ports b WHERE b.node_id = $1 AND p BETWEEN b.port_min AND b.port_max)
  AND NOT EXISTS (SELECT 1 FROM released_ports r WHERE r.node_id = $1 AND r.port = p AND r.released_at > now() - make_interval(secs => $2))`;

/** Ports sampled at random before falling back to scanning the whole range. */
const SAMPLES = 16;

/**
 * A random free port: first from a few random picks (a handful of index
 * probes, whatever the range's size), and only when none of them is free —
 * the range is nearly full — from a scan of the whole range.
 */
async function randomFreePort(tx: PoolClient, node: ChosenNode, cooldownSeconds: number): Promise<number | undefined> {
  const size = node.port_max - node.port_min + 1;
  const picks = Array.from({ length: Math.min(SAMPLES, size) }, () => node.port_min + Math.floor(Math.random() * size));
  const { rows: sampled } = await tx.query<{ port: number }>(`SELECT p AS port FROM unnest($3::int[]) AS p WHERE ${FREE} LIMIT 1`, [node.node_id, cooldownSeconds, picks]);
  if (sampled[0]) return sampled[0].port;
  const { rows: scanned } = await tx.query<{ port: number }>(
    `SELECT p AS port FROM generate_series($3::int, $4::int) AS p WHERE ${FREE} ORDER BY random() LIMIT 1`,
    [node.node_id, cooldownSeconds, node.port_min, node.port_max],
  );
  return scanned[0]?.port;
}

async function exhausted(tx: PoolClient, node: ChosenNode): Promise<ResourceExhaustedError> {
  const size = node.port_max - node.port_min + 1;
  const { rows } = await tx.query<{ allocated: string }>("SELECT count(*) AS allocated FROM port_services WHERE node_id = $1", [node.node_id]);
  const allocated = Number(rows[0]?.allocated ?? 0);
  if (allocated >= size) {
    return new ResourceExhaustedError(`no free port on node ${node.node_id}: all ${size} ports of its range ${node.port_min}-${node.port_max} are allocated`);
  }
  return new ResourceExhaustedError(
    `no free port on node ${node.node_id}: of the ${size} ports of its range ${node.port_min}-${node.port_max}, ${allocated} are allocated and the rest reserved or cooling down after a release`,
  );
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
