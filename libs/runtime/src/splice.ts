import type { Duplex } from "node:stream";

/**
 * Joins two connected sockets both ways. Half-close passes through: each
 * side's end ends the other's write side, so a client that shuts down its
 * sending side still gets the rest of the answer. An error or reset on
 * either side tears down both. `onClosed` runs once, when both are closed.
 */
export function spliceSockets(a: Duplex, b: Duplex, onClosed?: () => void): void {
  let open = 2;
  const closed = (other: Duplex) => (hadError?: boolean) => {
    if (hadError) other.destroy();
    // Ending a side that already finished would build (and throw away) an error per connection.
    else if (!other.destroyed && !other.writableEnded) other.end();
    if (--open === 0) onClosed?.();
  };
  a.once("close", closed(b));
  b.once("close", closed(a));
  // Errors end in "close" with hadError; listening here keeps them from being unhandled.
  a.on("error", () => undefined);
  b.on("error", () => undefined);
  a.pipe(b);
  b.pipe(a);
}
