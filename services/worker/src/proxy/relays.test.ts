import { execFileSync } from "node:child_process";
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { pino } from "pino";
import { afterEach, beforeAll, describe, expect, it } from "vitest";
import type { Backend } from "@harbor/proto";
import { createLogger } from "@harbor/runtime";
import { connectLines, freePort, startEchoBackend, waitFor, type EchoBackend } from "@harbor/testkit";
import { DataPlaneCounters } from "../metrics.js";
import { nativeModule, type NativeModule } from "./native.js";
import { RelayPool } from "./relays.js";
import { TcpListener } from "./tcp.js";

// Relays are forked from the built entry point (`npm test` builds first).
const RELAY_MAIN = fileURLToPath(new URL("../../dist/proxy/relay-main.js", import.meta.url));
const logger = createLogger("test", "silent");
const cleanup: Array<() => unknown> = [];

afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

async function backends(...names: string[]): Promise<EchoBackend[]> {
  const started: EchoBackend[] = [];
  for (const name of names) {
    const b = await startEchoBackend(name);
    started.push(b);
    cleanup.push(() => b.close());
  }
  return started;
}

const asSet = (bs: EchoBackend[]): Backend[] => bs.map((b, i) => ({ instanceId: `i${i}`, app: "a", host: "127.0.0.1", port: b.port, availableSince: undefined }));

/** `native`: the listener accepts with the module and hands descriptors over the relays' channels; `node`: Node's sockets and IPC. */
async function relayedListener(set: () => readonly Backend[], io: "native" | "node", host = "127.0.0.1", connectTimeoutMs = 1_000, poolLogger = logger) {
  const counters = new DataPlaneCounters();
  const native = io === "native" ? nativeModule("native") : undefined;
  const relays = new RelayPool(2, connectTimeoutMs, counters, poolLogger, native, RELAY_MAIN);
  await relays.start();
  cleanup.push(() => relays.stop(2_000));
  const listener = new TcpListener({
    serviceId: "s",
    host,
    port: await freePort(),
    backends: set,
    connectTimeoutMs,
    // Relays report ended connections every 100 ms: a limit near the tests' load would refuse some.
    maxConnections: 2_000,
    passiveEjectMs: 60_000,
    counters,
    logger,
    relays,
    native,
  });
  expect(await listener.listen()).toBe(true);
  cleanup.push(() => listener.close());
  return { listener, counters, relays };
}

/** This process's relay children, by pid. */
function relayChildren(): number[] {
  const pids: number[] = [];
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === process.pid && readFileSync(`/proc/${entry}/cmdline`, "utf8").includes("relay-main")) pids.push(Number(entry));
    } catch {
      // gone meanwhile
    }
  }
  return pids;
}

/** The largest control message a hand-off channel takes here (its send buffer's, as the pool reads it). */
function channelMaxBytes(): number {
  const native = nativeModule("native") as NativeModule;
  const ends = native.channel();
  if (typeof ends === "number") throw new Error(`socketpair: ${ends}`);
  native.close(ends[0]);
  native.close(ends[1]);
  return ends[2];
}

/** The pool's relays, as the pool keeps them (internals, read for the tests only). */
const relaysOf = (pool: RelayPool) => (pool as unknown as { relays: Array<{ unsent: unknown[]; channel: number | undefined; controlMaxBytes: number }> }).relays;
/** Control messages the pool holds for relays whose channels had no room. */
const waitingMessages = (pool: RelayPool): number => relaysOf(pool).reduce((n, relay) => n + relay.unsent.length, 0);
/** The worker's ends of the relays' hand-off channels. */
const channelsOf = (pool: RelayPool): number[] => relaysOf(pool).map((relay) => relay.channel as number);

/** A rotation of `backend` over and over, about `share` of what a hand-off channel holds when sent. */
function rotationFilling(backend: EchoBackend, share: number): Backend[] {
  // A rotation message carries each backend as {"host":…,"port":…} and a comma.
  const each = JSON.stringify({ host: "127.0.0.1", port: backend.port }).length + 1;
  const one = asSet([backend])[0] as Backend;
  return Array.from({ length: Math.ceil((share * channelMaxBytes()) / each) }, () => one);
}

