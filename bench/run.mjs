#!/usr/bin/env node
// Harbor benchmark harness: the same workloads against `direct` (no proxy),
// HAProxy, nginx (stream) and Harbor, side by side in one run.
//
//   bash bench/setup.sh            # once: haproxy, nginx, iperf3, wrk, ab
//   node bench/run.mjs [--smoke|--full]
//
// Prints two Markdown tables and writes them, with the machine and tool
// versions, to bench/results/latest.md (and bench/results/full.md for --full).
// Raw tool outputs and process logs go to bench/results/raw/<stamp>/.
// See bench/README.md for how to read the numbers.
import { spawnSync } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import dgram from "node:dgram";
import http from "node:http";
import os from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { CLK_TCK, createProcesses, median, oneLine, processTree, readStat, sleep, treeCpuTicks, treeRssKiB, waitFor as waitUntil } from "./lib.mjs";

const BENCH_DIR = dirname(fileURLToPath(import.meta.url));
const REPO = resolve(BENCH_DIR, "..");
const HARBOR_BIN = join(REPO, "services/cli/bin/harbor.js");
const HARBOR_MAIN = join(REPO, "services/cli/dist/main.js");
const LOCAL = "127.0.0.1";

// ---------------------------------------------------------------- settings

const MODES = {
  // seconds: length of each timed run; omit: iperf3 warm-up seconds left out;
  // reps: each workload × target is run this often and the median is kept;
  // idleMs: how long every proxy sits idle, after the last one started, before its idle RSS is read
  // (V8 gives a young process's start-up garbage back only after several seconds: at 10 s a
  // Node reading sometimes still holds it, 6 MiB more);
  // pairs: back-to-back pairs of direct and harbor-kernel bulk runs, for the kernel mode's ratio to direct
  // (none in smoke, which must stay under two minutes: it took 108 s without them here, 118 s with one).
  smoke: { seconds: 2, omit: 0, reps: 1, abRequests: 10000, idleMs: 1_000, pairs: 0 },
  full: { seconds: 6, omit: 1, reps: 3, abRequests: 50000, idleMs: 30_000, pairs: 5 },
};
const AB_CONCURRENCY = 32;
const WRK_CONNECTIONS = 32;
const UDP_SIZE = 64;
const UDP_FIXED_PPS = 100_000;
/** One proxy thread/worker each: Harbor's worker is one Node event loop. */
const PROXY_THREADS = 1;
/** Ports for everything we start are taken from here (below Linux's ephemeral range). */
const PORT_POOL = { min: 20000, max: 32000 };
// harbor-relays: the same Harbor with HARBOR_WORKER_RELAYS=<cores> (relay processes carry the TCP bytes).
// harbor-kernel: the same Harbor with HARBOR_WORKER_MODE=kernel (nftables), where nft is usable.
const KERNEL_USABLE = spawnSync("nft", ["list", "tables"], { stdio: "ignore" }).status === 0;
const RELAYS = os.availableParallelism();
const ALL_TARGETS = ["direct", "haproxy", "nginx", "harbor", "harbor-relays", ...(KERNEL_USABLE ? ["harbor-kernel"] : [])];

const args = process.argv.slice(2);
const option = (name) => args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
// --only=<text>: run just the workloads whose name contains <text> (e.g. --only=UDP), to iterate on one.
const ONLY = option("only");
// --cpu-prof=<dir>: a V8 CPU profile of each Harbor worker (and relay) process, written on exit.
const PROFILE_DIR = option("cpu-prof");
// --targets=a,b: run just these targets, in this order (e.g. --targets=nginx,harbor-kernel); a ratio whose peer is left out shows "—".
const PICKED = option("targets")?.split(",");
const unknown = args.filter((a) => a !== "--smoke" && a !== "--full" && !a.startsWith("--only=") && !a.startsWith("--targets=") && !a.startsWith("--cpu-prof="));
const badTarget = PICKED?.find((tg) => !ALL_TARGETS.includes(tg));
const twice = PICKED?.find((tg, i) => PICKED.indexOf(tg) !== i);
if (unknown.length > 0 || (args.includes("--smoke") && args.includes("--full")) || ONLY === "" || PROFILE_DIR === "" || badTarget !== undefined || twice !== undefined) {
  if (badTarget !== undefined) process.stderr.write(`unknown target "${badTarget}"; targets here: ${ALL_TARGETS.join(", ")}\n`);
  if (twice !== undefined) process.stderr.write(`target "${twice}" is named twice\n`);
  process.stderr.write("usage: node bench/run.mjs [--smoke|--full] [--only=<workload name text>] [--targets=<target>,...] [--cpu-prof=<dir>]\n");
  process.exit(2);
}
const TARGETS = PICKED ?? ALL_TARGETS;
/** The Harbor targets, each compared with the peers. */
const HARBORS = TARGETS.filter((tg) => tg.startsWith("harbor"));
const MODE = args.includes("--full") ? "full" : "smoke";
const CFG = MODES[MODE];
const COMMAND = ["node", "bench/run.mjs", ...args].join(" ");
const STAMP = new Date().toISOString().replace(/[:.]/g, "-").replace(/Z$/, "") + `-${MODE}`;
const RESULTS_DIR = join(BENCH_DIR, "results");
const RAW_DIR = join(RESULTS_DIR, "raw", STAMP);
const TMP_DIR = mkdtempSync(join(os.tmpdir(), "harbor-bench-"));
mkdirSync(RAW_DIR, { recursive: true });

const log = (msg) => process.stderr.write(`[bench ${new Date().toISOString().slice(11, 19)}] ${msg}\n`);

// ---------------------------------------------------------------- processes

const { live, cleanups, startProcess, stopProcess, runCommand, shutdown, installHandlers } = createProcesses({ rawDir: RAW_DIR, log });
cleanups.push(async () => rmSync(TMP_DIR, { recursive: true, force: true }));
installHandlers(() => rmSync(TMP_DIR, { recursive: true, force: true }));

// ---------------------------------------------------------------- ports

