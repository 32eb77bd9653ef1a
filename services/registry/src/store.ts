import { protocolToProto, timestampFromMs, type BackendSet, type Instance, type PortMapping } from "@harbor/proto";
import { query, withTransaction, type Pool } from "@harbor/db";
import type { ProtocolName } from "@harbor/core";

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

/**
 * A service's set row, locked for the rest of the transaction (created the
 * first time), and the service: one round trip. Recomputes of one service,
 * on any replica, run one after another; the next statement's snapshot is
 * taken after the lock, so it sees what the previous recompute committed.
 * Nothing when the service is gone.
 */
const LOCK_SET_READ_SERVICE = {
  name: "registry-lock-set",
  text: `
  WITH service AS (SELECT id, node_id, service_name, port, protocol FROM port_services WHERE id = $1),
  locked AS (
    INSERT INTO registry_backend_sets (service_id, node_id, revision, content)
    SELECT id, node_id, 0, 'null' FROM service
    ON CONFLICT (service_id) DO UPDATE SET node_id = registry_backend_sets.node_id
    RETURNING service_id)
  SELECT service.* FROM service JOIN locked ON locked.service_id = service.id`,
};

/** The live instances of the apps bound to a service, in availability (FIFO) order, each with its port for the binding's int_port. */
const READ_BACKENDS = {
  name: "registry-read-backends",
  text: `
  SELECT i.instance_id, i.app, i.host, i.available_since,
         COALESCE((SELECT (m->>'port')::int FROM jsonb_array_elements(i.ports) m
                    WHERE (m->>'int_port')::int = b.int_port LIMIT 1), b.int_port) AS port
    FROM port_bindings b
    JOIN registry_instances i ON i.app = b.app
   WHERE b.service_id = $1 AND i.expires_at > $2
   ORDER BY i.available_order`,
};

/** A new revision only when the content changed. */
const WRITE_SET = {
  name: "registry-write-set",
  text: `UPDATE registry_backend_sets SET revision = revision + 1, content = $2, node_id = $3
          WHERE service_id = $1 AND content IS DISTINCT FROM $2::jsonb RETURNING revision`,
};

/**
 * The registry's SQL. Instances live in Postgres so replicas agree and a
 * restart loses nothing; a backend set's revision is bumped under a row lock
 * only when its content changes.
 */
export class RegistryStore {
  constructor(private readonly pool: Pool) {}

  /** Registers or heartbeats. `changed` says whether what backends are made of moved. */
  async register(reg: Registration, nowMs: number): Promise<{ instance: Instance; created: boolean; changed: boolean }> {
    return withTransaction(this.pool, async (tx) => {
      const ports = JSON.stringify(reg.ports.map((p) => ({ int_port: p.intPort, port: p.port })));
      const { rows: before } = await tx.query<InstanceRow>(
        "SELECT * FROM registry_instances WHERE app = $1 AND instance_id = $2 FOR UPDATE",
        [reg.app, reg.instanceId],
      );
      const now = new Date(nowMs);
      const expires = new Date(nowMs + reg.ttlSeconds * 1000);
      const { rows } = await tx.query<InstanceRow>(
        `INSERT INTO registry_instances (app, instance_id, host, ports, ttl_seconds, available_since, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (app, instance_id) DO UPDATE SET host = $3, ports = $4, ttl_seconds = $5, expires_at = $7
         RETURNING *`,
        [reg.app, reg.instanceId, reg.host, ports, reg.ttlSeconds, now, expires],
      );
      const row = rows[0] as InstanceRow;
      const previous = before[0];
      // Expired but not swept yet: it was left out of its sets, so coming back is a change.
      const revived = previous !== undefined && previous.expires_at.getTime() <= nowMs;
      const changed = !previous || revived || previous.host !== row.host || JSON.stringify(previous.ports) !== JSON.stringify(row.ports);
      return { instance: instanceFromRow(row), created: !previous, changed };
    });
  }

