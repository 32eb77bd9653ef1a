/** A received message: its subject, its payload as text, and a way to answer when the sender asked for a reply. */
export interface BusMessage {
  readonly subject: string;
  readonly data: string;
  respond(data: string): void;
}

export interface BusSubscription {
  unsubscribe(): void;
}

/**
 * What Harbor needs of a message bus. NATS in production; the in-process bus
 * in one-process mode without a NATS server. Handlers are called one message
 * at a time per subscription, in order.
 */
export interface Bus {
  readonly kind: "nats" | "in-process";
  publish(subject: string, data: string): void;
  /** With `queue`, each message goes to one member of the group (replicas share the work). */
  subscribe(subject: string, handler: (msg: BusMessage) => void, options?: { queue?: string }): BusSubscription;
  request(subject: string, data: string, timeoutMs: number): Promise<string>;
  /** Resolves when everything published so far has reached the server. */
  flush(): Promise<void>;
  /** True while connected (always for the in-process bus). */
  isConnected(): boolean;
  /** The largest payload `publish` can send (the server's max_payload; unlimited in-process). */
  maxPayloadBytes(): number;
  /** Called after every reconnect, so followers can resync from a snapshot. */
  onReconnect(listener: () => void): void;
  /** Drains and closes; idempotent, never rejects. */
  close(): Promise<void>;
}

/** NATS subject matching: `*` matches one token, `>` the rest. */
export function subjectMatches(pattern: string, subject: string): boolean {
  const p = pattern.split(".");
  const s = subject.split(".");
  for (let i = 0; i < p.length; i++) {
    if (p[i] === ">") return s.length > i;
    if (i >= s.length) return false;
    if (p[i] !== "*" && p[i] !== s[i]) return false;
  }
  return p.length === s.length;
}
