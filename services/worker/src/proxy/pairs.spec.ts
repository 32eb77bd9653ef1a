import { describe, expect, it } from "vitest";
import { PAIR_CONNECTED, PAIR_ENDED, type NativeModule } from "./native.js";
import { NativePairTable, type PairHandler } from "./pairs.js";

/** The module's side of the table, faked: dial gives out ids in turn; `records` writes a batch and delivers it as the module does. */
function fakeModule() {
  let onRecords: ((count: number) => void) | undefined;
  let array: Float64Array = new Float64Array(0);
  let nextId = 0;
  const cuts: number[] = [];
  const module = {
    pairEvents: (records: Float64Array, callback: (count: number) => void) => {
      array = records;
      onRecords = callback;
    },
    dial: () => nextId++,
    cut: (id: number) => cuts.push(id),
  } as unknown as NativeModule;
  const records = (...batch: Array<[number, number, number?, number?]>) => {
    batch.forEach(([id, event, a = 0, b = 0], i) => array.set([id, event, a, b], 4 * i));
    onRecords?.(batch.length);
  };
  return { module, records, cuts };
}

function handler(log: string[], name: string, throws = false): PairHandler {
  return {
    id: -1,
    connected: () => log.push(`${name} connected`),
    ended: (toBackend, toClient) => {
      log.push(`${name} ended ${toBackend}/${toClient}`);
      if (throws) throw new Error(`${name} threw`);
    },
    failed: (errno) => log.push(`${name} failed ${errno}`),
  };
}

describe("native pair table - records", () => {
  it("gives each record to its pair's handler, and a cut after a pair's last record does nothing", () => {
    const fake = fakeModule();
    const table = new NativePairTable(fake.module, 4);
    const log: string[] = [];
    const a = handler(log, "a");
    const b = handler(log, "b");
    expect(table.dial(10, "127.0.0.1", 1, 1000, 60, false, a)).toBe(0);
    expect(table.dial(11, "127.0.0.1", 1, 1000, 60, false, b)).toBe(1);
    fake.records([1, PAIR_CONNECTED], [0, -111], [1, PAIR_ENDED, 5, 7]);
    expect(log).toEqual(["b connected", "a failed -111", "b ended 5/7"]);
    table.cut(a);
    table.cut(b);
    expect(fake.cuts).toEqual([]);
  });

  it("a handler that throws does not keep the batch's other records from theirs; the error comes after", () => {
    const fake = fakeModule();
    const table = new NativePairTable(fake.module, 4);
    const log: string[] = [];
    const handlers = [handler(log, "a", true), handler(log, "b"), handler(log, "c")];
    for (const h of handlers) table.dial(10, "127.0.0.1", 1, 1000, 60, false, h);
    expect(() => fake.records([0, PAIR_ENDED, 1, 1], [1, PAIR_ENDED, 2, 2], [2, PAIR_CONNECTED])).toThrow("a threw");
    expect(log).toEqual(["a ended 1/1", "b ended 2/2", "c connected"]);
    // c is still open: its cut reaches the module; a and b are gone.
    for (const h of handlers) table.cut(h);
    expect(fake.cuts).toEqual([2]);
  });
});
