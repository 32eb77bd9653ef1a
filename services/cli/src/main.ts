import { Command, CommanderError, Option } from "commander";
import { parseRange } from "@harbor/runtime";
import { createClients, CliError, type Clients } from "./client.js";
import { instanceOutput, keyValues, nodeOutput, serviceOutput, table } from "./output.js";
import { SERVE_TARGETS, type ServeTarget } from "./targets.js";

interface GlobalOptions {
  api?: string;
  token?: string;
  json?: boolean;
}

const WORKER_LIVE_WITHIN_MS = 15_000;

function print(json: boolean | undefined, value: unknown, human: () => string): void {
  process.stdout.write(json ? JSON.stringify(value, null, 2) + "\n" : human());
}

function parsePort(value: string, what = "port"): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < 1 || n > 65535) throw new CliError(`${what} ${JSON.stringify(value)} is not valid: use a whole number from 1 to 65535`, 2);
  return n;
}

function parseMapping(value: string): { intPort: number; port: number } {
  const match = /^(\d+):(\d+)$/.exec(value);
  if (!match) throw new CliError(`--map ${JSON.stringify(value)} is not valid: use INT_PORT:PORT, e.g. 4101:5001`, 2);
  return { intPort: parsePort(match[1] as string, "int_port"), port: parsePort(match[2] as string) };
}

/** Runs an action with the gRPC clients, turning every failure into one line on stderr and an exit code. */
function withClients(program: Command, action: (clients: Clients, opts: GlobalOptions, ...args: any[]) => Promise<void>) {
  return async function (this: Command, ...args: unknown[]) {
    const opts = this.optsWithGlobals<GlobalOptions>();
    const clients = createClients(opts.api ?? process.env.HARBOR_API, opts.token ?? process.env.HARBOR_TOKEN);
    try {
      await action(clients, opts, ...args);
    } finally {
      clients.close();
    }
  };
}

