import { describe, expect, it } from "vitest";
import { RoundRobin } from "./pickers.js";

describe("pickers - round-robin", () => {
  it("spreads connections evenly over the backends", () => {
    const rr = new RoundRobin();
    const counts = [0, 0, 0];
    for (let i = 0; i < 9; i++) counts[rr.start(3)]! += 1;
    expect(counts).toEqual([3, 3, 3]);
  });

  it("keeps rotating across backend-set changes instead of restarting at the first", () => {
    const rr = new RoundRobin();
    expect(rr.start(3)).toBe(0);
    expect(rr.start(3)).toBe(1);
    // the set shrinks to two: the rotation goes on from where it was
    expect(rr.start(2)).toBe(0);
    expect(rr.start(2)).toBe(1);
    expect(rr.start(4)).toBe(2);
  });

  it("says -1 when there is no backend", () => {
    expect(new RoundRobin().start(0)).toBe(-1);
  });
});
