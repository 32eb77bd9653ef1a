#!/usr/bin/env node
// Scale benchmark (issue 5, item 3): one Harbor worker's memory and CPU as its
// port services and its idle proxied TCP connections grow.
//
//   node bench/scale.mjs [--smoke|--full]
//
// The control plane is one `harbor serve control-plane` process; the measured
// worker is a separate `harbor serve worker` for a node of its own, as on a
// harbor node in production, so its RSS and CPU are the data plane's alone (with
// HARBOR_WORKER_RELAYS set, its relay processes are counted with it). Services
// are created and instances registered through Harbor's gRPC API. Clients and
// backends live in two child processes of this script: each process has its own
// open-file limit, and the worker's goes to its listeners and the two sockets of
// every connection.
//
// Needs the build (npm run build), Postgres on 127.0.0.1:5432 (a fresh database,
// dropped at the end) and NATS on 127.0.0.1:4222 (NATS_URL overrides). Prints a
// Markdown table and writes it to bench/results/scale.md; the processes' logs go
// to bench/results/raw/<stamp>-scale/ (git-ignored). See bench/README.md.
import { fork, spawnSync } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";
import { CLK_TCK, createDatabase, createProcesses, fetchMetrics, freePort as freePortOn, grpcCall, median, oneLine as oneLineOf, pool, sleep, treeCpuTicks, treeRssKiB, waitFor } from "./lib.mjs";

const SELF = fileURLToPath(import.meta.url);
const REPO = resolve(dirname(SELF), "..");
const LOCAL = "127.0.0.1";
const oneLine = (err) => oneLineOf(err, 300);

// ---------------------------------------------------------------- child roles
// `--role clients|backends`: this file is also the code of the two helper
// processes. They answer { id, cmd, ...args } messages over the IPC channel with
// { id, ...result } (or { id, error }), and exit when the parent goes away.

function serveRole(handlers) {
  process.on("message", async (msg) => {
    try {
      process.send({ id: msg.id, ...(await handlers[msg.cmd](msg)) });
    } catch (err) {
      process.send({ id: msg.id, error: oneLine(err) });
    }
  });
  process.on("disconnect", () => process.exit(0));
}

/** Echo backends: one server; every accepted socket echoes what it reads. */
function backendsRole() {
  let open = 0;
  const server = net.createServer((s) => {
    open++;
    s.on("data", (d) => s.write(d));
    s.on("error", () => undefined);
    s.once("close", () => open--);
  });
  serveRole({
    start: () => new Promise((res) => server.listen({ port: 0, host: LOCAL, backlog: 4096 }, () => res({ port: server.address().port }))),
    stats: async () => ({ open }),
  });
}

/** Clients: open idle connections to Harbor's ports, echo on a sample, close them. */
function clientsRole() {
  const sockets = [];
  let lost = 0; // closed by the other side while we held them
  let closing = false;
  const connectOne = (port) =>
    new Promise((res, rej) => {
      const s = net.connect({ port, host: LOCAL });
      s.once("error", rej);
      s.once("connect", () => {
        s.removeListener("error", rej);
        s.on("error", () => undefined);
        s.once("close", () => closing || lost++);
        res(s);
      });
    });
  serveRole({
    /** Opens connections until `total` are held; the k-th goes to ports[k % ports.length]. */
    async open({ total, ports, concurrency }) {
      let failed = 0;
      const started = performance.now();
      const from = sockets.length;
      const want = total - from;
      let next = 0;
      await Promise.all(
        Array.from({ length: concurrency }, async () => {
          while (next < want) {
            const port = ports[(from + next++) % ports.length];
            try {
              sockets.push(await connectOne(port));
            } catch {
              failed++;
            }
          }
        }),
      );
      return { held: sockets.filter((s) => !s.destroyed).length, failed, lost, ms: performance.now() - started };
    },
    /** Writes a line on `sample` connections spread over all held ones; counts exact echoes. */
    async echo({ sample, timeoutMs }) {
      const step = Math.max(1, Math.floor(sockets.length / sample));
      const picked = sockets.filter((_, i) => i % step === 0).slice(0, sample);
      const results = await Promise.all(
        picked.map(
          (s, i) =>
            new Promise((res) => {
              const want = `echo-${i}\n`;
              let got = "";
              const timer = setTimeout(() => res(false), timeoutMs);
              s.on("data", (d) => {
                got += d;
                if (got.length >= want.length) {
                  clearTimeout(timer);
                  res(got === want);
                }
              });
              s.write(want);
            }),
        ),
      );
      return { tried: picked.length, ok: results.filter(Boolean).length };
    },
    async closeAll() {
      closing = true;
      await Promise.all(sockets.map((s) => new Promise((res) => (s.destroyed ? res() : (s.once("close", res), s.destroy())))));
      sockets.length = 0;
      closing = false;
      return {};
    },
    stats: async () => ({ held: sockets.filter((s) => !s.destroyed).length, lost }),
  });
}

