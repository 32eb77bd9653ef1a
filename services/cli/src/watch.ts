import { createSubjects, DEFAULT_NATS_PREFIX, LOCAL_NATS_URL, NatsBus } from "@harbor/bus";
import { createLogger, redactUrl } from "@harbor/runtime";
import { CliError } from "./client.js";

/** A subject NATS takes for a subscription: non-empty tokens without spaces, `*` a whole token, `>` the whole last one. */
export function isSubscribableSubject(subject: string): boolean {
  const tokens = subject.split(".");
  return tokens.every((token, i) => {
    if (token === "" || /\s/.test(token)) return false;
    if (token === ">") return i === tokens.length - 1;
    return token === "*" || !/[*>]/.test(token);
  });
}

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
  if (!isSubscribableSubject(pattern)) {
    throw new CliError(`${JSON.stringify(subject)} is not a NATS subject: use dot-separated tokens, * for one token, > for the rest (e.g. 'backends.>')`, 2);
  }
  const logger = createLogger("harbor-watch", env.LOG_LEVEL ?? "warn");
  const url = env.NATS_URL || LOCAL_NATS_URL;
  let bus: NatsBus;
  try {
    // One attempt: a person is waiting (connectBus would retry an explicit NATS_URL for ever, logging each try).
    bus = await NatsBus.connect({ url, logger, connectTimeoutMs: 5_000, token: env.NATS_TOKEN, user: env.NATS_USER, pass: env.NATS_PASSWORD });
  } catch (err) {
    throw new CliError(`cannot reach NATS at ${redactUrl(url, { user: true })}: ${(err as Error).message} (watch needs the NATS that Harbor uses; set NATS_URL)`);
  }
  try {
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
    await bus.flush();
    process.stderr.write(`harbor: watching ${pattern} (Ctrl-C to stop)\n`);
    await new Promise<void>((resolve) => {
      process.once("SIGINT", resolve);
      process.once("SIGTERM", resolve);
    });
  } finally {
    // Also when subscribing failed: an open connection would keep the process alive.
    await bus.close();
  }
}
