import { constants } from "node:os";
import { afterEach, describe, expect, it, vi } from "vitest";
import { NativeAcceptor } from "./accept.js";
import type { NativeModule } from "./native.js";

const { EAGAIN, EMFILE, EPERM } = constants.errno;

/** The module's listen, poll and accept, scripted: each accept() returns the next entry (a batch of descriptors, or -errno). */
function scriptedModule(script: Array<number[] | number>) {
  const calls = { polls: 0, unpolls: 0, closed: [] as number[] };
  let onReadable: (() => void) | undefined;
  const module = {
    listen: () => 7,
    poll: (_fd: number, callback: () => void) => {
      calls.polls++;
      onReadable = callback;
      return { poller: calls.polls };
    },
    unpoll: () => {
      calls.unpolls++;
      onReadable = undefined;
    },
    accept: (_fd: number, into: Int32Array) => {
      const next = script.shift() ?? -EAGAIN;
      if (typeof next === "number") return next;
      into.set(next);
      return next.length;
    },
    close: (fd: number) => {
      calls.closed.push(fd);
      return 0;
    },
  };
  return { module: module as unknown as NativeModule, calls, readable: () => onReadable?.() };
}

afterEach(() => {
  vi.useRealTimers();
});

describe("native acceptor", () => {
  it("hands each accepted descriptor on, and says nothing when none is waiting", () => {
    const { module, readable } = scriptedModule([[10, 11], -EAGAIN]);
    const accepted: number[] = [];
    const failed: Error[] = [];
    NativeAcceptor.listen(module, "127.0.0.1", 80, 16, 60, { accepted: (fd) => accepted.push(fd), acceptFailed: (err) => failed.push(err) });
    readable();
    readable();
    expect(accepted).toEqual([10, 11]);
    expect(failed).toEqual([]);
  });

  it("out of descriptors: reports it, stops polling (the waiting connection would wake it at once, for ever) and polls again after a pause", () => {
    vi.useFakeTimers();
    const { module, calls, readable } = scriptedModule([-EMFILE, [12]]);
    const accepted: number[] = [];
    const failed: string[] = [];
    NativeAcceptor.listen(module, "127.0.0.1", 80, 16, 60, { accepted: (fd) => accepted.push(fd), acceptFailed: (err) => failed.push((err as NodeJS.ErrnoException).code ?? "") });
    readable();
    expect(failed).toEqual(["EMFILE"]);
    expect(calls.unpolls).toBe(1);
    vi.advanceTimersByTime(100);
    expect(calls.polls).toBe(2);
    readable();
    expect(accepted).toEqual([12]);
  });

  it("another failure (a firewall refusing, EPERM) is reported and the port keeps polling", () => {
    const { module, calls, readable } = scriptedModule([-EPERM]);
    const failed: string[] = [];
    NativeAcceptor.listen(module, "127.0.0.1", 80, 16, 60, { accepted: () => undefined, acceptFailed: (err) => failed.push((err as NodeJS.ErrnoException).code ?? "") });
    readable();
    expect(failed).toEqual(["EPERM"]);
    expect(calls.unpolls).toBe(0);
  });

  it("closed by a hook mid-batch: the rest of the batch is closed, not handed on; the listening socket is closed once", () => {
    const { module, calls, readable } = scriptedModule([[20, 21, 22]]);
    const accepted: number[] = [];
    const acceptor = NativeAcceptor.listen(module, "127.0.0.1", 80, 16, 60, {
      accepted: (fd) => {
        accepted.push(fd);
        acceptor.close();
      },
      acceptFailed: () => undefined,
    });
    readable();
    acceptor.close();
    expect(accepted).toEqual([20]);
    expect(calls.closed).toEqual([7, 21, 22]);
  });

  it("a pause cut short by close polls no more", () => {
    vi.useFakeTimers();
    const { module, calls, readable } = scriptedModule([-EMFILE]);
    const acceptor = NativeAcceptor.listen(module, "127.0.0.1", 80, 16, 60, { accepted: () => undefined, acceptFailed: () => undefined });
    readable();
    acceptor.close();
    vi.advanceTimersByTime(1_000);
    expect(calls.polls).toBe(1);
    expect(calls.closed).toEqual([7]);
  });
});
