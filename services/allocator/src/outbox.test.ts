import { afterAll, afterEach, beforeAll, describe, expect, it } from "vitest";
import { NatsBus, createSubjects, type Bus } from "@harbor/bus";
import { createPool, migrate, type Pool } from "@harbor/db";
import { createLogger } from "@harbor/runtime";
import { createTestDatabase, startNatsLink, uniqueName, waitFor, type TestDatabase } from "@harbor/testkit";
import { allocatorMigrations } from "./migrations.js";
import { OutboxRelay } from "./outbox.js";

const logger = createLogger("test", "silent");
let db: TestDatabase;
let pool: Pool;
let observer: Bus;

const cleanups: Array<() => Promise<unknown>> = [];

beforeAll(async () => {
  db = await createTestDatabase();
  pool = createPool({ url: db.url, logger, max: 10 });
  await migrate(pool, "allocator", allocatorMigrations, logger);
  observer = await NatsBus.connect({ url: "nats://127.0.0.1:4222", logger });
});

afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => undefined);
  await pool.query("DELETE FROM outbox");
});

afterAll(async () => {
  await observer?.close();
  await pool?.end();
  await db?.drop();
});

/** A relay over a bus that reaches NATS through a proxy the test controls, and what an observer on NATS saw of it. */
async function relayThroughProxy() {
  const proxy = await startNatsLink();
  const bus = await NatsBus.connect({ url: proxy.url, logger });
  const subjects = createSubjects(uniqueName("hbo"));
  const relay = new OutboxRelay(pool, bus, subjects, logger, 100, () => ({}));
  const seen: number[] = [];
  const sub = observer.subscribe(subjects.nodeUpdated("n1"), (m) => seen.push(Number((JSON.parse(m.data) as { n: number }).n)));
  await observer.flush();
  // Run in reverse: the relay stops, then NATS goes away for good, then the bus closes.
  cleanups.push(
    () => bus.close(),
    () => proxy.close(),
    async () => sub.unsubscribe(),
    () => relay.stop(),
  );
  return { proxy, bus, relay, seen };
}

/** Writes events n = from..to, one transaction each, as the allocator does. */
async function writeEvents(from: number, to: number): Promise<void> {
  for (let n = from; n <= to; n++) await pool.query("INSERT INTO outbox (event, node_id, payload) VALUES ('node.updated', 'n1', $1)", [JSON.stringify({ n })]);
}

const pending = async () => (await pool.query<{ n: number }>("SELECT count(*)::int AS n FROM outbox")).rows[0]!.n;

describe("outbox - NATS away", () => {
  it("events written while NATS is down are relayed when it is back: none lost, in order", async () => {
    const { proxy, relay, bus, seen } = await relayThroughProxy();
    await relay.start();
    await writeEvents(1, 3);
    // Confirmed and deleted, not only received: a cut before the relay read NATS's answer would put them back.
    await waitFor(async () => seen.length === 3 && (await pending()) === 0, "the first events relayed and confirmed");

    proxy.cut();
    await waitFor(() => !bus.isConnected(), "the disconnect");
    await writeEvents(4, 10);
    await new Promise((r) => setTimeout(r, 500));
    expect(await pending()).toBe(7);

    proxy.restore();
    await waitFor(async () => (await pending()) === 0, "an empty outbox");
    await waitFor(() => seen.includes(10), "the events written during the outage");
    expect(seen).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  });

  it("after a flush NATS did not confirm, the relay waits for NATS to answer before it publishes again", async () => {
    const { proxy, relay, seen } = await relayThroughProxy();
    await relay.start();
    // NATS stops answering; the client still counts as connected (it notices after minutes of missed pings).
    proxy.stall();
    await writeEvents(1, 2);
    // Past one flush timeout (2 s) and several passes, with events written in between.
    await new Promise((r) => setTimeout(r, 2_500));
    await writeEvents(3, 3);
    await new Promise((r) => setTimeout(r, 2_500));
    // Nothing confirmed, nothing deleted.
    expect(await pending()).toBe(3);

    // The network comes back before the client gave up: what was held reaches NATS.
    proxy.heal();
    await waitFor(async () => (await pending()) === 0, "an empty outbox");
    await waitFor(() => seen.includes(3), "every event");
    await new Promise((r) => setTimeout(r, 300));
    // At least once, and no more than once for the unconfirmed publish plus
    // once for the confirmed one: a batch is not published again and again
    // into a connection that has not answered.
    for (const n of [1, 2, 3]) expect(seen.filter((s) => s === n).length).toBeLessThanOrEqual(2);
    // The last copy of each event comes in order.
    const lastCopies = [...new Set([...seen].reverse())].reverse();
    expect(lastCopies).toEqual([1, 2, 3]);
  });
});

describe("outbox - stopping", () => {
  it("stop() leaves no relay pass running behind it", async () => {
    const { proxy, relay } = await relayThroughProxy();
    await relay.start();
    proxy.stall();
    await writeEvents(1, 1);
    // A pass (the timer's, within 100 ms) takes the row and waits for NATS to confirm, up to 2 s;
    // a commit meanwhile asks for one more pass.
    await new Promise((r) => setTimeout(r, 500));
    await writeEvents(2, 2);
    relay.kick();
    await relay.stop();
    // Nothing of the relay's still holds the rows: no pass outlived stop().
    const client = await pool.connect();
    try {
      await client.query("BEGIN");
      const { rows } = await client.query("SELECT id FROM outbox FOR UPDATE NOWAIT");
      expect(rows.length).toBe(2);
    } finally {
      await client.query("ROLLBACK");
      client.release();
    }
  });
});
