import { describe, expect, it } from "vitest";
import { InvalidArgumentError } from "./errors.js";
import { envSuffix, expandAppName, protocolFromName, validateAppName, validatePort, validateServiceName, wantsHttpsProxy } from "./naming.js";

describe("naming - service names", () => {
  it("accepts the seed's names", () => {
    for (const name of ["debug-port", "my-port", "udp-debug-port", "both-debug-port", "custom-cert-https", "harbor-https-custom-1", "a"]) {
      expect(validateServiceName(name)).toBe(name);
    }
  });

  it("rejects names that cannot become env vars or subject tokens, saying what a good one looks like", () => {
    for (const name of ["", "-x", "x-", "has space", "dot.ted", "under_score", "é", "x".repeat(64)]) {
      expect(() => validateServiceName(name)).toThrow(InvalidArgumentError);
    }
    expect(() => validateServiceName("has space")).toThrow(/letters, digits and hyphens.*e\.g\. debug-port/);
  });

  it("app names allow underscores but not dots", () => {
    expect(validateAppName("port_test-1")).toBe("port_test-1");
    expect(() => validateAppName("a.b")).toThrow(/app name "a.b" is not valid/);
  });

  it("ports are 1-65535", () => {
    expect(validatePort(1)).toBe(1);
    expect(validatePort(65535)).toBe(65535);
    expect(() => validatePort(0)).toThrow(InvalidArgumentError);
    expect(() => validatePort(65536)).toThrow(/65536 is not valid/);
  });
});

describe("naming - protocol from the name", () => {
  it("udp prefix is UDP, both or multi is both, anything else TCP", () => {
    expect(protocolFromName("udp-debug-port")).toBe("udp");
    expect(protocolFromName("UDP-dns")).toBe("udp");
    expect(protocolFromName("both-debug-port")).toBe("both");
    expect(protocolFromName("multi-dns")).toBe("both");
    expect(protocolFromName("debug-port")).toBe("tcp");
    expect(protocolFromName("tcp-udp")).toBe("tcp");
  });

  it("https as suffix or whole hyphen-separated word asks for the container proxy", () => {
    expect(wantsHttpsProxy("custom-cert-https")).toBe(true);
    expect(wantsHttpsProxy("harbor-https-custom-1")).toBe(true);
    expect(wantsHttpsProxy("myhttps")).toBe(true);
    expect(wantsHttpsProxy("httpsish-port")).toBe(false);
    expect(wantsHttpsProxy("debug-port")).toBe(false);
  });
});

describe("naming - env var forms", () => {
  it("upper-cases and turns hyphens into underscores", () => {
    expect(envSuffix("udp-port")).toBe("UDP_PORT");
    expect(envSuffix("port-test")).toBe("PORT_TEST");
  });

  it("expands ${name} to the app name", () => {
    expect(expandAppName("udp-${name}", "game")).toBe("udp-game");
    expect(expandAppName("${name}-${name}", "a")).toBe("a-a");
    expect(expandAppName("plain", "a")).toBe("plain");
  });
});
