import { openSync, readlinkSync } from "node:fs";
import { constants } from "node:os";
import { afterEach, describe, expect, it } from "vitest";
import { HANDOFF_META, nativeModule, type NativeModule } from "./native.js";

// The hand-off channel (native/handoff.c) between the worker and a relay, both ends in this process.
const native = nativeModule("native") as NativeModule;
const { EAGAIN, ECONNRESET, EMSGSIZE, EPIPE } = constants.errno;

const cleanup: Array<() => unknown> = [];
afterEach(() => {
  for (const c of cleanup.splice(0).reverse()) c();
});

/** [worker's end, relay's end, largest control payload]. */
function channel(): [number, number, number] {
  const ends = native.channel();
  if (typeof ends === "number") throw new Error(`channel: ${ends}`);
  cleanup.push(() => [ends[0], ends[1]].forEach((fd) => native.close(fd)));
  return ends;
}

/** What a descriptor is open on, or undefined when it is closed. */
function target(fd: number): string | undefined {
  try {
    return readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return undefined;
  }
}

function openDevNull(): number {
  const fd = openSync("/dev/null", "r");
  cleanup.push(() => target(fd) === "/dev/null" && native.close(fd));
  return fd;
}

const meta = new Int32Array(HANDOFF_META * 8);
const payload = Buffer.alloc(4096);
const messages = (n: number) => Array.from({ length: n }, (_, i) => Array.from(meta.subarray(i * HANDOFF_META, (i + 1) * HANDOFF_META)));

describe("hand-off channel", () => {
  it("carries clients as descriptors and control messages as bytes, in the order sent; a control message ends a batch", () => {
    const [worker, relay] = channel();
    const first = openDevNull();
    const second = openDevNull();
    expect(native.sendClient(worker, first, 7, 3, 1)).toBe(0);
    expect(native.sendControl(worker, Buffer.from('{"t":"forget","l":7}'))).toBe(0);
    expect(native.sendClient(worker, second, 8, 0, 0)).toBe(0);

    expect(native.receive(relay, meta, payload)).toBe(2);
    const [client, control] = messages(2);
    expect(client?.slice(0, 4)).toEqual([native.HANDOFF_CLIENT, 7, 3, 1]);
    const received = client?.[4] as number;
    cleanup.push(() => native.close(received));
    // A duplicate of the sender's, which is still open until the sender closes it.
    expect(received).not.toBe(first);
    expect(target(received)).toBe("/dev/null");
    expect(target(first)).toBe("/dev/null");
    expect(control).toEqual([native.HANDOFF_CONTROL, 20, 0, 0, -1]);
    expect(payload.toString("utf8", 0, 20)).toBe('{"t":"forget","l":7}');

    expect(native.receive(relay, meta, payload)).toBe(1);
    const later = meta[4] as number;
    cleanup.push(() => native.close(later));
    expect(messages(1)[0]?.slice(0, 4)).toEqual([native.HANDOFF_CLIENT, 8, 0, 0]);
    expect(native.receive(relay, meta, payload)).toBe(0);
  });

  it("reports a client whose descriptor did not come with its numbers, a malformed message as kind 0, and goes on", () => {
    const [worker, relay] = channel();
    // A client's header without its descriptor (as when the relay is out of them), a short message, a control message shorter than it says.
    expect(native.sendBuffer(worker, Buffer.from(new Int32Array([native.HANDOFF_CLIENT, 1, 0, 0]).buffer))).toBe(0);
    expect(native.sendBuffer(worker, Buffer.from("abc"))).toBe(0);
    expect(native.sendBuffer(worker, Buffer.concat([Buffer.from(new Int32Array([native.HANDOFF_CONTROL, 100, 0, 0]).buffer), Buffer.from("{}")]))).toBe(0);
    expect(native.sendControl(worker, Buffer.from("{}"))).toBe(0);
    expect(native.receive(relay, meta, payload)).toBe(4);
    const [lost, short, cut, control] = messages(4);
    // The relay counts the lost client's connection ended for its listener (1).
    expect(lost).toEqual([native.HANDOFF_CLIENT_LOST, 1, 0, 0, -1]);
    expect([short?.[0], short?.[4], cut?.[0], cut?.[4]]).toEqual([0, -1, 0, -1]);
    expect(control).toEqual([native.HANDOFF_CONTROL, 2, 0, 0, -1]);
  });

  it("says EAGAIN when the relay is behind, leaving the client the sender's; ECONNRESET or EPIPE when the relay is gone", () => {
    const [worker, relay] = channel();
    const client = openDevNull();
    let sent = 0;
    let r = 0;
    while ((r = native.sendClient(worker, client, sent, 0, 0)) === 0) sent++;
    expect(r).toBe(-EAGAIN);
    expect(sent).toBeGreaterThan(0);
    expect(target(client)).toBe("/dev/null");
    // Reading makes room again.
    expect(native.receive(relay, meta, payload)).toBe(8);
    for (let i = 0; i < 8; i++) native.close(meta[i * HANDOFF_META + 4] as number);
    expect(native.sendClient(worker, client, 0, 0, 0)).toBe(0);

    native.close(relay);
    cleanup.splice(0, cleanup.length, () => native.close(worker), () => native.close(client));
    // Gone with messages unread: ECONNRESET, once; then EPIPE.
    expect(native.sendClient(worker, client, 0, 0, 0)).toBe(-ECONNRESET);
    expect(native.sendControl(worker, Buffer.from("{}"))).toBe(-EPIPE);
    expect(target(client)).toBe("/dev/null");
  });

  it("says how large a control message it takes: that many bytes arrive whole, one more is EMSGSIZE and nothing is sent", () => {
    const [worker, relay, max] = channel();
    expect(max).toBeGreaterThan(64 << 10);
    const big = Buffer.alloc(max + 1, "x".charCodeAt(0));
    const whole = Buffer.alloc(max + 1024);
    expect(native.sendControl(worker, big)).toBe(-EMSGSIZE);
    expect(native.sendControl(worker, big.subarray(0, max))).toBe(0);
    expect(native.receive(relay, meta, whole)).toBe(1);
    expect(messages(1)[0]).toEqual([native.HANDOFF_CONTROL, max, 0, 0, -1]);
    expect(native.receive(relay, meta, whole)).toBe(0);
  });

  it("tells the relay when the worker's end is closed", () => {
    const [worker, relay] = channel();
    native.close(worker);
    cleanup.splice(0, cleanup.length, () => native.close(relay));
    expect(native.receive(relay, meta, payload)).toBe(-EPIPE);
  });

  it("throws for arguments of the wrong type", () => {
    expect(() => native.receive(0, new Int32Array(2), payload)).toThrow(/Int32Array/);
    expect(() => native.sendControl(0, "text" as unknown as Buffer)).toThrow(/Buffer/);
    expect(() => native.sendClient(0, 1, 2, 3, "x" as unknown as number)).toThrow(/number/);
  });
});
