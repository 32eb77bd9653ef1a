import { describe, expect, it } from "vitest";
import { isChannelControl, parseChannelControl } from "./relay-protocol.js";

describe("relay protocol - control messages read off the hand-off channel", () => {
  it("takes the rotation, forget and stop messages the worker sends", () => {
    expect(isChannelControl({ t: "rotation", l: 1, b: [{ host: "127.0.0.1", port: 4100 }] })).toBe(true);
    expect(isChannelControl({ t: "rotation", l: 2, b: [], e: ["127.0.0.1:4100"] })).toBe(true);
    expect(isChannelControl({ t: "forget", l: 3 })).toBe(true);
    expect(isChannelControl({ t: "stop", deadlineMs: 0 })).toBe(true);
  });

  it("refuses anything a relay would act on wrongly or crash on later", () => {
    for (const bad of [
      null,
      "rotation",
      7,
      [],
      {},
      { t: "conn", l: 1, s: 0, any: false },
      { t: "rotation", l: 1, b: "127.0.0.1:4100" },
      { t: "rotation", l: 1, b: [{ host: "127.0.0.1", port: 0 }] },
      { t: "rotation", l: 1, b: [{ host: "127.0.0.1", port: 70_000 }] },
      { t: "rotation", l: 1, b: [{ host: 1, port: 4100 }] },
      { t: "rotation", l: 0, b: [] },
      { t: "rotation", l: 1, b: [], e: [4100] },
      { t: "forget", l: "1" },
      { t: "stop", deadlineMs: -1 },
      { t: "stop" },
    ]) {
      expect(isChannelControl(bad), JSON.stringify(bad)).toBe(false);
    }
  });

  it("parses a message's text, or says why it is not one", () => {
    expect(parseChannelControl('{"t":"forget","l":4}')).toEqual({ t: "forget", l: 4 });
    expect(parseChannelControl("{not json")).toBeInstanceOf(SyntaxError);
    expect((parseChannelControl("[1,2,3]") as Error).message).toBe("a JSON array that is not a rotation, forget or stop the worker sends");
    expect((parseChannelControl('{"t":"rotation","l":1,"b":"x"}') as Error).message).toBe('a "rotation" message that is not a rotation, forget or stop the worker sends');
  });
});
