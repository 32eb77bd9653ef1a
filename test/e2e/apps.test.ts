import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freePort, waitFor } from "@harbor/testkit";
import { makeCertificate, tlsExchange } from "./certs.js";
import type { ServiceJson } from "./cluster.js";
import { startHarbor, type Background, type Harbor } from "./harbor.js";

let harbor: Harbor;
const background: Background[] = [];
const closers: Array<() => void> = [];

beforeAll(async () => {
  harbor = await startHarbor();
});

afterAll(async () => {
  for (const b of background) await b.stop();
  for (const c of closers) c();
  await harbor?.stop();
});

function appDir(manifest: string): string {
  const dir = mkdtempSync(join(tmpdir(), "harbor-app-"));
  writeFileSync(join(dir, "stackato.yml"), manifest);
  return dir;
}

/** The environment an instance started by `harbor run` sees, printed by the instance itself. */
async function instanceEnv(dir: string, extra: string[] = []): Promise<Record<string, string>> {
  const run = harbor.spawnCli(["run", ...extra, "--", process.execPath, "-e", "console.log('ENV ' + JSON.stringify(process.env)); setInterval(() => {}, 1000)"], { cwd: dir });
  background.push(run);
  const line = await waitFor(() => run.output().split("\n").find((l) => l.includes(" ENV {")), "the instance's environment");
  await run.stop();
  return JSON.parse(line.slice(line.indexOf("ENV ") + 4)) as Record<string, string>;
}

describe("e2e manifests - harbor apply", () => {
  it("udp-${name} and tcp-${name} are created and bound; the app sees STACKATO_HARBOR_<NAME> variables and no STACKATO_HARBOR; twice changes nothing", async () => {
    const dir = appDir("name: arena\nmem: 64\nprocesses:\n  web: ~\nservices:\n  udp-${name}: harbor\n  tcp-${name}: harbor\n  db: mysql\n");
    const first = await harbor.json<Array<ServiceJson & { action: string }>>("apply", "-f", join(dir, "stackato.yml"));
    expect(first.map((a) => [a.service_name, a.action, a.protocol])).toEqual([
      ["udp-arena", "created", "udp"],
      ["tcp-arena", "created", "tcp"],
    ]);
    const again = await harbor.json<Array<{ action: string }>>("apply", "-f", join(dir, "stackato.yml"));
    expect(again.map((a) => a.action)).toEqual(["unchanged", "unchanged"]);
    expect((await harbor.json<ServiceJson[]>("services", "--app", "arena")).length).toBe(2);

    const env = await harbor.json<Record<string, string>>("env", "arena");
    expect(env.STACKATO_HARBOR).toBeUndefined();
    expect(env.STACKATO_HARBOR_UDP_ARENA).toBe("4100");
    expect(env.STACKATO_HARBOR_TCP_ARENA).toBe("4101");
    expect(env.STACKATO_APP_NAME_UPCASE).toBe("ARENA");

    // An instance under `harbor run` gets its own ports in place of the int_ports, consistently.
    const seen = await instanceEnv(dir);
    expect(seen.STACKATO_HARBOR).toBeUndefined();
    expect(seen.PORT).toBeUndefined();
    expect(seen[`STACKATO_HARBOR_UDP_${seen.STACKATO_APP_NAME_UPCASE}`]).toBe(seen.STACKATO_HARBOR_UDP_ARENA);
    const services = JSON.parse(seen.STACKATO_SERVICES!) as Record<string, ServiceJson>;
    expect(String(services["udp-arena"]!.int_port)).toBe(seen.STACKATO_HARBOR_UDP_ARENA);
    expect(String(services["tcp-arena"]!.int_port)).toBe(seen.STACKATO_HARBOR_TCP_ARENA);
    expect(services["udp-arena"]!.int_port).not.toBe(services["tcp-arena"]!.int_port);
    expect(seen.INSTANCE_INDEX).toBe("0");
  });

  it("with one harbor service the app sees only STACKATO_HARBOR", async () => {
    const dir = appDir("name: solo\nservices:\n  my-port: harbor\n");
    expect((await harbor.cli("apply", "-f", join(dir, "stackato.yml"))).code).toBe(0);
    const env = await harbor.json<Record<string, string>>("env", "solo");
    expect(env.STACKATO_HARBOR).toBe("4100");
    expect(Object.keys(env).filter((k) => k.startsWith("STACKATO_HARBOR_"))).toEqual([]);
    const seen = await instanceEnv(dir);
    expect(Number(seen.STACKATO_HARBOR)).toBeGreaterThan(0);
    expect(Number(seen.PORT)).toBeGreaterThan(0);
  });

  it("a malformed manifest gets a message with its line and changes nothing", async () => {
    const before = (await harbor.json<ServiceJson[]>("services")).length;
    const dir = appDir("name: broken\nservices:\n  ok-port: harbor\n\tbad-port: harbor\nmem: 64\n");
    const result = await harbor.cli("apply", "-f", join(dir, "stackato.yml"));
    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/stackato\.yml:4: Tabs are not allowed as indentation/);
    expect(result.stderr.trim().split("\n")).toHaveLength(1);
    const badName = appDir("name: bad.name\nservices:\n  x: harbor\n");
    expect((await harbor.cli("apply", "-f", join(badName, "stackato.yml"))).stderr).toMatch(/app name "bad.name" is not valid/);
    expect((await harbor.cli("apply", "-f", "/nonexistent/stackato.yml")).stderr).toMatch(/cannot read \/nonexistent\/stackato.yml: no such file/);
    expect((await harbor.json<ServiceJson[]>("services")).length).toBe(before);
  });
});

