import { describe, expect, it } from "vitest";
import { BackendSet, PortService } from "@harbor/proto";
import { backendSetProblem, serviceProblem } from "./validate.js";

const ID = "0e01ec46-b3c1-4c6c-8d33-451f4451d8f7";

describe("worker - events from the bus are checked before they are applied", () => {
  it("a decoded but malformed backend set is refused", () => {
    const good = BackendSet.fromJSON({ serviceId: ID, revision: "3", backends: [{ host: "127.0.0.1", port: 5000 }] });
    expect(backendSetProblem(good)).toBeUndefined();
    expect(backendSetProblem(BackendSet.fromJSON({ serviceId: "x", revision: "3" }))).toMatch(/UUID/);
    expect(backendSetProblem(BackendSet.fromJSON({ serviceId: ID, revision: "abc" }))).toMatch(/revision/);
    expect(backendSetProblem(BackendSet.fromJSON({ serviceId: ID, revision: "3", backends: [{ host: {}, port: 1 }] }))).toMatch(/not an address/);
    expect(backendSetProblem(BackendSet.fromJSON({ serviceId: ID, revision: "3", backends: [{ host: "10.0.0.1", port: 70000 }] }))).toMatch(/port 70000/);
  });

  it("a service without a valid id, port or protocol is refused", () => {
    const base = { name: ID, port: 30000, protocol: "PROTOCOL_TCP" };
    expect(serviceProblem(PortService.fromJSON(base))).toBeUndefined();
    expect(serviceProblem(undefined)).toMatch(/no service/);
    expect(serviceProblem(PortService.fromJSON({ ...base, name: "" }))).toMatch(/UUID/);
    expect(serviceProblem(PortService.fromJSON({ ...base, port: 0 }))).toMatch(/port 0/);
    expect(serviceProblem(PortService.fromJSON({ ...base, protocol: 99 }))).toMatch(/protocol/);
  });
});
