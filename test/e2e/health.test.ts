import dgram from "node:dgram";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { connectLines, freePort, startEchoBackend, startUdpEchoBackend, udpClient, waitFor, type EchoBackend } from "@harbor/testkit";
import { spread, type ServiceJson } from "./cluster.js";
import { startHarbor, type Harbor } from "./harbor.js";

let harbor: Harbor;
const cleanup: Array<() => unknown> = [];

beforeAll(async () => {
  harbor = await startHarbor({ env: { HARBOR_PASSIVE_EJECT_MS: "1000" } });
});

afterAll(async () => {
  for (const c of cleanup.reverse()) await c();
  await harbor?.stop();
});

async function echo(name: string, port = 0): Promise<EchoBackend> {
  const b = await startEchoBackend(name, port);
  cleanup.push(() => b.close());
  return b;
}

const register = async (app: string, id: string, port: number) => {
  const r = await harbor.cli("register-instance", app, id, "--host", "127.0.0.1", "--port", String(port));
  expect(r.code, r.stderr).toBe(0);
};

describe("e2e health - backends out of rotation and back", () => {
  it("passive: a backend that refuses is out of rotation for a while, then tried again", async () => {
    const service = await harbor.json<ServiceJson>("create-service", "passive-port", "--app", "passive");
    await echo("steady").then((b) => register("passive", "p-steady", b.port));
    const downPort = await freePort();
    await register("passive", "p-down", downPort);
    await waitFor(async () => (await spread(service.port, 4))["steady"] === 4, "every connection answered by the live backend");
    // Within the ejection period, connections go straight to the live one.
    expect(await spread(service.port, 6)).toEqual({ steady: 6 });
    await echo("back", downPort);
    await waitFor(async () => ((await spread(service.port, 4))["back"] ?? 0) > 0, "the recovered backend back in rotation");
    expect(harbor.logs()).toMatch(new RegExp(`"backend":"127.0.0.1:${downPort}"[^\\n]*"msg":"backend-ejected"`));
  });

  it("active TCP checks take a backend out before any client meets it, and bring it back", async () => {
    const service = await harbor.json<ServiceJson>("create-service", "checked-port", "--app", "checked", "--check-interval", "200", "--check-unhealthy", "1", "--check-healthy", "1");
    expect(service.health_check).toEqual({ interval_ms: 200, timeout_ms: 100, unhealthy_threshold: 1, healthy_threshold: 1, udp_probe: "" });
    await echo("good").then((b) => register("checked", "c-good", b.port));
    const laterPort = await freePort();
    await register("checked", "c-later", laterPort);
    await waitFor(() => new RegExp(`"backend":"127.0.0.1:${laterPort}"[^\\n]*"msg":"backend-unhealthy"`).test(harbor.logs()), "the check marking it unhealthy");
    expect(await spread(service.port, 4)).toEqual({ good: 4 });
    expect(harbor.logs()).not.toMatch(new RegExp(`"backend":"127.0.0.1:${laterPort}"[^\\n]*"msg":"backend-ejected"`));
    await echo("later", laterPort);
    await waitFor(() => new RegExp(`"backend":"127.0.0.1:${laterPort}"[^\\n]*"msg":"backend-healthy"`).test(harbor.logs()), "the check marking it healthy");
    expect(await spread(service.port, 4)).toEqual({ good: 2, later: 2 });
  });

  it("a check set, then removed, on a running service takes effect at once; open connections carry on", async () => {
    const service = await harbor.json<ServiceJson>("create-service", "rechecked-port", "--app", "rechecked");
    const good = await echo("kept");
    await register("rechecked", "r-good", good.port);
    const deadPort = await freePort();
    await register("rechecked", "r-dead", deadPort);
    const held = await waitFor(async () => {
      const c = await connectLines(service.port).catch(() => undefined);
      return c && (await c.nextLine()) === "kept" ? c : (c?.close(), undefined);
    }, "a connection through the port");
    cleanup.push(() => held.close());

    const set = await harbor.cli("set-health-check", "rechecked-port", "--check-interval", "200", "--check-unhealthy", "1", "--check-healthy", "1");
    expect(set.code, set.stderr).toBe(0);
    await waitFor(() => new RegExp(`"backend":"127.0.0.1:${deadPort}"[^\\n]*"msg":"backend-unhealthy"`).test(harbor.logs()), "the new check taking the dead backend out");
    expect(await held.roundTrip("still here")).toBe("still here");

    // Removed: the backend the check had taken out is back in rotation, so a connection meets its refusal again.
    const ejectedBefore = harbor.logs().match(new RegExp(`"backend":"127.0.0.1:${deadPort}"[^\\n]*"msg":"backend-ejected"`, "g"))?.length ?? 0;
    const removed = await harbor.cli("set-health-check", "rechecked-port", "--none");
    expect(removed.code, removed.stderr).toBe(0);
    await waitFor(async () => {
      await spread(service.port, 2);
      return (harbor.logs().match(new RegExp(`"backend":"127.0.0.1:${deadPort}"[^\\n]*"msg":"backend-ejected"`, "g"))?.length ?? 0) > ejectedBefore;
    }, "the dead backend back in rotation, ejected passively again");
    expect(harbor.logs()).toMatch(/"msg":"health-check-removed"/);
    expect(await held.roundTrip("and still")).toBe("and still");
  });

  it("UDP: when the primary stops answering the probe, the next takes over", async () => {
    const service = await harbor.json<ServiceJson>("create-service", "udp-probed", "--app", "probed", "--check-interval", "200", "--udp-probe", "ping");
    // A primary that stays bound (so no ICMP) but can fall silent.
    let silent = false;
    const primary = dgram.createSocket("udp4");
    primary.on("message", (msg, from) => {
      if (!silent) primary.send(`primary:${msg}`, from.port, from.address);
    });
    await new Promise<void>((r) => primary.bind(0, "127.0.0.1", () => r()));
    cleanup.push(() => primary.close());
    const second = await startUdpEchoBackend("second");
    cleanup.push(() => second.close());
    await register("probed", "u-primary", primary.address().port);
    await register("probed", "u-second", second.port);
    const client = await udpClient(service.port);
    cleanup.push(() => client.close());
    await waitFor(async () => (await client.ask("hello", 300).catch(() => undefined))?.text === "primary:hello", "the primary answering");
    silent = true;
    await waitFor(async () => (await client.ask("again", 300).catch(() => undefined))?.text === "second:again", "the second taking over", 10_000);
    expect(harbor.logs()).toMatch(new RegExp(`"backend":"127.0.0.1:${primary.address().port}"[^\\n]*"msg":"backend-unhealthy"`));
  });
});

