import { execFileSync } from "node:child_process";
import { afterEach, describe, expect, it } from "vitest";
import type { Backend } from "@harbor/proto";
import { createLogger } from "@harbor/runtime";
import { connectLines, freePort, startEchoBackend, startSilentPort, waitFor, type EchoBackend } from "@harbor/testkit";
import { DataPlaneCounters } from "../metrics.js";
import { nativeModule, type NativeModule } from "./native.js";
import { nativePairs, nodePairs, type PairCarrier } from "./pairs.js";
import type { RelayPool } from "./relays.js";
import { TcpListener, type TcpListenerOptions } from "./tcp.js";

const logger = createLogger("test", "silent");
// Both carriers run every test; "native" throws here, failing the file, when the module is not built.
const CARRIERS: PairCarrier[] = [nativePairs(nativeModule("native") as NativeModule), nodePairs];
const cleanup: Array<() => unknown> = [];

afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

/** A listening TcpListener on 127.0.0.1 over backends on 127.0.0.1 at `ports`, closed after the test. */
async function listenerOver(pairs: PairCarrier, ports: number[], options: Partial<TcpListenerOptions> = {}) {
  const set: Backend[] = ports.map((port, i) => ({ instanceId: `i${i}`, app: "a", host: "127.0.0.1", port, availableSince: undefined }));
  const counters = new DataPlaneCounters();
  const listener = new TcpListener({
    serviceId: "s",
    host: "127.0.0.1",
    port: await freePort(),
    backends: () => set,
    connectTimeoutMs: 1_000,
    maxConnections: 100,
    passiveEjectMs: 5_000,
    counters,
    logger,
    pairs,
    ...options,
  });
  expect(await listener.listen()).toBe(true);
  cleanup.push(() => listener.close());
  return { listener, counters };
}

/**
 * A pool whose relays are all restarting: it takes no connection. (Real
 * relays are forked from the built relay-main.js; the e2e-relays ring runs them.)
 */
function unavailableRelays(): RelayPool & { offered: number } {
  const pool = {
    offered: 0,
    register: () => 1,
    unregister: () => undefined,
    dispatch: () => {
      pool.offered++;
      return false;
    },
  };
  return pool as unknown as RelayPool & { offered: number };
}

describe.each(CARRIERS)("tcp listener ($name pairs) - no relay can take a connection", (pairs) => {
  it("the worker carries it itself, in the same exact turns", async () => {
    const backends: EchoBackend[] = [];
    for (const name of ["t0", "t1", "t2"]) {
      const b = await startEchoBackend(name);
      backends.push(b);
      cleanup.push(() => b.close());
    }
    const relays = unavailableRelays();
    const { listener, counters } = await listenerOver(pairs, backends.map((b) => b.port), { relays });

    const reached: Record<string, number> = {};
    for (let i = 0; i < 9; i++) {
      const client = await connectLines(listener.port);
      const name = await client.nextLine();
      reached[name] = (reached[name] ?? 0) + 1;
      expect(await client.roundTrip(`hello ${i}`)).toBe(`hello ${i}`);
      client.close();
    }
    expect(reached).toEqual({ t0: 3, t1: 3, t2: 3 });
    expect(relays.offered).toBe(9);
    expect(counters.tcpProxied).toBe(9);
    await waitFor(() => listener.connections === 0, "every connection closed");
  });
});

describe.each(CARRIERS)("tcp listener ($name pairs) - a backend that never answers", (pairs) => {
  it("is given up at the connect timeout: the next backend carries the connection, and the silent one is passed over after", async () => {
    const silent = await startSilentPort();
    cleanup.push(() => silent.close());
    const answering = await startEchoBackend("t1");
    cleanup.push(() => answering.close());
    const { listener, counters } = await listenerOver(pairs, [silent.port, answering.port], { connectTimeoutMs: 300, passiveEjectMs: 60_000 });

    for (let i = 0; i < 3; i++) {
      const client = await connectLines(listener.port);
      cleanup.push(() => client.close());
      expect(await client.nextLine()).toBe("t1");
    }
    // Only the first connection waited for the silent backend; it was ejected then.
    expect(counters.tcpBackendFailures).toBe(1);
    expect(counters.tcpProxied).toBe(3);
  });
});

describe.each(CARRIERS)("tcp listener ($name pairs) - peers that vanish", (pairs) => {
  it("both sockets of a proxied pair have TCP keep-alive on, so a dead peer is found and its pair closed", async () => {
    const b = await startEchoBackend("k0");
    cleanup.push(() => b.close());
    const { listener } = await listenerOver(pairs, [b.port]);
    const client = await connectLines(listener.port);
    cleanup.push(() => client.close());
    expect(await client.nextLine()).toBe("k0");
    // ss shows a keep-alive timer on a socket that has SO_KEEPALIVE: the worker's accepted socket
    // (local port = the listener's) and its upstream socket (remote port = the backend's).
    const timers = (filter: string) => execFileSync("ss", ["-tnoH", "state", "established", filter]).toString();
    expect(timers(`( sport = :${listener.port} )`)).toMatch(/timer:\(keepalive,/);
    expect(timers(`( dport = :${b.port} )`)).toMatch(/timer:\(keepalive,/);
  });
});
