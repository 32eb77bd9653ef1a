import { randomBytes } from "node:crypto";

/** A name unique to this run, usable as a NATS token, SQL identifier or app name: `prefix_<hex>`. */
export function uniqueName(prefix = "t"): string {
  return `${prefix}_${randomBytes(5).toString("hex")}`;
}
