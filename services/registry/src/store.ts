import { timestampFromMs, type BackendSet, type Instance, type PortMapping } from "@harbor/proto";
import { query, type Pool } from "@harbor/db";

interface InstanceRow {
  app: string;
  instance_id: string;
  host: string;
  ports: Array<{ int_port: number; port: number }>;
  ttl_seconds: number;
  available_since: Date;
  expires_at: Date;
}

function instanceFromRow(row: InstanceRow): Instance {
  return {
    app: row.app,
    instanceId: row.instance_id,
    host: row.host,
    ports: row.ports.map((p) => ({ intPort: p.int_port, port: p.port })),
    ttlSeconds: row.ttl_seconds,
    availableSince: timestampFromMs(row.available_since.getTime()),
    expiresAt: timestampFromMs(row.expires_at.getTime()),
  };
}

export interface Registration {
  app: string;
  instanceId: string;
  host: string;
  ports: PortMapping[];
  ttlSeconds: number;
}

/** The set as stored and compared: everything but the revision. */
type SetContent = Omit<BackendSet, "revision">;

/** Apps whose space is remembered; past this the memory starts over (it only saves a round trip). */
const MAX_CACHED_APPS = 100_000;

/** The ids of the services `app` backs, as a column: the sets a change of its instances recomputes. */
/** The ids of the services an app is bound to, as an SQL array. */
const boundServices = (app: string) => `ARRAY(SELECT service_id::text FROM port_bindings WHERE app = ${app})`;
type BoundServices = { bound_services: string[] };

/** A stored set as published: its content with its revision. */
const setFromRow = (row: { revision: string; content: SetContent }): BackendSet => ({ ...row.content, revision: String(row.revision) });

/** An instance gone (deregistered or expired), with the services its app backs. */
const departureFromRow = (row: InstanceRow & BoundServices) => ({ instance: instanceFromRow(row), boundServices: row.bound_services });

/**
 * A registration or heartbeat: the row as it was, locked (the count makes
 * the insert wait for the lock: a statement's CTEs otherwise run in no set
 * order), then upserted; `inserted` (xmax 0: no older version) tells a new
 * row from one another registration inserted meanwhile. An instance already
 * registered keeps its availability order. Columns named: a prepared
 * statement's cached plan must not change its result when a migration adds one.
 */
const REGISTER = {
  name: "registry-register",
  text: `
  WITH before AS (
    SELECT host, ports, expires_at FROM registry_instances WHERE app = $1 AND instance_id = $2 FOR UPDATE),
  upserted AS (
    INSERT INTO registry_instances (app, instance_id, host, ports, ttl_seconds, available_since, expires_at)
    SELECT $1, $2, $3, $4, $5, $6, $7 FROM (SELECT count(*) FROM before) AS locked_first
    ON CONFLICT (app, instance_id) DO UPDATE SET host = $3, ports = $4, ttl_seconds = $5, expires_at = $7
    RETURNING app, instance_id, host, ports, ttl_seconds, available_since, expires_at, (xmax = 0) AS inserted)
  SELECT u.app, u.instance_id, u.host, u.ports, u.ttl_seconds, u.available_since, u.expires_at, u.inserted, c.changed,
         CASE WHEN c.changed THEN ${boundServices("$1")} ELSE '{}'::text[] END AS bound_services
    FROM upserted u LEFT JOIN before b ON true,
         -- What backends are made of moved: no row before (or one another registration inserted
         -- meanwhile: what it held is unknown), one expired but not swept yet (left out of its
         -- sets, so coming back is a change), or another address. A heartbeat is none of these,
         -- and names no services: the bindings are read only for a change.
         LATERAL (SELECT (b.expires_at IS NULL OR b.expires_at <= $6 OR b.host IS DISTINCT FROM u.host OR b.ports IS DISTINCT FROM u.ports) AS changed) c`,
};

type RegisterRow = InstanceRow & BoundServices & { inserted: boolean; changed: boolean };

/** registry_recompute (migration 2): the set's lock, read and write in one round trip. */
const RECOMPUTE = {
  name: "registry-recompute",
  text: "SELECT revision, content FROM registry_recompute($1, $2)",
};

/**
 * The registry's SQL. Instances live in Postgres so replicas agree and a
 * restart loses nothing; a backend set's revision is bumped under a row lock
 * only when its content changes.
 */
export class RegistryStore {
  /** An app's space, once claimed, never changes (app_spaces rows are never updated or deleted): safe to remember. */
  private readonly spaceOfApp = new Map<string, string>();

  constructor(private readonly pool: Pool) {}

  /**
   * Registers or heartbeats, in one statement: the row as it was (locked
   * first, so a concurrent change of this instance is seen, not raced) and
   * as it is now. `changed` says whether what backends are made of moved;
   * `boundServices` are the services the app backs, the sets to recompute.
   */
  async register(reg: Registration, nowMs: number): Promise<{ instance: Instance; created: boolean; changed: boolean; boundServices: string[] }> {
    const ports = JSON.stringify(reg.ports.map((p) => ({ int_port: p.intPort, port: p.port })));
    const { rows } = await query<RegisterRow>(
      this.pool,
      REGISTER,
      [reg.app, reg.instanceId, reg.host, ports, reg.ttlSeconds, new Date(nowMs), new Date(nowMs + reg.ttlSeconds * 1000)],
    );
    const row = rows[0] as RegisterRow;
    return { instance: instanceFromRow(row), created: row.inserted, changed: row.changed, boundServices: row.bound_services };
  }