/** Opens `count` connections one after another; which backend greeted each, and that each echoes. */
async function reach(port: number, count: number): Promise<Record<string, number>> {
  const reached: Record<string, number> = {};
  for (let i = 0; i < count; i++) {
    const client = await connectLines(port);
    const name = await client.nextLine();
    reached[name] = (reached[name] ?? 0) + 1;
    expect(await client.roundTrip(`hello ${i}`)).toBe(`hello ${i}`);
    client.close();
  }
  return reached;
}

beforeAll(() => {
  if (!existsSync(RELAY_MAIN)) throw new Error(`${RELAY_MAIN} is missing: build first (npm run build)`);
  // The relays inherit this process's environment.
  process.env.LOG_LEVEL = "silent";
});

// Clients go to the relays as descriptors and the module carries them (as where the worker has it built), or as Node sockets.
describe.each(["native", "node"] as const)("tcp listener with two relay processes (%s)", (io) => {
  it("keeps round-robin exact across the relays, and accounts for every connection and byte", async () => {
    const set = asSet(await backends("r0", "r1", "r2"));
    const { listener, counters } = await relayedListener(() => set, io);

    expect(await reach(listener.port, 9)).toEqual({ r0: 3, r1: 3, r2: 3 });
    // The relays report what they carried, and that each connection ended: "hello i\n" each way, and the greeting.
    await waitFor(() => counters.tcpProxied === 9 && listener.connections === 0, "the relays' reports");
    const sent = Array.from({ length: 9 }, (_, i) => `hello ${i}\n`.length).reduce((a, b) => a + b, 0);
    await waitFor(() => counters.tcpBytesToBackend === sent, "the byte counts");
    expect(counters.tcpBytesToClient).toBe(sent + 9 * "r0\n".length);
    // Every one went to a relay (harbor_worker_relay_handoffs_total).
    expect([counters.tcpToRelays, counters.tcpRelaysBusy]).toEqual([9, 0]);
  });

  it("carries 1,024 short connections, 32 at a time, clients speaking first, and loses no relay", async () => {
    const [b] = await backends("s0");
    const set = asSet([b as EchoBackend]);
    const { listener, counters } = await relayedListener(() => set, io);
    for (let round = 0; round < 32; round++) {
      await Promise.all(
        Array.from({ length: 32 }, async (_, i) => {
          const client = await connectLines(listener.port);
          // Sent before the greeting arrives: the relay has it waiting when it joins the pair.
          client.socket.write(`early ${i}\n`);
          expect(await client.nextLine()).toBe("s0");
          expect(await client.nextLine()).toBe(`early ${i}`);
          client.close();
        }),
      );
    }
    // A relay that died would lose its open connections from these counts.
    await waitFor(() => counters.tcpProxied === 1_024 && listener.connections === 0, "every connection carried and ended").catch((err: Error) => {
      throw new Error(`${err.message}: proxied ${counters.tcpProxied}, open ${listener.connections}`);
    });
  });

  it("stop cuts what is still open, and the relays' last reports count it", async () => {
    const [b] = await backends("k0");
    const { listener, counters, relays } = await relayedListener(() => asSet([b as EchoBackend]), io);
    const client = await connectLines(listener.port);
    expect(await client.nextLine()).toBe("k0");
    expect(await client.roundTrip("still open")).toBe("still open");
    await relays.stop(0);
    await client.closed;
    // Read from the reports that came before the relays exited: nothing is settled later.
    expect(listener.connections).toBe(0);
    expect(counters.tcpBytesToBackend).toBe("still open\n".length);
    expect(counters.tcpBytesToClient).toBe("k0\nstill open\n".length);
  });

  it("a relay that dies takes its open connections with it, the listener settles them, and new ones still go through", async () => {
    const before = relayChildren();
    const [b] = await backends("d0");
    const { listener } = await relayedListener(() => asSet([b as EchoBackend]), io);
    const mine = relayChildren().filter((pid) => !before.includes(pid));
    expect(mine).toHaveLength(2);
    // Connections alternate between the relays: two open ones are one in each.
    const clients = [await connectLines(listener.port), await connectLines(listener.port)];
    for (const client of clients) expect(await client.nextLine()).toBe("d0");
    expect(listener.connections).toBe(2);
    const closed = [false, false];
    clients.forEach((c, i) => void c.closed.then(() => (closed[i] = true)));
    process.kill(mine[0] as number, "SIGKILL");
    // One of the two is cut with its relay, and no longer counted open; the other carries on.
    await waitFor(() => listener.connections === 1 && closed.includes(true), "the dead relay's connection cut and settled");
    const survivor = clients[closed.indexOf(false)];
    expect(await survivor?.roundTrip("still here")).toBe("still here");
    expect(await reach(listener.port, 3)).toEqual({ d0: 3 });
  });

  it("sends a changed set to every relay before the next connection", async () => {
    const [a, b, c, d] = await backends("a", "b", "c", "d");
    let set = asSet([a as EchoBackend, b as EchoBackend]);
    const { listener } = await relayedListener(() => set, io);
    // Both relays have the first rotation (connections alternate between them).
    expect(await reach(listener.port, 4)).toEqual({ a: 2, b: 2 });

    set = asSet([c as EchoBackend, d as EchoBackend]);
    expect(await reach(listener.port, 4)).toEqual({ c: 2, d: 2 });
  });

  it("takes a backend a relay found refusing out of rotation for every relay", async () => {
    const [up, down] = await backends("up", "down");
    const set = asSet([up as EchoBackend, down as EchoBackend]);
    await (down as EchoBackend).close();
    const { listener, counters } = await relayedListener(() => set, io);

    // The relay that met the refusal went on to the next backend; the client never saw it.
    expect(await reach(listener.port, 6)).toEqual({ up: 6 });
    expect(listener.ejections.isEjected(`127.0.0.1:${(down as EchoBackend).port}`)).toBe(true);
    // Once ejected, no relay tries it again: one refusal in all.
    expect(counters.tcpBackendFailures).toBe(1);
  });
});

