import { describe, expect, it } from "vitest";
import { redactUrl } from "./urls.js";

describe("redactUrl", () => {
  it("hides a password, keeps the rest", () => {
    expect(redactUrl("postgres://harbor:s3cret@db:5432/harbor")).toBe("postgres://harbor:***@db:5432/harbor");
    expect(redactUrl("postgres://postgres@127.0.0.1:5432/harbor")).toBe("postgres://postgres@127.0.0.1:5432/harbor");
  });

  it("with user, hides a NATS token given as the user name too", () => {
    expect(redactUrl("nats://nats-token-0123@127.0.0.1:4222", { user: true })).toBe("nats://***@127.0.0.1:4222");
    expect(redactUrl("nats://u:p@127.0.0.1:4222", { user: true })).toBe("nats://***:***@127.0.0.1:4222");
    expect(redactUrl("nats://127.0.0.1:4222", { user: true })).toBe("nats://127.0.0.1:4222");
  });

  it("never prints what it cannot parse", () => {
    expect(redactUrl("not a url with secret")).toBe("[unparsable url]");
  });
});
