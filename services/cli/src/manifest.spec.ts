import { describe, expect, it } from "vitest";
import { parseManifest, resolveManifest } from "./manifest.js";

describe("manifest - stackato.yml", () => {
  it("reads the name, the harbor services (string or type:) and processes: web: ~", () => {
    const m = parseManifest(
      "name: port-test\nframework:\n  type: node\nmem: 64\nprocesses:\n  web: ~\nservices:\n  my-port: harbor\n  udp-${name}: { type: harbor }\n  db: mysql\n",
      "stackato.yml",
    );
    expect(m).toEqual({ file: "stackato.yml", name: "port-test", harborServices: ["my-port", "udp-${name}"], web: false, warnings: [] });
    expect(resolveManifest(m).services).toEqual(["my-port", "udp-port-test"]);
    expect(resolveManifest(m, "other").services).toEqual(["my-port", "udp-other"]);
  });

  it("has a web process unless it says otherwise, and may have no services", () => {
    expect(parseManifest("name: a\n", "f")).toMatchObject({ harborServices: [], web: true });
    expect(parseManifest('name: a\nprocesses:\n  web: "~"\n', "f")).toMatchObject({ web: false });
    // An app may be named harbor: that is not a service, nor worth a word.
    expect(parseManifest("name: harbor\n", "f")).toMatchObject({ name: "harbor", harborServices: [], warnings: [] });
    expect(parseManifest("name: a\nprocesses:\n  web: node server.js\nservices:\n", "f")).toMatchObject({ harborServices: [], web: true });
  });

  it("names the file and line of what is wrong", () => {
    expect(() => parseManifest("name: a\nservices:\n\tx: harbor\n", "m.yml")).toThrow(/^m\.yml:3: /);
    expect(() => parseManifest("- a\n- b\n", "m.yml")).toThrow(/m\.yml: expected a mapping at the top/);
    expect(() => parseManifest("name: a\nservices: [x]\n", "m.yml")).toThrow(/m\.yml:2: services must be a mapping/);
    expect(() => parseManifest("name: 5\n", "m.yml")).toThrow(/m\.yml:1: name must be a string/);
    // The seed's examples copied without their services: line: said, or the app would run without its port
    // unawares (only said: a key of the manifest's own may have the value harbor).
    const stray = parseManifest("name: harbor-test-app\ndescription: harbor\ncustom-cert-https: harbor\n", "m.yml");
    expect(stray.harborServices).toEqual([]);
    expect(stray.warnings).toEqual([
      "m.yml:2: description: harbor is at the top of the manifest, not under services:, so it is no harbor service; indent it under services: if it is meant as one",
      "m.yml:3: custom-cert-https: harbor is at the top of the manifest, not under services:, so it is no harbor service; indent it under services: if it is meant as one",
    ]);
    expect(() => resolveManifest(parseManifest("services:\n  x: harbor\n", "m.yml"))).toThrow(/no name: given/);
    expect(() => resolveManifest(parseManifest("name: a\nservices:\n  bad_name: harbor\n", "m.yml"))).toThrow(/service name "bad_name" is not valid/);
  });

  it("refuses harbor written another way, a name that is not a string, and two entries that are one service", () => {
    expect(() => parseManifest("name: a\nservices:\n  p: Harbor\n", "m.yml")).toThrow(/^m\.yml:3: service p: type "Harbor" is not harbor/);
    expect(() => parseManifest("name: a\nservices:\n  p: { vendor: harbor }\n", "m.yml")).toThrow(/^m\.yml:3: service p: give the vendor as type: harbor/);
    expect(() => parseManifest("name: a\nservices:\n  true: harbor\n", "m.yml")).toThrow(/^m\.yml:3: a service name must be a string/);
    // Other vendors, and entries with no vendor, are not Harbor's to judge.
    expect(parseManifest("name: a\nservices:\n  db: mysql\n  cache: { type: redis }\n  x: ~\n  7: harbor\n", "m.yml").harborServices).toEqual(["7"]);
    expect(() => resolveManifest(parseManifest("name: a\nservices:\n  my-port: harbor\n  MY-PORT: harbor\n", "m.yml"))).toThrow(/^m\.yml: services my-port and MY-PORT are one service/);
    expect(() => resolveManifest(parseManifest("name: a\nservices:\n  tcp-${name}: harbor\n  tcp-a: harbor\n", "m.yml"))).toThrow(/services tcp-\$\{name\} and tcp-a are one service, tcp-a/);
  });
});
