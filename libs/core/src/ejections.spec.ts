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

  it("a passive ejection never shortens one in force: a check's stays until restored, a later refusal extends", () => {
    const clock = new ManualClock();
    const ejections = new Ejections(clock, 1_000);
    ejections.eject("checked", true);
    ejections.eject("checked");
    clock.advance(5_000);
    expect(ejections.isEjected("checked")).toBe(true);
    ejections.eject("refused");
    clock.advance(600);
    ejections.eject("refused");
    clock.advance(600);
    expect(ejections.isEjected("refused")).toBe(true);
    clock.advance(400);
    expect(ejections.isEjected("refused")).toBe(false);
  });

  it("counts only ejections in force, also of backends nobody asks about again", () => {
    const clock = new ManualClock();
    const ejections = new Ejections(clock, 1_000);
    ejections.eject("gone:80");
    ejections.eject("kept:80", true);
    expect(ejections.active).toBe(2);
    clock.advance(1_000);
    // Never asked about with isEjected: it has expired all the same.
    expect(ejections.active).toBe(1);
  });
});
