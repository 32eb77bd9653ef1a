import { execFileSync } from "node:child_process";
import { chmodSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import type { Backend } from "@harbor/proto";
import { createLogger } from "@harbor/runtime";
import { connectLines, freePort, startEchoBackend, startUdpEchoBackend, udpClient, uniqueName, waitFor, type UdpClient } from "@harbor/testkit";
import type { KernelPort } from "./render.js";
import { KernelTable, kernelModeAvailable } from "./table.js";

const logger = createLogger("test", "silent");
const usable = (await kernelModeAvailable()) === undefined;
const cleanup: Array<() => unknown> = [];

afterEach(async () => {
  for (const c of cleanup.splice(0).reverse()) await c();
});

const backend = (port: number): Backend => ({ instanceId: `i${port}`, app: "a", host: "127.0.0.1", port, availableSince: undefined });

/** A table of the test's own on `host` (127.0.0.1 unless the test moves it), deleted afterwards; ports are set by the test. */
function table(host = { address: "127.0.0.1" }) {
  const name = uniqueName("harbor_test").replace(/[^A-Za-z0-9_]/g, "_");
  const t = new KernelTable(name, () => host.address, logger);
  cleanup.push(async () => {
    await t.destroy();
    // Whatever the test did, no table of its own is left behind.
    try {
      execFileSync("nft", ["delete", "table", "ip", name], { stdio: "ignore" });
    } catch {
      // already gone
    }
  });
  const ports = new Map<string, KernelPort>();
  const set = (port: number, protocol: "tcp" | "udp", backends: Backend[] | undefined) => {
    const key = `${protocol}/${port}`;
    if (backends === undefined) {
      ports.delete(key);
      t.remove(key);
    } else {
      ports.set(key, { port, protocol, backends });
      t.add({ key, current: () => ports.get(key) as KernelPort });
    }
    return t.update();
  };
  return { name, table: t, set };
}

async function client(port: number): Promise<UdpClient> {
  const c = await udpClient(port);
  cleanup.push(() => c.close());
  return c;
}

async function udpBackends(...names: string[]) {
  const started = await Promise.all(names.map((n) => startUdpEchoBackend(n)));
  for (const b of started) cleanup.push(() => b.close());
  return started;
}

/** A reply's text, or "none" after `ms`: short where none is expected, long enough for a loaded machine where one is. */
const answer = (c: UdpClient, text: string, ms = 2_000) => c.ask(text, ms).then((r) => r.text, () => "none");

describe.skipIf(!usable)("kernel table - UDP flows follow the FIFO primary as userspace sessions do", () => {
  it("a primary restored by its health check takes new flows; flows on the one that stood in stay there until it leaves", async () => {
    const { set } = table();
    const front = await freePort();
    const [a, b] = await udpBackends("a", "b");
    expect(await set(front, "udp", [backend(a!.port), backend(b!.port)])).toBeUndefined();
    const early = await client(front);
    expect(await answer(early, "1")).toBe("a:1");

    // a is ejected (its health check failed): its flow moves to b.
    await set(front, "udp", [backend(b!.port)]);
    expect(await answer(early, "2")).toBe("b:2");

    // a is healthy again: it is the primary for new flows, but b did not leave, so its flow stays.
    await set(front, "udp", [backend(a!.port), backend(b!.port)]);
    expect(await answer(early, "3")).toBe("b:3");
    const late = await client(front);
    expect(await answer(late, "4")).toBe("a:4");

    // b leaves: its flow moves to the primary.
    await set(front, "udp", [backend(a!.port)]);
    expect(await answer(early, "5")).toBe("a:5");
  });

  it("a port taken out of the table ends its flows, as closing a userspace listener ends its sessions", async () => {
    const { set } = table();
    const front = await freePort();
    const [a] = await udpBackends("a");
    await set(front, "udp", [backend(a!.port)]);
    const c = await client(front);
    expect(await answer(c, "1")).toBe("a:1");
    await set(front, "udp", undefined);
    const before = a!.received;
    expect(await answer(c, "2", 300)).toBe("none");
    expect(a!.received).toBe(before);
  });

  it("flows that began while a port had no rule are carried once it has one", async () => {
    const { set } = table();
    const [other, front] = [await freePort(), await freePort()];
    const [a] = await udpBackends("a");
    // The table is there (for another port): the kernel tracks the datagrams to `front`, which nothing answers.
    await set(other, "udp", []);
    const c = await client(front);
    expect(await answer(c, "early", 300)).toBe("none");
    await set(front, "udp", [backend(a!.port)]);
    expect(await answer(c, "1")).toBe("a:1");
  });
});

describe.skipIf(!usable)("kernel table - flow counters", () => {
  it("count new TCP connections, and a whole rewrite of the table (a host change) carries them over", async () => {
    const host = { address: "127.0.0.1" };
    const { table: t, set } = table(host);
    const front = await freePort();
    const x = await startEchoBackend("x");
    cleanup.push(() => x.close());
    expect(await set(front, "tcp", [backend(x.port)])).toBeUndefined();
    for (let i = 0; i < 3; i++) {
      const c = await connectLines(front);
      expect(await c.nextLine()).toBe("x");
      c.close();
    }
    expect(await t.flows()).toEqual({ tcp: 3, udp: 0 });

    host.address = "127.0.0.2";
    expect(await t.update()).toBeUndefined();
    expect(await t.flows()).toEqual({ tcp: 3, udp: 0 });
    const moved = await connectLines(front, "127.0.0.2");
    cleanup.push(() => moved.close());
    expect(await moved.nextLine()).toBe("x");
    expect(await t.flows()).toEqual({ tcp: 4, udp: 0 });
  });
});

describe.skipIf(!usable)("kernel table - failures and stopping", () => {
  it("an apply nft refuses is retried, so the kernel does not keep a stale backend set", async () => {
    const { name, set } = table();
    const front = await freePort();
    const [x, y] = [await startEchoBackend("x"), await startEchoBackend("y")];
    cleanup.push(() => x.close(), () => y.close());
    expect(await set(front, "tcp", [backend(x.port)])).toBeUndefined();

    // An nft whose applies fail twice (a transient error: the change, then the whole table), then work.
    const dir = mkdtempSync(join(tmpdir(), "harbor-nft-"));
    const failures = join(dir, "failures");
    const real = execFileSync("sh", ["-c", "command -v nft"]).toString().trim();
    writeFileSync(
      join(dir, "nft"),
      `#!/bin/sh\nn=$(cat ${failures})\nif [ "$1" = "-f" ] && [ "$n" -gt 0 ]; then echo $((n - 1)) > ${failures}; cat >/dev/null; echo transient >&2; exit 1; fi\nexec ${real} "$@"\n`,
    );
    chmodSync(join(dir, "nft"), 0o755);
    writeFileSync(failures, "2");
    const path = process.env.PATH;
    process.env.PATH = `${dir}:${path}`;
    cleanup.push(() => {
      process.env.PATH = path;
      rmSync(dir, { recursive: true, force: true });
    });

    expect(await set(front, "tcp", [backend(y.port)])).toBeDefined();
    expect(readFileSync(failures, "utf8").trim()).toBe("0");
    // Nobody else changes anything: the table still comes to send the port to y.
    await waitFor(() => execFileSync(real, ["list", "chain", "ip", name, `p_tcp_${front}`]).toString().includes(`:${y.port}`), "the retried apply", 5_000);
    const c = await connectLines(front);
    cleanup.push(() => c.close());
    expect(await c.nextLine()).toBe("y");
  });

  it("stopping lets open TCP connections finish up to the deadline: they carry on while new ones are refused", async () => {
    const { table: t, set } = table();
    const front = await freePort();
    const x = await startEchoBackend("x");
    cleanup.push(() => x.close());
    await set(front, "tcp", [backend(x.port)]);
    const open = await connectLines(front);
    cleanup.push(() => open.close());
    expect(await open.nextLine()).toBe("x");

    await set(front, "tcp", undefined);
    const drained = t.drain(10_000);
    let done = false;
    void drained.then(() => (done = true));
    await expect(connectLines(front)).rejects.toThrow();
    expect(await open.roundTrip("still")).toBe("still");
    expect(done).toBe(false);
    open.close();
    const started = Date.now();
    await drained;
    expect(Date.now() - started).toBeLessThan(3_000);
  });
});
