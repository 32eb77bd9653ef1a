import { spawn } from "node:child_process";
import type { Logger } from "pino";
import { flowCounter, portRules, renderDelta, renderTable, type KernelPort, type PortRules } from "./render.js";

/** Runs a command with `input` on stdin; resolves with its exit code, stdout and stderr. */
function run(command: string, args: string[], input = ""): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(command, args, { stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (d: Buffer) => (stdout += d.toString()));
    child.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
    child.once("error", (err) => resolve({ code: 127, stdout, stderr: err.message }));
    child.once("exit", (code) => resolve({ code: code ?? 1, stdout, stderr: stderr.trim() }));
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
 * The node's nftables table. The first apply (and any after a failure or a
 * host change) writes the whole table; later ones change only the ports that
 * changed, each in one nft transaction — at 5,000 ports a whole table takes
 * nft seconds, one port's change about a tenth of one. When a UDP port's
 * primary changes, the conntrack entries of the departed primary are
 * deleted, so only its flows move; TCP connections keep their conntrack
 * entry and are never cut.
 */
export class KernelTable {
  private readonly sources = new Map<string, KernelPortSource>();
  private readonly primaries = new Map<string, string>();
  private applying: Promise<string | undefined> = Promise.resolve(undefined);
  private pending: Promise<string | undefined> | undefined;
  /** What the kernel holds now, as far as we know; undefined: write the whole table next time. */
  private installed: { host: string; rules: PortRules } | undefined;
  applied = 0;
  /** The flow counters as last read. */
  private lastFlows = { tcp: 0, udp: 0 };

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
    const rules = portRules(ports);
    const installed = this.installed;
    this.installed = undefined;
    if (installed && installed.host === host) {
      const delta = renderDelta(this.name, installed.rules, rules);
      const result = delta === "" ? undefined : await run("nft", ["-f", "-"], delta);
      // A failed delta (the table changed behind our back?) falls through to a whole table.
      if (!result || result.code === 0) {
        this.installed = { host, rules };
        if (result) this.logger.debug({ table: this.name, ports: rules.size, whole: false }, "nftables-applied");
      }
      else this.logger.warn({ table: this.name, error: firstLines(result.stderr) }, "nftables-delta-failed-rewriting-table");
    }
    if (!this.installed) {
      const result = await run("nft", ["-f", "-"], renderTable(this.name, host, rules));
      if (result.code !== 0) {
        this.logger.error({ table: this.name, error: firstLines(result.stderr) }, "nftables-apply-failed");
        return result.stderr || `nft exited ${result.code}`;
      }
      this.installed = { host, rules };
      this.logger.debug({ table: this.name, ports: rules.size, whole: true }, "nftables-applied");
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

  /**
   * New flows the kernel has sent on (or refused), by protocol, from the
   * table's counters (NAT rules see a flow's first packet only). They count
   * from the last time the table was written whole.
   */
  async flows(): Promise<{ tcp: number; udp: number }> {
    // A netlink dump is cut short when any table of the host changes meanwhile:
    // tried a few times, and a read that still fails repeats the last good one
    // (a counter that dropped to 0 would read as a reset).
    for (let attempt = 0; attempt < 3; attempt++) {
      const listed = await run("nft", ["-j", "list", "counters", "table", "ip", this.name]);
      if (listed.code !== 0) continue;
      try {
        const doc = JSON.parse(listed.stdout) as { nftables?: Array<{ counter?: { name: string; packets: number } }> };
        const packets = (protocol: "tcp" | "udp") => doc.nftables?.find((item) => item.counter?.name === flowCounter(protocol))?.counter?.packets ?? 0;
        this.lastFlows = { tcp: packets("tcp"), udp: packets("udp") };
        break;
      } catch {
        // Unreadable output: try again.
      }
    }
    return this.lastFlows;
  }

  /** Removes the table. Open connections keep their conntrack entries, so they are not cut. */
  async destroy(): Promise<void> {
    await this.applying;
    this.installed = undefined;
    await run("nft", ["delete", "table", "ip", this.name]);
  }
}

const firstLines = (text: string) => text.split("\n").slice(0, 3).join(" ");

/** Whether this process may program nftables (root or CAP_NET_ADMIN, and nft installed). */
export async function kernelModeAvailable(): Promise<string | undefined> {
  const probe = await run("nft", ["list", "tables"]);
  return probe.code === 0 ? undefined : probe.stderr || "nft is not usable";
}
