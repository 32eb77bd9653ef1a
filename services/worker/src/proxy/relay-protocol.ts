/**
 * Messages between the worker and its relay processes (HARBOR_WORKER_PROCESSES > 1).
 *
 * The worker keeps the listening sockets and chooses every connection's
 * backend itself, so round-robin stays exact however many relays there are;
 * a relay only connects to that backend (or the next ones, on refusal) and
 * copies the bytes.
 */
import type { Endpoint } from "./dial.js";

/** Worker → relay, with the accepted client socket as the message's handle. */
export interface HandOff {
  t: "conn";
  /** The listener, as the pool numbered it. */
  l: number;
  /** The rotation as the listener saw it, and where this connection starts in it. */
  b: Endpoint[];
  s: number;
  /** Every backend is out of rotation: try them all. */
  any: boolean;
  /** Backends out of rotation now (`host:port`); absent when none are. */
  e?: string[];
}

/** Worker → relay: finish open connections within the deadline, then exit. */
export interface Stop {
  t: "stop";
  deadlineMs: number;
}

export type ToRelay = HandOff | Stop;

/** Relay → worker: a backend refused or timed out (the worker ejects it for every relay). */
export interface BackendFailed {
  t: "failed";
  l: number;
  host: string;
  port: number;
  err: string;
}

/** Relay → worker: counts since the last report. */
export interface Stats {
  t: "stats";
  /** Per listener: connections that ended (or never reached a backend). */
  closed: Array<[number, number]>;
  proxied: number;
  allFailed: number;
  bytesToBackend: number;
  bytesToClient: number;
}

export type FromRelay = BackendFailed | Stats | { t: "ready" };
