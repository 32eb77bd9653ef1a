import { spawn } from "node:child_process";
import { isIPv4 } from "node:net";
import type { Logger } from "pino";
import { backendKey } from "../proxy/dial.js";
import { TABLE_NAME_START, flowCounter, portRules, renderDelta, renderTable, type FlowCounts, type KernelPort, type PortRules } from "./render.js";

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

/** One conntrack entry as `conntrack -L` prints it: the original direction's ports, where replies come from, its TCP state. */
interface Flow {
  dport: number;
  replyFrom: string;
  state: string;
}

/** Parses `conntrack -L` output: per line, the original tuple, then the reply tuple. */
function parseFlows(text: string): Flow[] {
  const flows: Flow[] = [];
  for (const line of text.split("\n")) {
    const fields = [...line.matchAll(/\b(src|sport|dport)=(\S+)/g)];
    const dport = fields.find(([, key]) => key === "dport")?.[2];
    const src = fields.filter(([, key]) => key === "src")[1]?.[2];
    const sport = fields.filter(([, key]) => key === "sport")[1]?.[2];
    if (dport === undefined || src === undefined || sport === undefined) continue;
    flows.push({ dport: Number(dport), replyFrom: `${src}:${sport}`, state: line.trim().split(/\s+/)[3] ?? "" });
  }
  return flows;
}

