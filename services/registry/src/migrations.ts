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
];
