import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { createAllocator, loadAllocatorConfig, type Allocator } from "@harbor/allocator";
import { NatsBus, createSubjects, type Bus } from "@harbor/bus";
import { createPool, type Pool } from "@harbor/db";
import { createRegistry, loadRegistryConfig, type RegistryService } from "@harbor/registry";
import { createGrpcServer, createLogger, type GrpcServer } from "@harbor/runtime";
import { createTestDatabase, uniqueName, waitFor, type TestDatabase } from "@harbor/testkit";
import { CliError } from "./client.js";
import { runCli } from "./program.js";
import { watchEvents } from "./watch.js";

// The `harbor` verbs run in-process against a real allocator and registry (on
// the machine's Postgres and NATS): what a user sees on stdout and stderr, the
// exit code, and that a refused command changes nothing on the server.
const logger = createLogger("test", "silent");
const subjects = createSubjects(uniqueName("hbc"));
const RANGE = { min: 31000, max: 31049 };
let db: TestDatabase;
let pool: Pool;
let bus: Bus;
let allocator: Allocator;
let registry: RegistryService;
let server: GrpcServer;
let dir: string;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function harbor(...args: string[]): Promise<Run> {
  let stdout = "";
  let stderr = "";
  const code = await runCli(["node", "harbor", "--api", server.boundAddress, ...args], { out: (t) => void (stdout += t), err: (t) => void (stderr += t) });
  return { code, stdout, stderr };
}

async function json<T>(...args: string[]): Promise<T> {
  const run = await harbor(...args, "--json");
  expect(run, run.stderr).toMatchObject({ code: 0 });
  return JSON.parse(run.stdout) as T;
}

/** A refusal: the exit code, and exactly one line on stderr, nothing on stdout. */
function expectRefused(run: Run, code: number, message: RegExp): void {
  expect(run.code, run.stderr).toBe(code);
  expect(run.stdout).toBe("");
  expect(run.stderr.endsWith("\n")).toBe(true);
  expect(run.stderr.trimEnd().split("\n")).toHaveLength(1);
  expect(run.stderr).toMatch(/^harbor: /);
  expect(run.stderr).toMatch(message);
}

function manifest(text: string): string {
  const file = join(dir, `${uniqueName("m")}.yml`);
  writeFileSync(file, text);
  return file;
}

/** Everything the server holds that a CLI verb could change. */
async function serverState() {
  return {
    services: await json<unknown[]>("services"),
    instances: (await json<Array<{ app: string; instance_id: string; ports: unknown; ttl_seconds: number }>>("instances")).map((i) => [i.app, i.instance_id, i.ports, i.ttl_seconds]),
    nodes: await json<unknown[]>("nodes").then((nodes) => nodes.map((n) => ({ ...(n as object), worker_seen_at: null, worker_live: false }))),
  };
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "harbor-cli-"));
  db = await createTestDatabase();
  pool = createPool({ url: db.url, logger, max: 10 });
  bus = await NatsBus.connect({ url: "nats://127.0.0.1:4222", logger });
  allocator = createAllocator(
    loadAllocatorConfig({ HARBOR_NODE_ID: "n1", HARBOR_PORT_RANGE: `${RANGE.min}-${RANGE.max}`, HARBOR_PORT_COOLDOWN_SECONDS: "0" }),
    { pool, bus, subjects, logger },
  );
  await allocator.start();
  registry = createRegistry(loadRegistryConfig({ HARBOR_INSTANCE_TTL_SECONDS: "30", HARBOR_EXPIRY_SWEEP_MS: "60000" }), { pool, bus, subjects, logger });
  await registry.start();
  server = createGrpcServer({ address: "127.0.0.1:0", services: [allocator.grpc, registry.grpc], logger });
  await server.start();
});

afterAll(async () => {
  await server?.stop();
  await registry?.stop();
  await allocator?.stop();
  await bus?.close();
  await pool?.end();
  await db?.drop();
});