/** TCP states of a connection that is still open (not TIME_WAIT or CLOSE). */
const OPEN_TCP = new Set(["SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "SYN_SENT2"]);

/**
 * The node's nftables table. The first apply (and any after a failure or a
 * host change) writes the whole table; later ones change only the ports that
 * changed, each in one nft transaction — at 5,000 ports a whole table takes
 * nft seconds, one port's change about a tenth of one. An apply that fails is
 * retried until one succeeds: the kernel must not keep a stale set.
 *
 * UDP flows live in conntrack and would stay on the backend their first
 * datagram went to. As userspace sessions do, a flow moves only when its
 * backend leaves the rotation (deregistered, expired, ejected while another
 * can take it): those flows' entries are deleted, so their next datagram
 * goes to the primary. Flows that began while the port had no rule (no
 * NAT at all) move too, once it has one; a port taken out of the table ends
 * its flows. TCP connections keep their conntrack entry and are never cut.
 */
export class KernelTable {
  private readonly sources = new Map<string, KernelPortSource>();
  /** Per UDP port in the table: the backends (`host:port`) that may hold flows of it. */
  private udpHolders = new Map<number, Set<string>>();
  /** Per UDP port: its rotation (`host:port`, …) when its holders were last brought in line. */
  private udpRotations = new Map<number, string>();
  /** The address the holders' flows were sent to. */
  private udpHost: string | undefined;
  /** TCP ports the table has carried: their connections are waited for on drain. */
  private readonly tcpCarried = new Set<number>();
  private applying: Promise<string | undefined> = Promise.resolve(undefined);
  private pending: Promise<string | undefined> | undefined;
  /** What the kernel holds now, as far as we know; undefined: write the whole table next time. */
  private installed: { host: string; rules: PortRules } | undefined;
  private retry: NodeJS.Timeout | undefined;
  /** The wait before the next retry of a failed apply: doubles while applies fail, so a failure that repeats does not rewrite the table every second. */
  private retryDelayMs = FIRST_RETRY_MS;
  private destroyed = false;
  applied = 0;
  /** The flow counters as last read (or carried into a rewritten table). */
  private lastFlows: FlowCounts = { tcp: 0, udp: 0 };
  /** The last read of the counters failed (and was logged). */
  private flowsStale = false;

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
    this.pending ??= this.applying.then(async () => {
      this.pending = undefined;
      clearTimeout(this.retry);
      this.retry = undefined;
      if (this.destroyed) return "the table is being removed";
      const outcome = await this.apply().catch((err: unknown) => {
        this.logger.error({ table: this.name, err }, "nftables-apply-failed");
        return { error: err instanceof Error ? err.message : String(err), retry: true };
      });
      // The kernel may now hold an older state than the worker: try again until it takes.
      if (outcome.retry && !this.destroyed) {
        this.retry = setTimeout(() => void this.update(), this.retryDelayMs);
        this.retry.unref();
        this.retryDelayMs = Math.min(MAX_RETRY_MS, this.retryDelayMs * 2);
      } else if (!outcome.error) this.retryDelayMs = FIRST_RETRY_MS;
      return outcome.error;
    });
    this.applying = this.pending;
    return this.pending;
  }

  /** One apply: the error, if any, and whether trying again may help (not while the host is unusable). */
  private async apply(): Promise<{ error?: string; retry: boolean }> {
    const host = this.host();
    if (!host) return { error: "the node's host is not known yet", retry: false };
    const unusable = kernelHostProblem(host);
    if (unusable) {
      const error = `${unusable} (set the node's host, or HARBOR_WORKER_LISTEN_HOST, to it)`;
      this.logger.error({ table: this.name, host, error }, "nftables-host-not-usable");
      return { error, retry: false };
    }
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
      // The rewrite re-creates the counters: they start from what the table has counted so far,
      // so the metric never goes back. Before this process's first write there is often no
      // table to read (one try); after it, a failed read is a dump cut short (three).
      const counted = await this.readCounters(this.applied > 0 ? 3 : 1);
      const carried = { tcp: Math.max(counted?.tcp ?? 0, this.lastFlows.tcp), udp: Math.max(counted?.udp ?? 0, this.lastFlows.udp) };
      const result = await run("nft", ["-f", "-"], renderTable(this.name, host, rules, carried));
      if (result.code !== 0) {
        const error = `nftables refused the node's table: ${firstLines(result.stderr) || `nft exited ${result.code}`}`;
        this.logger.error({ table: this.name, error }, "nftables-apply-failed");
        return { error, retry: true };
      }
      this.lastFlows = carried;
      this.installed = { host, rules };
      this.logger.debug({ table: this.name, ports: rules.size, whole: true }, "nftables-applied");
    }
    this.applied++;
    for (const p of ports) if (p.protocol === "tcp") this.tcpCarried.add(p.port);
    await this.moveUdpFlows(host, ports);
    return { retry: false };
  }

  /** After an apply: the UDP flows whose backend left the rotation (or that have none) go, so their next datagram follows the rules. */
  private async moveUdpFlows(host: string, ports: KernelPort[]): Promise<void> {
    // Flows to another address are not the rules' any more; those to this one are looked up afresh.
    if (this.udpHost !== host) {
      this.udpHolders = new Map();
      this.udpRotations = new Map();
    }
    this.udpHost = host;
    const udp = new Map(ports.filter((p) => p.protocol === "udp").map((p) => [p.port, p]));
    const remove = (port: number, from?: string) => {
      const filter = ["-D", "-p", "udp", "--orig-dst", host, "--dport", String(port)];
      if (from !== undefined) {
        const cut = from.lastIndexOf(":");
        filter.push("--reply-src", from.slice(0, cut), "--reply-port-src", from.slice(cut + 1));
      }
      return run("conntrack", filter).then((result) => {
        // Exit 1 with "0 flow entries have been deleted" is no failure: there were none.
        const ok = result.code === 0 || /flow entries have been deleted/.test(result.stderr);
        if (!ok) this.logger.warn({ port, from, error: firstLines(result.stderr) }, "conntrack-delete-failed");
        return { ...result, ok };
      });
    };
    // A port taken out of the table ends its flows, as a closed userspace listener ends its sessions.
    for (const port of [...this.udpHolders.keys()]) {
      if (udp.has(port)) continue;
      this.udpHolders.delete(port);
      this.udpRotations.delete(port);
      const deleted = await remove(port);
      this.logger.debug({ port, conntrack: lastLine(deleted.stderr) }, "udp-flows-ended");
    }
    // A port new to the table: whatever flows the kernel already tracks for it (a previous
    // worker's, or ones that met no rule and were never translated) are its holders.
    const fresh = [...udp.keys()].filter((port) => !this.udpHolders.has(port));
    if (fresh.length > 0) {
      const listed = await run("conntrack", ["-L", "-p", "udp", "--orig-dst", host]);
      if (listed.code !== 0) this.logger.warn({ error: firstLines(listed.stderr) }, "conntrack-list-failed");
      const byPort = new Map<number, Set<string>>();
      for (const f of listed.code === 0 ? parseFlows(listed.stdout) : []) {
        if (!byPort.has(f.dport)) byPort.set(f.dport, new Set());
        byPort.get(f.dport)?.add(f.replyFrom);
      }
      for (const port of fresh) this.udpHolders.set(port, byPort.get(port) ?? new Set());
    }
    for (const [port, p] of udp) {
      // Holders change only with the port's rotation: an apply for another port's change leaves this one be.
      const keys = p.backends.map(backendKey);
      const signature = keys.join(",");
      if (this.udpRotations.get(port) === signature) continue;
      this.udpRotations.set(port, signature);
      const holders = this.udpHolders.get(port) as Set<string>;
      const rotation = new Set(keys);
      const primary = keys[0];
      for (const from of [...holders]) {
        if (rotation.has(from)) continue;
        const deleted = await remove(port, from);
        // Kept when the deletion failed: the next change of the port tries again.
        if (deleted.ok) holders.delete(from);
        this.logger.info({ port, from, to: primary ?? "", moved: deleted.ok, conntrack: lastLine(deleted.stderr) }, "udp-flows-moved");
      }
      if (primary) holders.add(primary);
    }
  }

  /**
   * New flows the kernel has sent on (or refused), by protocol, from the
   * table's counters (NAT rules see a flow's first packet only). A whole
   * rewrite of the table carries them over, so they only grow.
   */
  async flows(): Promise<FlowCounts> {
    const read = await this.readCounters(3);
    // Said once while reads keep failing: the metric repeats its last value meanwhile
    // (a counter that dropped to 0 would read as a reset).
    if (!read && !this.flowsStale) this.logger.warn({ table: this.name }, "nftables-counters-unreadable");
    this.flowsStale = !read;
    if (read) this.lastFlows = read;
    return this.lastFlows;
  }

  /** The table's flow counters, or undefined when `attempts` reads all failed (no table, or a dump cut short). */
  private async readCounters(attempts: number): Promise<FlowCounts | undefined> {
    // A netlink dump is cut short when any table of the host changes meanwhile: worth another try.
    for (let attempt = 0; attempt < attempts; attempt++) {
      const listed = await run("nft", ["-j", "list", "counters", "table", "ip", this.name]);
      if (listed.code !== 0) continue;
      try {
        const doc = JSON.parse(listed.stdout) as { nftables?: Array<{ counter?: { name: string; packets: number } }> };
        const packets = (protocol: "tcp" | "udp") => doc.nftables?.find((item) => item.counter?.name === flowCounter(protocol))?.counter?.packets ?? 0;
        return { tcp: packets("tcp"), udp: packets("udp") };
      } catch {
        // Unreadable output: try again.
      }
    }
    return undefined;
  }

  /**
   * Waits, up to the deadline, until no TCP connection the table carried is
   * open any more. The table must stay meanwhile: the kernel translates an
   * open connection's packets only while some NAT chain is hooked in, so
   * removing the table (the last one) would cut every one of them.
   */
  async drain(deadlineMs: number): Promise<void> {
    await this.applying;
    const host = this.installed?.host ?? this.host();
    if (host === undefined || this.tcpCarried.size === 0) return;
    const deadline = Date.now() + deadlineMs;
    let open = 0;
    for (;;) {
      const listed = await run("conntrack", ["-L", "-p", "tcp", "--orig-dst", host, "--dst-nat"]);
      // Without conntrack the open connections cannot be seen: they get the whole deadline, waited once.
      open = listed.code === 0 ? parseFlows(listed.stdout).filter((f) => this.tcpCarried.has(f.dport) && OPEN_TCP.has(f.state)).length : Number.POSITIVE_INFINITY;
      if (open === 0 || Date.now() >= deadline) break;
      const wait = listed.code === 0 ? Math.min(100, deadline - Date.now()) : deadline - Date.now();
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, wait)));
    }
    if (open > 0) this.logger.info({ table: this.name, open: Number.isFinite(open) ? open : "unknown" }, "kernel-drain-deadline-passed");
  }

  /** Removes the table: connections still open through it are cut (see `drain`). */
  async destroy(): Promise<void> {
    this.destroyed = true;
    clearTimeout(this.retry);
    await this.applying;
    this.installed = undefined;
    await run("nft", ["delete", "table", "ip", this.name]);
  }
}

