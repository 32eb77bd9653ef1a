import type { Logger } from "./logger.js";

/** Every long-running part has this shape. `stop` is idempotent and never rejects. */
export interface Component {
  readonly name: string;
  start(): Promise<void>;
  stop(): Promise<void>;
}

/**
 * Starts components in order and stops them in reverse. A component that
 * fails to start stops the ones already started.
 */
export class ComponentGroup implements Component {
  readonly name = "group";
  private started: Component[] = [];
  private stopping: Promise<void> | undefined;

  constructor(
    private readonly components: Component[],
    private readonly logger: Logger,
    private readonly stopDeadlineMs = 15_000,
  ) {}

  async start(): Promise<void> {
    for (const component of this.components) {
      try {
        await component.start();
      } catch (err) {
        // A shutdown signalled while a component waited (on NATS, say) is no failure of it.
        if ((err as Error)?.name === "AbortError") this.logger.info({ component: component.name }, "component-start-interrupted");
        else this.logger.error({ err, component: component.name }, "component-start-failed");
        await this.stop();
        throw err;
      }
      this.started.push(component);
      this.logger.debug({ component: component.name }, "component-started");
    }
  }

  stop(): Promise<void> {
    this.stopping ??= this.stopAll();
    return this.stopping;
  }

  private async stopAll(): Promise<void> {
    for (const component of [...this.started].reverse()) {
      let timer: NodeJS.Timeout | undefined;
      const deadline = new Promise<"timeout">((resolve) => {
        timer = setTimeout(() => resolve("timeout"), this.stopDeadlineMs);
      });
      try {
        const outcome = await Promise.race([component.stop().then(() => "stopped" as const), deadline]);
        if (outcome === "timeout") this.logger.warn({ component: component.name }, "component-stop-timed-out");
      } catch (err) {
        this.logger.error({ err, component: component.name }, "component-stop-failed");
      } finally {
        clearTimeout(timer);
      }
    }
    this.started = [];
  }
}

/**
 * Runs a component until SIGTERM or SIGINT, then stops it and resolves. The
 * handlers are in place before it starts: a signal during a slow start (the
 * embedded Postgres's first initdb) stops it as soon as it is up, instead of
 * killing the process and orphaning what it started; `shutdown` is aborted
 * at the signal, so a start that waits on something that may never come (a
 * NATS_URL that does not answer) can give up instead. A second signal exits
 * at once.
 */
export async function runUntilSignalled(component: Component, logger: Logger, shutdown = new AbortController()): Promise<void> {
  let signalled = false;
  let wake = () => undefined as void;
  const stopping = new Promise<void>((resolve) => (wake = resolve));
  const onSignal = (signal: NodeJS.Signals) => {
    if (signalled) {
      logger.warn({ signal }, "second-signal-exiting");
      process.exit(1);
    }
    signalled = true;
    logger.info({ signal }, "shutdown-started");
    shutdown.abort();
    wake();
  };
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  try {
    await component.start();
  } catch (err) {
    // What waits on `shutdown.signal` gives up when signalled: that start ends the run, not in failure.
    if (!signalled || (err as Error)?.name !== "AbortError") throw err;
  }
  if (!signalled) logger.info("ready");
  await stopping;
  await component.stop();
  logger.info("shutdown-complete");
}
