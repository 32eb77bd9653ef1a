import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort, startEchoBackend, waitFor, type EchoBackend } from "@harbor/testkit";
import { reach, type ServiceJson } from "./cluster.js";
import { HARBOR_BIN, startHarbor, type Harbor } from "./harbor.js";
import { spawnSync } from "node:child_process";
import { pino } from "pino";
import { NatsBus, createSubjects } from "@harbor/bus";

const OPERATOR = "op-token-0123456789abcdef";
const BLUE = "blue-token-0123456789abcdef";
const RED = "red-token-0123456789abcdef";
const BLUE_AGENT = "blue-agent-0123456789abcdef";

let harbor: Harbor;
let backend: EchoBackend | undefined;
let intruder: EchoBackend | undefined;

beforeAll(async () => {
  harbor = await startHarbor({
    env: {
      HARBOR_TOKENS: `${OPERATOR}=operator,${BLUE}=space:blue,${RED}=space:red,${BLUE_AGENT}=agent:blue`,
      HARBOR_SPACE_PORT_QUOTA: "2",
      // The echo backends listen on loopback; with tokens on, only a named loopback is a backend network.
      HARBOR_BACKEND_NETWORKS: "127.0.0.0/8",
    },
  });
});

afterAll(async () => {
  await backend?.close();
  await intruder?.close();
  await harbor?.stop();
});

const as = (token: string | undefined, ...args: string[]) => harbor.cli(...(token ? ["--token", token] : []), ...args);
async function json<T>(token: string, ...args: string[]): Promise<T> {
  const r = await as(token, ...args, "--json");
  if (r.code !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout) as T;
}

describe("e2e security - tokens and roles", () => {
  it("refuses callers without a valid token", async () => {
    const none = await as(undefined, "services");
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/^harbor: this Harbor needs a token: set HARBOR_TOKEN or pass --token/);
    expect((await as("wrong-token-0123456789", "services")).stderr).toMatch(/the token is not valid/);
  });

  it("a space creates, sees and binds only its own services; nodes are for operators; quotas hold", async () => {
    const mine = await json<ServiceJson>(BLUE, "create-service", "blue-port", "--app", "blue-app");
    expect(mine.service_name).toBe("blue-port");
    expect(await json<ServiceJson[]>(RED, "services")).toEqual([]);
    expect((await as(RED, "service", "blue-port")).stderr).toMatch(/no port service named "blue-port"/);
    expect((await as(RED, "bind-service", "blue-port", "red-app")).stderr).toMatch(/no port service named "blue-port"/);
    expect((await as(RED, "delete-service", "blue-port")).code).toBe(1);
    const stolen = await as(RED, "create-service", "red-port", "--app", "blue-app");
    expect(stolen.stderr).toMatch(/app "blue-app" belongs to another space/);
    expect((await as(RED, "env", "blue-app")).stderr).toMatch(/belongs to another space/);
    expect((await as(BLUE, "nodes")).stderr).toMatch(/listing nodes is for operators; this token belongs to space "blue"/);
    expect((await as(BLUE, "set-node", "harbor_node_1", "--private")).code).toBe(1);
    // The operator sees everything.
    expect((await json<ServiceJson[]>(OPERATOR, "services")).map((s) => s.service_name)).toEqual(["blue-port"]);
    // Quota: 2 ports per space.
    await json(BLUE, "create-service", "blue-second");
    const over = await as(BLUE, "create-service", "blue-third");
    expect(over.stderr).toMatch(/space "blue" holds 2 ports, its quota/);
    expect((await json<ServiceJson[]>(BLUE, "services")).length).toBe(2);
  });

  it("an instance agent registers only for its space's apps, only inside the backend networks; the worker still forwards", async () => {
    const service = await json<ServiceJson>(OPERATOR, "service", "blue-port");
    backend = await startEchoBackend("blue-0");
    const register = (token: string, app: string, host: string) =>
      as(token, "register-instance", app, `${app}-0`, "--host", host, "--port", String(backend!.port));
    expect((await register(BLUE, "blue-app", "127.0.0.1")).stderr).toMatch(/registering instances is for instance agents/);
    expect((await register(BLUE_AGENT, "red-app-x", "127.0.0.1")).code).toBe(0); // unclaimed: now blue's
    await json(RED, "create-service", "red-port");
    expect((await as(RED, "bind-service", "red-port", "red-app-x")).stderr).toMatch(/belongs to another space/);
    expect((await register(BLUE_AGENT, "blue-app", "8.8.8.8")).stderr).toMatch(/host 8\.8\.8\.8 is outside the backend networks \(127\.0\.0\.0\/8/);
    const ok = await register(BLUE_AGENT, "blue-app", "127.0.0.1");
    expect(ok.code, ok.stderr).toBe(0);
    // The in-process worker has a token of its own and keeps serving.
    await waitFor(async () => (await reach(service.port).catch(() => "")) === "blue-0", "traffic through blue-port");
    expect((await json<Array<{ app: string }>>(RED, "instances")).length).toBe(0);
    expect((await json<Array<{ app: string }>>(BLUE_AGENT, "instances")).map((i) => i.app).sort()).toEqual(["blue-app", "red-app-x"]);
  });

  it("with tokens on, NATS registrations are refused: nobody with NATS access registers or deregisters another space's instances", async () => {
    const service = await json<ServiceJson>(OPERATOR, "service", "blue-port");
    await waitFor(async () => (await reach(service.port).catch(() => "")) === "blue-0", "blue's own backend");
    intruder = await startEchoBackend("intruder-0");
    const bus = await NatsBus.connect({ url: harbor.env.NATS_URL!, logger: pino({ level: "silent" }) });
    try {
      const s = createSubjects(harbor.env.HARBOR_NATS_PREFIX);
      const ask = async (subject: string, body: unknown) => JSON.parse(await bus.request(subject, JSON.stringify(body), 5_000)) as Record<string, unknown>;
      const hijack = await ask(s.registerInstance(), { app: "blue-app", instanceId: "intruder-0", host: "127.0.0.1", ports: [{ intPort: 4100, port: intruder.port }] });
      expect(hijack.error).toMatch(/registration over NATS is off.*HARBOR_NATS_REGISTRATION/);
      const squat = await ask(s.registerInstance(), { app: "unclaimed-app", instanceId: "u-0", host: "127.0.0.1", ports: [] });
      expect(squat.error).toMatch(/registration over NATS is off/);
      const evict = await ask(s.deregisterInstance(), { app: "blue-app", instanceId: "blue-app-0" });
      expect(evict.error).toMatch(/registration over NATS is off/);
    } finally {
      await bus.close();
    }
    const instances = await json<Array<{ app: string; instance_id: string }>>(OPERATOR, "instances");
    expect(instances.map((i) => `${i.app}/${i.instance_id}`).sort()).toEqual(["blue-app/blue-app-0", "red-app-x/red-app-x-0"]);
    const seen = new Set<string>();
    for (let i = 0; i < 6; i++) seen.add(await reach(service.port));
    expect([...seen]).toEqual(["blue-0"]);
  });

  it("never logs a token", () => {
    for (const token of [OPERATOR, BLUE, RED, BLUE_AGENT]) expect(harbor.logs()).not.toContain(token);
  });
});