const handedOut = new Set();

function canBind(port, proto) {
  return new Promise((res) => {
    if (proto === "udp") {
      const s = dgram.createSocket("udp4");
      s.once("error", () => res(false));
      s.bind({ port, address: LOCAL, exclusive: true }, () => s.close(() => res(true)));
    } else {
      const s = createServer();
      s.once("error", () => res(false));
      s.listen({ port, host: LOCAL, exclusive: true }, () => s.close(() => res(true)));
    }
  });
}

const portFree = async (p) => !handedOut.has(p) && (await canBind(p, "tcp")) && (await canBind(p, "udp"));

/** `count` consecutive ports free for TCP and UDP, from a random start in the pool. */
async function freePortBlock(count) {
  const span = PORT_POOL.max - PORT_POOL.min;
  const start = PORT_POOL.min + Math.floor(Math.random() * span);
  for (let i = 0; i < span; i++) {
    const first = PORT_POOL.min + ((start - PORT_POOL.min + i) % (span - count));
    let ok = true;
    for (let p = first; p < first + count && ok; p++) ok = await portFree(p);
    if (ok) {
      for (let p = first; p < first + count; p++) handedOut.add(p);
      return first;
    }
  }
  throw new Error(`no ${count} free consecutive ports in ${PORT_POOL.min}-${PORT_POOL.max}`);
}
const freePort = () => freePortBlock(1);

// ---------------------------------------------------------------- /proc sampling

/** utime+stime of the tree, in seconds. */
const cpuSeconds = (root) => treeCpuTicks(root) / CLK_TCK;

const rssMiB = (root) => treeRssKiB(root) / 1024;

/** Samples the tree's RSS every 250 ms until stopped; returns the peak. */
function rssPeakSampler(root) {
  let peak = rssMiB(root);
  const timer = setInterval(() => (peak = Math.max(peak, rssMiB(root))), 250);
  return () => {
    clearInterval(timer);
    return Math.max(peak, rssMiB(root));
  };
}

/** Busy and total jiffies of the whole machine (/proc/stat), idle and iowait not busy. */
function machineTicks() {
  const [user, nice, system, idle, iowait, irq, softirq, steal] = readFileSync("/proc/stat", "utf8").split("\n")[0].trim().split(/\s+/).slice(1).map(Number);
  const busy = user + nice + system + irq + softirq + steal;
  return { busy, total: busy + idle + iowait };
}

/** CPU ticks of this process, its reaped children, and the trees of the children still running. */
function ownTicks() {
  const s = readFileSync("/proc/self/stat", "utf8");
  const f = s.slice(s.lastIndexOf(")") + 2).split(" ");
  let ticks = Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]); // utime stime cutime cstime
  for (const pid of live.keys()) for (const p of processTree(pid)) ticks += readStat(p)?.ticks ?? 0;
  return ticks;
}

/** Measures how much of the machine's CPU went to processes that are not ours (other work on the box). */
function foreignCpuMeter() {
  const m0 = machineTicks();
  const o0 = ownTicks();
  return () => {
    const m1 = machineTicks();
    const own = ownTicks() - o0;
    const total = m1.total - m0.total;
    return { busyPct: (100 * (m1.busy - m0.busy)) / total, foreignPct: (100 * Math.max(0, m1.busy - m0.busy - own)) / total };
  };
}

/**
 * Runs fn while accounting the proxy's CPU: returns fn's result plus cpuS
 * (CPU-seconds the proxy tree used) and wallS. No proxy (direct): cpuS null.
 */
async function withProxyCpu(target, fn) {
  const c0 = target.pid ? cpuSeconds(target.pid) : null;
  const t0 = performance.now();
  const result = await fn();
  const wallS = (performance.now() - t0) / 1000;
  const cpuS = target.pid ? cpuSeconds(target.pid) - c0 : null;
  return { ...result, cpuS, wallS };
}

// ---------------------------------------------------------------- waiting and probes

const waitFor = (what, probe) => waitUntil(`${what} reachable`, probe, 30_000, 300);

function httpGetOk(port) {
  return new Promise((res, rej) => {
    const req = http.get({ host: LOCAL, port, path: "/", agent: false, timeout: 2_000 }, (resp) => {
      let body = "";
      resp.on("data", (c) => (body += c));
      resp.on("end", () => res(resp.statusCode === 200 && body === "ok"));
    });
    req.on("timeout", () => req.destroy(new Error("timeout")));
    req.on("error", rej);
  });
}

async function iperfReaches(port, udp) {
  const r = await runCommand("iperf3", ["-c", LOCAL, "-p", String(port), "-J", ...(udp ? ["-u", "-l", "64", "-n", "6400"] : ["-n", "64K"])], { timeoutMs: 8_000 });
  if (r.code !== 0) throw new Error(parseJson(r.stdout)?.error ?? (r.stderr || `iperf3 exit ${r.code}`));
  return udp ? (parseJson(r.stdout)?.end?.sum_received?.packets ?? 0) > 0 : true;
}

/** Polls every endpoint of a target until a connection through it reaches the backend. */
async function waitReachable(target) {
  const { bulk, http: httpPort, udp } = target.endpoints;
  await waitFor(`${target.name} http`, () => httpGetOk(httpPort));
  await waitFor(`${target.name} bulk`, () => iperfReaches(bulk, false));
  if (udp) await waitFor(`${target.name} udp`, () => iperfReaches(udp, true));
}

const parseJson = (text) => {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
};

// ---------------------------------------------------------------- backends
// bulk: iperf3 server (TCP). udp: a second iperf3 server (its TCP control
// connection and the UDP datagrams share one port). http: nginx `return 200 "ok"`,
// on a port of its own for each target. The backend closes first and keeps each
// connection in TIME_WAIT for 60 s; through a DNAT (harbor-kernel) the client
// cannot see those entries when it picks a source port, and a SYN that meets
// one left by another target's run is rejected (PAWS, TcpExtPAWSTimewait) and
// retried a second later. Separate ports keep one target's run from slowing
// the next one's.

