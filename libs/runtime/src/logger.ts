import { pino, type Logger } from "pino";

export type { Logger };

/**
 * The root logger of a process: JSON lines on stderr (stdout stays free for
 * the CLI's `--json` output), ISO times, secrets redacted. Components take a
 * child with `{ component }`; messages are kebab-case events.
 */
export function createLogger(name: string, level = process.env.LOG_LEVEL ?? "info"): Logger {
  return pino(
    {
      name,
      level,
      base: { pid: process.pid },
      timestamp: pino.stdTimeFunctions.isoTime,
      redact: {
        paths: ["token", "*.token", "authorization", "*.authorization", "password", "*.password", "databaseUrl", "*.databaseUrl"],
        censor: "[redacted]",
      },
    },
    pino.destination({ dest: 2, sync: true }),
  );
}

export { redactUrl } from "@harbor/core";
