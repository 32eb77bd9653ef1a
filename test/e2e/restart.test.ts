import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { createTestDatabase, waitFor, type TestDatabase } from "@harbor/testkit";
import { reach, type ServiceJson } from "./cluster.js";
import { startHarbor, type Background, type Harbor } from "./harbor.js";

let db: TestDatabase | undefined;
const running: Array<Harbor | Background> = [];

afterAll(async () => {
  for (const r of running.reverse()) await r.stop();
  await db?.drop();
});

describe("e2e run - local instances", () => {
  it("harbor run keeps heartbeating through a restart of Harbor, is back in rotation as soon as Harbor is, and is deregistered when it exits", async () => {
    db = await createTestDatabase();
    const first = await startHarbor({ database: db });
    running.push(first);
    const dir = mkdtempSync(join(tmpdir(), "harbor-phoenix-"));
    writeFileSync(join(dir, "stackato.yml"), "name: phoenix\nprocesses:\n  web: ~\nservices:\n  phoenix-port: harbor\n");
    writeFileSync(
      join(dir, "server.mjs"),
      "import net from 'node:net';\nnet.createServer((s) => s.end('phoenix-' + process.env.INSTANCE_INDEX + '\\n')).listen(Number(process.env.STACKATO_HARBOR), '127.0.0.1');\n",
    );
    const run = first.spawnCli(["run", "--instances", "2", "--ttl", "3", "--", process.execPath, "server.mjs"], { cwd: dir });
    running.push(run);
    const service = await waitFor(() => first.json<ServiceJson>("service", "phoenix-port").catch(() => undefined), "the service from the manifest");
    await waitFor(async () => {
      const seen = new Set([await reach(service.port).catch(() => ""), await reach(service.port).catch(() => "")]);
      return seen.has("phoenix-0") && seen.has("phoenix-1");
      // A budget, not a measure: two instance processes start and register while the rest of the suite loads both cores.
    }, "both instances in rotation", 30_000);

    // Harbor goes away for longer than the TTL, then comes back on the same database.
    expect(await first.stop()).toBe(0);
    await new Promise((r) => setTimeout(r, 4_000));
    const second = await startHarbor({ database: db, like: first });
    running.push(second);
    await waitFor(async () => {
      const seen = new Set([await reach(service.port).catch(() => ""), await reach(service.port).catch(() => "")]);
      return seen.has("phoenix-0") && seen.has("phoenix-1");
    }, "both instances back in rotation", 15_000);

    // When harbor run stops, its instances stop and leave the rotation at once.
    expect(await run.stop("SIGINT")).toBe(0);
    const instances = await second.json<unknown[]>("instances", "phoenix");
    expect(instances).toEqual([]);
    expect(run.output()).toMatch(/phoenix\/0 exited/);
  }, 120_000);
});
