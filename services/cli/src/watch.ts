import { connectBus, createSubjects, DEFAULT_NATS_PREFIX } from "@harbor/bus";
import { createLogger } from "@harbor/runtime";
import { CliError } from "./client.js";

/**
 * `harbor watch [SUBJECT]`: the live NATS events of this deployment, one per
 * line. SUBJECT is relative to `<prefix>.v1.` (e.g. `backends.>`) unless it
 * already starts with the prefix. With --json, each line is one JSON object
 * (a stream: one document per event).
 */
export async function watchEvents(subject: string | undefined, json: boolean, env: Record<string, string | undefined>): Promise<void> {
  const prefix = env.HARBOR_NATS_PREFIX || DEFAULT_NATS_PREFIX;
  const subjects = createSubjects(prefix);
  const pattern = !subject ? subjects.all() : subject.startsWith(`${prefix}.`) ? subject : `${prefix}.v1.${subject}`;
  const logger = createLogger("harbor-watch", env.LOG_LEVEL ?? "warn");
  let bus;
  try {
    bus = await connectBus({ url: env.NATS_URL, fallbackToInProcess: false, logger, token: env.NATS_TOKEN, user: env.NATS_USER, pass: env.NATS_PASSWORD });
  } catch (err) {
    throw new CliError(`cannot reach NATS at ${env.NATS_URL ?? "nats://127.0.0.1:4222"}: ${(err as Error).message} (watch needs the NATS that Harbor uses; set NATS_URL)`);
  }
  process.stderr.write(`harbor: watching ${pattern} (Ctrl-C to stop)\n`);
  bus.subscribe(pattern, (msg) => {
    let payload: unknown = msg.data;
    try {
      payload = JSON.parse(msg.data);
    } catch {
      // not JSON: show it as text
    }
    const time = new Date().toISOString();
    process.stdout.write(json ? JSON.stringify({ time, subject: msg.subject, payload }) + "\n" : `${time.slice(11, 23)} ${msg.subject} ${typeof payload === "string" ? payload : JSON.stringify(payload)}\n`);
  });
  await new Promise<void>((resolve) => {
    process.once("SIGINT", resolve);
    process.once("SIGTERM", resolve);
  });
  await bus.close();
}