const NGINX_STREAM_MODULE = ["/usr/lib/nginx/modules/ngx_stream_module.so", "/usr/share/nginx/modules/ngx_stream_module.so"].find((p) => existsSync(p));

function nginxArgs(confPath, prefix) {
  return ["-p", prefix, "-c", confPath, "-e", join(prefix, "error.log"), "-g", "daemon off;"];
}

async function startBackends() {
  const [bulk, udp] = [await freePort(), await freePort()];
  const httpPorts = {};
  for (const name of TARGETS) httpPorts[name] = await freePort();
  const iperfBulk = await startProcess("backend-iperf3-bulk", "iperf3", ["-s", "-p", String(bulk), "-B", LOCAL]);
  const iperfUdp = await startProcess("backend-iperf3-udp", "iperf3", ["-s", "-p", String(udp), "-B", LOCAL]);
  const prefix = join(TMP_DIR, "nginx-backend");
  mkdirSync(prefix, { recursive: true });
  const conf = join(prefix, "nginx.conf");
  writeFileSync(
    conf,
    `worker_processes 1;
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  default_type text/plain;
  keepalive_requests 1000000;
  server {
${Object.values(httpPorts).map((port) => `    listen ${LOCAL}:${port} backlog=4096;`).join("\n")}
    location / { return 200 "ok"; }
  }
}
`,
  );
  writeFileSync(join(RAW_DIR, "backend-nginx.conf"), readFileSync(conf));
  const nginxHttp = await startProcess("backend-nginx-http", "nginx", nginxArgs(conf, prefix));
  return { ports: { bulk, udp }, httpPorts, procs: [iperfBulk, iperfUdp, nginxHttp] };
}

// ---------------------------------------------------------------- targets
// Each setup returns { name, pid (the proxy's process, null for direct),
// endpoints: { bulk, http, udp|null }, stop() }.

async function setupDirect(backends) {
  return { name: "direct", pid: null, endpoints: { ...backends.ports }, stop: async () => {} };
}

async function setupHaproxy(backends) {
  const ports = { bulk: await freePort(), http: await freePort() };
  const frontend = (name, port, backendPort) => `
frontend fe_${name}
  bind ${LOCAL}:${port}
  default_backend be_${name}
backend be_${name}
  balance roundrobin
  server s1 ${LOCAL}:${backendPort}
`;
  const cfg = join(TMP_DIR, "haproxy.cfg");
  writeFileSync(
    cfg,
    `global
  nbthread ${PROXY_THREADS}
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
` +
      frontend("bulk", ports.bulk, backends.ports.bulk) +
      frontend("http", ports.http, backends.ports.http),
  );
  writeFileSync(join(RAW_DIR, "haproxy.cfg"), readFileSync(cfg));
  const proc = await startProcess("haproxy", "haproxy", ["-f", cfg, "-db"]);
  return { name: "haproxy", pid: proc.pid, endpoints: { ...ports, udp: null }, stop: () => stopProcess(proc) };
}

async function setupNginx(backends) {
  if (!NGINX_STREAM_MODULE) throw new Error("nginx stream module not found (bash bench/setup.sh installs libnginx-mod-stream)");
  const ports = { bulk: await freePort(), http: await freePort(), udp: await freePort() };
  const prefix = join(TMP_DIR, "nginx-proxy");
  mkdirSync(prefix, { recursive: true });
  const b = backends.ports;
  const conf = join(prefix, "nginx.conf");
  writeFileSync(
    conf,
    `load_module ${NGINX_STREAM_MODULE};
worker_processes ${PROXY_THREADS};
pid ${prefix}/nginx.pid;
error_log ${prefix}/error.log warn;
events { worker_connections 8192; }
stream {
  upstream bulk { server ${LOCAL}:${b.bulk}; }
  upstream http { server ${LOCAL}:${b.http}; }
  upstream udp  { server ${LOCAL}:${b.udp}; }
  server { listen ${LOCAL}:${ports.bulk}; proxy_pass bulk; }
  server { listen ${LOCAL}:${ports.http}; proxy_pass http; }
  # iperf3's UDP test: its TCP control connection and its datagrams use one port.
  server { listen ${LOCAL}:${ports.udp}; proxy_pass udp; }
  # The receive buffer Harbor's worker gives its UDP ports by default (HARBOR_UDP_RECEIVE_BUFFER_BYTES), like for like.
  server { listen ${LOCAL}:${ports.udp} udp rcvbuf=4m; proxy_pass udp; proxy_timeout 30s; }
}
`,
  );
  writeFileSync(join(RAW_DIR, "nginx-proxy.conf"), readFileSync(conf));
  const proc = await startProcess("nginx-proxy", "nginx", nginxArgs(conf, prefix));
  return { name: "nginx", pid: proc.pid, endpoints: ports, stop: () => stopProcess(proc) };
}

function psql(sql) {
  const r = spawnSync("psql", ["-h", LOCAL, "-U", "postgres", "-v", "ON_ERROR_STOP=1", "-qc", sql], { encoding: "utf8", timeout: 30_000 });
  if (r.status !== 0) throw new Error(`psql: ${oneLine(r.stderr || r.error)}`);
}

