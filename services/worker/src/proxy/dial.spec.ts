import { describe, expect, it } from "vitest";
import { isLocalFailure } from "./dial.js";

const failure = (code: string, message = `connect ${code} 10.0.0.1:4100`) => Object.assign(new Error(message), { code });

describe("dial - whose failure a failed connect is", () => {
  it("running out of descriptors, local ports or memory is this host's, also as a relay's bare message", () => {
    for (const code of ["EMFILE", "ENFILE", "EADDRNOTAVAIL", "ENOBUFS", "ENOMEM"]) {
      expect(isLocalFailure(failure(code))).toBe(true);
      expect(isLocalFailure(new Error(`connect ${code} 10.0.0.1:4100 - Local (undefined:undefined)`))).toBe(true);
    }
  });

  it("a refusal, a reset, an unreachable host or a timeout is the backend's", () => {
    for (const code of ["ECONNREFUSED", "ECONNRESET", "EHOSTUNREACH", "ENETUNREACH", "ETIMEDOUT"]) expect(isLocalFailure(failure(code))).toBe(false);
    expect(isLocalFailure(new Error("connect timed out after 1000 ms"))).toBe(false);
  });
});
