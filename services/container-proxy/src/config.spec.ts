import { ConfigError } from "@harbor/core";
import { describe, expect, it } from "vitest";
import { loadContainerProxyConfig } from "./config.js";

function problems(env: Record<string, string>): string[] {
  try {
    loadContainerProxyConfig(env, "/app");
  } catch (err) {
    if (err instanceof ConfigError) return err.problems;
    throw err;
  }
  return [];
}

const GOOD = { HARBOR_PROXY_SERVICE: "custom-cert-https", HARBOR_PROXY_LISTEN_PORT: "4100", PORT: "8080" };

describe("container proxy - config", () => {
  it("reads the environment, PORT being the app's web port by default", () => {
    expect(loadContainerProxyConfig(GOOD, "/app")).toMatchObject({
      serviceName: "custom-cert-https",
      listenHost: "0.0.0.0",
      listenPort: 4100,
      appHost: "127.0.0.1",
      appPort: 8080,
      appRoot: "/app",
      handshakeTimeoutMs: 10_000,
      appConnectTimeoutMs: 5_000,
      drainTimeoutMs: 10_000,
    });
    expect(loadContainerProxyConfig({ ...GOOD, HARBOR_PROXY_APP_PORT: "9000", HARBOR_DRAIN_TIMEOUT_MS: "250", HARBOR_PROXY_APP_CONNECT_TIMEOUT_MS: "750" }, "/app")).toMatchObject({
      appPort: 9000,
      drainTimeoutMs: 250,
      appConnectTimeoutMs: 750,
    });
  });

  it("an unset variable is reported as required, naming it and what it is", () => {
    const found = problems({});
    expect(found).toHaveLength(3);
    expect(found[0]).toMatch(/^HARBOR_PROXY_SERVICE: required/);
    expect(found[1]).toMatch(/^HARBOR_PROXY_LISTEN_PORT: required .*int_port/);
    expect(found[2]).toMatch(/^HARBOR_PROXY_APP_PORT or PORT: required .*web port/);
    expect(found.join("\n")).not.toMatch(/ 0 is not valid/);
  });

  it("a malformed port is one problem, quoting the value given", () => {
    const found = problems({ ...GOOD, HARBOR_PROXY_LISTEN_PORT: "abc" });
    expect(found).toEqual([expect.stringMatching(/^HARBOR_PROXY_LISTEN_PORT=abc: expected a whole number from 1 to 65535/)]);
    expect(problems({ ...GOOD, HARBOR_PROXY_LISTEN_PORT: "0" })).toEqual([expect.stringMatching(/^HARBOR_PROXY_LISTEN_PORT=0: expected a whole number from 1 to 65535/)]);
  });

  it("PORT is not looked at when HARBOR_PROXY_APP_PORT is given", () => {
    expect(problems({ ...GOOD, PORT: "not-a-port", HARBOR_PROXY_APP_PORT: "9000" })).toEqual([]);
  });

  it("a bad service name says what a good one looks like", () => {
    expect(problems({ ...GOOD, HARBOR_PROXY_SERVICE: "bad name" })).toEqual([expect.stringMatching(/^HARBOR_PROXY_SERVICE=bad name: .*custom-cert-https/)]);
  });

  it("a proxy that would forward to its own port is refused", () => {
    expect(problems({ ...GOOD, PORT: "4100" })).toEqual([expect.stringMatching(/HARBOR_PROXY_LISTEN_PORT.*4100.*itself/)]);
    // Another app host: a different server, fine.
    expect(problems({ ...GOOD, PORT: "4100", HARBOR_PROXY_APP_HOST: "10.0.0.5" })).toEqual([]);
  });

  it("every problem is listed at once", () => {
    const found = problems({ HARBOR_PROXY_LISTEN_PORT: "99999", PORT: "x", HARBOR_PROXY_HANDSHAKE_TIMEOUT_MS: "5", HARBOR_DRAIN_TIMEOUT_MS: "-1" });
    expect(found.map((p) => p.split(/[=:]/)[0])).toEqual([
      "HARBOR_PROXY_SERVICE",
      "HARBOR_PROXY_LISTEN_PORT",
      "PORT",
      "HARBOR_PROXY_HANDSHAKE_TIMEOUT_MS",
      "HARBOR_DRAIN_TIMEOUT_MS",
    ]);
  });
});
