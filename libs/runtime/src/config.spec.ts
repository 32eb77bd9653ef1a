import { describe, expect, it } from "vitest";
import { ConfigError } from "@harbor/core";
import { EnvReader, parseAddress, parseRange } from "./config.js";

describe("config - env reader", () => {
  it("uses defaults and reads set values", () => {
    const r = new EnvReader({ A: "7", R: "100-200" });
    expect(r.int("A", 1)).toBe(7);
    expect(r.int("B", 1)).toBe(1);
    expect(r.range("R", { min: 1, max: 2 })).toEqual({ min: 100, max: 200 });
    r.finish();
  });

  it("lists every problem with its variable before failing", () => {
    const r = new EnvReader({ N: "x", R: "200-100", API: "nohost", B: "maybe" });
    r.int("N", 1);
    r.range("R", { min: 1, max: 2 });
    r.address("API", "127.0.0.1:1");
    r.bool("B", false);
    try {
      r.finish();
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(ConfigError);
      expect((err as ConfigError).problems.map((p) => p.split("=")[0])).toEqual(["N", "R", "API", "B"]);
    }
  });

  it("parses addresses and ranges", () => {
    expect(parseAddress("127.0.0.1:0")).toEqual({ host: "127.0.0.1", port: 0 });
    expect(parseAddress("[::1]:7300")).toEqual({ host: "::1", port: 7300 });
    expect(parseAddress("host:99999")).toBeUndefined();
    expect(parseRange("30000-32767")).toEqual({ min: 30000, max: 32767 });
    expect(parseRange("0-10")).toBeUndefined();
  });
});