describe("tcp listener with relays taking descriptors", () => {
  it("passes clients on when a relay is behind (its channel full), and loses none", async () => {
    const before = relayChildren();
    const [b] = await backends("q0");
    // Hundreds of dials at once to one echo backend in this busy process: more than a second's connect time.
    const { listener, counters } = await relayedListener(() => asSet([b as EchoBackend]), "native", "127.0.0.1", 15_000);
    const [stalled] = relayChildren().filter((pid) => !before.includes(pid));
    process.kill(stalled as number, "SIGSTOP");
    cleanup.push(() => process.kill(stalled as number, "SIGCONT"));
    // Half go to the stalled relay in turn; its channel holds a few hundred (278 here), then the rest must go elsewhere.
    const total = 800;
    const clients = [];
    for (let i = 0; i < total; i += 100) clients.push(...(await Promise.all(Array.from({ length: 100 }, () => connectLines(listener.port)))));
    let greeted = 0;
    const greetings = clients.map((c) => c.nextLine(20_000).then((line) => (greeted++, line)));
    await waitFor(() => greeted > total / 2, "more than half greeted while one relay is stalled");
    expect(greeted).toBeLessThan(total);
    process.kill(stalled as number, "SIGCONT");
    // The stalled relay takes what waited in its channel: every client gets through.
    expect(new Set(await Promise.all(greetings))).toEqual(new Set(["q0"]));
    await Promise.all(clients.map(async (c, i) => expect(await c.roundTrip(`m${i}`)).toBe(`m${i}`)));
    for (const c of clients) c.close();
    expect(counters.tcpToRelays + counters.tcpRelaysBusy).toBe(total);
    await waitFor(() => counters.tcpProxied === total && listener.connections === 0, "every connection carried and ended").catch((err: Error) => {
      throw new Error(`${err.message}: proxied ${counters.tcpProxied}, open ${listener.connections}`);
    });
  });

  it("a rotation that finds a stalled relay's channel full waits, and reaches the relay before any client does", async () => {
    const before = relayChildren();
    const [first, second, third] = await backends("first", "second", "third");
    // Each rotation about 60 % of what a channel holds: the second fills it, the third finds no room.
    const rotationOf = (b: EchoBackend) => rotationFilling(b, 0.6);
    let set = rotationOf(first as EchoBackend);
    const { listener, counters, relays } = await relayedListener(() => set, "native");
    const stalled = relayChildren().filter((pid) => !before.includes(pid));
    expect(stalled).toHaveLength(2);
    for (const pid of stalled) process.kill(pid, "SIGSTOP");
    cleanup.push(() => stalled.forEach((pid) => process.kill(pid, "SIGCONT")));

    // One client per relay, each after its first rotation; they wait in the channels.
    const early = [await connectLines(listener.port), await connectLines(listener.port)];
    await waitFor(() => counters.tcpToRelays === 2, "both clients handed to the stalled relays");
    set = rotationOf(second as EchoBackend);
    const c2 = await connectLines(listener.port);
    set = rotationOf(third as EchoBackend);
    const c3 = await connectLines(listener.port);
    // The third rotation waits in the pool for both relays: the worker carried these two itself, with the set of their time.
    expect(await c2.nextLine()).toBe("second");
    expect(await c3.nextLine()).toBe("third");
    expect([counters.tcpToRelays, counters.tcpRelaysBusy]).toEqual([2, 2]);
    expect(waitingMessages(relays)).toBe(2);

    for (const pid of stalled) process.kill(pid, "SIGCONT");
    // The early clients kept the rotation they were sent with; every later one has the third, which got there first.
    expect(await Promise.all(early.map((c) => c.nextLine()))).toEqual(["first", "first"]);
    await waitFor(() => waitingMessages(relays) === 0, "the waiting rotations sent once the relays read again");
    expect(await reach(listener.port, 4)).toEqual({ third: 4 });
    expect(counters.tcpToRelays).toBe(6);
    for (const c of [...early, c2, c3]) c.close();
  });

  it("a rotation the channel refuses outright is not taken for sent: the worker carries those clients, and the next rotation goes to the relays", async () => {
    const before = relayChildren();
    const [big, small] = await backends("big", "small");
    let set = rotationFilling(big as EchoBackend, 1.5);
    const { listener, counters, relays } = await relayedListener(() => set, "native");
    // The pool's own size check refuses such a rotation before any send: lifted, the send itself fails (EMSGSIZE),
    // as any send that is not "no room now" does.
    for (const relay of relaysOf(relays)) relay.controlMaxBytes = Number.MAX_SAFE_INTEGER;
    const pids = relayChildren().filter((pid) => !before.includes(pid));

    // Each client's rotation is tried again and fails again: no relay gets a client it has no rotation for.
    expect(await reach(listener.port, 4)).toEqual({ big: 4 });
    expect([counters.tcpToRelays, counters.tcpRelaysBusy]).toEqual([0, 4]);
    set = asSet([small as EchoBackend]);
    expect(await reach(listener.port, 2)).toEqual({ small: 2 });
    expect(counters.tcpToRelays).toBe(2);
    expect(relayChildren().filter((pid) => !before.includes(pid))).toEqual(pids);
  });

  it("a relay that reads a malformed control message drops it and goes on carrying", async () => {
    const before = relayChildren();
    const set = asSet(await backends("m0", "m1"));
    const { listener, counters, relays } = await relayedListener(() => set, "native");
    expect(await reach(listener.port, 2)).toEqual({ m0: 1, m1: 1 });
    const pids = relayChildren().filter((pid) => !before.includes(pid));
    const native = nativeModule("native") as NativeModule;
    // Not JSON; JSON but no message; a rotation for this very listener that the relay would crash on at its next client.
    const garbage = ["{not json", "[1,2,3]", JSON.stringify({ t: "rotation", l: 1, b: "127.0.0.1:1" })];
    for (const channel of channelsOf(relays)) for (const text of garbage) expect(native.sendControl(channel, Buffer.from(text))).toBe(0);

    expect(await reach(listener.port, 4)).toEqual({ m0: 2, m1: 2 });
    expect(relayChildren().filter((pid) => !before.includes(pid))).toEqual(pids);
    expect([counters.tcpToRelays, counters.tcpRelaysBusy]).toEqual([6, 0]);
  });

  it("hands a client Node's sockets accepted (a listener on a host name) over the channel too, after its rotation", async () => {
    const set = asSet(await backends("h0", "h1"));
    const { listener, counters } = await relayedListener(() => set, "native", "localhost");
    expect(await reach(listener.port, 4)).toEqual({ h0: 2, h1: 2 });
    await waitFor(() => counters.tcpProxied === 4 && listener.connections === 0, "the relays' reports");
    // Accepted by Node's sockets, the client is given keep-alive (and Nagle off) before it goes, as a native listener's are.
    const client = await connectLines(listener.port);
    cleanup.push(() => client.close());
    expect(await client.nextLine()).toMatch(/^h[01]$/);
    expect(execFileSync("ss", ["-tnoH", "state", "established", `( sport = :${listener.port} )`]).toString()).toMatch(/timer:\(keepalive,/);
  });
});

describe("relay pool - descriptors over the channel", () => {
  it("a rotation too big for a relay's channel: the worker carries that listener's clients, and says why once per relay", async () => {
    const [b] = await backends("big");
    // Some 400 KB of JSON: more than a channel with the default send buffer takes in one message.
    const set = Array.from({ length: 12_000 }, () => asSet([b as EchoBackend])[0] as Backend);
    const events: Array<{ msg: string; err?: { message: string } }> = [];
    const watched = pino({ level: "info" }, { write: (line: string) => void events.push(JSON.parse(line)) });
    const { listener, counters } = await relayedListener(() => set, "native", "127.0.0.1", 1_000, watched);
    for (let i = 0; i < 10; i++) {
      const c = await connectLines(listener.port);
      expect(await c.nextLine()).toBe("big");
      expect(await c.roundTrip(`m${i}`)).toBe(`m${i}`);
      c.close();
    }
    expect([counters.tcpToRelays, counters.tcpRelaysBusy]).toEqual([0, 10]);
    const refused = events.filter((e) => e.msg === "relay-message-not-sent");
    expect(refused).toHaveLength(2);
    expect(refused[0]?.err?.message).toMatch(/-byte message is more than its channel takes \(\d+\)/);
  });
});

describe("relay pool", () => {
  it("restarts a relay that keeps dying young later each time: 0.5, 1, 2 s", async () => {
    // A relay that says it is ready, then dies at once, every time.
    const dir = mkdtempSync(join(tmpdir(), "harbor-relay-"));
    cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
    const dying = join(dir, "dying-relay.mjs");
    writeFileSync(dying, 'process.send({ t: "ready" }); setTimeout(() => process.exit(3), 20);\n');
    const restarts: number[] = [];
    const watched = pino({ level: "info" }, { write: (line: string) => {
      const entry = JSON.parse(line) as { msg: string; restartInMs?: number };
      if (entry.msg === "relay-died-restarting") restarts.push(entry.restartInMs as number);
    } });
    const relays = new RelayPool(1, 1_000, new DataPlaneCounters(), watched, undefined, dying);
    await relays.start();
    cleanup.push(() => relays.stop(1_000));
    await waitFor(() => restarts.length >= 3, "three deaths", 10_000);
    expect(restarts.slice(0, 3)).toEqual([500, 1_000, 2_000]);
  });

  it("a relay that died just before stop is not restarted after it: stop leaves no relay behind", async () => {
    const before = relayChildren();
    const events: string[] = [];
    const watched = pino({ level: "info" }, { write: (line: string) => void events.push(String(JSON.parse(line).msg)) });
    const relays = new RelayPool(2, 1_000, new DataPlaneCounters(), watched, undefined, RELAY_MAIN);
    await relays.start();
    const mine = relayChildren().filter((pid) => !before.includes(pid));
    expect(mine).toHaveLength(2);
    process.kill(mine[0]!, "SIGKILL");
    await waitFor(() => events.includes("relay-died-restarting"), "the pool to see it die");
    // Within the 500 ms before its restart.
    await relays.stop(1_000);
    await new Promise((r) => setTimeout(r, 800));
    expect(relayChildren().filter((pid) => !before.includes(pid))).toEqual([]);
  });
});
