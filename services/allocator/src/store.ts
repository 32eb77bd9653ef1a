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
import { isUniqueViolation, query, withClient, withTransaction, type Pool, type PoolClient } from "@harbor/db";

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
export type OutboxEvent = "service.created" | "service.deleted" | "service.updated" | "service.bound" | "service.unbound" | "node.updated";

export interface NewService {
  serviceName: string;
  protocol: ProtocolName;
  httpsProxy: boolean;
  healthCheck?: HealthCheckSpec;
  nodeId?: string;
  port?: number;
}

/** A ServiceRow but its bindings, from port_services `s` and nodes `n`. */
const SERVICE_COLUMNS = `s.id, s.space, s.service_name, s.node_id, s.port, s.protocol, s.https_proxy, s.health_check, s.created_at,
         n.hostname, n.host, n.ext_hostname, n.ext_host`;
const SERVICE_SELECT = `
  SELECT ${SERVICE_COLUMNS},
         COALESCE(json_agg(json_build_object('app', b.app, 'int_port', b.int_port, 'bound_at', b.bound_at)
                           ORDER BY b.bound_at, b.app) FILTER (WHERE b.app IS NOT NULL), '[]') AS bindings
    FROM port_services s
    JOIN nodes n ON n.node_id = s.node_id
    LEFT JOIN port_bindings b ON b.service_id = s.id`;
const SERVICE_GROUP = ` GROUP BY s.id, n.node_id ORDER BY s.service_name`;

export interface ServiceRow {
  id: string;
  space: string;
  service_name: string;
  node_id: string;
  port: number;
  protocol: ProtocolName;
  https_proxy: boolean;
  health_check: HealthCheckSpec | null;
  /** A Date from a query; an ISO string in a snapshot (JSON). */
  created_at: Date | string;
  hostname: string;
  host: string;
  ext_hostname: string;
  ext_host: string;
  bindings: Array<{ app: string; int_port: number; bound_at: string }>;
}

