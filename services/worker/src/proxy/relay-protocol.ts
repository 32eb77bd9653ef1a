/**
 * Messages between the worker and its relay processes (HARBOR_WORKER_RELAYS > 0).
 *
 * The worker keeps the listening sockets and chooses every connection's
 * backend itself, so round-robin stays exact however many relays there are;
 * a relay only connects to that backend (or the next ones, on refusal) and
 * copies the bytes.
 *
 * Where the worker has the native module, it sends the clients as
 * descriptors over a hand-off channel (native/handoff.c), each with its
 * ClientHeader, and every ToRelay message on that channel too, so a relay
 * reads them in the order they were sent; otherwise clients and messages go
 * over Node's IPC channel (HandOff). Relay → worker is always Node's IPC.
 */
import type { Endpoint } from "./dial.js";

/** The descriptor a relay finds its end of the hand-off channel at: fork's stdio after 0-2 and IPC's 3. */
export const RELAY_CHANNEL_FD = 4;
/**
 * The largest control message a relay reads (its receive buffer). The channel
 * itself may take less (its send buffer: ~208 KiB by default, a rotation of
 * ~6,000 backends); the pool refuses what is over either, and that listener's
 * clients stay in the worker.
 */
export const CONTROL_MAX_BYTES = 1 << 20;

/**
 * Worker → relay: a listener's rotation, sent before the first connection
 * that uses it and again only when it changes (not with every connection).
 */
export interface Rotation {
  t: "rotation";
  /** The listener, as the pool numbered it. */
  l: number;
  b: Endpoint[];
  /** On the hand-off channel: the backends out of rotation now (`host:port`), sent again when they change; absent when none are. */
  e?: string[];
}

/** Worker → relay: the listener is gone; its rotation may be dropped. */
export interface Forget {
  t: "forget";
  l: number;
}

/** Worker → relay, with the accepted client socket as the message's handle. */
export interface HandOff {
  t: "conn";
  /** The listener; its rotation is the last one sent for it. */
  l: number;
  /** Where this connection starts in the rotation. */
  s: number;
  /** Every backend is out of rotation: try them all. */
  any: boolean;
  /** Backends out of rotation now (`host:port`); absent when none are. */
  e?: string[];
}

/*
 * Worker → relay on the hand-off channel, with the client's descriptor: the
 * sendClient numbers are (a) the listener, (b) where this connection starts
 * in the rotation, (c) 1 when every backend is out of rotation (try them
 * all), else 0. The listener's rotation, and the backends out of it, are the
 * last Rotation sent for it.
 */

/** Worker → relay: finish open connections within the deadline, then exit. */
export interface Stop {
  t: "stop";
  deadlineMs: number;
}

export type ToRelay = Rotation | Forget | HandOff | Stop;

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

/** A control message the worker sends on the hand-off channel (not a client's). */
export type ChannelControl = Rotation | Forget | Stop;

const isListenerId = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) > 0;
const isEndpoint = (v: unknown): v is Endpoint =>
  typeof v === "object" && v !== null && typeof (v as Endpoint).host === "string" && Number.isInteger((v as Endpoint).port) && (v as Endpoint).port > 0 && (v as Endpoint).port < 65_536;

/** A control message's text off the hand-off channel, parsed and checked; an Error saying why it is not one. */
export function parseChannelControl(text: string): ChannelControl | Error {
  let message: unknown;
  try {
    message = JSON.parse(text);
  } catch (err) {
    return err as Error;
  }
  if (isChannelControl(message)) return message;
  const kind = typeof message === "object" && message !== null && !Array.isArray(message) ? `a "${String((message as { t?: unknown }).t)}" message` : `a JSON ${Array.isArray(message) ? "array" : typeof message}`;
  return new Error(`${kind} that is not a rotation, forget or stop the worker sends`);
}

/**
 * Whether a message read off the hand-off channel is one a relay acts on.
 * Only the worker writes there, so anything else is a bug: the relay logs
 * and drops it rather than keep a rotation it would crash on at the next client.
 */
export function isChannelControl(m: unknown): m is ChannelControl {
  if (typeof m !== "object" || m === null) return false;
  const message = m as { t?: unknown; l?: unknown; b?: unknown; e?: unknown; deadlineMs?: unknown };
  switch (message.t) {
    case "rotation":
      return isListenerId(message.l) && Array.isArray(message.b) && message.b.every(isEndpoint) && (message.e === undefined || (Array.isArray(message.e) && message.e.every((k: unknown) => typeof k === "string")));
    case "forget":
      return isListenerId(message.l);
    case "stop":
      return Number.isFinite(message.deadlineMs) && (message.deadlineMs as number) >= 0;
    default:
      return false;
  }
}
