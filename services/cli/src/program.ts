import { createRequire } from "node:module";
import { Command, CommanderError, Option } from "commander";
import { parseRange } from "@harbor/runtime";
import { createClients, CliError, type Clients } from "./client.js";
import { inline, instanceOutput, keyValues, nodeOutput, oneLine, serviceOutput, table } from "./output.js";
import { DEFAULT_SERVE_TARGET, SERVE_TARGETS, isServeTarget } from "./targets.js";

/** This package's version (the file is one level above both src/ and dist/). */
const VERSION = (createRequire(import.meta.url)("../package.json") as { version: string }).version;

/** Where a run of the CLI writes: the process's streams, or a test's buffers. */
export interface CliIo {
  out(text: string): void;
  err(text: string): void;
}

const processIo: CliIo = {
  out: (text) => void process.stdout.write(text),
  err: (text) => void process.stderr.write(text),
};

interface GlobalOptions {
  api?: string;
  token?: string;
  json?: boolean;
}

const WORKER_LIVE_WITHIN_MS = 15_000;

/**
 * A whole number written in decimal digits, from min to max. (`Number()` alone
 * would take "", " ", "0x10" and "1e3".)
 */
function parseWhole(value: string, flag: string, min: number, max: number, unit = ""): number {
  const n = Number(value);
  if (!/^\d+$/.test(value) || n < min || n > max) throw new CliError(`${flag} ${JSON.stringify(value)} is not valid: use a whole number${unit} from ${min} to ${max}`, 2);
  return n;
}

const parsePort = (value: string, what = "port"): number => parseWhole(value, what, 1, 65535);

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

/** The active health check flags, shared by create-service and set-health-check. */
interface CheckFlags {
  checkInterval?: string;
  checkTimeout?: string;
  checkUnhealthy?: string;
  checkHealthy?: string;
  udpProbe?: string;
}

function withCheckOptions(command: Command): Command {
  return command
    .option("--check-interval <ms>", "actively check each backend this often (TCP connect; UDP with --udp-probe)")
    .option("--check-timeout <ms>", "how long a check may take (default: half the interval)")
    .option("--check-unhealthy <n>", "failed checks in a row that take a backend out (default 2)")
    .option("--check-healthy <n>", "passed checks in a row that bring it back (default 2)")
    .option("--udp-probe <text>", "UDP: a datagram to send as the check; any answer passes");
}

/**
 * The health check the flags ask for; undefined without --check-interval.
 * Every check flag is read, and goes with --check-interval: none is dropped unread.
 */
function healthCheckFrom(local: CheckFlags) {
  const flag = (key: string) => `--${key.replace(/[A-Z]/g, (ch) => `-${ch.toLowerCase()}`)}`;
  const checkFlags = ["checkTimeout", "checkUnhealthy", "checkHealthy", "udpProbe"] as const;
  const lone = checkFlags.find((key) => local[key] !== undefined);
  if (local.checkInterval === undefined && lone) throw new CliError(`${flag(lone)} goes with --check-interval MS (how often to check)`, 2);
  if (local.checkInterval === undefined) return undefined;
  // 0 is "off" for the interval (as the server reads it); an explicit 0 elsewhere would silently mean the default.
  const count = (key: Exclude<keyof CheckFlags, "udpProbe">, min: number, max: number) => {
    const value = local[key];
    return value === undefined ? 0 : parseWhole(value, flag(key), min, max);
  };
  return {
    intervalMs: count("checkInterval", 0, 3_600_000),
    timeoutMs: count("checkTimeout", 1, 3_600_000),
    unhealthyThreshold: count("checkUnhealthy", 1, 100),
    healthyThreshold: count("checkHealthy", 1, 100),
    udpProbe: local.udpProbe ?? "",
  };
}

