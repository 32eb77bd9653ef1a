import type { Logger } from "pino";
import type { Bus, Subjects } from "@harbor/bus";
import { withTransaction, type Pool } from "@harbor/db";
import type { Component } from "@harbor/runtime";
import type { OutboxEvent, ServiceRow } from "./store.js";

/** Exactly one of `payload` (rendered) and `service` (a snapshot to render) is set. */
interface OutboxRow {
  id: string;
  event: OutboxEvent;
  node_id: string;
  payload: Record<string, unknown> | null;
  service: ServiceRow | null;
}

const BATCH = 200;
const FLUSH_TIMEOUT_MS = 2_000;

/**
 * Relays outbox rows to NATS at least once: the transaction that takes rows
 * (SKIP LOCKED lets replicas share the work) commits their deletion only
 * after the bus has flushed them. This allocator's commits wake it (`kick`); a
 * timer picks up rows any other replica wrote. Each event carries its row id
 * as `sequence`.
 */
export class OutboxRelay implements Component {
  readonly name = "outbox-relay";
  private timer: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;
  private again = false;
  private stopped = false;
  private stopping: Promise<void> | undefined;
  /**
   * Set when NATS did not confirm a batch. The batch stays in the outbox, but
   * it may still reach NATS (a network that held it, then came back): until
   * NATS answers a flush, nothing more is published, or every pass would add
   * another copy of the batch behind the unanswered one.
   */
  private unconfirmed = false;

  constructor(
    private readonly pool: Pool,
    private readonly bus: Bus,
    private readonly subjects: Subjects,
    private readonly logger: Logger,
    private readonly pollMs: number,
    /** Renders a row written as a service snapshot. */
    private readonly renderSnapshot: (service: ServiceRow) => Record<string, unknown>,
  ) {}

  async start(): Promise<void> {
    this.timer = setInterval(() => this.kick(), this.pollMs);
    this.kick();
  }

  /** Relays soon; calls while a pass runs schedule one more pass. */
  kick(): void {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = this.drain().finally(() => {
      this.running = undefined;
      if (this.again) {
        this.again = false;
        this.kick();
      }
    });
  }

  private async drain(): Promise<void> {
    try {
      if (this.unconfirmed) {
        if (!this.bus.isConnected()) return;
        await withTimeout(this.bus.flush(), FLUSH_TIMEOUT_MS, "NATS has not answered since it left an outbox batch unconfirmed");
        this.unconfirmed = false;
      }
      while (this.bus.isConnected() && (await this.relayBatch()) === BATCH) {
        // a full batch: there may be more
      }
    } catch (err) {
      this.logger.warn({ err }, "outbox-relay-failed");
    }
  }

  /**
   * Publishes one batch; returns how many rows it relayed. The rows are
   * deleted as they are taken, but the deletion commits only after NATS
   * confirmed them: a failed flush rolls it back and they are relayed again.
   */
  private relayBatch(): Promise<number> {
    return withTransaction(this.pool, async (tx) => {
      const { rows } = await tx.query<OutboxRow>(
        // = ANY(ARRAY(…)): by the primary key; IN (…) was planned as a scan of the whole table.
        // RETURNING keeps no order: the outer ORDER BY sends events in the order they were written.
        `WITH taken AS (
           DELETE FROM outbox WHERE id = ANY(ARRAY(SELECT id FROM outbox ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED))
           RETURNING id, event, node_id, payload, service)
         SELECT * FROM taken ORDER BY id`,
        [BATCH],
      );
      if (rows.length === 0) return 0;
      for (const row of rows) {
        const payload = row.payload ?? this.renderSnapshot(row.service as ServiceRow);
        this.bus.publish(this.subjectOf(row), JSON.stringify({ ...payload, sequence: row.id }));
      }
      try {
        await withTimeout(this.bus.flush(), FLUSH_TIMEOUT_MS, "NATS did not confirm the outbox batch");
      } catch (err) {
        this.unconfirmed = true;
        throw err;
      }
      this.logger.debug({ count: rows.length, last: rows[rows.length - 1]?.id }, "outbox-relayed");
      return rows.length;
    });
  }

  private subjectOf(row: OutboxRow): string {
    switch (row.event) {
      case "service.created":
        return this.subjects.serviceCreated(row.node_id);
      case "service.deleted":
        return this.subjects.serviceDeleted(row.node_id);
      case "service.updated":
        return this.subjects.serviceUpdated(row.node_id);
      case "service.bound":
        return this.subjects.serviceBound(row.node_id);
      case "service.unbound":
        return this.subjects.serviceUnbound(row.node_id);
      case "node.updated":
        return this.subjects.nodeUpdated(row.node_id);
    }
  }

  /**
   * Stops the timer and makes one last pass, so a clean shutdown leaves
   * nothing behind that NATS can take. Marked stopped first: a pass asked for
   * while the running one finishes would otherwise start after it and
   * outlive stop(), still holding its rows while the bus and the pool close.
   */
  stop(): Promise<void> {
    this.stopping ??= (async () => {
      this.stopped = true;
      clearInterval(this.timer);
      await this.running;
      await this.drain();
    })();
    return this.stopping;
  }
}

function withTimeout<T>(promise: Promise<T>, ms: number, message: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(message)), ms);
    }),
  ]);
}
