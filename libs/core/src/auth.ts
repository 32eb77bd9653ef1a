import { PermissionDeniedError, UnauthenticatedError } from "./errors.js";

/**
 * Who is calling. An operator may do everything; a space creates, sees and
 * binds only its own services and apps; an instance agent registers
 * instances only for apps of its space.
 */
export type Caller = { role: "operator" } | { role: "space"; space: string } | { role: "agent"; space: string };

export const OPERATOR: Caller = { role: "operator" };

const SPACE = /^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,62})$/;

/**
 * Parses `token=role` entries, comma or newline separated, where role is
 * `operator`, `space:<name>` or `agent:<space>`. Returns the problems found
 * instead of throwing, so config can list them all.
 */
export function parseTokens(spec: string): { tokens: Map<string, Caller>; problems: string[] } {
  const tokens = new Map<string, Caller>();
  const problems: string[] = [];
  spec
    .split(/[,\n]/)
    .map((e) => e.trim())
    .filter((e) => e !== "" && !e.startsWith("#"))
    .forEach((entry, index) => {
      const at = entry.lastIndexOf("=");
      const token = entry.slice(0, at).trim();
      const role = entry.slice(at + 1).trim();
      const where = `entry ${index + 1}`;
      if (at <= 0 || token.length < 16) {
        problems.push(`${where}: expected TOKEN=ROLE with a token of at least 16 characters`);
        return;
      }
      const [kind, space] = role.split(":", 2);
      if (kind === "operator" && space === undefined) tokens.set(token, OPERATOR);
      else if ((kind === "space" || kind === "agent") && space && SPACE.test(space)) tokens.set(token, { role: kind, space });
      else problems.push(`${where}: role ${JSON.stringify(role)} is not operator, space:<name> or agent:<space>`);
    });
  return { tokens, problems };
}

/**
 * Maps the `authorization` header to a caller. With no tokens configured,
 * every caller is an operator (local use stays zero-setup; the API is then
 * kept on loopback).
 */
export class Authenticator {
  constructor(private readonly tokens: Map<string, Caller>) {}

  get enabled(): boolean {
    return this.tokens.size > 0;
  }

  /** Adds a token, e.g. the one-process mode's internal token for its own worker. */
  add(token: string, caller: Caller): void {
    this.tokens.set(token, caller);
  }

  authenticate(authorization: string | undefined): Caller {
    if (!this.enabled) return OPERATOR;
    if (!authorization) throw new UnauthenticatedError("this Harbor needs a token: set HARBOR_TOKEN or pass --token");
    const match = /^Bearer\s+(\S+)$/i.exec(authorization);
    const caller = match ? this.tokens.get(match[1] as string) : undefined;
    if (!caller) throw new UnauthenticatedError("the token is not valid for this Harbor");
    return caller;
  }
}

export function requireOperator(caller: Caller, what: string): void {
  if (caller.role !== "operator") throw new PermissionDeniedError(`${what} is for operators; this token belongs to ${describeCaller(caller)}`);
}

export function describeCaller(caller: Caller): string {
  return caller.role === "operator" ? "an operator" : caller.role === "space" ? `space "${caller.space}"` : `the instance agent of space "${caller.space}"`;
}
