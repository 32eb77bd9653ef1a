import { spawn } from "node:child_process";
import type { Logger } from "pino";
import { renderTable, type KernelPort } from "./render.js";

/** Runs a command with `input` on stdin; resolves with its exit code and stderr. */
function run(command: string, args: string[], input = ""): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { stdio: ["pipe", "ignore", "pipe"] });
    let stderr = "";
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.once("error", (err) => resolve({ code: 127, stderr: err.message }));
    child.once("exit", (code) => resolve({ code: code ?? 1, stderr: stderr.trim() }));
    // A command that does not read its input may exit first: EPIPE here is not an error of ours.
    child.stdin.on("error", () => undefined);
    child.stdin.end(input);
  });
}

export interface KernelPortSource {
  readonly key: string;
  current(): KernelPort;
}

/**
 * The node's nftables table. Every change re-renders the whole table and
 * applies it in one nft transaction (state, not deltas). When a UDP port's
 * primary changes, the conntrack entries of the departed primary are
 * deleted, so only its flows move; TCP connections keep their conntrack
 * entry and are never cut.
 */
export class KernelTable {
  private readonly sources = new Map<string, KernelPortSource>();
  private readonly primaries = new Map<string, string>();
  private applying: Promise<string | undefined> = Promise.resolve(undefined);
  private pending: Promise<string | undefined> | undefined;
  applied = 0;

  constructor(
    private readonly name: string,
    private readonly host: () => string | undefined,
    private readonly logger: Logger,
  ) {}

  add(source: KernelPortSource): void {
    this.sources.set(source.key, source);
  }

  remove(key: string): void {
    this.sources.delete(key);
  }

  /** Applies the current state soon; calls made meanwhile share one apply. Resolves with an error message, if any. */
  update(): Promise<string | undefined> {
    this.pending ??= this.applying.then(() => {
      this.pending = undefined;
      return this.apply();
    });
    this.applying = this.pending;
    return this.pending;
  }

  private async apply(): Promise<string | undefined> {
    const host = this.host();
    if (!host) return "the node's host is not known yet";
    const ports = [...this.sources.values()].map((s) => s.current());
    const result = await run("nft", ["-f", "-"], renderTable(this.name, host, ports));
    if (result.code !== 0) {
      this.logger.error({ table: this.name, error: result.stderr.split("\n").slice(0, 3).join(" ") }, "nftables-apply-failed");
      return result.stderr || `nft exited ${result.code}`;
    }
    this.applied++;
    await this.forgetDepartedPrimaries(host, ports);
    return undefined;
  }

  private async forgetDepartedPrimaries(host: string, ports: KernelPort[]): Promise<void> {
    for (const p of ports.filter((x) => x.protocol === "udp")) {
      const key = String(p.port);
      const primary = p.backends[0] ? `${p.backends[0].host}:${p.backends[0].port}` : "";
      const before = this.primaries.get(key);
      this.primaries.set(key, primary);
      if (!before || before === primary) continue;
      const cut = before.lastIndexOf(":");
      const [oldHost, oldPort] = [before.slice(0, cut), before.slice(cut + 1)];
      const deleted = await run("conntrack", ["-D", "-p", "udp", "--orig-dst", host, "--dport", key, "--reply-src", oldHost, "--reply-port-src", oldPort]);
      this.logger.info({ port: p.port, from: before, to: primary, conntrack: deleted.stderr.split("\n").pop() }, "udp-primary-moved");
    }
  }

  /** Removes the table. Open connections keep their conntrack entries, so they are not cut. */
  async destroy(): Promise<void> {
    await this.applying;
    await run("nft", ["delete", "table", "ip", this.name]);
  }
}

/** Whether this process may program nftables (root or CAP_NET_ADMIN, and nft installed). */
export async function kernelModeAvailable(): Promise<string | undefined> {
  const probe = await run("nft", ["list", "tables"]);
  return probe.code === 0 ? undefined : probe.stderr || "nft is not usable";
}