export function buildProgram(io: CliIo = processIo): Command {
  const print = (json: boolean | undefined, value: unknown, human: () => string): void => io.out(json ? JSON.stringify(value, null, 2) + "\n" : human());
  const program = new Command("harbor")
    .description("Harbor: extra TCP and UDP ports for your apps, carried to whichever instances are alive.")
    .version(VERSION, "-V, --version", "print harbor's version")
    .option("--api <host:port>", "where the Harbor API listens (env HARBOR_API, default 127.0.0.1:7300)")
    .option("--token <token>", "bearer token, when the API needs one (env HARBOR_TOKEN)")
    .showSuggestionAfterError(true)
    // Commander's own errors (unknown command, bad option, …) are one line too, its suggestion included.
    .configureOutput({ writeOut: io.out, writeErr: io.err, outputError: (str, write) => write(`harbor: ${oneLine(str.replace(/^error: /, ""))}\n`) })
    .exitOverride();

  const json = () => new Option("--json", "print exactly one JSON document on stdout");

  withCheckOptions(program
    .command("create-service")
    .description("allocate a port service (Stackato's `create-service harbor NAME [APP]` is accepted too)")
    .argument("<name>", "service name: udp… for UDP, both…/multi… for TCP+UDP, …https for the HTTPS container proxy")
    .argument("[more...]")
    .option("--app <app>", "bind it to this app")
    .option("--node <node_id>", "allocate on this harbor node")
    .option("--port <n>", "ask for this port"))
    .addOption(json())
    .action(
      withClients(program, async (c, opts, first: string, more: string[], local: { app?: string; node?: string; port?: string; json?: boolean } & CheckFlags) => {
        let name = first;
        let app = local.app;
        if (first === "harbor" && more.length > 0) {
          name = more[0] as string;
          if (more.length > 2) throw new CliError(`unexpected argument ${JSON.stringify(more[2])}`, 2);
          if (more[1] !== undefined && app !== undefined && more[1] !== app) throw new CliError(`two apps given: ${JSON.stringify(more[1])} and --app ${JSON.stringify(app)}; give one`, 2);
          app ??= more[1];
        } else if (more.length > 0) {
          throw new CliError(`unexpected argument ${JSON.stringify(more[0])}; use --app APP to bind`, 2);
        }
        const port = local.port === undefined ? 0 : parsePort(local.port);
        const healthCheck = healthCheckFrom(local);
        const { service } = await c.call(c.allocator, "createPortService", { name, app: app ?? "", nodeId: local.node ?? "", port, healthCheck });
        const out = serviceOutput(service!);
        print(local.json ?? opts.json, out, () => `Created ${out.protocol === "both" ? "TCP+UDP" : out.protocol.toUpperCase()} port service ${name}: port ${out.port} on ${out.node_id}${app ? `, bound to ${app} (int_port ${out.int_port})` : ""}\n` + keyValues(out));
      }),
    );

  program
    .command("delete-service")
    .description("release a port service and its port")
    .argument("<name>")
    .action(
      withClients(program, async (c, _opts, name: string) => {
        await c.call(c.allocator, "deletePortService", { name });
        io.err(`Deleted port service ${name}\n`);
      }),
    );

  withCheckOptions(program
    .command("set-health-check")
    .description("change a port service's active health check, or remove it with --none; open connections stay")
    .argument("<name>")
    .option("--none", "no active check: passive checks only"))
    .addOption(json())
    .action(
      withClients(program, async (c, opts, name: string, local: { none?: boolean; json?: boolean } & CheckFlags) => {
        const healthCheck = healthCheckFrom(local);
        if (local.none && healthCheck) throw new CliError("--none removes the check: give it or --check-interval, not both", 2);
        if (!local.none && !healthCheck) throw new CliError("give the new check (--check-interval MS …) or --none to remove it", 2);
        const { service } = await c.call(c.allocator, "setHealthCheck", { name, healthCheck });
        const out = serviceOutput(service!);
        print(local.json ?? opts.json, out, () => `Health check of ${name}: ${out.health_check ? inline(out.health_check) : "none (passive checks only)"}\n`);
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
        const str = (key: string) => (typeof local[key] === "string" ? (local[key] as string) : undefined);
        const reservations = ((local.reserve as string[] | undefined) ?? []).map((value) => {
          const r = value.includes("-") ? parseRange(value) : parseRange(`${value}-${value}`);
          if (!r) throw new CliError(`--reserve ${JSON.stringify(value)} is not valid: use MIN-MAX or a port, e.g. 30000-30010`, 2);
          return { portMin: r.min, portMax: r.max, reason: "reserved" };
        });
        if (local.private && (str("extHostname") !== undefined || str("extHost") !== undefined)) throw new CliError("--private clears the public hostname and address: give it or --ext-*, not both", 2);
        const { nodes } = await c.call(c.allocator, "listNodes", {});
        const current = nodes.find((n) => n.nodeId === nodeId);
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
        const ttl = local.ttl === undefined ? 0 : parseWhole(local.ttl, "--ttl", 0, 86_400, " of seconds");
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
        io.err(`Deregistered ${app}/${instanceId}\n`);
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
        const manifest = readManifest(local.file);
        for (const warning of manifest.warnings) io.err(`harbor: warning: ${warning}\n`);
        const { app, applied } = await applyManifest(c, manifest, local.app);
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
        const instances = parseWhole(local.instances, "--instances", 1, 64);
        const ttl = parseWhole(local.ttl, "--ttl", 3, 86_400, " of seconds");
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
    .argument("[target]", SERVE_TARGETS.join(" | "), DEFAULT_SERVE_TARGET)
    .action(async function (this: Command, target: string) {
      if (!isServeTarget(target)) throw new CliError(`serve target ${JSON.stringify(target)} is not one of ${SERVE_TARGETS.join(", ")}`, 2);
      const opts = this.optsWithGlobals<GlobalOptions>();
      // Loaded only to serve: the other verbs stay light.
      const { serve } = await import("./serve.js");
      process.exitCode = await serve(target, process.env, opts.api);
    });

  return program;
}

function shellQuote(value: string): string {
  return /^[A-Za-z0-9_./:@-]*$/.test(value) ? value : `'${value.replace(/'/g, `'\\''`)}'`;
}

/**
 * Runs the `harbor` command line and answers its exit code: 0 done, 1 the
 * request failed, 2 bad usage. Every failure is one line on io.err.
 */
export async function runCli(argv: string[], io: CliIo = processIo): Promise<number> {
  const program = buildProgram(io);
  try {
    await program.parseAsync(argv);
    // `run` and `serve` end with their children's or services' code, set as the process's.
    return Number(process.exitCode ?? 0);
  } catch (err) {
    if (err instanceof CommanderError) {
      // Commander has printed its message (or the help) already.
      return err.exitCode === 0 ? 0 : 2;
    }
    if (err instanceof CliError) {
      io.err(`harbor: ${oneLine(err.message)}\n`);
      return err.exitCode;
    }
    io.err(`harbor: ${oneLine((err as Error).message ?? String(err))}\n`);
    return 1;
  }
}