async function setupHarbor(backends, { name = "harbor", mode = "userspace", relays = 0 } = {}) {
  if (!existsSync(HARBOR_MAIN)) {
    log("services/cli/dist/main.js missing: npm run build");
    const r = await runCommand("npm", ["run", "build"], { timeoutMs: 600_000, rawFile: "harbor-build.txt" });
    if (r.code !== 0) throw new Error(`npm run build failed: ${oneLine(r.stderr)}`);
  }
  const api = `${LOCAL}:${await freePort()}`;
  const rangeStart = await freePortBlock(16);
  const tag = `${process.pid}_${Date.now().toString(36)}`;
  const db = `bench_${tag}`;
  psql(`CREATE DATABASE ${db}`);
  cleanups.push(async () => psql(`DROP DATABASE IF EXISTS ${db} WITH (FORCE)`));
  const env = {
    HARBOR_API: api,
    HARBOR_PORT_RANGE: `${rangeStart}-${rangeStart + 15}`,
    HARBOR_NATS_PREFIX: `bench_${tag}`,
    DATABASE_URL: `postgres://postgres@${LOCAL}:5432/${db}`,
    NATS_URL: process.env.NATS_URL ?? "nats://127.0.0.1:4222",
    HARBOR_DRAIN_TIMEOUT_MS: "1000",
    HARBOR_WORKER_MODE: mode,
    HARBOR_WORKER_RELAYS: String(relays),
  };
  // The worker runs apart from the control plane, as in production: its CPU and
  // memory are what the tables show, and its heap holds only the data plane's
  // objects (a bigger heap makes V8's collections, which every read's buffer
  // brings on, slower: bulk TCP ran ~40 % slower with 40 MB of unrelated live
  // objects in the same process).
  const controlPlane = await startProcess(`${name}-control-plane`, process.execPath, [HARBOR_BIN, "serve", "control-plane"], { env, readyText: '"msg":"ready"', readyTimeoutMs: 60_000 });
  let proc;
  try {
    const profile = PROFILE_DIR ? ["--cpu-prof", `--cpu-prof-dir=${resolve(PROFILE_DIR, name)}`] : [];
    proc = await startProcess(`${name}-worker`, process.execPath, [...profile, HARBOR_BIN, "serve", "worker"], { env, readyText: '"msg":"worker-started"', readyTimeoutMs: 60_000 });
  } catch (err) {
    await stopProcess(controlPlane);
    throw err;
  }
  const cli = async (...argv) => {
    const r = await runCommand(process.execPath, [HARBOR_BIN, ...argv], { env: { HARBOR_API: api }, timeoutMs: 30_000 });
    if (r.code !== 0) throw new Error(`harbor ${argv[0]}: ${oneLine(r.stderr || r.stdout)}`);
    return r.stdout;
  };
  // A `both…` service is TCP and UDP on one port: iperf3's UDP test needs its
  // TCP control connection next to the datagrams, which take the UDP listener
  // exactly as a `udp…` service's would.
  const services = { bulk: "bench-bulk", http: "bench-http", udp: "both-bench-udp" };
  const endpoints = {};
  await Promise.all(
    Object.entries(services).map(async ([kind, name]) => {
      const app = `bench-${kind}`;
      const created = JSON.parse(await cli("create-service", name, "--app", app, "--json"));
      endpoints[kind] = created.port;
      await cli("register-instance", app, `${app}-0`, "--host", LOCAL, "--port", String(backends.ports[kind]), "--ttl", "3600");
    }),
  );
  return {
    name,
    pid: proc.pid,
    endpoints,
    stop: async () => {
      await stopProcess(proc, 8_000);
      await stopProcess(controlPlane, 8_000);
    },
  };
}

const SETUPS = {
  direct: setupDirect,
  haproxy: setupHaproxy,
  nginx: setupNginx,
  harbor: (backends) => setupHarbor(backends),
  "harbor-relays": (backends) => setupHarbor(backends, { name: "harbor-relays", relays: RELAYS }),
  "harbor-kernel": (backends) => setupHarbor(backends, { name: "harbor-kernel", mode: "kernel" }),
};

// ---------------------------------------------------------------- workloads
// Each takes (target, rep, backends) and returns { <row key>: value, ... } plus the
// proxy's cpuS and wallS; it throws on failure.

const rawName = (what, target, rep) => `${what}-${target.name}-r${rep}`;

/** One iperf3 client run; `omit` warm-up seconds are left out (TCP only: iperf3 miscounts UDP loss with -O). */
async function iperf(target, rep, what, port, extra, omit = 0) {
  const argv = ["-c", LOCAL, "-p", String(port), "-t", String(CFG.seconds), "-J", ...extra];
  if (omit) argv.push("-O", String(omit));
  const r = await runCommand("iperf3", argv, { timeoutMs: (CFG.seconds + omit + 30) * 1000, rawFile: `${rawName(what, target, rep)}.json` });
  const json = parseJson(r.stdout);
  if (r.code !== 0 || !json || json.error) throw new Error(json?.error ?? (r.stderr || `iperf3 exit ${r.code}`));
  return json;
}

async function tcpBulk(target, rep, streams) {
  const stopRss = target.pid && streams > 1 ? rssPeakSampler(target.pid) : null;
  try {
    const m = await withProxyCpu(target, () => iperf(target, rep, `bulk${streams}`, target.endpoints.bulk, ["-P", String(streams)], CFG.omit));
    const gbps = m.end.sum_received.bits_per_second / 1e9;
    return { [`bulk${streams}`]: gbps, ...(stopRss ? { rssLoad: stopRss() } : {}), cpuS: m.cpuS, wallS: m.wallS };
  } finally {
    stopRss?.();
  }
}
const tcpBulk1 = (target, rep) => tcpBulk(target, rep, 1);
const tcpBulk8 = (target, rep) => tcpBulk(target, rep, 8);

async function newConnPerRequest(target, rep) {
  const url = `http://${LOCAL}:${target.endpoints.http}/`;
  const m = await withProxyCpu(target, () =>
    runCommand("ab", ["-r", "-q", "-s", "10", "-c", String(AB_CONCURRENCY), "-n", String(CFG.abRequests), url], { timeoutMs: 300_000, rawFile: `${rawName("ab", target, rep)}.txt` }),
  );
  const rps = /Requests per second:\s+([\d.]+)/.exec(m.stdout);
  if (m.code !== 0 || !rps) throw new Error(oneLine(m.stderr || m.stdout) || `ab exit ${m.code}`);
  const failed = Number(/Failed requests:\s+(\d+)/.exec(m.stdout)?.[1] ?? 0);
  if (failed > CFG.abRequests * 0.01) throw new Error(`${failed} of ${CFG.abRequests} requests failed`);
  return { ab: Number(rps[1]), cpuS: m.cpuS, wallS: m.wallS };
}