describe("cli - errors", () => {
  it("an unknown command or option, suggestion included, is one line on stderr and exit 2", async () => {
    expectRefused(await harbor("servics"), 2, /unknown command 'servics' \(Did you mean one of service, services\?\)/);
    expectRefused(await harbor("services", "--jsn"), 2, /unknown option '--jsn' \(Did you mean --json\?\)/);
    expectRefused(await harbor("create-service"), 2, /missing required argument 'name'/);
  });

  it("--version prints the package's version, exit 0", async () => {
    const { version } = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8")) as { version: string };
    expect(await harbor("--version")).toEqual({ code: 0, stdout: `${version}\n`, stderr: "" });
  });

  it("a gRPC error is the server's message on one line, exit 1; an unreachable API says where it looked", async () => {
    expectRefused(await harbor("service", "nosuch"), 1, /no port service named "nosuch"/);
    expectRefused(await harbor("create-service", "bad_name"), 1, /service name "bad_name" is not valid/);
    let stderr = "";
    const code = await runCli(["node", "harbor", "--api", "127.0.0.1:1", "services"], { out: () => undefined, err: (t) => void (stderr += t) });
    expect(code).toBe(1);
    expect(stderr).toMatch(/^harbor: cannot reach harbor at 127\.0\.0\.1:1 .*\n$/);
  });

  it("an API address that is not host:port is a usage error, not a resolver's message", async () => {
    for (const api of ["nohost", "a b", ""]) {
      let stderr = "";
      const code = await runCli(["node", "harbor", "--api", api, "services"], { out: () => undefined, err: (t) => void (stderr += t) });
      expect(code, stderr).toBe(2);
      expect(stderr).toMatch(/^harbor: the API address ".*" is not HOST:PORT/);
      expect(stderr.trimEnd().split("\n")).toHaveLength(1);
    }
  });
});

describe("cli - bad flag values change nothing", () => {
  it("a health-check flag without --check-interval, or not a whole number, is refused before anything is created", async () => {
    const before = await serverState();
    expectRefused(await harbor("create-service", "hc-a", "--check-timeout", "abc"), 2, /--check-timeout goes with --check-interval/);
    expectRefused(await harbor("create-service", "hc-b", "--check-timeout", "500"), 2, /--check-timeout goes with --check-interval/);
    expectRefused(await harbor("create-service", "hc-c", "--udp-probe", "ping"), 2, /--udp-probe goes with --check-interval/);
    expectRefused(await harbor("create-service", "hc-d", "--check-interval", "1000", "--check-healthy", "0x2"), 2, /--check-healthy "0x2" is not valid/);
    expectRefused(await harbor("create-service", "hc-e", "--check-interval", "4294967396"), 2, /--check-interval "4294967396" is not valid/);
    expectRefused(await harbor("create-service", "hc-f", "--check-interval", "1000", "--check-unhealthy", "0"), 2, /--check-unhealthy "0" is not valid: use a whole number from 1 to 100/);
    expect(await serverState()).toEqual(before);
  });

  it("register-instance refuses a --ttl that is not decimal digits ('' would have meant the default, 0x10 sixteen)", async () => {
    const before = await serverState();
    for (const ttl of ["", " ", "0x10", "1e2", "-1", "4294967326"]) {
      expectRefused(await harbor("register-instance", "ttl-app", "t-0", "--host", "127.0.0.1", "--ttl", ttl), 2, /--ttl ".*" is not valid/);
    }
    expect(await serverState()).toEqual(before);
  });

  it("run refuses --instances and --ttl that are not decimal digits before it starts anything", async () => {
    expectRefused(await harbor("run", "--app", "r", "--instances", "0x2", "--", "true"), 2, /--instances "0x2" is not valid/);
    expectRefused(await harbor("run", "--app", "r", "--ttl", "1e1", "--", "true"), 2, /--ttl "1e1" is not valid/);
  });

  it("create-service harbor NAME APP with a different --app, and set-node --private with --ext-*, are refused", async () => {
    const before = await serverState();
    expectRefused(await harbor("create-service", "harbor", "two-apps", "one", "--app", "other"), 2, /two apps given/);
    expectRefused(await harbor("set-node", "n1", "--private", "--ext-host", "10.0.0.9"), 2, /--private/);
    expect(await serverState()).toEqual(before);
  });
});

