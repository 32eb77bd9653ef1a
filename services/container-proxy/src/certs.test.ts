import { execFileSync } from "node:child_process";
import { chmodSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir, userInfo } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { certificateValidityProblem, checkCertificatePair, findCertificate } from "./certs.js";

function root(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), "harbor-certs-"));
  for (const [path, content] of Object.entries(files)) {
    mkdirSync(join(dir, path, ".."), { recursive: true });
    writeFileSync(join(dir, path), content);
  }
  return dir;
}

/** A self-signed certificate and its key, PEM (openssl, from the OS). */
function selfSigned(commonName: string, days = 2): { crt: string; key: string } {
  const dir = mkdtempSync(join(tmpdir(), "harbor-pem-"));
  execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", String(days), "-subj", `/CN=${commonName}`, "-keyout", join(dir, "k"), "-out", join(dir, "c")], {
    stdio: "ignore",
  });
  return { crt: readFileSync(join(dir, "c"), "utf8"), key: readFileSync(join(dir, "k"), "utf8") };
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

  it("a directory where a file should be is an error naming it", () => {
    const dir = root({ "certs/harbor.crt": "A", "certs/harbor.key/x": "a" });
    expect(() => findCertificate(dir, "x-https")).toThrow(/cannot read .*certs\/harbor\.key/);
  });
});

describe("container proxy - certificate contents", () => {
  const one = selfSigned("one.example");
  const two = selfSigned("two.example");

  it("a matching pair is used", () => {
    const dir = root({ "certs/harbor.crt": one.crt, "certs/harbor.key": one.key });
    expect(checkCertificatePair(findCertificate(dir, "x-https")).cert.toString()).toBe(one.crt);
  });

  it("a key that is not the certificate's key is an error naming both files", () => {
    const dir = root({ "certs/harbor.crt": one.crt, "certs/harbor.key": two.key });
    expect(() => checkCertificatePair(findCertificate(dir, "x-https"))).toThrow(/.*certs\/harbor\.key is not the private key of .*certs\/harbor\.crt/);
  });

  it("a certificate file that is not a PEM certificate is an error naming it", () => {
    const dir = root({ "certs/harbor.crt": "not a certificate\n", "certs/harbor.key": one.key });
    expect(() => checkCertificatePair(findCertificate(dir, "x-https"))).toThrow(/.*certs\/harbor\.crt is not a PEM certificate/);
  });

  it("a key file that is not a PEM private key is an error naming it", () => {
    const dir = root({ "certs/harbor.crt": one.crt, "certs/harbor.key": one.crt });
    expect(() => checkCertificatePair(findCertificate(dir, "x-https"))).toThrow(/.*certs\/harbor\.key is not a usable PEM private key/);
  });

  it("a key with a passphrase is an error naming it and saying how to remove the passphrase", () => {
    const dir = root({ "certs/harbor.crt": one.crt });
    execFileSync("openssl", ["pkey", "-aes256", "-passout", "pass:secret", "-out", join(dir, "certs/harbor.key")], { input: one.key, stdio: ["pipe", "ignore", "ignore"] });
    expect(() => checkCertificatePair(findCertificate(dir, "x-https"))).toThrow(/certs\/harbor\.key is protected by a passphrase.*openssl pkey/);
  });

  it("errors are one line", () => {
    const dir = root({ "certs/harbor.crt": one.crt, "certs/harbor.key": two.key });
    expect(() => checkCertificatePair(findCertificate(dir, "x-https"))).toThrow(/^[^\n]+$/);
  });
});

describe("container proxy - certificate validity", () => {
  const { crt, key } = selfSigned("dates.example");
  const pair = { certPath: "/app/certs/harbor.crt", keyPath: "/app/certs/harbor.key", cert: Buffer.from(crt), key: Buffer.from(key) };
  const day = 86_400_000;

  it("says nothing of a certificate with weeks to go; names one not valid yet", () => {
    const long = selfSigned("long.example", 60);
    expect(certificateValidityProblem({ ...pair, cert: Buffer.from(long.crt), key: Buffer.from(long.key) })).toBeUndefined();
    expect(certificateValidityProblem(pair, Date.now() - 30 * day)).toMatch(/is not valid until .*is this machine's clock right/);
  });

  it("names an expired certificate, and one about to expire, with its date", () => {
    expect(certificateValidityProblem(pair, Date.now() + 3 * day)).toMatch(/^\/app\/certs\/harbor\.crt expired on \d{4}-\d\d-\d\dT.*clients will refuse it/);
    expect(certificateValidityProblem(pair)).toMatch(/^\/app\/certs\/harbor\.crt expires on .*, in 1 day: replace it before then$/);
  });
});