const WRK_UNITS = { us: 0.001, ms: 1, s: 1000, m: 60_000 };
async function persistentConns(target, rep) {
  const url = `http://${LOCAL}:${target.endpoints.http}/`;
  const m = await withProxyCpu(target, () =>
    runCommand("wrk", ["-t1", `-c${WRK_CONNECTIONS}`, `-d${CFG.seconds}s`, "--latency", url], { timeoutMs: (CFG.seconds + 30) * 1000, rawFile: `${rawName("wrk", target, rep)}.txt` }),
  );
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(m.stdout);
  const p99 = /^\s*99%\s+([\d.]+)(us|ms|s|m)\s*$/m.exec(m.stdout);
  if (m.code !== 0 || !rps || !p99) throw new Error(oneLine(m.stderr || m.stdout) || `wrk exit ${m.code}`);
  const non2xx = /Non-2xx or 3xx responses:\s+(\d+)/.exec(m.stdout);
  if (non2xx) throw new Error(`${non2xx[1]} non-2xx responses`);
  return { wrk: Number(rps[1]), wrkP99: Number(p99[1]) * WRK_UNITS[p99[2]], cpuS: m.cpuS, wallS: m.wallS };
}

/** A larger receive buffer at the iperf3 UDP server, so the backend itself is not what drops bursts. */
const RMEM_MAX = Number(readFileSync("/proc/sys/net/core/rmem_max", "utf8").trim()) || 0;
const UDP_WINDOW = RMEM_MAX >= 1 << 20 ? ["-w", String(Math.min(RMEM_MAX, 4 << 20))] : [];

async function udpRun(target, rep, what, bitrate) {
  const m = await withProxyCpu(target, () => iperf(target, rep, what, target.endpoints.udp, ["-u", "-l", String(UDP_SIZE), "-b", bitrate, ...UDP_WINDOW]));
  // Datagrams counted from bytes: the server's own packet/loss counters are
  // thrown off by reordering; the sender's count is the client's.
  const delivered = m.end.sum_received.bytes / UDP_SIZE;
  const sent = m.end.sum_sent.bytes / UDP_SIZE;
  const lossPct = sent > 0 ? Math.max(0, 100 * (1 - delivered / sent)) : 100;
  return { kpps: delivered / m.end.sum_received.seconds / 1000, lossPct, cpuS: m.cpuS, wallS: m.wallS };
}

async function udpFlood(target, rep) {
  const m = await udpRun(target, rep, "udpflood", "0");
  return { udpFlood: m.kpps, cpuS: m.cpuS, wallS: m.wallS };
}

async function udpFixedRate(target, rep) {
  const m = await udpRun(target, rep, "udp100k", String(UDP_FIXED_PPS * UDP_SIZE * 8));
  return { udpLoss: m.lossPct, udpFixedKpps: m.kpps, ...(m.cpuS === null ? {} : { udpCpu: (100 * m.cpuS) / m.wallS }), cpuS: m.cpuS, wallS: m.wallS };
}

// The batched flood (bench/udpflood.c, built with the machine's C compiler
// into the run's temporary folder on first use). Its sink takes the iperf3 UDP
// backend's port, which that server binds only during its own tests.
const UDPFLOOD_SOURCE = join(BENCH_DIR, "udpflood.c");
let udpfloodBinary;
async function udpfloodTool() {
  udpfloodBinary ??= (async () => {
    const binary = join(TMP_DIR, "udpflood");
    const r = await runCommand("cc", ["-O2", "-o", binary, UDPFLOOD_SOURCE], { timeoutMs: 60_000, rawFile: "udpflood-build.txt" });
    if (r.code !== 0) throw new Error(`cc ${relative(REPO, UDPFLOOD_SOURCE)}: ${oneLine(r.stderr) || `exit ${r.code}`}`);
    return binary;
  })();
  return udpfloodBinary;
}

/** Whether some socket is bound to 127.0.0.1:port for UDP, read from /proc/net/udp (a test bind would race the sink's). */
function udpPortBound(port) {
  const local = `0100007F:${port.toString(16).toUpperCase().padStart(4, "0")}`;
  return readFileSync("/proc/net/udp", "utf8").split("\n").some((line) => line.trim().split(/\s+/)[1] === local);
}

async function udpBatchedFlood(target, rep, backends) {
  const tool = await udpfloodTool();
  const backendPort = backends.ports.udp;
  const sinkP = runCommand(tool, ["sink", LOCAL, String(backendPort), String(CFG.seconds + 20)], { timeoutMs: (CFG.seconds + 30) * 1000, rawFile: `${rawName("udpbatch-sink", target, rep)}.json` });
  try {
    await waitUntil("the udpflood sink bound", () => udpPortBound(backendPort), 5_000, 20);
  } catch (err) {
    const sink = await sinkP;
    throw new Error(`udpflood sink: ${oneLine(sink.stderr) || oneLine(err)}`);
  }
  const m = await withProxyCpu(target, async () => {
    const send = await runCommand(tool, ["send", LOCAL, String(target.endpoints.udp), String(CFG.seconds), String(UDP_SIZE)], { timeoutMs: (CFG.seconds + 30) * 1000, rawFile: `${rawName("udpbatch-send", target, rep)}.json` });
    return { send, sink: await sinkP };
  });
  const sent = parseJson(m.send.stdout);
  const got = parseJson(m.sink.stdout);
  if (m.send.code !== 0 || !sent) throw new Error(`udpflood send: ${oneLine(m.send.stderr) || `exit ${m.send.code}`}`);
  if (m.sink.code !== 0 || !got) throw new Error(`udpflood sink: ${oneLine(m.sink.stderr) || `exit ${m.sink.code}`}`);
  if (got.received === 0 || got.seconds <= 0) throw new Error(`nothing reached the backend (${sent.sent} sent)`);
  // The proxy's CPU is divided over the time datagrams flowed, not the sink's trailing second of silence.
  return { udpBatch: got.received / got.seconds / 1000, cpuS: m.cpuS, wallS: Math.min(m.wallS, sent.seconds) };
}

