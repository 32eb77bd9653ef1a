import { describe, expect, it } from "vitest";
import { Authenticator, OPERATOR, parseTokens, requireOperator } from "./auth.js";
import { PermissionDeniedError, UnauthenticatedError } from "./errors.js";
import { inNetworks, parseNetwork } from "./networks.js";

const OP = "op-0123456789abcdef";
const BLUE = "blue-0123456789abcdef";

describe("auth - tokens", () => {
  it("parses token=role entries and lists every bad one", () => {
    const { tokens, problems } = parseTokens(`${OP}=operator, ${BLUE}=space:blue\nagent-0123456789abcdef=agent:blue\n# a comment\nshort=operator,x-0123456789abcdef=root,y-0123456789abcdef=space:`);
    expect(tokens.get(OP)).toEqual(OPERATOR);
    expect(tokens.get(BLUE)).toEqual({ role: "space", space: "blue" });
    expect(tokens.get("agent-0123456789abcdef")).toEqual({ role: "agent", space: "blue" });
    expect(problems).toHaveLength(3);
    expect(problems[0]).toMatch(/at least 16 characters/);
    expect(problems[1]).toMatch(/"root" is not operator/);
  });

  it("without tokens every caller is an operator; with tokens a bearer token is needed", () => {
    expect(new Authenticator(new Map()).authenticate(undefined)).toEqual(OPERATOR);
    const auth = new Authenticator(parseTokens(`${OP}=operator,${BLUE}=space:blue`).tokens);
    expect(() => auth.authenticate(undefined)).toThrow(UnauthenticatedError);
    expect(() => auth.authenticate("Bearer nope")).toThrow(/not valid/);
    expect(() => auth.authenticate(BLUE)).toThrow(/not valid/);
    expect(auth.authenticate(`Bearer ${BLUE}`)).toEqual({ role: "space", space: "blue" });
    expect(() => requireOperator(auth.authenticate(`bearer ${BLUE}`), "changing nodes")).toThrow(PermissionDeniedError);
  });
});

describe("networks - backend addresses", () => {
  const networks = ["127.0.0.0/8", "10.0.0.0/8", "::1/128", "fc00::/7"].map((c) => parseNetwork(c)!);

  it("matches IPv4 and IPv6 addresses against CIDR networks", () => {
    expect(inNetworks("127.0.0.1", networks)).toBe(true);
    expect(inNetworks("10.255.1.2", networks)).toBe(true);
    expect(inNetworks("11.0.0.1", networks)).toBe(false);
    expect(inNetworks("8.8.8.8", networks)).toBe(false);
    expect(inNetworks("::1", networks)).toBe(true);
    expect(inNetworks("fd12:3456::1", networks)).toBe(true);
    expect(inNetworks("2001:db8::1", networks)).toBe(false);
    expect(inNetworks("::ffff:10.1.2.3", networks)).toBe(true);
    expect(inNetworks("not an ip", networks)).toBe(false);
    expect(inNetworks("::1.8.8.8", networks)).toBe(false);
  });

  it("rejects what is not a network", () => {
    expect(parseNetwork("10.0.0.0/33")).toBeUndefined();
    expect(parseNetwork("banana/8")).toBeUndefined();
    expect(parseNetwork("192.168.1.7")).toMatchObject({ bits: 32 });
  });
});
