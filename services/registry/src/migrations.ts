import type { Migration } from "@harbor/db";

/**
 * The registry's own tables. It reads the allocator's port_services and
 * port_bindings (never writes them) to know which app backs which service.
 */
export const registryMigrations: Migration[] = [
  {
    version: 1,
    name: "instances-and-backend-sets",
    sql: `
      -- Availability order: the UDP FIFO queue. A re-registration after
      -- expiry or deregistration is a new row and joins the back.
      CREATE SEQUENCE registry_availability_order;

      CREATE TABLE registry_instances (
        app text NOT NULL,
        instance_id text NOT NULL,
        host text NOT NULL,
        ports jsonb NOT NULL DEFAULT '[]',
        ttl_seconds int NOT NULL,
        available_since timestamptz NOT NULL,
        available_order bigint NOT NULL DEFAULT nextval('registry_availability_order'),
        expires_at timestamptz NOT NULL,
        PRIMARY KEY (app, instance_id)
      );
      CREATE INDEX registry_instances_expires_idx ON registry_instances (expires_at);

      -- The last published set of each service. The revision survives
      -- restarts, so it only ever increases.
      CREATE TABLE registry_backend_sets (
        service_id uuid PRIMARY KEY,
        node_id text NOT NULL,
        revision bigint NOT NULL,
        content jsonb NOT NULL
      );
      CREATE INDEX registry_backend_sets_node_idx ON registry_backend_sets (node_id);
    `,
  },
  {
    version: 2,
    name: "recompute-in-one-round-trip",
    sql: `
      -- A service's set recomputed in one call (it was five round trips,
      -- most of a registration's latency). Each statement of a plpgsql
      -- function takes its own snapshot: the service and its backends are
      -- read after the set's row is locked, so they include what the
      -- previous recompute of this service, on any replica, committed. The content has the shape
      -- of BackendSet without its revision (proto3 JSON of the TypeScript
      -- side: int64 seconds as text, enums as numbers). Returns the new
      -- revision and content when the content changed; nothing when it did
      -- not, or when the service is gone (its set is then dropped).
      CREATE FUNCTION registry_recompute(p_service uuid, p_now timestamptz)
      RETURNS TABLE (revision bigint, content jsonb) LANGUAGE plpgsql AS $fn$
      DECLARE
        svc record;
        fresh jsonb;
      BEGIN
        INSERT INTO registry_backend_sets AS b (service_id, node_id, revision, content)
        SELECT s.id, s.node_id, 0, 'null' FROM port_services s WHERE s.id = p_service
        ON CONFLICT (service_id) DO UPDATE SET node_id = b.node_id;
        -- Read after the lock: a service deleted meanwhile (its set dropped) is seen gone.
        SELECT s.node_id, s.service_name, s.port, s.protocol INTO svc FROM port_services s WHERE s.id = p_service;
        IF NOT FOUND THEN
          DELETE FROM registry_backend_sets WHERE service_id = p_service;
          RETURN;
        END IF;

        fresh := jsonb_build_object(
          'serviceId', p_service,
          'nodeId', svc.node_id,
          'serviceName', svc.service_name,
          'port', svc.port,
          'protocol', CASE svc.protocol WHEN 'tcp' THEN 1 WHEN 'udp' THEN 2 WHEN 'both' THEN 3 ELSE 0 END,
          'backends', COALESCE((
            SELECT jsonb_agg(jsonb_build_object(
                     'instanceId', i.instance_id,
                     'app', i.app,
                     'host', i.host,
                     'port', COALESCE((SELECT (m->>'port')::int FROM jsonb_array_elements(i.ports) m
                                        WHERE (m->>'int_port')::int = pb.int_port LIMIT 1), pb.int_port),
                     'availableSince', jsonb_build_object(
                       'seconds', floor(extract(epoch FROM i.available_since))::bigint::text,
                       'nanos', (floor(extract(epoch FROM i.available_since) * 1000)::bigint % 1000) * 1000000))
                   ORDER BY i.available_order)
              FROM port_bindings pb JOIN registry_instances i ON i.app = pb.app
             WHERE pb.service_id = p_service AND i.expires_at > p_now), '[]'::jsonb));

        RETURN QUERY
          UPDATE registry_backend_sets b SET revision = b.revision + 1, content = fresh, node_id = svc.node_id
           WHERE b.service_id = p_service AND b.content IS DISTINCT FROM fresh
          RETURNING b.revision, b.content;
      END
      $fn$;
    `,
  },
];