describe("e2e https", () => {
  it("an …https service answers HTTPS with the app's certificate, certs/<name>.crt chosen over harbor.crt", async () => {
    const dir = appDir("name: secure\nservices:\n  custom-cert-https: harbor\n");
    makeCertificate(join(dir, "certs"), "custom-cert-https", "named.example");
    makeCertificate(join(dir, "certs"), "harbor", "fallback.example");
    writeFileSync(
      join(dir, "server.mjs"),
      "import http from 'node:http';\nhttp.createServer((q, s) => s.end('plain http behind ' + q.url)).listen(Number(process.env.PORT), '127.0.0.1');\n",
    );
    const run = harbor.spawnCli(["run", "--", process.execPath, "server.mjs"], { cwd: dir });
    background.push(run);
    // `harbor run` applies the manifest first: the service appears.
    const service = await waitFor(() => harbor.json<ServiceJson>("service", "custom-cert-https").catch(() => undefined), "the service to be created");
    expect(service.https_proxy).toBe(true);
    // Until the app listens on PORT the proxy answers 502: wait for the app's answer.
    const answer = await waitFor(async () => {
      const a = await tlsExchange(service.port, "GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").catch(() => undefined);
      return a?.received.startsWith("HTTP/1.1 200") ? a : undefined;
    }, "an HTTPS answer from the app through the port");
    expect(answer.commonName).toBe("named.example");
    expect(answer.received).toMatch(/^HTTP\/1\.1 200 OK/);
    expect(answer.received).toMatch(/plain http behind \/hello$/);
    await run.stop();
  });

  it("falls back to harbor.crt in cert/, and a missing certificate is a clear error at start naming the files", async () => {
    const dir = appDir("name: fallback\n");
    makeCertificate(join(dir, "cert"), "harbor", "fallback.example");
    const env = { HARBOR_PROXY_SERVICE: "other-https", HARBOR_PROXY_LISTEN_PORT: "0", HARBOR_PROXY_APP_PORT: "9", HARBOR_APP_ROOT: dir };
    const noPort = await harbor.cli("serve", "container-proxy");
    expect(noPort.code).toBe(2);
    expect(noPort.stderr).toMatch(/HARBOR_PROXY_SERVICE/);
    const empty = mkdtempSync(join(tmpdir(), "harbor-nocert-"));
    const missing = harbor.spawnCli(["serve", "container-proxy"], { env: { ...env, HARBOR_PROXY_LISTEN_PORT: "1", HARBOR_APP_ROOT: empty } });
    expect(await missing.stop("SIGCONT")).toBe(1);
    expect(missing.output()).toMatch(/no certificate for HTTPS service "other-https": looked for .*certs\/other-https\.crt.*cert\/harbor\.crt/);
    // A port of its own: other tests use 127.0.0.1:1 as a port where nothing listens.
    const port = await freePort();
    const fine = harbor.spawnCli(["serve", "container-proxy"], { env: { ...env, HARBOR_PROXY_LISTEN_PORT: String(port), HARBOR_APP_ROOT: dir, HARBOR_PROXY_LISTEN_HOST: "127.0.0.1" } });
    background.push(fine);
    await waitFor(() => /container-proxy-listening/.test(fine.output()), "the proxy listening, its certificate found");
    expect(fine.output()).not.toMatch(/no certificate/);
  });

  it("harbor run with a certificate missing for its second HTTPS service exits with the error, leaving nothing listening", async () => {
    const dir = appDir("name: twocerts\nservices:\n  first-https: harbor\n  second-https: harbor\n");
    makeCertificate(join(dir, "certs"), "first-https", "first.example");
    writeFileSync(join(dir, "server.mjs"), "setInterval(() => {}, 1000);\n");
    const run = harbor.spawnCli(["run", "--", process.execPath, "server.mjs"], { cwd: dir });
    background.push(run);
    // The first proxy was listening when the second failed: it used to keep `harbor run` alive for good.
    const code = await Promise.race([run.stop("SIGCONT"), new Promise<"still running">((r) => setTimeout(() => r("still running"), 20_000))]);
    expect(code).not.toBe("still running");
    expect(code).not.toBe(0);
    expect(run.output()).toMatch(/no certificate for HTTPS service "second-https"/);
  });

  it("HTTPS pass-through: an app serving TLS itself is reached unchanged", async () => {
    const dir = mkdtempSync(join(tmpdir(), "harbor-tls-"));
    const { cert, key } = makeCertificate(dir, "app", "passthrough.example");
    const server = tls.createServer({ cert, key }, (socket) => socket.pipe(socket));
    await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
    closers.push(() => server.close());
    const service = await harbor.json<ServiceJson>("create-service", "tls-direct", "--app", "tlsapp");
    const port = (server.address() as { port: number }).port;
    expect((await harbor.cli("register-instance", "tlsapp", "t-0", "--host", "127.0.0.1", "--port", String(port))).code).toBe(0);
    const answer = await waitFor(() => tlsExchange(service.port, "through harbor").catch(() => undefined), "TLS through the port");
    expect(answer).toEqual({ commonName: "passthrough.example", received: "through harbor" });
  });
});

describe("e2e operators - harbor watch", () => {
  it("prints the live events readably", async () => {
    const watch = harbor.spawnCli(["watch", "--json"]);
    background.push(watch);
    await waitFor(() => watch.output().includes("watching"), "watch to subscribe");
    await harbor.cli("create-service", "watched-port");
    const line = await waitFor(() => watch.output().split("\n").find((l) => l.includes(".services.harbor_node_1.created")), "the created event");
    const event = JSON.parse(line) as { subject: string; payload: { service: { serviceName: string }; sequence: string } };
    expect(event.subject).toBe(`${harbor.env.HARBOR_NATS_PREFIX}.v1.services.harbor_node_1.created`);
    expect(event.payload.service.serviceName).toBe("watched-port");
    expect(Number(event.payload.sequence)).toBeGreaterThan(0);
    expect(await watch.stop("SIGINT")).toBe(0);
  });
});