describe("e2e security - the node's loopback with tokens on", () => {
  it("is no backend network by default: a space cannot carry its port to the node's own Postgres", async () => {
    const RED_AGENT = "red-agent-0123456789abcdef";
    const other = await startHarbor({ env: { HARBOR_TOKENS: `${OPERATOR}=operator,${RED}=space:red,${RED_AGENT}=agent:red` } });
    try {
      const cli = (token: string, ...args: string[]) => other.cli("--token", token, ...args);
      const created = await cli(RED, "create-service", "red-port", "--app", "red-app", "--json");
      expect(created.code, created.stderr).toBe(0);
      const service = JSON.parse(created.stdout) as ServiceJson;
      const postgres = new URL(other.env.DATABASE_URL!).port || "5432";
      for (const host of ["127.0.0.1", "localhost"]) {
        const refused = await cli(RED_AGENT, "register-instance", "red-app", "red-0", "--host", host, "--port", postgres);
        expect(refused.code).toBe(1);
        expect(refused.stderr).toMatch(/is outside the backend networks \(10\.0\.0\.0\/8, .*\); an operator sets HARBOR_BACKEND_NETWORKS/);
      }
      expect(await other.json<unknown[]>("--token", OPERATOR, "instances")).toEqual([]);
      // No backend: the port closes the connection at once.
      expect(await reach(service.port).catch(() => "")).toBe("");
    } finally {
      await other.stop();
    }
  });
});

describe("e2e security - an API beyond loopback", () => {
  it("refuses to start without tokens unless the operator opts out", async () => {
    const port = await freePort();
    const refused = spawnSync(process.execPath, [HARBOR_BIN, "serve", "registry"], {
      env: { ...process.env, HARBOR_API: `0.0.0.0:${port}`, DATABASE_URL: "postgres://unused@127.0.0.1:1/x", HARBOR_TOKENS: "" },
      encoding: "utf8",
      timeout: 20_000,
    });
    expect(refused.status).toBe(2);
    expect(refused.stderr).toMatch(/HARBOR_API=0\.0\.0\.0:\d+: an API beyond loopback needs tokens .*HARBOR_ALLOW_INSECURE_API=true/);
  });
});