/** Workloads in run order; `needs` names the endpoint, `perCore` the row whose throughput is divided by the proxy's cores used. */
const WORKLOADS = [
  { name: "TCP bulk, 1 stream", fn: tcpBulk1, needs: "bulk", rows: ["bulk1"], perCore: "bulk1" },
  { name: "TCP bulk, 8 streams", fn: tcpBulk8, needs: "bulk", rows: ["bulk8", "rssLoad"], perCore: "bulk8" },
  { name: "ab new connection per request", fn: newConnPerRequest, needs: "http", rows: ["ab"], perCore: "ab" },
  { name: "wrk persistent connections", fn: persistentConns, needs: "http", rows: ["wrk", "wrkP99"], perCore: "wrk" },
  { name: "UDP flood", fn: udpFlood, needs: "udp", rows: ["udpFlood"], perCore: "udpFlood" },
  { name: "UDP 100 kpps", fn: udpFixedRate, needs: "udp", rows: ["udpLoss", "udpCpu"], perCore: "udpFixedKpps" },
  { name: "UDP flood, batched sender", fn: udpBatchedFlood, needs: "udp", rows: ["udpBatch"], perCore: "udpBatch" },
];

// ---------------------------------------------------------------- kernel mode ÷ direct, paired

/**
 * pairRatios[row] = harbor-kernel ÷ direct of each back-to-back pair. In the
 * repetitions above the two targets' runs of one workload sit up to four runs
 * apart, and the host's speed drifts between them (direct's own repetitions
 * spread by a quarter); a pair run back to back, its order alternating, sees
 * the same host, so its ratio is the rewrite's cost and little else.
 */
const pairRatios = {};

async function kernelPairs(targets) {
  const direct = targets.find((tg) => tg.name === "direct");
  const kernel = targets.find((tg) => tg.name === "harbor-kernel");
  if (!direct || !kernel || CFG.pairs === 0) return;
  for (const w of WORKLOADS.filter((w) => w.fn === tcpBulk1 || w.fn === tcpBulk8)) {
    if (ONLY && !w.name.includes(ONLY)) continue;
    const row = w.rows[0];
    const entry = (pairRatios[row] ??= { values: [], errors: [] });
    for (let pair = 1; pair <= CFG.pairs; pair++) {
      const order = pair % 2 ? [direct, kernel] : [kernel, direct];
      try {
        const got = {};
        for (const target of order) {
          log(`pair ${pair}/${CFG.pairs} ${w.name} → ${target.name}`);
          got[target.name] = (await w.fn(target, `pair${pair}`))[row];
          await sleep(300);
        }
        entry.values.push(got[kernel.name] / got[direct.name]);
      } catch (err) {
        log(`  error: ${oneLine(err)}`);
        entry.errors.push(oneLine(err));
      }
    }
  }
}

function renderPairs() {
  const rows = ROWS.filter((row) => pairRatios[row.key]);
  if (rows.length === 0) return "";
  const lines = [
    "## Kernel mode ÷ direct, back to back",
    "",
    "| Workload | each pair | median |",
    "|---|---|---:|",
    ...rows.map((row) => {
      const { values, errors } = pairRatios[row.key];
      const each = values.map((v) => `${fmt(v, 2)}×`).join(", ") || `error: ${errors[0]}`;
      return `| ${cellText(row.label)} | ${each} | ${values.length ? `${fmt(median(values), 2)}×` : "—"} |`;
    }),
    "",
    `${CFG.pairs} pair(s) of runs, direct then harbor-kernel and the other way round in turn, after the`,
    "repetitions above: each ratio compares two runs seconds apart, not minutes.",
    "",
  ];
  return lines.join("\n");
}

// ---------------------------------------------------------------- report

const t = `${CFG.seconds} s`;
/** peer: what harbor is compared with; ↓ in the label: smaller is better; diff: compare as a difference (percentage points); proxyOnly: no direct value. */
const ROWS = [
  { key: "bulk1", label: `TCP bulk, 1 stream, iperf3 ${t} (Gbit/s)`, peer: "haproxy", digits: 2 },
  { key: "bulk8", label: `TCP bulk, 8 streams, iperf3 -P 8 (Gbit/s)`, peer: "haproxy", digits: 2 },
  { key: "ab", label: `New connection per request, ab -c ${AB_CONCURRENCY} -n ${CFG.abRequests} (req/s)`, peer: "haproxy", digits: 0 },
  { key: "wrk", label: `Persistent connections, wrk -t1 -c${WRK_CONNECTIONS} ${t} (req/s)`, peer: "haproxy", digits: 0 },
  { key: "wrkP99", label: `… wrk p99 latency (ms) ↓`, peer: "haproxy", digits: 2 },
  { key: "udpFlood", label: `UDP ${UDP_SIZE} B flood, delivered at backend (kpps)`, peer: "nginx", digits: 1 },
  { key: "udpBatch", label: `UDP ${UDP_SIZE} B flood, batched sender (udpflood), delivered (kpps)`, peer: "nginx", digits: 1 },
  { key: "udpLoss", label: `UDP ${UDP_SIZE} B at ${UDP_FIXED_PPS / 1000} kpps: loss (%) ↓`, peer: "nginx", digits: 2, diff: true },
  { key: "udpCpu", label: `UDP ${UDP_SIZE} B at ${UDP_FIXED_PPS / 1000} kpps: proxy CPU (% of a core) ↓`, peer: "nginx", digits: 0, proxyOnly: true },
  { key: "rssIdle", label: "Proxy RSS, idle (MiB) ↓", peer: "haproxy", digits: 1, proxyOnly: true },
  { key: "rssLoad", label: "Proxy RSS, under 8-stream bulk (MiB) ↓", peer: "haproxy", digits: 1, proxyOnly: true },
];
const PER_CORE_ROWS = [
  { key: "bulk1", label: "TCP bulk, 1 stream (Gbit/s per core)", peer: "haproxy", digits: 2 },
  { key: "bulk8", label: "TCP bulk, 8 streams (Gbit/s per core)", peer: "haproxy", digits: 2 },
  { key: "ab", label: "New connection per request (req/s per core)", peer: "haproxy", digits: 0 },
  { key: "wrk", label: "Persistent connections (req/s per core)", peer: "haproxy", digits: 0 },
  { key: "udpFlood", label: "UDP flood, delivered (kpps per core)", peer: "nginx", digits: 1 },
  { key: "udpBatch", label: "UDP flood, batched sender, delivered (kpps per core)", peer: "nginx", digits: 1 },
  { key: "udpFixedKpps", label: `UDP at ${UDP_FIXED_PPS / 1000} kpps, delivered (kpps per core)`, peer: "nginx", digits: 1 },
];

