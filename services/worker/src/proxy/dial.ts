import net from "node:net";

/** Where a backend is reached: all a dial needs of it (a relay process gets no more). */
export interface Endpoint {
  host: string;
  port: number;
}

export const backendKey = (b: Endpoint): string => `${b.host}:${b.port}`;

/** Idle time before TCP keep-alive probes a proxied connection's peers (then the kernel's interval and count). */
export const KEEPALIVE_IDLE_MS = 60_000;

/** Failures of this host, not of the backend: out of descriptors, local ports or memory. */
const LOCAL_FAILURES = /\b(EMFILE|ENFILE|EADDRNOTAVAIL|ENOBUFS|ENOMEM)\b/;

/** Whether a failed connect says nothing about the backend (a relay reports the message only). */
export function isLocalFailure(err: Error): boolean {
  return LOCAL_FAILURES.test((err as NodeJS.ErrnoException).code ?? "") || LOCAL_FAILURES.test(err.message);
}

/** What a dial needs from whoever owns the connection: the listener itself, or a relay process. */
export interface DialHooks {
  readonly connectTimeoutMs: number;
  /** Out of rotation (passively or by active checks); cheap when nothing is. */
  isEjected(backend: Endpoint): boolean;
  /** Refused or timed out; the dial goes on with the next backend. */
  backendFailed(backend: Endpoint, err: Error): void;
  /** Every backend was tried or is out of rotation; the client has been closed. */
  allFailed(): void;
  /** Client and backend are connected (Nagle off on both); the hook joins them. */
  connected(client: net.Socket, upstream: net.Socket): void;
}

/**
 * Connects `client` to the backend `attempt` places on from `start` in the
 * rotation, passing over backends out of rotation — unless every one is
 * (`anyBackend`: better a try than a certain refusal) — and on refusal or
 * timeout tries the next. Nothing is allocated per connection beyond the
 * upstream socket and its timer.
 */
export function dial(client: net.Socket, backends: readonly Endpoint[], start: number, attempt: number, anyBackend: boolean, hooks: DialHooks): void {
  if (client.destroyed) return;
  const i = nextAttempt(backends, start, attempt, anyBackend, hooks);
  if (i < 0) {
    client.destroy();
    hooks.allFailed();
    return;
  }
  const backend = backends[(start + i) % backends.length] as Endpoint;
  const upstream = net.connect({ host: backend.host, port: backend.port, allowHalfOpen: true });
  const timer = setTimeout(() => upstream.destroy(new Error(`connect timed out after ${hooks.connectTimeoutMs} ms`)), hooks.connectTimeoutMs);
  const abandon = () => {
    clearTimeout(timer);
    upstream.destroy();
  };
  client.once("close", abandon);
  upstream.once("error", (err) => {
    clearTimeout(timer);
    client.removeListener("close", abandon);
    hooks.backendFailed(backend, err);
    dial(client, backends, start, i + 1, anyBackend, hooks);
  });
  upstream.once("connect", () => {
    clearTimeout(timer);
    client.removeListener("close", abandon);
    upstream.removeAllListeners("error");
    // A proxy adds no delay of its own: small writes go out as they come.
    client.setNoDelay(true);
    upstream.setNoDelay(true);
    // A peer that vanished without a FIN or RST (a client VM killed, NAT state dropped) is found
    // by TCP keep-alive, so its pair does not hold two descriptors and a place under the port's
    // connection limit for ever. Idle connections of live peers are never cut.
    client.setKeepAlive(true, KEEPALIVE_IDLE_MS);
    upstream.setKeepAlive(true, KEEPALIVE_IDLE_MS);
    hooks.connected(client, upstream);
  });
}

/**
 * The attempt (from `attempt` on) whose backend, `start` places on in the
 * rotation, is the next to try: backends out of rotation are passed over
 * unless `anyBackend`. -1 when none is left.
 */
export function nextAttempt(backends: readonly Endpoint[], start: number, attempt: number, anyBackend: boolean, hooks: Pick<DialHooks, "isEjected">): number {
  const n = backends.length;
  let i = attempt;
  while (i < n && !anyBackend && hooks.isEjected(backends[(start + i) % n] as Endpoint)) i++;
  return i < n ? i : -1;
}

/** Whether every backend is out of rotation (then all are tried anyway). */
export function allEjected(backends: readonly Endpoint[], isEjected: (b: Endpoint) => boolean): boolean {
  for (const b of backends) if (!isEjected(b)) return false;
  return backends.length > 0;
}
