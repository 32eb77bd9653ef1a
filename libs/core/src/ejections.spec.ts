import { describe, expect, it } from "vitest";
import { ManualClock } from "./clock.js";
import { Ejections } from "./ejections.js";

describe("ejections - backends out of rotation", () => {
  it("a passive ejection lasts its period, then the backend is tried again", () => {
    const clock = new ManualClock();
    const ejections = new Ejections(clock, 1_000);
    ejections.eject("10.0.0.1:80");
    expect(ejections.isEjected("10.0.0.1:80")).toBe(true);
    expect(ejections.isEjected("10.0.0.2:80")).toBe(false);
    clock.advance(999);
    expect(ejections.isEjected("10.0.0.1:80")).toBe(true);
    clock.advance(1);
    expect(ejections.isEjected("10.0.0.1:80")).toBe(false);
    expect(ejections.size).toBe(0);
  });

  it("an indefinite ejection lasts until restored", () => {
    const clock = new ManualClock();
    const ejections = new Ejections(clock, 1_000);
    ejections.eject("a", true);
    clock.advance(1e9);
    expect(ejections.isEjected("a")).toBe(true);
    ejections.restore("a");
    expect(ejections.isEjected("a")).toBe(false);
  });
});