export function buildProgram(): Command {
  const program = new Command("harbor")
    .description("Harbor: extra TCP and UDP ports for your apps, carried to whichever instances are alive.")
    .option("--api <host:port>", "where the Harbor API listens (env HARBOR_API, default 127.0.0.1:7300)")
    .option("--token <token>", "bearer token, when the API needs one (env HARBOR_TOKEN)")
    .showSuggestionAfterError(true)
    .configureOutput({ outputError: (str, write) => write(`harbor: ${str.replace(/^error: /, "")}`) })
    .exitOverride();

  const json = () => new Option("--json", "print exactly one JSON document on stdout");

  program
    .command("create-service")
    .description("allocate a port service (Stackato's `create-service harbor NAME [APP]` is accepted too)")
    .argument("<name>", "service name: udp… for UDP, both…/multi… for TCP+UDP, …https for the HTTPS container proxy")
    .argument("[more...]")
    .option("--app <app>", "bind it to this app")
    .option("--node <node_id>", "allocate on this harbor node")
    .option("--port <n>", "ask for this port")
    .option("--check-interval <ms>", "actively check each backend this often (TCP connect; UDP with --udp-probe)")
    .option("--check-timeout <ms>", "how long a check may take (default: half the interval)")
    .option("--check-unhealthy <n>", "failed checks in a row that take a backend out (default 2)")
    .option("--check-healthy <n>", "passed checks in a row that bring it back (default 2)")
    .option("--udp-probe <text>", "UDP: a datagram to send as the check; any answer passes")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, first: string, more: string[], local: { app?: string; node?: string; port?: string; json?: boolean } & Record<string, string | undefined>) => {
        let name = first;
        let app = local.app;
        if (first === "harbor" && more.length > 0) {
          name = more[0] as string;
          app ??= more[1];
          if (more.length > 2) throw new CliError(`unexpected argument ${JSON.stringify(more[2])}`, 2);
        } else if (more.length > 0) {
          throw new CliError(`unexpected argument ${JSON.stringify(more[0])}; use --app APP to bind`, 2);
        }
        const port = local.port === undefined ? 0 : parsePort(local.port);
        const count = (key: string) => {
          const value = local[key];
          if (value === undefined) return 0;
          if (!/^\d+$/.test(value)) throw new CliError(`--${key.replace(/[A-Z]/g, (ch) => `-${ch.toLowerCase()}`)} ${JSON.stringify(value)}: use a whole number`, 2);
          return Number(value);
        };
        const healthCheck =
          local.checkInterval === undefined
            ? undefined
            : {
                intervalMs: count("checkInterval"),
                timeoutMs: count("checkTimeout"),
                unhealthyThreshold: count("checkUnhealthy"),
                healthyThreshold: count("checkHealthy"),
                udpProbe: local.udpProbe ?? "",
              };
        const { service } = await c.call(c.allocator, "createPortService", { name, app: app ?? "", nodeId: local.node ?? "", port, healthCheck });
        const out = serviceOutput(service!);
        print(local.json ?? opts.json, out, () => `Created ${out.protocol.toUpperCase()} port service ${name}: port ${out.port} on ${out.node_id}${app ? `, bound to ${app} (int_port ${out.int_port})` : ""}\n` + keyValues(out));
      }),
    );

  program
    .command("delete-service")
    .description("release a port service and its port")
    .argument("<name>")
    .action(
      withClients(program, async (c, _opts, name: string) => {
        await c.call(c.allocator, "deletePortService", { name });
        process.stderr.write(`Deleted port service ${name}\n`);
      }),
    );

  program
    .command("service")
    .description("show a port service's credentials (as in $STACKATO_SERVICES)")
    .argument("<name>")
    .option("--app <app>", "show int_port for this app's binding")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, name: string, local: { app?: string; json?: boolean }) => {
        const { service } = await c.call(c.allocator, "getPortService", { name, app: local.app ?? "" });
        const out = serviceOutput(service!);
        print(local.json ?? opts.json, out, () => keyValues(out));
      }),
    );

  program
    .command("services")
    .description("list port services")
    .option("--app <app>", "only those bound to this app")
    .option("--node <node_id>", "only those on this node")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, local: { app?: string; node?: string; json?: boolean }) => {
        const { services } = await c.call(c.allocator, "listPortServices", { app: local.app ?? "", nodeId: local.node ?? "", unlessDigest: "" });
        const out = services.map(serviceOutput);
        print(local.json ?? opts.json, out, () =>
          table(
            ["NAME", "PROTOCOL", "NODE", "PORT", "APPS"],
            out.map((s) => [s.service_name, s.protocol, s.node_id, String(s.port), s.apps.join(",")]),
          ),
        );
      }),
    );

  for (const [verb, bind] of [
    ["bind-service", true],
    ["unbind-service", false],
  ] as const) {
    program
      .command(verb)
      .description(bind ? "bind a port service to an app (gives the app its next int_port)" : "unbind a port service from an app")
      .argument("<name>")
      .argument("<app>")
      .addOption(json())
      .action(
        withClients(program, async (c, opts, name: string, app: string, local: { json?: boolean }) => {
          if (bind) {
            const { service } = await c.call(c.allocator, "bindPortService", { name, app });
            const out = serviceOutput(service!);
            print(local.json ?? opts.json, out, () => `Bound ${name} to ${app}: int_port ${out.int_port}\n`);
          } else {
            await c.call(c.allocator, "unbindPortService", { name, app });
            print(local.json ?? opts.json, { unbound: true, service_name: name, app }, () => `Unbound ${name} from ${app}\n`);
          }
        }),
      );
  }

  program
    .command("env")
    .description("the environment variables an instance of APP gets")
    .argument("<app>")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, app: string, local: { json?: boolean }) => {
        const { variables } = await c.call(c.allocator, "getAppEnvironment", { app });
        const sorted = Object.fromEntries(Object.entries(variables).sort(([a], [b]) => a.localeCompare(b)));
        print(local.json ?? opts.json, sorted, () => Object.entries(sorted).map(([k, v]) => `${k}=${shellQuote(v)}`).join("\n") + "\n");
      }),
    );

  program
    .command("instances")
    .description("list registered app instances")
    .argument("[app]")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, app: string | undefined, local: { json?: boolean }) => {
        const { instances } = await c.call(c.registry, "listInstances", { app: app ?? "" });
        const out = instances.map(instanceOutput);
        print(local.json ?? opts.json, out, () =>
          table(
            ["APP", "INSTANCE", "HOST", "PORTS", "EXPIRES"],
            out.map((i) => [i.app, i.instance_id, i.host, i.ports.map((p) => `${p.int_port}->${p.port}`).join(",") || "-", i.expires_at ?? ""]),
          ),
        );
      }),
    );

  program
    .command("nodes")
    .description("list harbor nodes, their ranges and whether a worker is live")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, local: { json?: boolean }) => {
        const { nodes } = await c.call(c.allocator, "listNodes", {});
        const out = nodes.map((n) => nodeOutput(n, Date.now(), WORKER_LIVE_WITHIN_MS));
        print(local.json ?? opts.json, out, () =>
          table(
            ["NODE", "HOST", "HOSTNAME", "RANGE", "ALLOCATED", "PUBLIC", "WORKER"],
            out.map((n) => [
              n.node_id,
              n.host,
              n.hostname,
              `${n.port_min}-${n.port_max}`,
              String(n.allocated),
              n.public ? `${n.ext_hostname || n.ext_host}` : "no",
              n.worker_live ? "live" : "none",
            ]),
          ),
        );
      }),
    );

  program
    .command("set-node")
    .description("create or change a harbor node (operators); --ext-* make it public")
    .argument("<node_id>")
    .option("--range <min-max>", "port range, e.g. 30000-32767")
    .option("--hostname <name>", "internal hostname")
    .option("--host <ip>", "internal IP address (where its worker listens)")
    .option("--ext-hostname <name>", "public hostname")
    .option("--ext-host <ip>", "public IP address")
    .option("--private", "clear the public hostname and address")
    .option("--reserve <min-max>", "never hand out these ports (repeatable; adds to the node's reservations)", (v: string, prev: string[] = []) => [...prev, v])
    .option("--clear-reserved", "drop the node's reservations (before adding --reserve ones)")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, nodeId: string, local: Record<string, string | boolean | string[] | undefined>) => {
        const range = typeof local.range === "string" ? parseRange(local.range) : undefined;
        if (typeof local.range === "string" && !range) throw new CliError(`--range ${JSON.stringify(local.range)} is not valid: use MIN-MAX, e.g. 30000-32767`, 2);
        const { nodes } = await c.call(c.allocator, "listNodes", {});
        const current = nodes.find((n) => n.nodeId === nodeId);
        const str = (key: string) => (typeof local[key] === "string" ? (local[key] as string) : undefined);
        const reservations = ((local.reserve as string[] | undefined) ?? []).map((value) => {
          const r = value.includes("-") ? parseRange(value) : parseRange(`${value}-${value}`);
          if (!r) throw new CliError(`--reserve ${JSON.stringify(value)} is not valid: use MIN-MAX or a port, e.g. 30000-30010`, 2);
          return { portMin: r.min, portMax: r.max, reason: "reserved" };
        });
        const kept = local.clearReserved ? [] : (current?.blocked ?? []).filter((b) => !b.reason.startsWith("bind failed"));
        const node = {
          nodeId,
          hostname: str("hostname") ?? current?.hostname ?? "",
          host: str("host") ?? current?.host ?? "",
          extHostname: local.private ? "" : (str("extHostname") ?? current?.extHostname ?? ""),
          extHost: local.private ? "" : (str("extHost") ?? current?.extHost ?? ""),
          portMin: range?.min ?? current?.portMin ?? 0,
          portMax: range?.max ?? current?.portMax ?? 0,
          allocated: 0,
          workerSeenAt: undefined,
          blocked: [...kept, ...reservations],
        };
        if (!current && (!node.host || !range)) throw new CliError(`node ${nodeId} is new: give --host IP and --range MIN-MAX`, 2);
        const saved = await c.call(c.allocator, "upsertNode", { node });
        const out = nodeOutput(saved.node!, Date.now(), WORKER_LIVE_WITHIN_MS);
        print(local.json === true || opts.json, out, () => `${current ? "Changed" : "Created"} node ${nodeId}\n` + keyValues(out));
      }),
    );

  program
    .command("register-instance")
    .description("register (or heartbeat) an app instance as a backend (platform integration)")
    .argument("<app>")
    .argument("<instance_id>")
    .requiredOption("--host <host>", "where the instance is reachable")
    .option("--port <n>", "where its first int_port (4100) is reachable")
    .option("--map <int_port:port>", "where another int_port is reachable (repeatable)", (v: string, prev: string[] = []) => [...prev, v])
    .option("--ttl <seconds>", "expire unless heartbeated within this many seconds")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, app: string, instanceId: string, local: { host: string; port?: string; map?: string[]; ttl?: string; json?: boolean }) => {
        const ports = (local.map ?? []).map(parseMapping);
        if (local.port !== undefined) ports.unshift({ intPort: 4100, port: parsePort(local.port) });
        const ttl = local.ttl === undefined ? 0 : Number(local.ttl);
        if (!Number.isInteger(ttl) || ttl < 0) throw new CliError(`--ttl ${JSON.stringify(local.ttl)} is not valid: use whole seconds`, 2);
        const res = await c.call(c.registry, "registerInstance", { app, instanceId, host: local.host, ports, ttlSeconds: ttl });
        const out = { ...instanceOutput(res.instance!), created: res.created };
        print(local.json ?? opts.json, out, () => `${res.created ? "Registered" : "Heartbeat for"} ${app}/${instanceId} (expires ${out.expires_at})\n`);
      }),
    );

  program
    .command("deregister-instance")
    .description("take an app instance out of rotation at once")
    .argument("<app>")
    .argument("<instance_id>")
    .action(
      withClients(program, async (c, _opts, app: string, instanceId: string) => {
        await c.call(c.registry, "deregisterInstance", { app, instanceId });
        process.stderr.write(`Deregistered ${app}/${instanceId}\n`);
      }),
    );

  program
    .command("apply")
    .description("create and bind the harbor services of a stackato.yml (running it twice changes nothing)")
    .option("-f, --file <file>", "the manifest", "stackato.yml")
    .option("--app <app>", "the app (default: the manifest's name)")
    .addOption(json())
    .action(
      withClients(program, async (c, opts, local: { file: string; app?: string; json?: boolean }) => {
        const [{ applyManifest }, { readManifest }] = await Promise.all([import("./apply.js"), import("./manifest.js")]);
        const { app, applied } = await applyManifest(c, readManifest(local.file), local.app);
        print(local.json ?? opts.json, applied, () =>
          applied.length === 0
            ? `${local.file} asks for no harbor service\n`
            : table(
                ["SERVICE", "ACTION", "PROTOCOL", "PORT", "INT_PORT"],
                applied.map((a) => [a.service_name, a.action, a.protocol, String(a.port), String(a.int_port)]),
              ) + `app: ${app}\n`,
        );
      }),
    );

  program
    .command("run")
    .description("run instances of an app here, with the platform's environment, registered and heartbeating")
    .option("--app <app>", "the app (default: the manifest's name)")
    .option("--instances <n>", "how many", "1")
    .option("-f, --file <file>", "a stackato.yml to apply first (default: ./stackato.yml if present)")
    .option("--ttl <seconds>", "registration TTL; heartbeats go at a third of it", "15")
    .argument("<command...>", "the app's command, after --")
    .action(
      withClients(program, async (c, _opts, command: string[], local: { app?: string; instances: string; file?: string; ttl: string }) => {
        const instances = Number(local.instances);
        const ttl = Number(local.ttl);
        if (!Number.isInteger(instances) || instances < 1 || instances > 64) throw new CliError(`--instances ${JSON.stringify(local.instances)}: use 1 to 64`, 2);
        if (!Number.isInteger(ttl) || ttl < 3) throw new CliError(`--ttl ${JSON.stringify(local.ttl)}: use whole seconds, at least 3`, 2);
        const { runInstances } = await import("./run.js");
        process.exitCode = await runInstances(c, { app: local.app, instances, manifestFile: local.file, command, ttlSeconds: ttl });
      }),
    );

  program
    .command("watch")
    .description("print the live NATS events of this deployment (SUBJECT relative to <prefix>.v1., e.g. 'backends.>')")
    .argument("[subject]")
    .addOption(json())
    .action(async function (this: Command, subject: string | undefined, local: { json?: boolean }) {
      const { watchEvents } = await import("./watch.js");
      await watchEvents(subject, local.json ?? this.optsWithGlobals<GlobalOptions>().json ?? false, process.env);
    });

  program
    .command("serve")
    .description("run Harbor: all (one process, as `npm start`), control-plane (allocator and registry), one of allocator, registry, worker, or an app instance's HTTPS container-proxy")
    .argument("[target]", SERVE_TARGETS.join(" | "), "all")
    .action(async function (this: Command, target: string) {
      if (!(SERVE_TARGETS as readonly string[]).includes(target)) throw new CliError(`serve target ${JSON.stringify(target)} is not one of ${SERVE_TARGETS.join(", ")}`, 2);
      const opts = this.optsWithGlobals<GlobalOptions>();
      // Loaded only to serve: the other verbs stay light.
      const { serve } = await import("./serve.js");
      process.exitCode = await serve(target as ServeTarget, process.env, opts.api);
    });

  return program;
}

function shellQuote(value: string): string {
  return /^[A-Za-z0-9_./:@-]*$/.test(value) ? value : `'${value.replace(/'/g, `'\\''`)}'`;
}

async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
  } catch (err) {
    if (err instanceof CommanderError) {
      // Commander has printed its message (or the help) already.
      process.exitCode = err.exitCode === 0 ? 0 : 2;
      return;
    }
    if (err instanceof CliError) {
      process.stderr.write(`harbor: ${err.message}\n`);
      process.exitCode = err.exitCode;
      return;
    }
    process.stderr.write(`harbor: ${(err as Error).message ?? String(err)}\n`);
    process.exitCode = 1;
  }
}

await main(process.argv);
