/**
 * Domain errors. Each failure a caller can act on has its own class with a
 * `kind`; libs/runtime maps kinds to gRPC codes in one place. The message is
 * for a person: say what was wrong and what would be right.
 */
export type ErrorKind =
  | "invalid-argument"
  | "already-exists"
  | "not-found"
  | "resource-exhausted"
  | "failed-precondition"
  | "unavailable"
  | "unauthenticated"
  | "permission-denied"
  | "internal";

export class HarborError extends Error {
  readonly kind: ErrorKind;
  constructor(kind: ErrorKind, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.kind = kind;
    this.name = new.target.name;
  }
}

export class InvalidArgumentError extends HarborError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("invalid-argument", message, options);
  }
}
export class AlreadyExistsError extends HarborError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("already-exists", message, options);
  }
}
export class NotFoundError extends HarborError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("not-found", message, options);
  }
}
export class ResourceExhaustedError extends HarborError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("resource-exhausted", message, options);
  }
}
export class FailedPreconditionError extends HarborError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("failed-precondition", message, options);
  }
}
export class UnavailableError extends HarborError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("unavailable", message, options);
  }
}

export class UnauthenticatedError extends HarborError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("unauthenticated", message, options);
  }
}
export class PermissionDeniedError extends HarborError {
  constructor(message: string, options?: { cause?: unknown }) {
    super("permission-denied", message, options);
  }
}

/** Configuration that cannot work; lists every problem with its variable, on one line (`harbor serve` prints it to stderr as is). */
export class ConfigError extends Error {
  readonly problems: string[];
  constructor(problems: string[]) {
    super(`invalid configuration: ${problems.join("; ")}`);
    this.name = "ConfigError";
    this.problems = problems;
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
