/**
 * A connection URL fit to log or print: its password hidden, and with
 * `user`, its user name too (NATS takes a token there: `nats://TOKEN@host`).
 */
export function redactUrl(url: string, options: { user?: boolean } = {}): string {
  try {
    const parsed = new URL(url);
    if (parsed.password) parsed.password = "***";
    if (options.user && parsed.username) parsed.username = "***";
    return parsed.toString();
  } catch {
    return "[unparsable url]";
  }
}
