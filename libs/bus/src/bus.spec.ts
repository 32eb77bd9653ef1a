import { pino } from "pino";
import { describe, expect, it } from "vitest";
import { subjectMatches } from "./bus.js";
import { InProcessBus } from "./memory.js";
import { ANY, createSubjects } from "./subjects.js";

describe("bus - subjects", () => {
  it("carry the deployment's prefix and version", () => {
    const s = createSubjects("blue");
    expect(s.backends("harbor_node_1", "abc")).toBe("blue.v1.backends.harbor_node_1.abc");
    expect(s.serviceCreated(ANY)).toBe("blue.v1.services.*.created");
    expect(s.all()).toBe("blue.v1.>");
  });

  it("refuse values that would change a subject's shape", () => {
    const s = createSubjects();
    expect(() => s.instanceUp("a.b")).toThrow(/not usable in a NATS subject/);
    expect(() => s.instanceUp(">")).toThrow();
    expect(() => createSubjects("a.b")).toThrow();
  });

  it("match NATS wildcards", () => {
    expect(subjectMatches("a.*.c", "a.b.c")).toBe(true);
    expect(subjectMatches("a.*.c", "a.b.d")).toBe(false);
    expect(subjectMatches("a.>", "a.b.c")).toBe(true);
    expect(subjectMatches("a.>", "a")).toBe(false);
    expect(subjectMatches("a.b", "a.b.c")).toBe(false);
  });
});

describe("bus - in-process", () => {
  it("delivers to matching subscribers and answers requests", async () => {
    const bus = new InProcessBus();
    const seen: string[] = [];
    bus.subscribe("x.*", (m) => seen.push(`${m.subject}=${m.data}`));
    bus.subscribe("svc", (m) => m.respond(`echo:${m.data}`));
    bus.publish("x.1", "a");
    bus.publish("y.1", "b");
    expect(await bus.request("svc", "hi", 1000)).toBe("echo:hi");
    await bus.flush();
    expect(seen).toEqual(["x.1=a"]);
    bus.subscribe("mute", () => undefined);
    await expect(bus.request("mute", "hi", 50)).rejects.toThrow(/no answer on mute within 50 ms/);
  });

  it("a request nobody subscribes to fails at once, as over NATS (no responders), not at its timeout", async () => {
    const bus = new InProcessBus();
    const started = Date.now();
    await expect(bus.request("nobody", "hi", 60_000)).rejects.toThrow(/no responders: 'nobody'/);
    expect(Date.now() - started).toBeLessThan(30_000);
  });
});

describe("bus - in-process, as over NATS", () => {
  it("a handler that throws is reported; the other subscribers and later messages still arrive", async () => {
    const lines: string[] = [];
    const bus = new InProcessBus(pino({ level: "info" }, { write: (line: string) => lines.push(line) }));
    const first: string[] = [];
    const second: string[] = [];
    bus.subscribe("x.*", (m) => {
      first.push(m.data);
      if (m.data === "boom") throw new Error("a handler bug");
    });
    bus.subscribe("x.>", (m) => second.push(m.data));
    for (const data of ["1", "boom", "2"]) bus.publish("x.y", data);
    await bus.flush();
    expect(first).toEqual(["1", "boom", "2"]);
    expect(second).toEqual(["1", "boom", "2"]);
    expect(lines.some((l) => l.includes('"msg":"bus-handler-failed"') && l.includes('"subject":"x.y"'))).toBe(true);
  });
});