const lastLine = (text: string) => text.split("\n").pop();
const firstLines = (text: string) => text.split("\n").slice(0, 3).join(" ");

const FIRST_RETRY_MS = 1_000;
const MAX_RETRY_MS = 30_000;

/**
 * Why the kernel's rules cannot match packets for this host, if they cannot:
 * they match the IPv4 address clients connect to (nft takes no IPv6 address
 * in an ip table, and no packet is sent to 0.0.0.0).
 */
export function kernelHostProblem(host: string): string | undefined {
  return isIPv4(host) && host !== "0.0.0.0" ? undefined : `kernel mode matches packets by the IPv4 address clients connect to; ${host} is not one`;
}

/**
 * Harbor tables on this host other than `own`: left by a worker with another
 * node id or NATS prefix (perhaps a dead deployment, perhaps another live
 * worker on this host; which, only the operator knows). Their rules still
 * apply to the ports they name.
 */
export async function otherHarborTables(own: string): Promise<string[]> {
  const listed = await run("nft", ["list", "tables", "ip"]);
  if (listed.code !== 0) return [];
  return listed.stdout
    .split("\n")
    .map((line) => /^table ip (\S+)$/.exec(line.trim())?.[1])
    .filter((name): name is string => name !== undefined && name.startsWith(TABLE_NAME_START) && name !== own);
}

/** Whether this process may program nftables (root or CAP_NET_ADMIN, and nft installed). */
export async function kernelModeAvailable(): Promise<string | undefined> {
  const probe = await run("nft", ["list", "tables"]);
  return probe.code === 0 ? undefined : probe.stderr || "nft is not usable";
}

/** Why the flows of departed UDP backends cannot be moved, and a drain cannot see open connections, if so: no conntrack tool. */
export async function conntrackProblem(): Promise<string | undefined> {
  const probe = await run("conntrack", ["--version"]);
  return probe.code === 0 ? undefined : probe.stderr || "conntrack is not usable";
}
