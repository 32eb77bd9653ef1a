import { chmodSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { findCertificate } from "./certs.js";

function root(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), "harbor-certs-"));
  for (const [path, content] of Object.entries(files)) {
    mkdirSync(join(dir, path, ".."), { recursive: true });
    writeFileSync(join(dir, path), content);
  }
  return dir;
}

describe("container proxy - certificate lookup", () => {
  it("prefers certs/<service>.crt over certs/harbor.crt", () => {
    const dir = root({ "certs/web-https.crt": "A", "certs/web-https.key": "a", "certs/harbor.crt": "B", "certs/harbor.key": "b" });
    expect(findCertificate(dir, "web-https").cert.toString()).toBe("A");
    expect(findCertificate(dir, "other-https").cert.toString()).toBe("B");
  });

  it("accepts a cert/ folder too", () => {
    const dir = root({ "cert/harbor.crt": "C", "cert/harbor.key": "c" });
    expect(findCertificate(dir, "x-https").certPath).toBe(join(dir, "cert/harbor.crt"));
  });

  it("names every file it looked for when there is none", () => {
    const dir = root({});
    expect(() => findCertificate(dir, "x-https")).toThrow(/no certificate for HTTPS service "x-https": looked for .*certs\/x-https\.crt.*cert\/x-https\.crt.*certs\/harbor\.crt.*cert\/harbor\.crt/);
  });

  it("a pair with one half missing is an error naming both", () => {
    const dir = root({ "certs/x-https.crt": "A" });
    expect(() => findCertificate(dir, "x-https")).toThrow(/found .*certs\/x-https\.crt but not .*certs\/x-https\.key/);
  });

  it.skipIf(userInfo().uid === 0)("an unreadable file is an error naming it", () => {
    const dir = root({ "certs/harbor.crt": "A", "certs/harbor.key": "a" });
    chmodSync(join(dir, "certs/harbor.key"), 0o000);
    expect(() => findCertificate(dir, "x-https")).toThrow(/cannot read .*harbor\.key/);
  });
});