describe("cli - set-health-check", () => {
  it("changes a service's check, removes it with --none, and refuses what it cannot do without changing anything", async () => {
    expect((await harbor("create-service", "recheck")).code).toBe(0);
    const set = await harbor("set-health-check", "recheck", "--check-interval", "2000", "--check-unhealthy", "3");
    expect(set.code, set.stderr).toBe(0);
    expect(set.stdout).toBe("Health check of recheck: interval_ms=2000 timeout_ms=1000 unhealthy_threshold=3 healthy_threshold=2 udp_probe=\n");
    expect((await json<{ health_check?: unknown }>("service", "recheck")).health_check).toEqual({ interval_ms: 2000, timeout_ms: 1000, unhealthy_threshold: 3, healthy_threshold: 2, udp_probe: "" });

    const before = await serverState();
    expectRefused(await harbor("set-health-check", "recheck"), 2, /give the new check \(--check-interval MS …\) or --none/);
    expectRefused(await harbor("set-health-check", "recheck", "--none", "--check-interval", "1000"), 2, /--none removes the check/);
    expectRefused(await harbor("set-health-check", "recheck", "--check-timeout", "100"), 2, /--check-timeout goes with --check-interval/);
    expectRefused(await harbor("set-health-check", "recheck", "--check-interval", "50"), 1, /health check: interval 50 ms is not valid/);
    expectRefused(await harbor("set-health-check", "no-such-service", "--none"), 1, /no port service named "no-such-service"/);
    expect(await serverState()).toEqual(before);

    const removed = await json<{ health_check?: unknown }>("set-health-check", "recheck", "--none");
    expect(removed.health_check).toBeUndefined();
    expect((await harbor("delete-service", "recheck")).code).toBe(0);
  });
});

