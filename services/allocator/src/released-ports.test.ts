import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Authenticator, parseTokens } from "@harbor/core";
import type { PortAllocatorClient } from "@harbor/proto";
import { grpc, invoke, tokenMetadata, type RequestOf } from "@harbor/runtime";
import { startTestAllocator, type TestAllocator } from "./allocator.fixture.js";

// A released port is kept for its name in its own space: clients of a deleted
// service still point at its port, so another space must not inherit it by
// re-creating the name, nor learn the name from a refusal.
const BLUE = "blue-0123456789abcdef";
const RED = "red-0123456789abcdef";
let harness: TestAllocator;

const as = <M extends "createPortService" | "deletePortService">(token: string, method: M, request: RequestOf<PortAllocatorClient[M]>) =>
  invoke(harness.client, method, request, 5_000, tokenMetadata(token));

beforeAll(async () => {
  harness = await startTestAllocator(
    { HARBOR_NODE_ID: "n1", HARBOR_PORT_RANGE: "30000-30099" },
    new Authenticator(parseTokens(`${BLUE}=space:blue,${RED}=space:red`).tokens),
  );
});

afterAll(async () => {
  await harness?.stop();
});

describe("allocator - released ports and spaces", () => {
  it("another space neither learns the released name nor inherits the port by re-creating it; the space itself does", async () => {
    const { service } = await as(BLUE, "createPortService", { name: "blue-db", app: "", nodeId: "", port: 0 });
    const port = service!.port;
    await as(BLUE, "deletePortService", { name: "blue-db" });

    const fixed = (await as(RED, "createPortService", { name: "red-x", app: "", nodeId: "", port }).catch((e: unknown) => e)) as grpc.ServiceError;
    expect(fixed.code).toBe(grpc.status.FAILED_PRECONDITION);
    expect(fixed.details).toMatch(new RegExp(`^port ${port} on node n1 was released by another space's service and is kept for it until`));
    expect(fixed.details).not.toContain("blue-db");

    const squat = await as(RED, "createPortService", { name: "blue-db", app: "", nodeId: "", port: 0 });
    expect(squat.service!.port).not.toBe(port);
    const squatAgain = (await as(RED, "createPortService", { name: "blue-db-2", app: "", nodeId: "", port }).catch((e: unknown) => e)) as grpc.ServiceError;
    expect(squatAgain.code).toBe(grpc.status.FAILED_PRECONDITION);
    await as(RED, "deletePortService", { name: "blue-db" });

    const back = await as(BLUE, "createPortService", { name: "blue-db", app: "", nodeId: "", port: 0 });
    expect(back.service!.port).toBe(port);
  });
});