  /**
   * The space an app belongs to, claiming it for `space` if no space has it
   * (the allocator claims too; the primary key decides).
   */
  async claimApp(app: string, space: string): Promise<string> {
    const { rows } = await query<{ space: string }>(
      this.pool,
      `WITH claimed AS (INSERT INTO app_spaces (app, space) VALUES ($1, $2) ON CONFLICT (app) DO NOTHING RETURNING space)
       SELECT space FROM claimed UNION ALL SELECT space FROM app_spaces WHERE app = $1 LIMIT 1`,
      [app, space],
    );
    return rows[0]?.space ?? space;
  }

  async appsOfSpace(space: string): Promise<Set<string>> {
    const { rows } = await query<{ app: string }>(this.pool, "SELECT app FROM app_spaces WHERE space = $1", [space]);
    return new Set(rows.map((r) => r.app));
  }

  async deregister(app: string, instanceId: string): Promise<Instance | undefined> {
    const { rows } = await query<InstanceRow>(this.pool, "DELETE FROM registry_instances WHERE app = $1 AND instance_id = $2 RETURNING *", [app, instanceId]);
    return rows[0] ? instanceFromRow(rows[0]) : undefined;
  }

  /** Removes instances whose TTL ran out; each row goes to exactly one replica. */
  async expire(nowMs: number): Promise<Instance[]> {
    const { rows } = await query<InstanceRow>(this.pool, "DELETE FROM registry_instances WHERE expires_at <= $1 RETURNING *", [new Date(nowMs)]);
    return rows.map(instanceFromRow);
  }

  async listInstances(app?: string): Promise<Instance[]> {
    const { rows } = await query<InstanceRow>(
      this.pool,
      "SELECT * FROM registry_instances WHERE $1::text IS NULL OR app = $1 ORDER BY app, available_order",
      [app ?? null],
    );
    return rows.map(instanceFromRow);
  }

  async servicesOfApp(app: string): Promise<string[]> {
    const { rows } = await query<{ service_id: string }>(this.pool, "SELECT service_id FROM port_bindings WHERE app = $1", [app]);
    return rows.map((r) => r.service_id);
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
    // Three round trips and a commit, each statement prepared (with its columns named, so a
    // migration cannot change a cached plan's result): this runs inside every
    // RegisterInstance that changes something, so it is most of propagation's latency.
    return withTransaction(this.pool, async (tx) => {
      const { rows: services } = await tx.query<{ id: string; node_id: string; service_name: string; port: number; protocol: ProtocolName }>({
        ...LOCK_SET_READ_SERVICE,
        values: [serviceId],
      });
      const service = services[0];
      if (!service) {
        await tx.query("DELETE FROM registry_backend_sets WHERE service_id = $1", [serviceId]);
        return undefined;
      }
      const { rows: backends } = await tx.query<{ instance_id: string; app: string; host: string; port: number; available_since: Date }>({
        ...READ_BACKENDS,
        values: [serviceId, new Date(nowMs)],
      });
      const content: SetContent = {
        serviceId,
        nodeId: service.node_id,
        serviceName: service.service_name,
        port: service.port,
        protocol: protocolToProto(service.protocol),
        backends: backends.map((b) => ({
          instanceId: b.instance_id,
          app: b.app,
          host: b.host,
          port: b.port,
          availableSince: timestampFromMs(b.available_since.getTime()),
        })),
      };
      const { rows: updated } = await tx.query<{ revision: string }>({ ...WRITE_SET, values: [serviceId, JSON.stringify(content), service.node_id] });
      const revision = updated[0]?.revision;
      return revision === undefined ? undefined : { ...content, revision };
    });
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
    return rows.map((r) => ({ ...r.content, revision: String(r.revision) }));
  }

  /** The allocator's tables exist (it migrates them); the registry reads them. */
  async allocatorSchemaReady(): Promise<boolean> {
    const { rows } = await query<{ ready: boolean }>(this.pool, "SELECT to_regclass('app_spaces') IS NOT NULL AS ready");
    return rows[0]?.ready === true;
  }
}
