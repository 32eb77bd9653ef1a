/** What the worker needs of one protocol's listener on one port. */
export interface PortListener {
  readonly port: number;
  readonly protocol: "tcp" | "udp";
  readonly listening: boolean;
  readonly error: string | undefined;
  /** Binds; a failure (e.g. the port is taken) is recorded, not thrown, and retried later. */
  listen(): Promise<boolean>;
  /** Stops taking new traffic; what is open carries on. */
  close(): Promise<void>;
  /** Lets open traffic finish up to the deadline, then cuts the rest. */
  drain(deadlineMs: number): Promise<void>;
  /** The backend set changed. */
  backendsChanged(): void;
}