export function serviceFromRow(row: ServiceRow): ServiceRecord {
  return {
    id: row.id,
    space: row.space,
    serviceName: row.service_name,
    nodeId: row.node_id,
    port: row.port,
    protocol: row.protocol,
    httpsProxy: row.https_proxy,
    healthCheck: row.health_check,
    createdAt: new Date(row.created_at),
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
  private nodeLoadCounting: Promise<void> | undefined;

  constructor(
    private readonly pool: Pool,
    /** How long a released port is kept from other services. */
    private readonly cooldownSeconds = 300,
    /** Runs after each committed change (they all write outbox rows): wakes the relay. */
    private readonly afterCommit: () => void = () => undefined,
  ) {}

  /**
   * A change and its outbox rows, in one transaction; or, for a change that
   * is one statement writing its own outbox rows, without one.
   */
  private async change<T>(fn: (tx: PoolClient) => Promise<T>, transaction = true): Promise<T> {
    const result = await (transaction ? withTransaction : withClient)(this.pool, fn);
    this.afterCommit();
    return result;
  }

  /**
   * Creates a service, and binds it to `app` if given. The store writes its
   * service.created event (a snapshot of the service, which the relay
   * renders); `onCreated` writes the others (service.bound).
   */
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
    const quota = scope.space !== undefined && scope.quota !== undefined;
    // Without a quota to check or an app to bind, the claim that inserts the
    // service writes its event too: one statement, no transaction. Claims
    // that insert nothing change nothing, so they may be retried outside one.
    return this.change(async (tx) => {
      if (quota) await checkQuota(tx, scope.space as string, scope.quota as number);
      if (app) await claimApp(tx, app, scope);
      const values = serviceValues(randomUUID(), input, scope.space ?? "", !app);
      let row: ServiceRow | undefined;
      if (input.port !== undefined) {
        row = await claimFixedPort(tx, values, await chooseNode(tx, input), input.port, this.cooldownSeconds, scope.space === undefined);
      } else {
        const guessed = input.nodeId === undefined;
        let node = guessed ? await this.leastLoadedNode(tx, input) : await chooseNode(tx, input);
        row = await claimFreePort(tx, values, node, this.cooldownSeconds, guessed);
        if (!row && guessed) {
          // The cached counts were stale and that node is full: choose again, exactly.
          this.nodeLoad = undefined;
          const exact = await chooseNode(tx, input);
          if (exact.node_id !== node.node_id) {
            node = exact;
            row = await claimFreePort(tx, values, node, this.cooldownSeconds, false);
          }
        }
        if (!row) throw await exhausted(tx, node);
      }
      const created = serviceFromRow(row);
      if (app) {
        created.bindings.push(await bind(tx, created.id, app));
        await writeServiceSnapshot(tx, "service.created", created.id);
      }
      await onCreated(tx, created);
      return created;
    }, quota || app !== undefined);
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

  /**
   * A hash of what a worker serves of a node's services. Read before the
   * list it goes with: a change in between makes the next check miss, never
   * hides a change.
   */
  async servicesDigest(nodeId: string): Promise<string> {
    const { rows } = await query<{ digest: string }>(
      this.pool,
      `SELECT md5(COALESCE(string_agg(concat_ws('|', id, service_name, port, protocol, health_check::text), ',' ORDER BY id), '')) AS digest
         FROM port_services WHERE node_id = $1`,
      [nodeId],
    );
    return rows[0]?.digest ?? "";
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
        `INSERT INTO released_ports (node_id, port, service_name, space) VALUES ($1, $2, $3, $4)
         ON CONFLICT (node_id, port) DO UPDATE SET service_name = $3, space = $4, released_at = now()`,
        [service.nodeId, service.port, service.serviceName, service.space],
      );
      await onDeleted(tx, service);
      return service;
    });
  }

  /**
   * Replaces a service's active health check (undefined: passive checks
   * only) and writes its service.updated event, a snapshot of the service.
   * Unchanged when the check is the same: no event, nothing for a worker to restart.
   */
  async setHealthCheck(name: string, healthCheck: HealthCheckSpec | undefined, scope: Scope): Promise<{ service: ServiceRecord; changed: boolean }> {
    return this.change(async (tx) => {
      const service = await findServiceByName(tx, name, true);
      if (!service || !visible(service.space, scope)) throw notFound(name);
      const value = healthCheck ? JSON.stringify(healthCheck) : null;
      const { rowCount } = await tx.query("UPDATE port_services SET health_check = $2::jsonb WHERE id = $1 AND health_check IS DISTINCT FROM $2::jsonb", [service.id, value]);
      if (rowCount === 0) return { service, changed: false };
      await writeServiceSnapshot(tx, "service.updated", service.id);
      // The row is locked: only the check changed.
      return { service: { ...service, healthCheck: healthCheck ?? null }, changed: true };
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
      const { intPort } = await bind(tx, service.id, app);
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
      // One count at a time: every create that finds the counts stale would
      // otherwise count them again, together. Until it ends, stale counts serve.
      // It runs on the caller's own client: waiting for another of the pool's,
      // while holding one, deadlocks once every client is held by such a wait.
      if (!this.nodeLoadCounting) {
        this.nodeLoadCounting = tx
          .query<ChosenNode & { free: string }>(NODE_FREE_SELECT)
          .then(({ rows }) => {
            this.nodeLoad = { at: Date.now(), nodes: rows.map((r) => ({ ...r, free: Number(r.free) })) };
          })
          .finally(() => (this.nodeLoadCounting = undefined));
        // A failed count fails the creates that wait for it and the one whose client ran it (its
        // transaction is aborted); nothing else: the next stale look counts again.
        this.nodeLoadCounting.catch(() => undefined);
      }
      if (!this.nodeLoad) await this.nodeLoadCounting;
    }
    let best: (ChosenNode & { free: number }) | undefined;
    for (const n of this.nodeLoad?.nodes ?? []) if (!best || n.free > best.free) best = n;
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
  await tx.query({ name: "allocator-outbox-insert", text: "INSERT INTO outbox (event, node_id, payload) VALUES ($1, $2, $3)", values: [event, nodeId, JSON.stringify(payload)] });
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

/** `$1`-`$7` of every claim statement: the new service's columns, and whether the claim writes its service.created event. */
function serviceValues(id: string, input: NewService, space: string, writesEvent: boolean): unknown[] {
  return [id, input.serviceName, input.protocol, input.httpsProxy, space, input.healthCheck ? JSON.stringify(input.healthCheck) : null, writesEvent];
}

/**
 * A claim: inserts the new service at the first (node_id, port) of the
 * `candidates` CTE; `$1`-`$7` as serviceValues, `$8` the node. The unique
 * constraint decides: a port taken meanwhile inserts nothing. A claim that
 * inserts the service also ends this name's claims on released ports and,
 * if `$7`, writes its service.created event; one that does not changes
 * nothing. One round trip, a prepared statement. The result has one row if
 * there was a candidate, with the service's columns (null when someone else
 * holds that port first).
 */
function claimStatement(name: string, candidates: string): { name: string; text: string } {
  return {
    name: `allocator-claim-${name}`,
    text: `
  WITH ${candidates},
  chosen AS (SELECT node_id, port FROM candidates LIMIT 1),
  inserted AS (
    INSERT INTO port_services (id, service_name, node_id, port, protocol, https_proxy, space, health_check)
    SELECT $1::uuid, $2::text, node_id, port, $3::text, $4::boolean, $5::text, $6::jsonb FROM chosen
    ON CONFLICT (node_id, port) DO NOTHING
    RETURNING *),
  claimed AS (SELECT ${SERVICE_COLUMNS}, '[]'::json AS bindings FROM inserted s JOIN nodes n ON n.node_id = s.node_id),
  unclaimed AS (DELETE FROM released_ports WHERE lower(service_name) = lower($2::text) AND space = $5::text AND EXISTS (SELECT 1 FROM inserted)),
  evented AS (INSERT INTO outbox (event, node_id, service) SELECT 'service.created', node_id, to_jsonb(claimed) FROM claimed WHERE $7::boolean)
  SELECT claimed.* FROM chosen LEFT JOIN claimed ON true`,
  };
}

/**
 * An event carrying a snapshot of the service as it is now: service.created
 * for a service whose claim did not write it (more changes followed in its
 * transaction), service.updated after a change of its health check.
 */
async function writeServiceSnapshot(tx: PoolClient, event: "service.created" | "service.updated", id: string): Promise<void> {
  await tx.query(
    `INSERT INTO outbox (event, node_id, service)
     SELECT $2, node_id, to_jsonb(x) FROM (${SERVICE_SELECT} WHERE s.id = $1${SERVICE_GROUP}) x`,
    [id, event],
  );
}

/** Free for the new service (`$2`, of space `$5`): not allocated, not blocked, not cooling down after another's release. */
const free = (node: string, port: string, cooldown: string) => `
  NOT EXISTS (SELECT 1 FROM port_services s WHERE s.node_id = ${node} AND s.port = ${port})
  AND NOT EXISTS (SELECT 1 FROM blocked_ports b WHERE b.node_id = ${node} AND ${port} BETWEEN b.port_min AND b.port_max)
  AND NOT COALESCE((SELECT true FROM released_ports r WHERE r.node_id = ${node} AND r.port = ${port}
                       AND r.released_at > now() - make_interval(secs => ${cooldown})
                       AND (lower(r.service_name) <> lower($2::text) OR r.space <> $5::text)), false)`;

/** Ports picked at random before scanning the whole range: at 90 % allocated, about 1 claim in 850 scans. */
const SAMPLES = 64;

/**
 * `$9` cool-down seconds, `$10`-`$11` the node's range, `$12` may take its
 * previous port. A service re-created soon after its deletion, without
 * asking for a node or port, gets its most recent released port back when
 * that is in its node's range, not blocked and free; else the first free of
 * a few random picks: a handful of index probes, whatever the range's size.
 */
const CLAIM_SAMPLED = claimStatement(
  "sampled",
  // Materialized: each pick is drawn once, so the port checked is the port claimed.
  `picks AS MATERIALIZED (SELECT $10::int + floor(random() * ($11::int - $10::int + 1))::int AS p FROM generate_series(1, ${SAMPLES})),
  candidates AS (
    (SELECT r.node_id, r.port FROM released_ports r JOIN nodes n ON n.node_id = r.node_id
      WHERE $12::boolean AND lower(r.service_name) = lower($2::text) AND r.space = $5::text AND r.port BETWEEN n.port_min AND n.port_max
        AND NOT EXISTS (SELECT 1 FROM blocked_ports b WHERE b.node_id = r.node_id AND r.port BETWEEN b.port_min AND b.port_max)
        AND NOT EXISTS (SELECT 1 FROM port_services s WHERE s.node_id = r.node_id AND s.port = r.port)
      ORDER BY r.released_at DESC LIMIT 1)
    UNION ALL
    (SELECT $8::text, p FROM picks WHERE ${free("$8::text", "p", "$9::int")} LIMIT 1))`,
);

/** `$9` cool-down seconds, `$10`-`$11` the node's range: a random free port of the whole range, for when no pick was free. */
const CLAIM_SCANNED = claimStatement(
  "scanned",
  `candidates AS (
    SELECT $8::text AS node_id, p AS port FROM generate_series($10::int, $11::int) AS p
     WHERE ${free("$8::text", "p", "$9::int")} ORDER BY random() LIMIT 1)`,
);

/** `$9` the port. */
const CLAIM_FIXED = claimStatement("fixed", `candidates AS (SELECT $8::text AS node_id, $9::int AS port)`);

type ClaimRow = { [K in keyof ServiceRow]: ServiceRow[K] | null };

async function claim(tx: PoolClient, statement: { name: string; text: string }, values: unknown[], serviceName: string): Promise<ClaimRow | undefined> {
  try {
    const { rows } = await tx.query<ClaimRow>({ ...statement, values });
    return rows[0];
  } catch (err) {
    throw nameTaken(err, serviceName);
  }
}

/** Whether the claim inserted the service (it had a candidate, and nobody held it first). */
function inserted(row: ClaimRow | undefined): row is ServiceRow {
  return row?.id !== null && row?.id !== undefined;
}

/**
 * Claims a free port of `node` (or this name's previous port): first among
 * random picks, and only when none of them is free — the range is nearly
 * full — by scanning the whole range. A port taken meanwhile is tried again:
 * each retry means someone else got a port, so the loop ends. Undefined when
 * no port is free.
 */
async function claimFreePort(tx: PoolClient, values: unknown[], node: ChosenNode, cooldownSeconds: number, mayTakePrevious: boolean): Promise<ServiceRow | undefined> {
  const name = values[1] as string;
  const where = [...values, node.node_id, cooldownSeconds, node.port_min, node.port_max];
  for (;;) {
    const row = (await claim(tx, CLAIM_SAMPLED, [...where, mayTakePrevious], name)) ?? (await claim(tx, CLAIM_SCANNED, where, name));
    if (!row) return undefined;
    if (inserted(row)) return row;
  }
}

/**
 * Why a port may not be handed to this service now, if it may not: reserved,
 * or cooling down for another (named only to its own space, or to operators).
 */
async function refusal(tx: PoolClient, node: ChosenNode, port: number, serviceName: string, space: string, operator: boolean, cooldownSeconds: number): Promise<string | undefined> {
  const { rows: blocked } = await tx.query<{ reason: string }>(
    "SELECT reason FROM blocked_ports WHERE node_id = $1 AND $2 BETWEEN port_min AND port_max LIMIT 1",
    [node.node_id, port],
  );
  if (blocked[0]) return `port ${port} on node ${node.node_id} is not offered (${blocked[0].reason})`;
  const { rows: cooling } = await tx.query<{ service_name: string; space: string; until: Date }>(
    `SELECT service_name, space, released_at + make_interval(secs => $3) AS until FROM released_ports
      WHERE node_id = $1 AND port = $2 AND released_at > now() - make_interval(secs => $3) AND (lower(service_name) <> lower($4) OR space <> $5)`,
    [node.node_id, port, cooldownSeconds, serviceName, space],
  );
  const held = cooling[0];
  if (held) {
    const by = operator || held.space === space ? `"${held.service_name}"` : "another space's service";
    return `port ${port} on node ${node.node_id} was released by ${by} and is kept for it until ${held.until.toISOString()}`;
  }
  return undefined;
}

/** Claims the port asked for, unless it is refused or held. */
async function claimFixedPort(tx: PoolClient, values: unknown[], node: ChosenNode, port: number, cooldownSeconds: number, operator: boolean): Promise<ServiceRow> {
  const name = values[1] as string;
  const refused = await refusal(tx, node, port, name, values[4] as string, operator, cooldownSeconds);
  if (refused) throw new FailedPreconditionError(refused);
  const row = await claim(tx, CLAIM_FIXED, [...values, node.node_id, port], name);
  if (!inserted(row)) throw new AlreadyExistsError(`port ${port} on node ${node.node_id} is already allocated to another service`);
  return row;
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
async function bind(tx: PoolClient, serviceId: string, app: string): Promise<BindingRecord> {
  await tx.query("SELECT pg_advisory_xact_lock(hashtext('harbor-app:' || $1))", [app]);
  const { rows } = await tx.query<{ int_port: number }>("SELECT int_port FROM port_bindings WHERE app = $1", [app]);
  const intPort = nextIntPort(rows.map((r) => r.int_port));
  const { rows: bound } = await tx.query<{ bound_at: Date }>(
    "INSERT INTO port_bindings (service_id, app, int_port) VALUES ($1, $2, $3) RETURNING bound_at",
    [serviceId, app, intPort],
  );
  return { app, intPort, boundAt: (bound[0] as { bound_at: Date }).bound_at };
}