const fmt = (v, digits) => v.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
const cellText = (s) => String(s).replace(/\|/g, "\\|");

/** results[row][target] = { values: [], errors: [], na?: true }; perCore likewise with { values, cores }. */
const results = {};
const perCore = {};
const slot = (store, row, target) => ((store[row] ??= {})[target] ??= { values: [], errors: [], cores: [] });

function summarize(entry) {
  if (!entry || entry.na) return { text: "—" };
  if (entry.values.length) return { value: median(entry.values) };
  if (entry.errors.length) return { text: `error: ${entry.errors[0]}` };
  return { text: "—" };
}

function compare(row, harbor, other) {
  // other is undefined when --targets left the peer out.
  if (harbor?.value === undefined || other?.value === undefined) return "—";
  if (row.diff) {
    const d = harbor.value - other.value;
    return `${d >= 0 ? "+" : "−"}${fmt(Math.abs(d), 2)} pp`;
  }
  if (other.value === 0) return "—";
  return `${fmt(harbor.value / other.value, 2)}×`;
}

function renderMain() {
  const head = ["Workload", ...TARGETS, ...HARBORS.flatMap((h) => [`${h} ÷ peer`, `${h} ÷ direct`])];
  const lines = [`| ${head.join(" | ")} |`, `|${head.map((_, i) => (i === 0 ? "---" : "---:")).join("|")}|`];
  for (const row of ROWS) {
    const cells = Object.fromEntries(TARGETS.map((tg) => [tg, row.proxyOnly && tg === "direct" ? { text: "—" } : summarize(results[row.key]?.[tg])]));
    const shown = TARGETS.map((tg) => cellText(cells[tg].text ?? fmt(cells[tg].value, row.digits)));
    const ratios = HARBORS.flatMap((h) => {
      const vsPeer = compare(row, cells[h], cells[row.peer]);
      const vsDirect = row.proxyOnly ? "—" : compare(row, cells[h], cells.direct);
      return [vsPeer === "—" ? "—" : `${vsPeer} (${row.peer})`, vsDirect];
    });
    lines.push(`| ${cellText(row.label)} | ${shown.join(" | ")} | ${ratios.join(" | ")} |`);
  }
  return lines.join("\n");
}

function renderPerCore() {
  // The kernel mode's forwarding runs in softirq, accounted to the client's and backend's
  // processes, not Harbor's: a per-core figure for it would divide by almost nothing.
  const proxies = TARGETS.filter((tg) => tg !== "direct" && tg !== "harbor-kernel");
  const head = ["Per core of proxy CPU", ...proxies, "harbor ÷ peer"];
  const lines = [`| ${head.join(" | ")} |`, `|${head.map((_, i) => (i === 0 ? "---" : "---:")).join("|")}|`];
  for (const row of PER_CORE_ROWS) {
    const cells = Object.fromEntries(proxies.map((tg) => [tg, summarize(perCore[row.key]?.[tg])]));
    const shown = proxies.map((tg) => {
      const c = cells[tg];
      if (c.text) return cellText(c.text);
      const cores = median(perCore[row.key][tg].cores);
      return `${fmt(c.value, row.digits)} (${fmt(cores, 2)} cores)`;
    });
    const vsPeer = compare(row, cells.harbor, cells[row.peer]);
    lines.push(`| ${row.label} | ${shown.join(" | ")} | ${vsPeer === "—" ? "—" : `${vsPeer} (${row.peer})`} |`);
  }
  return lines.join("\n");
}

