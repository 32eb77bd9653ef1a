/** What the worker needs of one protocol's listener on one port. */
import type { Ejections } from "@harbor/core";

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
  /** TCP connections open through it (0 for UDP, whose sessions end at close, and in kernel mode, where conntrack holds them). */
  readonly connections: number;
  /** The backend set changed, or a backend's health did. */
  backendsChanged(): void;
  /** Backends out of rotation: passively after failures, or by active checks. */
  readonly ejections: Ejections;
}