  /**
   * The space an app belongs to, claiming it for `space` if no space has it
   * (the allocator claims too; the primary key decides).
   */
  async claimApp(app: string, space: string): Promise<string> {
    const known = this.spaceOfApp.get(app);
    if (known !== undefined) return known;
    const { rows } = await query<{ space: string }>(
      this.pool,
      `WITH claimed AS (INSERT INTO app_spaces (app, space) VALUES ($1, $2) ON CONFLICT (app) DO NOTHING RETURNING space)
       SELECT space FROM claimed UNION ALL SELECT space FROM app_spaces WHERE app = $1 LIMIT 1`,
      [app, space],
    );
    // Nothing: another claim committed while this statement waited, after its
    // snapshot was taken; a statement of its own sees it.
    const owner = rows[0]?.space ?? (await query<{ space: string }>(this.pool, "SELECT space FROM app_spaces WHERE app = $1", [app])).rows[0]?.space;
    if (owner === undefined) throw new Error(`app "${app}" was claimed and is not in app_spaces`);
    if (this.spaceOfApp.size >= MAX_CACHED_APPS) this.spaceOfApp.clear();
    this.spaceOfApp.set(app, owner);
    return owner;
  }

  async appsOfSpace(space: string): Promise<Set<string>> {
    const { rows } = await query<{ app: string }>(this.pool, "SELECT app FROM app_spaces WHERE space = $1", [space]);
    return new Set(rows.map((r) => r.app));
  }

  /** The instance removed, if it was registered, with the services its app backs. */
  async deregister(app: string, instanceId: string): Promise<{ instance: Instance; boundServices: string[] } | undefined> {
    const { rows } = await query<InstanceRow & BoundServices>(
      this.pool,
      `DELETE FROM registry_instances WHERE app = $1 AND instance_id = $2
       RETURNING *, ${boundServices("$1")} AS bound_services`,
      [app, instanceId],
    );
    return rows[0] && departureFromRow(rows[0]);
  }

  /** Removes instances whose TTL ran out, each with the services its app backs; each row goes to exactly one replica. */
  async expire(nowMs: number): Promise<Array<{ instance: Instance; boundServices: string[] }>> {
    const { rows } = await query<InstanceRow & BoundServices>(
      this.pool,
      `DELETE FROM registry_instances i WHERE expires_at <= $1 RETURNING *, ${boundServices("i.app")} AS bound_services`,
      [new Date(nowMs)],
    );
    return rows.map(departureFromRow);
  }

  async listInstances(app?: string): Promise<Instance[]> {
    const { rows } = await query<InstanceRow>(
      this.pool,
      "SELECT * FROM registry_instances WHERE $1::text IS NULL OR app = $1 ORDER BY app, available_order",
      [app ?? null],
    );
    return rows.map(instanceFromRow);
  }

  /** Every service that has, or had, a backend set: what a full reconcile recomputes. */
  async allServiceIds(): Promise<string[]> {
    const { rows } = await query<{ id: string }>(
      this.pool,
      "SELECT DISTINCT service_id AS id FROM port_bindings UNION SELECT service_id FROM registry_backend_sets",
    );
    return rows.map((r) => r.id);
  }

  /**
   * Recomputes one service's set from the allocator's bindings and the live
   * instances. Returns the set with its new revision when the content
   * changed, nothing when it did not (or the service is gone).
   */
  async recompute(serviceId: string, nowMs: number): Promise<BackendSet | undefined> {
    const { rows } = await query<{ revision: string; content: SetContent }>(this.pool, RECOMPUTE, [serviceId, new Date(nowMs)]);
    return rows[0] && setFromRow(rows[0]);
  }

  async dropSet(serviceId: string): Promise<void> {
    await query(this.pool, "DELETE FROM registry_backend_sets WHERE service_id = $1", [serviceId]);
  }

  /**
   * A hash of a node's sets (a set's revision goes up with every change of
   * it). Read before the sets it goes with: a change in between makes the
   * next check miss, never hides a change.
   */
  async setsDigest(nodeId: string): Promise<string> {
    const { rows } = await query<{ digest: string }>(
      this.pool,
      `SELECT md5(COALESCE(string_agg(service_id::text || ':' || revision, ',' ORDER BY service_id), '')) AS digest
         FROM registry_backend_sets WHERE node_id = $1 AND content <> 'null'`,
      [nodeId],
    );
    return rows[0]?.digest ?? "";
  }

  async listSets(filter: { nodeId?: string; serviceId?: string }): Promise<BackendSet[]> {
    const { rows } = await query<{ revision: string; content: SetContent }>(
      this.pool,
      `SELECT revision, content FROM registry_backend_sets
        WHERE content <> 'null' AND ($1::text IS NULL OR node_id = $1) AND ($2::uuid IS NULL OR service_id = $2)
        ORDER BY service_id`,
      [filter.nodeId ?? null, filter.serviceId ?? null],
    );
    return rows.map(setFromRow);
  }

  /** The allocator's tables exist (it migrates them); the registry reads them. */
  async allocatorSchemaReady(): Promise<boolean> {
    const { rows } = await query<{ ready: boolean }>(this.pool, "SELECT to_regclass('app_spaces') IS NOT NULL AS ready");
    return rows[0]?.ready === true;
  }
}