describe("cli - output", () => {
  it("create-service and set-node print nested values readably, not [object Object]", async () => {
    const created = await harbor("create-service", "checked", "--check-interval", "1000", "--check-timeout", "300");
    expect(created.code, created.stderr).toBe(0);
    expect(created.stdout).not.toContain("[object Object]");
    expect(created.stdout).toMatch(/^health_check: +interval_ms=1000 timeout_ms=300 unhealthy_threshold=2 healthy_threshold=2 udp_probe=$/m);
    const node = await harbor("set-node", "n1", "--reserve", "31040-31041");
    expect(node.code, node.stderr).toBe(0);
    expect(node.stdout).not.toContain("[object Object]");
    expect(node.stdout).toMatch(/^blocked: +ports=31040-31041 reason=reserved$/m);
    expect((await harbor("set-node", "n1", "--clear-reserved")).code).toBe(0);
    expect((await harbor("delete-service", "checked")).code).toBe(0);
  });

  it("create-service names the protocols as the name asked for them", async () => {
    const both = await harbor("create-service", "both-names");
    expect(both.code, both.stderr).toBe(0);
    expect(both.stdout).toMatch(/^Created TCP\+UDP port service both-names: port \d+ on n1\n/);
    const udp = await harbor("create-service", "udp-names");
    expect(udp.stdout).toMatch(/^Created UDP port service udp-names/);
    for (const name of ["both-names", "udp-names"]) expect((await harbor("delete-service", name)).code).toBe(0);
  });

  it("env names the variables as the seed does: STACKATO_HARBOR for one service, STACKATO_HARBOR_<NAME> for several", async () => {
    const file = manifest("name: port-test\nservices:\n  udp-${name}: harbor\n  tcp-${name}: harbor\n  my-db: mysql\n");
    const one = await harbor("create-service", "debug-port", "--app", "solo-app");
    expect(one.code, one.stderr).toBe(0);
    const solo = await json<Record<string, string>>("env", "solo-app");
    expect(Object.keys(solo)).toEqual(["STACKATO_APP_NAME", "STACKATO_APP_NAME_UPCASE", "STACKATO_HARBOR", "STACKATO_SERVICES"]);
    expect(solo.STACKATO_HARBOR).toBe("4100");
    const credentials = JSON.parse(solo.STACKATO_SERVICES!)["debug-port"];
    expect(Object.keys(credentials)).toEqual(["hostname", "host", "port", "name", "node_id", "int_port"]);

    const applied = await json<Array<{ service_name: string; protocol: string; action: string }>>("apply", "-f", file);
    expect(applied.map((a) => [a.service_name, a.protocol, a.action])).toEqual([["udp-port-test", "udp", "created"], ["tcp-port-test", "tcp", "created"]]);
    const env = await json<Record<string, string>>("env", "port-test");
    expect(env).toMatchObject({ STACKATO_APP_NAME: "port-test", STACKATO_APP_NAME_UPCASE: "PORT_TEST", STACKATO_HARBOR_UDP_PORT_TEST: "4100", STACKATO_HARBOR_TCP_PORT_TEST: "4101" });
    expect(env).not.toHaveProperty("STACKATO_HARBOR");
    expect(Object.keys(JSON.parse(env.STACKATO_SERVICES!)).sort()).toEqual(["tcp-port-test", "udp-port-test"]);
    // The human form is the same variables, shell-quoted.
    const human = await harbor("env", "port-test");
    expect(human.stdout).toMatch(/^STACKATO_HARBOR_UDP_PORT_TEST=4100$/m);
    expect(human.stdout).toMatch(/^STACKATO_SERVICES='\{"tcp-port-test":/m);
    // Applying again changes nothing.
    expect((await json<Array<{ action: string }>>("apply", "-f", file)).map((a) => a.action)).toEqual(["unchanged", "unchanged"]);
  });
});

describe("cli - apply refuses a manifest it cannot honour, and changes nothing", () => {
  it("two services that are one (same name ignoring case, or after ${name})", async () => {
    const before = await serverState();
    expectRefused(await harbor("apply", "-f", manifest("name: twice\nservices:\n  game-port: harbor\n  Game-Port: harbor\n")), 2, /game-port.*Game-Port|Game-Port.*game-port/);
    expectRefused(await harbor("apply", "-f", manifest("name: twice\nservices:\n  udp-${name}: harbor\n  udp-twice: harbor\n")), 2, /udp-\$\{name\}.*udp-twice/);
    expect(await serverState()).toEqual(before);
  });

  it("a harbor service with a vendor it does not name right, or a name that is not a string", async () => {
    const before = await serverState();
    expectRefused(await harbor("apply", "-f", manifest("name: vend\nservices:\n  p1: harbor\n  p2: HARBOR\n")), 2, /:4: service p2: type "HARBOR" .*harbor/);
    expectRefused(await harbor("apply", "-f", manifest("name: vend\nservices:\n  p1: harbor\n  p3: { type: Harbor }\n")), 2, /:4: service p3: type "Harbor"/);
    expectRefused(await harbor("apply", "-f", manifest("name: vend\nservices:\n  p1: harbor\n  p4: { vendor: harbor }\n")), 2, /:4: service p4: .*type: harbor/);
    expectRefused(await harbor("apply", "-f", manifest("name: vend\nservices:\n  p1: harbor\n  ~: harbor\n")), 2, /:4: a service name must be a string/);
    expect(await serverState()).toEqual(before);
  });

  it("a harbor service at the manifest's top (no services: line) is said on stderr as a warning, and is no service", async () => {
    const before = await serverState();
    const run = await harbor("apply", "-f", manifest("name: stray\nmy-port: harbor\n"));
    expect(run.code).toBe(0);
    expect(run.stderr).toMatch(/^harbor: warning: .*:2: my-port: harbor is at the top of the manifest, not under services:/);
    expect(run.stderr.trimEnd().split("\n")).toHaveLength(1);
    expect(run.stdout).toMatch(/asks for no harbor service/);
    expect(await serverState()).toEqual(before);
  });

  it("a manifest the server refuses half-way: what it created or bound before is undone", async () => {
    // Leave exactly one free port on the node: the first new service takes it, the second finds none.
    const taken = new Set((await json<Array<{ port: number }>>("services")).map((s) => s.port));
    const free = Array.from({ length: RANGE.max - RANGE.min + 1 }, (_, i) => RANGE.min + i).filter((p) => !taken.has(p));
    const reserve = free.slice(1).map((p) => ["--reserve", String(p)]).flat();
    expect((await harbor("set-node", "n1", ...reserve)).code).toBe(0);
    try {
      const shared = await harbor("create-service", "shared-port", "--port", String(free[0]));
      expect(shared.code, shared.stderr).toBe(0);
      // Now no port is free: a manifest binding the existing service, then creating one, fails at the second.
      const before = await serverState();
      const run = await harbor("apply", "-f", manifest("name: half\nservices:\n  shared-port: harbor\n  new-port: harbor\n"));
      expectRefused(run, 1, /new-port: no free port on .*\(nothing changed: undid bound shared-port\)$/m);
      expect(await serverState()).toEqual(before);
      expect((await harbor("delete-service", "shared-port")).code).toBe(0);
      // And a created one is deleted again.
      const before2 = await serverState();
      const run2 = await harbor("apply", "-f", manifest("name: half\nservices:\n  first-port: harbor\n  second-port: harbor\n"));
      expectRefused(run2, 1, /second-port: no free port on .*\(nothing changed: undid created first-port\)$/m);
      expect(await serverState()).toEqual(before2);
    } finally {
      expect((await harbor("set-node", "n1", "--clear-reserved")).code).toBe(0);
    }
  });
});

describe("cli - watch", () => {
  const within = <T>(promise: Promise<T>, ms: number) =>
    Promise.race([promise, new Promise<never>((_, reject) => setTimeout(() => reject(new Error(`still running after ${ms} ms`)), ms))]);

  it("prints each event on the subject, one line each, until SIGINT", async () => {
    const prefix = uniqueName("hbw");
    const lines: string[] = [];
    const out = vi.spyOn(process.stdout, "write").mockImplementation((chunk) => (lines.push(String(chunk)), true));
    const err = vi.spyOn(process.stderr, "write").mockImplementation(() => true);
    try {
      const watching = watchEvents("backends.>", true, { NATS_URL: "nats://127.0.0.1:4222", HARBOR_NATS_PREFIX: prefix, LOG_LEVEL: "silent" });
      await waitFor(() => err.mock.calls.some(([c]) => String(c).includes(`watching ${prefix}.v1.backends.>`)), "the watch subscribed");
      bus.publish(`${prefix}.v1.backends.n1.s1`, JSON.stringify({ revision: "1" }));
      bus.publish(`${prefix}.v1.services.created.n1`, "{}");
      await waitFor(() => lines.length >= 1, "the event printed");
      process.emit("SIGINT");
      await within(watching, 5_000);
      expect(lines).toHaveLength(1);
      expect(JSON.parse(lines[0]!)).toMatchObject({ subject: `${prefix}.v1.backends.n1.s1`, payload: { revision: "1" } });
    } finally {
      out.mockRestore();
      err.mockRestore();
    }
  });

  it("an unreachable NATS_URL is one error, not retries forever", async () => {
    const err = await within(watchEvents(undefined, false, { NATS_URL: "nats://127.0.0.1:1", LOG_LEVEL: "silent" }), 8_000).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CliError);
    expect((err as CliError).message).toMatch(/cannot reach NATS at nats:\/\/127\.0\.0\.1:1/);
  });

  it("a subject NATS would refuse is a usage error before anything connects", async () => {
    for (const subject of ["a..b", "bad subj", "a.>.b", "a*"]) {
      const err = await within(watchEvents(subject, false, { NATS_URL: "nats://127.0.0.1:4222", LOG_LEVEL: "silent" }), 3_000).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CliError);
      expect(err).toMatchObject({ exitCode: 2 });
      expect((err as CliError).message).toMatch(/is not a NATS subject/);
    }
  });
});