const roleAt = process.argv.indexOf("--role");
if (roleAt >= 0) {
  const role = process.argv[roleAt + 1];
  if (role === "backends") backendsRole();
  else if (role === "clients") clientsRole();
  else throw new Error(`unknown role ${role}`);
} else {
  await benchmark();
}

// ---------------------------------------------------------------- the benchmark

async function benchmark() {
  const MODES = {
    // ports: services open on the ports worker, step by step; connections: idle
    // proxied connections held through the connections worker (on CONNECTION_PORTS
    // services); combined: connections through the ports worker at its last step
    // (its listeners leave room for fewer); settleMs before each reading, then the
    // worker's CPU is averaged over windowMs (30 s holds one periodic resync) and
    // its RSS is the median of samples over that window.
    smoke: { ports: [100, 1_000], connections: [1_000, 4_000], combined: 0, settleMs: 4_000, windowMs: 3_000 },
    full: { ports: [100, 1_000, 5_000], connections: [1_000, 4_000, 9_000], combined: 7_000, settleMs: 10_000, windowMs: 30_000 },
  };
  /** Services the connections worker carries its connections on. */
  const CONNECTION_PORTS = 100;
  /** Services per app: one instance maps all of its app's int_ports, and the registry allows 64 mappings. */
  const SERVICES_PER_APP = 50;
  const CREATE_CONCURRENCY = 32;
  const CONNECT_CONCURRENCY = 200;
  const ECHO_SAMPLE = 500;
  /** Node ranges come from here: below Linux's ephemeral range and apart from run.mjs's 20000-32000. */
  const PORT_POOL = { min: 10_000, max: 19_999 };

  const args = process.argv.slice(2);
  if (args.some((a) => a !== "--smoke" && a !== "--full") || (args.includes("--smoke") && args.includes("--full"))) {
    process.stderr.write("usage: node bench/scale.mjs [--smoke|--full]\n");
    process.exit(2);
  }
  const MODE = args.includes("--full") ? "full" : "smoke";
  const CFG = MODES[MODE];
  const COMMAND = ["node", "bench/scale.mjs", ...args].join(" ");
  const STAMP = new Date().toISOString().replace(/[:.]/g, "-").replace(/Z$/, "") + `-scale-${MODE}`;
  const RESULTS_DIR = join(REPO, "bench/results");
  const RAW_DIR = join(RESULTS_DIR, "raw", STAMP);
  const HARBOR_BIN = join(REPO, "services/cli/bin/harbor.js");
  const NATS_URL = process.env.NATS_URL ?? "nats://127.0.0.1:4222";
  const NATS_PREFIX = `scale${Date.now().toString(36)}`;
  /** The worker's relay processes (its default: none); passed on from the environment. */
  const RELAYS = Number(process.env.HARBOR_WORKER_RELAYS ?? 0);

  const log = (msg) => process.stderr.write(`[scale ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

  if (!existsSync(join(REPO, "services/cli/dist/main.js")) || !existsSync(join(REPO, "libs/proto/dist/index.js"))) {
    log("building the workspace (npm run build) …");
    if (spawnSync("npm", ["run", "build", "--silent"], { cwd: REPO, stdio: ["ignore", 2, 2] }).status !== 0) throw new Error("npm run build failed");
  }
  const grpc = await import("@grpc/grpc-js");
  const { PortAllocatorClient, BackendRegistryClient } = await import(join(REPO, "libs/proto/dist/index.js"));
  mkdirSync(RAW_DIR, { recursive: true });

  // ---------------------------------------------------------------- processes
  // Every process runs in its own process group and is tracked in `live`; on
  // exit, Ctrl-C or an error all get SIGTERM, then SIGKILL, then the database goes.

  const { cleanups, track, startProcess, stopProcess, shutdown, isShuttingDown, installHandlers } = createProcesses({ rawDir: RAW_DIR, log, shutdownGraceMs: 15_000, stopGraceMs: 15_000 });
  installHandlers();

  /** A `harbor` verb as a long-running process; resolves once its output holds readyText. */
  const startHarbor = (name, argv, env, readyText, readyTimeoutMs = 60_000) =>
    startProcess(name, process.execPath, [HARBOR_BIN, ...argv], { env, readyText, readyTimeoutMs });

  /** A helper process running this file with --role; returns { pid, call(cmd, args) }. */
  async function startRole(role) {
    const child = fork(SELF, ["--role", role], { detached: true, stdio: ["ignore", "inherit", "inherit", "ipc"] });
    const exited = track(role, child);
    let seq = 0;
    const waiting = new Map();
    child.on("message", (m) => {
      const w = waiting.get(m.id);
      if (!w) return;
      waiting.delete(m.id);
      if (m.error) w.reject(new Error(`${role}: ${m.error}`));
      else w.resolve(m);
    });
    exited.then(({ code, signal }) => {
      for (const w of waiting.values()) w.reject(new Error(`${role} exited (${code ?? signal})`));
      waiting.clear();
    });
    const call = (cmd, rest = {}) =>
      new Promise((res, rej) => {
        const id = ++seq;
        waiting.set(id, { resolve: res, reject: rej });
        child.send({ id, cmd, ...rest });
      });
    return { name: role, pid: child.pid, exited, call };
  }

  // ---------------------------------------------------------------- /proc

  /** Local ports of every TCP and UDP socket (any state) on this machine. */
  function portsInUse() {
    const used = new Set();
    for (const file of ["tcp", "tcp6", "udp", "udp6"]) {
      let text = "";
      try {
        text = readFileSync(`/proc/net/${file}`, "utf8");
      } catch {
        continue;
      }
      for (const line of text.split("\n").slice(1)) {
        const local = line.trim().split(/\s+/)[1];
        if (local) used.add(parseInt(local.slice(local.lastIndexOf(":") + 1), 16));
      }
    }
    return used;
  }

  /** TCP ports with a socket in LISTEN (state 0A). */
  function listeningPorts() {
    const out = new Set();
    for (const file of ["tcp", "tcp6"]) {
      for (const line of readFileSync(`/proc/net/${file}`, "utf8").split("\n").slice(1)) {
        const f = line.trim().split(/\s+/);
        if (f[3] === "0A") out.add(parseInt(f[1].slice(f[1].lastIndexOf(":") + 1), 16));
      }
    }
    return out;
  }

  /** Waits until every one of `ports` is listening; resolves how many still were not (0, or the count at the 30 s deadline). */
  async function untilListening(what, ports, everyMs) {
    let missing = ports.length;
    await waitFor(
      what,
      () => {
        const l = listeningPorts();
        missing = ports.filter((p) => !l.has(p)).length;
        return missing === 0;
      },
      30_000,
      everyMs,
    ).catch(() => undefined);
    return missing;
  }

  const handedOut = new Set();
  /** `size` consecutive ports of PORT_POOL that no socket uses. */
  function freeBlock(size) {
    const used = portsInUse();
    let run = 0;
    for (let p = PORT_POOL.min; p <= PORT_POOL.max; p++) {
      run = used.has(p) || handedOut.has(p) ? 0 : run + 1;
      if (run === size) {
        for (let q = p - size + 1; q <= p; q++) handedOut.add(q);
        return { min: p - size + 1, max: p };
      }
    }
    throw new Error(`no ${size} free consecutive ports in ${PORT_POOL.min}-${PORT_POOL.max}`);
  }

  const freePort = () => freePortOn(LOCAL);

  /** A few series from the worker's /metrics (Prometheus text). */
  async function scrape(address) {
    const body = await fetchMetrics(address);
    // A series by name (any labels), or by name and exact labels.
    const value = (name, labels) => Number(new RegExp(`^${name}${labels ? `\\{${labels}\\}` : "(?:\\{[^}]*\\})?"} (\\S+)$`, "m").exec(body)?.[1] ?? Number.NaN);
    return {
      open: value("harbor_worker_tcp_connections_open"),
      listening: value("harbor_worker_listening_ports"),
      heapUsed: value("nodejs_heap_size_used_bytes"),
      heapTotal: value("nodejs_heap_size_total_bytes"),
      newSpace: value("nodejs_heap_space_size_total_bytes", 'space="new"'),
    };
  }

  // ---------------------------------------------------------------- Harbor's API

  const call = (client, method, request) => grpcCall(client, method, request, 60_000);

  function cli(api, ...argv) {
    const r = spawnSync(process.execPath, [HARBOR_BIN, "--api", api, ...argv], { encoding: "utf8", env: { ...process.env, HARBOR_API: api } });
    if (r.status !== 0) throw new Error(`harbor ${argv.join(" ")}: ${r.stderr.trim()}`);
    return r.stdout;
  }

  // ---------------------------------------------------------------- readings

  const readings = [];

  /**
   * The worker's periodic resync (its `worker-synced` log line, reason
   * "timer") inside the window: median RSS of the samples before it and after
   * it, and the highest after.
   */
  function aroundResync(worker, series) {
    let text = "";
    for (const ext of ["err", "out"]) {
      try {
        text += readFileSync(join(RAW_DIR, `${worker.name}.${ext}`), "utf8");
      } catch {
        /* not written yet */
      }
    }
    const [from, to] = [series[0][0], series.at(-1)[0]];
    const at = text
      .split("\n")
      .filter((l) => l.includes('"msg":"worker-synced"') && l.includes('"reason":"timer"'))
      .map((l) => Date.parse(/"time":"([^"]+)"/.exec(l)?.[1] ?? ""))
      .find((t) => t > from && t < to);
    if (at === undefined) return undefined;
    const before = series.filter(([t]) => t < at).map(([, k]) => k).sort((a, b) => a - b);
    const after = series.filter(([t]) => t >= at).map(([, k]) => k).sort((a, b) => a - b);
    if (before.length === 0 || after.length === 0) return undefined;
    return { before: median(before), after: median(after), peak: after.at(-1) };
  }
  /** Settles, then averages the worker's CPU over the window and takes the median of its RSS samples. */
  async function reading(worker, fields) {
    const sinceTicks = treeCpuTicks(worker.pid) - worker.lastTicks;
    await sleep(CFG.settleMs);
    const t0 = treeCpuTicks(worker.pid);
    const w0 = performance.now();
    const until = w0 + CFG.windowMs;
    const series = []; // [wall-clock ms, KiB]
    while (performance.now() < until) {
      series.push([Date.now(), treeRssKiB(worker.pid)]);
      await sleep(Math.min(500, CFG.windowMs / 4));
    }
    series.push([Date.now(), treeRssKiB(worker.pid)]);
    const samples = series.map(([, k]) => k);
    const restPct = (100 * (treeCpuTicks(worker.pid) - t0)) / CLK_TCK / ((performance.now() - w0) / 1000);
    samples.sort((a, b) => a - b);
    const rss = median(samples);
    const m = await scrape(worker.metrics);
    worker.lastTicks = treeCpuTicks(worker.pid);
    const r = { worker: worker.label, ...fields, resync: aroundResync(worker, series), series, rssKiB: rss, rssMin: samples[0], rssMax: samples.at(-1), heapUsed: m.heapUsed, heapTotal: m.heapTotal, newSpace: m.newSpace, cpuToHere: sinceTicks / CLK_TCK, restPct, listening: m.listening, open: m.open };
    readings.push(r);
    log(`${worker.label} ${fields.step}: RSS ${(rss / 1024).toFixed(1)} MiB (heap used ${(m.heapUsed / 2 ** 20).toFixed(1)} MiB), CPU at rest ${restPct.toFixed(1)} %, ${m.listening} ports, ${m.open} connections`);
    return r;
  }

  // ---------------------------------------------------------------- report

  function writeReport({ startedAt, elapsedS, loadBefore, connBase, maxConns, sideRss, notes, echoOk }) {
    const mib = (k) => (k / 1024).toFixed(1);
    const kib = (bytes) => (bytes / 1024).toFixed(1).replace(/^-/, "−");
    const fmt = (n) => (Number.isFinite(n) ? n.toLocaleString("en") : "?");
    // Average: (reading − the series' base) / N; marginal: (reading − the previous one) / (N − its N).
    const perCell = (r) => {
      const p = r.per;
      if (!p) return { delta: "", avg: "", marginal: "", heap: "" };
      const delta = r.rssKiB - p.base.rssKiB;
      const sign = (k) => `${k >= 0 ? "+" : "−"}${mib(Math.abs(k))}`;
      if (p.unit === "kept") return { delta: sign(delta), avg: "kept after closing", marginal: "", heap: "" };
      const avg = `${kib((delta * 1024) / p.n)} KiB / ${p.unit}`;
      const marginal = p.prev && p.prev !== p.base ? `${kib(((r.rssKiB - p.prev.rssKiB) * 1024) / (p.n - p.prevN))} KiB` : "";
      return { delta: sign(delta), avg, marginal, heap: `${kib((r.heapUsed - p.base.heapUsed) / p.n)} KiB` };
    };
    const rows = readings.map((r) => {
      const c = perCell(r);
      return `| ${r.worker} | ${r.step} | ${fmt(r.listening)} | ${fmt(r.open)} | ${mib(r.rssKiB)} (${mib(r.rssMin)}-${mib(r.rssMax)}) | ${c.delta} | ${c.avg} | ${c.marginal} | ${c.heap} | ${(r.heapUsed / 2 ** 20).toFixed(1)} / ${(r.heapTotal / 2 ** 20).toFixed(1)} | ${(r.newSpace / 2 ** 20).toFixed(1)} | ${r.cpuToHere.toFixed(2)} | ${r.restPct.toFixed(1)} |`;
    });
    const top = readings.find((r) => r.per?.base === connBase && r.connections === maxConns);
    const perConnBytes = top ? ((top.rssKiB - connBase.rssKiB) * 1024) / top.connections : Number.NaN;
    const marginal = top?.per.prev && top.per.prev !== connBase ? ((top.rssKiB - top.per.prev.rssKiB) * 1024) / (maxConns - top.per.prevN) : undefined;
    const jumps = readings
      .filter((r) => r.resync && Math.max(Math.abs(r.resync.after - r.resync.before), r.resync.peak - r.resync.before) >= 5 * 1024)
      .map((r) => `${r.worker}, ${r.step}: ${mib(r.resync.before)} → ${mib(r.resync.after)} MiB (peak ${mib(r.resync.peak)})`);
    const limits = readFileSync("/proc/self/limits", "utf8").match(/Max open files\s+(\d+)\s+(\d+)/);
    const side = sideRss.connections;
    const lines = [
      `# Scale (${MODE}) — ${startedAt.toISOString()}`,
      "",
      `- command: \`${COMMAND}\` (took ${Math.round(elapsedS)} s)`,
      `- node ${process.version}; ${os.cpus().length} cores; kernel ${os.release()}; open files per process ${limits ? `${limits[1]} (hard ${limits[2]})` : "?"}; load average before the run: ${loadBefore}`,
      `- control plane: one \`harbor serve control-plane\` process (the machine's Postgres, a fresh database; the machine's NATS, a prefix of its own). **Measured: a separate \`harbor serve worker\` process** for a node of its own (LOG_LEVEL=info, metrics on, HARBOR_WORKER_RELAYS=${RELAYS}${RELAYS > 0 ? ": the relays' RSS and CPU are added to the worker's" : ""}), so the figures are the data plane's alone`,
      `- services created (bound to apps, ${SERVICES_PER_APP} per app) and instances registered through Harbor's gRPC API; every instance is one echo backend in a helper process; the clients are in another`,
      `- each reading: ${CFG.settleMs / 1000} s to settle, then the worker's CPU averaged over ${CFG.windowMs / 1000} s${CFG.windowMs >= 30_000 ? " (one periodic 30 s resync inside)" : " (too short to hold a 30 s resync: indicative only)"}; RSS = median VmRSS over that window (min-max in brackets: V8 commits pages for a GC or a resync and gives them back lazily, so RSS moves by tens of MiB within a window)`,
      `- raw logs: \`${relative(REPO, RAW_DIR)}/\` (git-ignored)`,
      "",
      "| worker process | step | ports listening | idle connections | RSS MiB | Δ RSS MiB | per port / connection | marginal | heap per port / connection | V8 heap used / committed MiB | of which new space MiB | CPU-s to get here | CPU at rest, % of a core |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
      ...rows,
      "",
      "Δ RSS and per port / connection: against the worker's idle reading (ports) or its reading at 0 connections (connections), divided by N; marginal: against the previous step, divided by the N added since. A connection is a client socket and an upstream socket in the worker; the kernel's socket buffers are not in RSS. Ports listening, connections and the V8 figures come from the worker's own `/metrics` (`harbor_worker_listening_ports`, `harbor_worker_tcp_connections_open`, `nodejs_heap_size_used_bytes`, `nodejs_heap_size_total_bytes`, `nodejs_heap_space_size_total_bytes{space=\"new\"}`: the young generation, which V8 grows up to 32 MiB while a burst allocates and which counts in RSS once touched; RSS minus the committed heap is Node's native memory, code and libraries), read after the RSS; without a forced GC the heap still holds some garbage. CPU-s to get here: the worker's CPU since the previous reading (creating the services, accepting the connections; for a new process, its start-up).",
      "",
      `**Memory per idle proxied connection at ${fmt(maxConns)}: ${kib(perConnBytes)} KiB** (${fmt(Math.round(perConnBytes))} bytes, (RSS at ${fmt(maxConns)} − RSS at 0) / ${fmt(maxConns)}; target ≤ 10 KiB: ${perConnBytes <= 10 * 1024 ? "met" : "not met"}; ${kib(((top?.rssMin - connBase.rssKiB) * 1024) / maxConns)}-${kib(((top?.rssMax - connBase.rssKiB) * 1024) / maxConns)} KiB from the lowest and highest RSS of the window)${marginal ? `; marginal, from ${fmt(top.per.prevN)} to ${fmt(maxConns)}: ${kib(marginal)} KiB` : ""}.`,
      "",
      ...(side
        ? [
            `For comparison, one plain Node \`net.Socket\` held idle cost ${kib((side.client * 1024) / side.n)} KiB of RSS in the client process and ${kib((side.backend * 1024) / side.n)} KiB in the echo backend (a \`data\` listener each), at ${fmt(side.n)}.`,
            "",
          ]
        : []),
      ...notes.map((n) => `- ${n}`),
      ...(jumps.length > 0
        ? [`- RSS around the worker's periodic 30 s resync (by digest: \`ListPortServices\` + \`ListBackends\` of its node list nothing unless something changed, and every tenth lists all; RSS also moves with V8's own collections) where RSS moved by 5 MiB or more, median before → median after: ${jumps.join("; ")}.`]
        : []),
      "",
    ];
    const report = lines.join("\n");
    mkdirSync(RESULTS_DIR, { recursive: true });
    writeFileSync(join(RESULTS_DIR, "scale.md"), report);
    writeFileSync(join(RAW_DIR, "readings.json"), JSON.stringify({ mode: MODE, command: COMMAND, readings, sideRss, notes, echoOk }, null, 2));
    process.stdout.write(report);
    log(`wrote ${relative(REPO, join(RESULTS_DIR, "scale.md"))} in ${Math.round(elapsedS)} s${echoOk ? "" : " — WARNING: the echo check failed"}`);
  }

  // ---------------------------------------------------------------- the run
  try {
    const startedAt = new Date();
    const t0 = performance.now();
    const loadBefore = os.loadavg().map((l) => l.toFixed(2)).join(" ");
    const notes = [];
    log(`mode ${MODE}; logs in ${relative(REPO, RAW_DIR)}`);

    // A fresh database, dropped at the end.
    const database = await createDatabase("harbor_scale");
    cleanups.push(database.drop);

    const defaultRange = freeBlock(10);
    const api = `${LOCAL}:${await freePort()}`;
    const common = { ...process.env, NATS_URL, HARBOR_NATS_PREFIX: NATS_PREFIX, HARBOR_API: api };
    // A worker has no database: nothing of Postgres in its environment.
    const { DATABASE_URL: _unused, ...workerEnv } = common;
    const control = await startHarbor(
      "harbor-control-plane",
      ["serve", "control-plane"],
      { ...common, DATABASE_URL: database.url, HARBOR_PORT_RANGE: `${defaultRange.min}-${defaultRange.max}`, LOG_LEVEL: "info" },
      '"msg":"ready"',
    );
    const credentials = grpc.credentials.createInsecure();
    const allocator = new PortAllocatorClient(api, credentials);
    const registry = new BackendRegistryClient(api, credentials);
    log(`control plane up (pid ${control.pid}, API ${api})`);

    // Fresh helpers for each part, so that the second one's RSS is not what the first one left.
    let backends, clients, backendPort;
    async function startHelpers() {
      backends = await startRole("backends");
      backendPort = (await backends.call("start")).port;
      clients = await startRole("clients");
      await clients.call("stats");
    }
    async function stopHelpers() {
      await stopProcess(clients);
      await stopProcess(backends);
    }
    await startHelpers();

    /** A `serve worker` process for the node `nodeId` (made beforehand with `harbor set-node`). */
    async function startWorker(label, nodeId) {
      const metrics = `${LOCAL}:${await freePort()}`;
      const spawnedAt = performance.now();
      const proc = await startHarbor(
        label,
        ["serve", "worker"],
        { ...workerEnv, HARBOR_NODE_ID: nodeId, HARBOR_METRICS_ADDRESS: metrics, LOG_LEVEL: "info" },
        '"msg":"ready"',
      );
      // lastTicks 0: the first reading's "CPU to get here" is the process's start-up too.
      return { ...proc, label, nodeId, metrics, spawnedAt, readyAfterS: (performance.now() - spawnedAt) / 1000, lastTicks: 0, services: [], apps: new Map() };
    }

    /** Creates services on the worker's node up to `total` (bound to apps, whose instances are the echo backend); waits until all listen. */
    async function growServices(worker, total) {
      const started = performance.now();
      const from = worker.services.length;
      const appCount = worker.appCount;
      const touched = new Set();
      await pool(
        total - from,
        CREATE_CONCURRENCY,
        async (k) => {
          const i = from + k;
          const app = `${worker.nodeId}-app${i % appCount}`;
          const { service } = await call(allocator, "createPortService", { name: `${worker.nodeId}-${i}`, nodeId: worker.nodeId, port: 0, app });
          worker.services.push(service.port);
          if (!worker.apps.has(app)) worker.apps.set(app, []);
          worker.apps.get(app).push({ intPort: service.intPort, port: backendPort });
          touched.add(app);
        },
      );
      const apps = [...touched];
      await pool(apps.length, 8, (k) =>
        call(registry, "registerInstance", { app: apps[k], instanceId: `${apps[k]}-0`, host: LOCAL, ports: worker.apps.get(apps[k]), ttlSeconds: 3600 }),
      );
      const created = performance.now();
      const want = worker.services;
      const missing = await untilListening(`${worker.label}: ${total} ports listening`, want, 200);
      if (missing > 0) {
        notes.push(`${worker.label}: ${missing} of ${want.length} ports not listening after 30 s; probably held by another process.`);
        log(`warning: ${missing} of ${want.length} ports not listening`);
      }
      log(`${worker.label}: ${total} services (${total - from} created and bound in ${((created - started) / 1000).toFixed(1)} s, listening ${((performance.now() - created) / 1000).toFixed(1)} s later)`);
    }

    /** Opens idle connections through the worker's ports until `total` are held, and waits until all are proxied to the backend. */
    async function holdConnections(worker, total, ports) {
      const r = await clients.call("open", { total, ports, concurrency: CONNECT_CONCURRENCY });
      if (r.failed > 0 || r.lost > 0) notes.push(`${worker.label}: opening ${total} connections: ${r.failed} failed to connect, ${r.lost} closed by Harbor.`);
      let last = {};
      await waitFor(
        `${worker.label}: ${total} connections proxied`,
        async () => {
          const [b, m] = await Promise.all([backends.call("stats"), scrape(worker.metrics)]);
          last = { backend: b.open, worker: m.open };
          return b.open === total && m.open === total;
        },
        60_000,
        250,
      );
      log(`${worker.label}: ${total} connections held (opened in ${(r.ms / 1000).toFixed(1)} s; backend ${last.backend}, worker ${last.worker})`);
    }

    const sideRss = {}; // RSS of the client and backend processes, for a plain Node socket's cost
    async function echoCheck(worker, held) {
      const e = await clients.call("echo", { sample: ECHO_SAMPLE, timeoutMs: 10_000 });
      const c = await clients.call("stats");
      const b = await backends.call("stats");
      const line = `${worker.label}, ${held.toLocaleString("en")} connections: ${e.ok} of ${e.tried} sampled connections echoed a line through Harbor; the client still held ${c.held.toLocaleString("en")} (${c.lost} closed under it), the backend ${b.open.toLocaleString("en")}.`;
      notes.push(line);
      log(line);
      return e.ok === e.tried && c.held === held && b.open === held;
    }

    async function closeConnections(worker) {
      await clients.call("closeAll");
      await waitFor(`${worker.label}: connections closed`, async () => (await scrape(worker.metrics)).open === 0 && (await backends.call("stats")).open === 0, 30_000, 100);
    }

    // Part 1: ports. A fresh worker; services step by step; in --full, connections on top of the last step; then a cold start.
    const maxPorts = CFG.ports.at(-1);
    const portsRange = freeBlock(Math.ceil(maxPorts * 1.4));
    cli(api, "set-node", "scale-ports", "--range", `${portsRange.min}-${portsRange.max}`, "--host", LOCAL);
    let worker = await startWorker("ports worker", "scale-ports");
    worker.appCount = Math.ceil(maxPorts / SERVICES_PER_APP);
    log(`ports worker up (pid ${worker.pid}, node range ${portsRange.min}-${portsRange.max})`);
    const portsIdle = await reading(worker, { step: "idle", ports: 0, connections: 0 });
    let prev = portsIdle;
    for (const n of CFG.ports) {
      await growServices(worker, n);
      prev = await reading(worker, { step: `${n.toLocaleString("en")} ports`, ports: n, connections: 0, per: { unit: "port", n, base: portsIdle, prev, prevN: prev.ports } });
    }
    const portsTop = readings.at(-1);
    let echoOk = true;
    if (CFG.combined > 0) {
      await holdConnections(worker, CFG.combined, worker.services);
      await reading(worker, { step: `${maxPorts.toLocaleString("en")} ports + ${CFG.combined.toLocaleString("en")} connections`, ports: maxPorts, connections: CFG.combined, per: { unit: "connection", n: CFG.combined, base: portsTop } });
      echoOk = (await echoCheck(worker, CFG.combined)) && echoOk;
      await closeConnections(worker);
    }
    await stopProcess(worker);
    // Cold start: a new worker process for the same node, spawn → every port listening.
    const coldPorts = worker.services;
    worker = await startWorker("ports worker (restarted)", "scale-ports");
    worker.services = coldPorts;
    const missing = await untilListening("cold start: ports listening", coldPorts, 20);
    const listeningAfter = missing === 0 ? (performance.now() - worker.spawnedAt) / 1000 : Number.NaN;
    notes.push(
      `Cold start: a new \`serve worker\` process for the node with ${coldPorts.length.toLocaleString("en")} services had ${Number.isFinite(listeningAfter) ? `every port listening ${listeningAfter.toFixed(2)} s after spawn (its \`ready\` log line at ${worker.readyAfterS.toFixed(2)} s)` : `${missing} ports still not listening after 30 s`} (control plane and database already up; polled every 20 ms in /proc/net/tcp).`,
    );
    await reading(worker, { step: `${maxPorts.toLocaleString("en")} ports, cold start`, ports: maxPorts, connections: 0, per: { unit: "port", n: maxPorts, base: portsIdle } });
    await stopProcess(worker);

    await stopHelpers();
    await startHelpers();

    // Part 2: connections. A fresh worker with CONNECTION_PORTS services; idle connections spread over them.
    const connRange = freeBlock(CONNECTION_PORTS * 2);
    cli(api, "set-node", "scale-conns", "--range", `${connRange.min}-${connRange.max}`, "--host", LOCAL);
    worker = await startWorker("connections worker", "scale-conns");
    worker.appCount = Math.ceil(CONNECTION_PORTS / SERVICES_PER_APP);
    log(`connections worker up (pid ${worker.pid}, node range ${connRange.min}-${connRange.max})`);
    await growServices(worker, CONNECTION_PORTS);
    const sides0 = { client: treeRssKiB(clients.pid), backend: treeRssKiB(backends.pid) };
    const connBase = await reading(worker, { step: "0 connections", ports: CONNECTION_PORTS, connections: 0 });
    prev = connBase;
    for (const n of CFG.connections) {
      await holdConnections(worker, n, worker.services);
      prev = await reading(worker, { step: `${n.toLocaleString("en")} connections`, ports: CONNECTION_PORTS, connections: n, per: { unit: "connection", n, base: connBase, prev, prevN: prev.connections } });
    }
    const maxConns = CFG.connections.at(-1);
    sideRss.connections = { n: maxConns, client: treeRssKiB(clients.pid) - sides0.client, backend: treeRssKiB(backends.pid) - sides0.backend };
    echoOk = (await echoCheck(worker, maxConns)) && echoOk;
    await closeConnections(worker);
    await reading(worker, { step: "all closed again", ports: CONNECTION_PORTS, connections: 0, per: { unit: "kept", n: 0, base: connBase } });
    await stopProcess(worker);
    await stopHelpers();
    await stopProcess(control);

    writeReport({ startedAt, elapsedS: (performance.now() - t0) / 1000, loadBefore, connBase, maxConns, sideRss, notes, echoOk });
    await shutdown();
    process.exit(echoOk ? 0 : 1);
  } catch (err) {
    // Ctrl-C takes the processes away under a reading: that is not the error to report.
    if (isShuttingDown()) return void (await shutdown());
    log(`fatal: ${err?.stack ?? err}`);
    await shutdown();
    process.exit(1);
  }
}
