import type { Migration } from "@harbor/db";

/**
 * The allocator owns these tables and is their only writer. The registry
 * reads nodes, port_services and port_bindings to derive backend sets.
 */
export const allocatorMigrations: Migration[] = [
  {
    version: 1,
    name: "nodes-services-bindings-outbox",
    sql: `
      CREATE TABLE nodes (
        node_id text PRIMARY KEY,
        hostname text NOT NULL DEFAULT '',
        host text NOT NULL,
        ext_hostname text NOT NULL DEFAULT '',
        ext_host text NOT NULL DEFAULT '',
        port_min int NOT NULL,
        port_max int NOT NULL,
        worker_seen_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT nodes_range_check CHECK (port_min BETWEEN 1 AND 65535 AND port_max BETWEEN port_min AND 65535)
      );

      CREATE TABLE port_services (
        id uuid PRIMARY KEY,
        service_name text NOT NULL,
        node_id text NOT NULL REFERENCES nodes (node_id),
        port int NOT NULL CHECK (port BETWEEN 1 AND 65535),
        protocol text NOT NULL CHECK (protocol IN ('tcp', 'udp', 'both')),
        https_proxy boolean NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        -- The guarantee: a port of a node is never held by two services.
        CONSTRAINT port_services_node_port_key UNIQUE (node_id, port)
      );
      -- Names are unique ignoring case: their env var forms must not collide.
      CREATE UNIQUE INDEX port_services_name_key ON port_services (lower(service_name));

      CREATE TABLE port_bindings (
        service_id uuid NOT NULL REFERENCES port_services (id) ON DELETE CASCADE,
        app text NOT NULL,
        int_port int NOT NULL,
        bound_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (service_id, app),
        CONSTRAINT port_bindings_app_int_port_key UNIQUE (app, int_port)
      );
      CREATE INDEX port_bindings_app_idx ON port_bindings (app);

      -- Events written in the same transaction as the change they describe,
      -- relayed to NATS at least once and then deleted.
      CREATE TABLE outbox (
        id bigserial PRIMARY KEY,
        event text NOT NULL,
        node_id text NOT NULL,
        payload jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now()
      );
    `,
  },
  {
    version: 2,
    name: "released-and-blocked-ports",
    sql: `
      -- A released port is kept from other services for a cool-down period;
      -- the service name that held it may have it back.
      CREATE TABLE released_ports (
        node_id text NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
        port int NOT NULL,
        service_name text NOT NULL,
        released_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node_id, port)
      );
      CREATE INDEX released_ports_name_idx ON released_ports (lower(service_name), released_at DESC);

      -- Ports never handed out: operator reservations and ports a worker
      -- could not bind.
      CREATE TABLE blocked_ports (
        node_id text NOT NULL REFERENCES nodes (node_id) ON DELETE CASCADE,
        port_min int NOT NULL,
        port_max int NOT NULL,
        kind text NOT NULL CHECK (kind IN ('reserved', 'bind-failed')),
        reason text NOT NULL,
        since timestamptz NOT NULL DEFAULT now(),
        CHECK (port_min BETWEEN 1 AND port_max AND port_max <= 65535),
        UNIQUE (node_id, kind, port_min, port_max)
      );
    `,
  },
  {
    version: 3,
    name: "spaces",
    sql: `
      -- Services belong to the space that created them ("" = operators').
      ALTER TABLE port_services ADD COLUMN space text NOT NULL DEFAULT '';
      CREATE INDEX port_services_space_idx ON port_services (space);

      -- Which space an app belongs to: claimed by the first space that binds
      -- it a service or registers an instance of it (the registry claims
      -- too). The primary key decides a race.
      CREATE TABLE app_spaces (
        app text PRIMARY KEY,
        space text NOT NULL,
        claimed_at timestamptz NOT NULL DEFAULT now()
      );
      INSERT INTO app_spaces (app, space) SELECT DISTINCT app, '' FROM port_bindings ON CONFLICT DO NOTHING;
    `,
  },
  {
    version: 4,
    name: "health-checks",
    sql: `
      -- Active health checks of the backends (harbor.v1.HealthCheck as JSON); NULL = passive only.
      ALTER TABLE port_services ADD COLUMN health_check jsonb;
    `,
  },
  {
    version: 5,
    name: "outbox-service-snapshots",
    sql: `
      -- An event is written either rendered (payload: the proto3 JSON) or as
      -- the service's row (service: a snapshot taken by the statement that
      -- changed it, so it needs no second round trip); the relay renders
      -- the latter.
      ALTER TABLE outbox ADD COLUMN service jsonb;
      ALTER TABLE outbox ALTER COLUMN payload DROP NOT NULL;
      ALTER TABLE outbox ADD CONSTRAINT outbox_payload_or_service CHECK ((payload IS NULL) <> (service IS NULL));
    `,
  },
  {
    version: 6,
    name: "released-ports-space",
    sql: `
      -- A released port is kept for its name within its space: another space
      -- re-creating the name must not inherit the port its clients still use.
      ALTER TABLE released_ports ADD COLUMN space text NOT NULL DEFAULT '';
    `,
  },
];
