import { execFileSync } from "node:child_process";
import { afterAll, describe, expect, it } from "vitest";
import { connectLines, createTestDatabase, startEchoBackend, waitFor, type EchoBackend, type TestDatabase } from "@harbor/testkit";
import { reach, type ServiceJson } from "./cluster.js";
import { startHarbor, type Background, type Harbor } from "./harbor.js";

/** Kernel mode through the worker, where tcp.test.ts and udp.test.ts (the e2e-kernel ring) do not reach. */
function nftablesUsable(): boolean {
  try {
    execFileSync("nft", ["list", "tables"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

const KERNEL = { HARBOR_WORKER_MODE: "kernel" };

async function reachAt(port: number, host: string): Promise<string> {
  const client = await connectLines(port, host);
  try {
    return await client.nextLine();
  } finally {
    client.close();
  }
}
const tables = () => execFileSync("nft", ["list", "tables"]).toString();
let db: TestDatabase | undefined;
const running: Array<Harbor | Background> = [];
const backends: EchoBackend[] = [];
const strays: string[] = [];

afterAll(async () => {
  for (const name of strays) {
    try {
      execFileSync("nft", ["delete", "table", "ip", name], { stdio: "ignore" });
    } catch {
      // already gone
    }
  }
  for (const r of running.reverse()) await r.stop();
  for (const b of backends) await b.close();
  await db?.drop();
});

describe.skipIf(!nftablesUsable())("e2e kernel - restarts", () => {
  it("a worker killed with -9 leaves its table carrying traffic; its restart rewrites it whole with every port, and one table remains", async () => {
    db = await createTestDatabase();
    const first = await startHarbor({ database: db, env: KERNEL });
    running.push(first);
    const names = ["k0", "k1", "k2", "k3"];
    const ports: number[] = [];
    for (const name of names) {
      const service = await first.json<ServiceJson>("create-service", `${name}-port`, "--app", name);
      const backend = await startEchoBackend(name);
      backends.push(backend);
      expect((await first.cli("register-instance", name, `${name}-0`, "--host", "127.0.0.1", "--port", String(backend.port))).code).toBe(0);
      ports.push(service.port);
    }
    for (const [i, port] of ports.entries()) await waitFor(async () => (await reach(port).catch(() => "")) === names[i], `${names[i]} in rotation`);
    const table = /table ip (harbor_\w+)/.exec(tables().split("\n").find((l) => l.includes(first.env.HARBOR_NATS_PREFIX!.replace(/\W/g, "_"))) ?? "")?.[1];
    expect(table).toBeDefined();

    // The process is gone, its rules are not: the kernel still carries every port.
    await first.kill("SIGKILL");
    for (const [i, port] of ports.entries()) expect(await reach(port)).toBe(names[i]);

    // A table another deployment left (another NATS prefix): named at start, not deleted.
    const stray = `harbor_stray_${process.pid}`;
    execFileSync("nft", ["add", "table", "ip", stray]);
    strays.push(stray);

    const second = await startHarbor({ database: db, like: first, env: KERNEL });
    running.push(second);
    await waitFor(() => /"whole":true[^\n]*"msg":"nftables-applied"/.test(second.logs()), "the table written");
    expect(second.logs()).toMatch(new RegExp(`"others":\\[[^\\]]*"${stray}"[^\n]*"msg":"other-harbor-nftables-tables-on-host"`));
    expect(tables()).toContain(stray);
    // The first write after the restart holds every port: none went without its rule in between.
    const firstWrite = /"ports":(\d+),"whole":true[^\n]*"msg":"nftables-applied"/.exec(second.logs());
    expect(Number(firstWrite?.[1])).toBe(ports.length);
    for (const [i, port] of ports.entries()) expect(await reach(port)).toBe(names[i]);
    expect(tables().split("\n").filter((l) => l.includes(table!))).toHaveLength(1);

    // The node's host changes: the rules move to it in one whole write, every port in it.
    const range = `${second.range.min}-${second.range.max}`;
    expect((await second.cli("set-node", "harbor_node_1", "--range", range, "--host", "127.0.0.2")).code).toBe(0);
    await waitFor(() => /"msg":"listen-host-changed"[^]*"whole":true[^\n]*"msg":"nftables-applied"/.test(second.logs()), "the table rewritten for the new host");
    const rewrite = /"msg":"listen-host-changed"[^]*?"ports":(\d+),"whole":true[^\n]*"msg":"nftables-applied"/.exec(second.logs());
    expect(Number(rewrite?.[1])).toBe(ports.length);
    for (const [i, port] of ports.entries()) expect(await reachAt(port, "127.0.0.2")).toBe(names[i]);

    expect(await second.stop()).toBe(0);
    expect(tables()).not.toContain(table!);
  });

  it("HARBOR_WORKER_LISTEN_HOST=0.0.0.0 is refused at start with a line that says why (no packet is sent to 0.0.0.0)", async () => {
    const harbor = await startHarbor({ env: KERNEL });
    running.push(harbor);
    const worker = harbor.spawnCli(["serve", "worker"], { env: { HARBOR_NODE_ID: "edge-k", HARBOR_WORKER_LISTEN_HOST: "0.0.0.0" } });
    running.push(worker);
    const exited = await Promise.race([
      new Promise<number | null>((resolve) => (worker.child.exitCode !== null ? resolve(worker.child.exitCode) : worker.child.once("exit", resolve))),
      new Promise<"running">((resolve) => setTimeout(() => resolve("running"), 15_000)),
    ]);
    expect(exited).not.toBe("running");
    expect(exited).not.toBe(0);
    expect(worker.output()).toMatch(/HARBOR_WORKER_LISTEN_HOST to be the IPv4 address clients connect to, not 0\.0\.0\.0/);
  });
});