function versions() {
  const first = (cmd, argv) => {
    const r = spawnSync(cmd, argv, { encoding: "utf8" });
    return ((r.stdout || "") + (r.stderr || "")).split("\n").find((l) => l.trim()) ?? `${cmd}: not found`;
  };
  return {
    node: process.version,
    haproxy: first("haproxy", ["-v"]).replace(/ - https?:.*$/, ""),
    nginx: first("nginx", ["-v"]).replace(/^nginx version: /, ""),
    iperf3: first("iperf3", ["--version"]).replace(/ \(cJSON.*$/, ""),
    wrk: first("wrk", ["-v"]).replace(/ Copyright.*$/, "").replace(/ \[epoll\]/, ""),
    ab: first("ab", ["-V"]).replace(/^This is ApacheBench, Version ([\d.]+).*/, "ApacheBench $1"),
    nproc: os.availableParallelism?.() ?? os.cpus().length,
    cpu: os.cpus()[0]?.model ?? "?",
    kernel: os.release(),
  };
}

function renderReport(v, startedAt, elapsedS, loadBefore, cpu) {
  return `# Harbor benchmark (${MODE})

- date: ${startedAt.toISOString()} (took ${Math.round(elapsedS)} s)
- command: \`${COMMAND}\`
- node ${v.node}; ${v.haproxy}; ${v.nginx}; ${v.iperf3}; ${v.wrk}; ${v.ab}
- nproc: ${v.nproc} (${v.cpu}); kernel ${v.kernel}; load average before the run: ${loadBefore}
- machine CPU busy during the workloads: ${cpu.busyPct.toFixed(0)} %, of which processes not started by this run: ${cpu.foreignPct.toFixed(1)} % (an estimate; above a few % the numbers are disturbed)
- each timed run ${CFG.seconds} s${CFG.omit ? ` (TCP iperf3 runs +${CFG.omit} s warm-up, omitted)` : ""}; ${CFG.reps} repetition(s), median shown; ab -n ${CFG.abRequests}; idle RSS read after ${CFG.idleMs / 1000} s idle
- HAProxy \`nbthread ${PROXY_THREADS}\`, nginx \`worker_processes ${PROXY_THREADS}\`; Harbor's worker is one Node process (\`harbor serve worker\`, beside a \`serve control-plane\`), or that process and its relays (harbor-relays)
- raw outputs: \`${relative(REPO, RAW_DIR)}/\` (git-ignored)

## Results

${renderMain()}

↓ = lower is better. "harbor ÷ peer" compares with HAProxy on TCP rows and nginx on UDP rows
(HAProxy has no UDP); loss is compared as a difference in percentage points.

${renderPairs()}
## Per core of proxy CPU

${renderPerCore()}

Throughput divided by the proxy's CPU-seconds per second of the run (the cores it used, in
brackets). Harbor's CPU is its worker process's (with its relays for harbor-relays); the
control plane runs in a process of its own, as in production.

Two shared cores: client, proxy and backends compete for them, so compare ratios within one
run; absolute numbers move 10-30 % between runs. See bench/README.md.
`;
}

// ---------------------------------------------------------------- main

async function main() {
  const startedAt = new Date();
  const t0 = performance.now();
  const loadBefore = os.loadavg().map((l) => l.toFixed(2)).join(" ");
  for (const tool of ["haproxy", "nginx", "iperf3", "wrk", "ab", "psql"]) {
    if (spawnSync("sh", ["-c", `command -v ${tool}`]).status !== 0) throw new Error(`${tool} not found: run bash bench/setup.sh first`);
  }
  log(`mode ${MODE}; raw outputs in ${relative(REPO, RAW_DIR)}`);

  const backends = await startBackends();
  log(`backends: iperf3 bulk :${backends.ports.bulk}, iperf3 udp :${backends.ports.udp}, nginx http ${JSON.stringify(backends.httpPorts)}`);

  const targets = [];
  for (const name of TARGETS) {
    try {
      const target = await SETUPS[name]({ ...backends, ports: { ...backends.ports, http: backends.httpPorts[name] } });
      targets.push(target);
      await waitReachable(target);
      log(`${name} ready: ${JSON.stringify(target.endpoints)}${target.pid ? ` pid ${target.pid}` : ""}`);
    } catch (err) {
      log(`${name} setup failed: ${oneLine(err)}`);
      for (const row of ROWS) slot(results, row.key, name).errors.push(`setup: ${oneLine(err)}`);
      const i = targets.findIndex((tg) => tg.name === name);
      if (i >= 0) {
        await targets[i].stop().catch(() => {});
        targets.splice(i, 1);
      }
    }
  }

  // Idle means settled: a process read just after its start still holds its start-up garbage.
  await sleep(CFG.idleMs);
  for (const target of targets) if (target.pid) slot(results, "rssIdle", target.name).values.push(rssMiB(target.pid));

  const foreignCpu = foreignCpuMeter();
  for (let rep = 1; rep <= CFG.reps; rep++) {
    // Rotate the target order each repetition so none always runs first.
    const order = targets.map((_, i) => targets[(i + rep - 1) % targets.length]);
    for (const w of WORKLOADS) {
      if (ONLY && !w.name.includes(ONLY)) continue;
      for (const target of order) {
        if (!target.endpoints[w.needs]) {
          for (const row of w.rows) slot(results, row, target.name).na = true;
          continue;
        }
        log(`rep ${rep}/${CFG.reps} ${w.name} → ${target.name}`);
        try {
          const r = await w.fn(target, rep, backends);
          for (const row of w.rows) if (r[row] !== undefined) slot(results, row, target.name).values.push(r[row]);
          if (r.cpuS !== null && r.cpuS !== undefined && r[w.perCore] !== undefined) {
            const cores = r.cpuS / r.wallS;
            const entry = slot(perCore, w.perCore, target.name);
            entry.cores.push(cores);
            if (cores > 0) entry.values.push(r[w.perCore] / cores);
          }
        } catch (err) {
          log(`  error: ${oneLine(err)}`);
          for (const row of w.rows) slot(results, row, target.name).errors.push(oneLine(err));
          if (w.perCore) slot(perCore, w.perCore, target.name).errors.push(oneLine(err));
        }
        await sleep(300); // let queues drain between runs
      }
    }
  }

  await kernelPairs(targets);

  const cpu = foreignCpu();
  if (cpu.foreignPct > 5) log(`warning: other processes used ${cpu.foreignPct.toFixed(0)} % of the machine's CPU during the run`);
  for (const target of targets) await target.stop();
  for (const p of backends.procs) await stopProcess(p);

  const elapsedS = (performance.now() - t0) / 1000;
  const report = renderReport(versions(), startedAt, elapsedS, loadBefore, cpu);
  writeFileSync(join(RAW_DIR, "results.json"), JSON.stringify({ mode: MODE, command: COMMAND, machineCpu: cpu, results, perCore, pairRatios }, null, 2));
  mkdirSync(RESULTS_DIR, { recursive: true });
  writeFileSync(join(RESULTS_DIR, "latest.md"), report);
  // full.md keeps the last whole full run: every workload, every target.
  const whole = MODE === "full" && !ONLY && !PICKED;
  if (whole) writeFileSync(join(RESULTS_DIR, "full.md"), report);
  process.stdout.write(report.slice(report.indexOf("## Results")));
  log(`wrote ${relative(REPO, join(RESULTS_DIR, "latest.md"))}${whole ? " and full.md" : ""} in ${Math.round(elapsedS)} s`);
}

try {
  await main();
  await shutdown();
} catch (err) {
  log(`fatal: ${oneLine(err)}`);
  await shutdown();
  process.exit(1);
}
