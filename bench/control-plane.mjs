// Control-plane benchmark: allocation throughput as allocations grow, and
// propagation latency (instance registered → in rotation; gone → out) as
// services grow. Drives Harbor through its own gRPC API, run as in production:
// `harbor serve control-plane` and, apart, `harbor serve worker`.
//
//   node bench/control-plane.mjs [--smoke|--full] [--only=allocation|propagation] [--cpu-prof=DIR]
//
// --cpu-prof writes a V8 CPU profile of each Harbor process to DIR.
// Needs the build (npm run build), Postgres on 127.0.0.1:5432 and NATS on
// 127.0.0.1:4222, as the tests do. Prints Markdown tables; writes them to
// bench/results/control-plane.md (a run with --only prints its part only).
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import net from "node:net";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { performance } from "node:perf_hooks";
import * as grpc from "@grpc/grpc-js";
import pg from "pg";
import { createDatabase, createProcesses, fetchMetrics, freePort, grpcCall, pool, waitFor } from "./lib.mjs";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const { PortAllocatorClient, BackendRegistryClient } = await import(join(ROOT, "libs/proto/dist/index.js"));

const args = process.argv.slice(2);
const option = (name) => args.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3);
const full = args.includes("--full");
const only = option("only");
const profileDir = option("cpu-prof");
const unknown = args.filter((a) => a !== "--smoke" && a !== "--full" && !a.startsWith("--only=") && !a.startsWith("--cpu-prof="));
if (unknown.length > 0 || (full && args.includes("--smoke")) || (only !== undefined && only !== "allocation" && only !== "propagation") || profileDir === "") {
  process.stderr.write("usage: node bench/control-plane.mjs [--smoke|--full] [--only=allocation|propagation] [--cpu-prof=<dir>]\n");
  process.exit(2);
}
const STAMP = new Date().toISOString().replace(/[:.]/g, "-").replace(/Z$/, "") + `-control-plane-${full ? "full" : "smoke"}`;
const RAW_DIR = join(ROOT, "bench/results/raw", STAMP);
mkdirSync(RAW_DIR, { recursive: true });
const log = (msg) => process.stderr.write(`${msg}\n`);
const { cleanups, startProcess, stopProcess, shutdown, installHandlers } = createProcesses({ rawDir: RAW_DIR, log });
installHandlers();
const HARBOR_BIN = join(ROOT, "services/cli/bin/harbor.js");
const SCALES = full ? [0, 10_000, 25_000, 50_000] : [0, 5_000];
const BATCH = full ? 2_000 : 1_000;
const WARM_CREATES = 4_000;
const CONCURRENCY = 32;
const SERVICE_COUNTS = full ? [10, 1_000, 10_000] : [10, 1_000];
const LATENCY_SAMPLES = full ? 100 : 30;
const WARM_UP = 10;
const NODE_RANGE = 2_500; // ports per synthetic node: 20 nodes hold 50,000

const call = (client, method, request) => grpcCall(client, method, request, 30_000);

/** A fresh database for `fn`, dropped afterwards (dropping twice is harmless). */
async function withDatabase(fn) {
  const database = await createDatabase("harbor_bench");
  // Also dropped when Ctrl-C ends the run (the handlers exit before this finally).
  cleanups.push(database.drop);
  try {
    return await fn(database.url);
  } finally {
    await database.drop();
  }
}

/**
 * Harbor as it runs in production, on a database of its own: `harbor serve
 * control-plane` (allocator and registry) and, apart, `harbor serve worker`
 * for the node; resolves when the API answers. The worker's listeners are
 * waited for by whoever needs them.
 */
async function startHarbor(databaseUrl, env = {}) {
  const api = `127.0.0.1:${await freePort()}`;
  const prefix = `bench${Date.now().toString(36)}`;
  // LOG_LEVEL warn: an info line per registration would be part of what is timed.
  const common = { DATABASE_URL: databaseUrl, NATS_URL: "nats://127.0.0.1:4222", HARBOR_API: api, HARBOR_NATS_PREFIX: prefix, LOG_LEVEL: "warn", ...env };
  const serve = (target, own = {}) =>
    startProcess(`harbor-${target}-${prefix}`, process.execPath, [...(profileDir ? ["--cpu-prof", `--cpu-prof-dir=${profileDir}`] : []), HARBOR_BIN, "serve", target], { env: { ...common, ...own } });
  const credentials = grpc.credentials.createInsecure();
  const allocator = new PortAllocatorClient(api, credentials);
  const controlPlane = await serve("control-plane");
  const metrics = `127.0.0.1:${await freePort()}`;
  let worker;
  try {
    let exited = false;
    controlPlane.exited.then(() => (exited = true));
    await waitFor("harbor serve control-plane answering", async () => {
      if (exited) throw new Error(`it exited; see ${RAW_DIR}`);
      return grpcCall(allocator, "listNodes", {}, 1_000).then(() => true, () => false);
    }, 60_000, 50);
    worker = await serve("worker", { HARBOR_METRICS_ADDRESS: metrics });
  } catch (err) {
    await stopProcess(controlPlane);
    throw err;
  }
  return {
    allocator,
    registry: new BackendRegistryClient(api, credentials),
    /** The worker's `harbor_worker_propagation_seconds` buckets now: upper bound (s) → cumulative count. */
    propagationBuckets: () => propagationBuckets(metrics),
    stop: async () => {
      await stopProcess(worker);
      await stopProcess(controlPlane);
    },
  };
}

async function propagationBuckets(address) {
  const buckets = new Map();
  for (const m of (await fetchMetrics(address)).matchAll(/^harbor_worker_propagation_seconds_bucket\{le="([^"]+)"\} (\S+)$/gm)) {
    buckets.set(m[1] === "+Inf" ? Infinity : Number(m[1]), Number(m[2]));
  }
  return buckets;
}

/**
 * The bucket bound under which `p` % of the observations made between two
 * scrapes fall ("≤ 2 ms"), from the worker's histogram: registry → worker.
 */
function bucketPercentile(before, after, p) {
  const bounds = [...after.keys()].sort((a, b) => a - b);
  const count = (after.get(Infinity) ?? 0) - (before.get(Infinity) ?? 0);
  if (count === 0) return "—";
  const bound = bounds.find((le) => (after.get(le) ?? 0) - (before.get(le) ?? 0) >= (p / 100) * count);
  return bound === Infinity ? `> ${+(bounds.at(-2) * 1000).toFixed(1)}` : `≤ ${+(bound * 1000).toFixed(1)}`;
}

/** Nearest rank: the smallest sample with at least p % of the samples at or below it; NaN with none. */
const percentile = (sorted, p) => (sorted.length === 0 ? Number.NaN : sorted[Math.max(0, Math.ceil((p / 100) * sorted.length) - 1)]);

/** Runs `each(i)` for i < count, CONCURRENCY at a time; returns calls per second. */
async function concurrently(count, each) {
  const started = performance.now();
  await pool(count, CONCURRENCY, each);
  return count / ((performance.now() - started) / 1000);
}

/** Creates `count` services CONCURRENCY at a time; returns creates per second. */
const createMany = (allocator, prefix, count) =>
  concurrently(count, (i) => call(allocator, "createPortService", { name: `${prefix}-${i}`, nodeId: "", port: 0, app: "" }));

async function allocationThroughput() {
  return withDatabase(async (url) => {
    const harbor = await startHarbor(url, { HARBOR_PORT_RANGE: `20000-${20000 + NODE_RANGE - 1}` });
    const rows = [];
    try {
      // Synthetic nodes (no worker needed to allocate) so 50,000 ports fit,
      // beside the warm-up's, which cool down after their release.
      const nodes = Math.ceil((SCALES.at(-1) + BATCH * SCALES.length + BATCH + WARM_CREATES) / NODE_RANGE) + 1;
      for (let i = 2; i <= nodes; i++) {
        const min = 20000 + (i % 4) * NODE_RANGE;
        await call(harbor.allocator, "upsertNode", { node: { nodeId: `bench-${i}`, hostname: "", host: `10.1.${Math.floor(i / 250)}.${i % 250}`, extHostname: "", extHost: "", portMin: min, portMax: min + NODE_RANGE - 1, allocated: 0, blocked: [] } });
      }
      // A fresh process's first creates run at about half speed while V8
      // compiles the gRPC, protobuf and pg paths (a process restarted at
      // 5,000 allocations ramps up again, so it is the process, not the
      // table). Measured apart; then warmed up to WARM_CREATES and emptied,
      // so the steps measure the number of existing allocations alone.
      const cold = await createMany(harbor.allocator, "cold", BATCH);
      log(`allocations: a fresh process's first ${BATCH} → ${cold.toFixed(0)} creates/s`);
      await createMany(harbor.allocator, "warm", WARM_CREATES);
      await concurrently(BATCH, (i) => call(harbor.allocator, "deletePortService", { name: `cold-${i}` }));
      await concurrently(WARM_CREATES, (i) => call(harbor.allocator, "deletePortService", { name: `warm-${i}` }));
      let existing = 0;
      for (const scale of SCALES) {
        if (scale > existing) {
          await createMany(harbor.allocator, `fill-${scale}`, scale - existing);
          existing = scale;
        }
        const rate = await createMany(harbor.allocator, `batch-${scale}`, BATCH);
        existing += BATCH;
        rows.push({ existing: scale, rate });
        log(`allocations: ${scale} existing → ${rate.toFixed(0)} creates/s`);
      }
      const client = new pg.Client({ connectionString: url });
      await client.connect();
      const { rows: check } = await client.query("SELECT count(*)::int AS n, count(DISTINCT (node_id, port))::int AS d FROM port_services");
      await client.end();
      return { cold, rows, total: check[0].n, distinct: check[0].d };
    } finally {
      await harbor.stop();
    }
  });
}

/** A TCP server that greets with its name, as the backend whose arrival is timed. */
function greeter(name) {
  return new Promise((resolve) => {
    const server = net.createServer((s) => s.end(`${name}\n`)).listen(0, "127.0.0.1", () => resolve({ server, port: server.address().port }));
  });
}

function greeting(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    let data = "";
    s.on("data", (d) => (data += d));
    s.on("close", () => resolve(data.trim()));
    s.on("error", () => resolve(""));
  });
}

/**
 * Time from the RPC's start until `predicate(greeting)` holds for a new
 * connection through the port (`total`), and of that the RPC's own (`rpc`).
 */
async function timeUntil(action, port, predicate) {
  const started = performance.now();
  await action();
  const rpc = performance.now() - started;
  while (!predicate(await greeting(port))) {
    if (performance.now() - started > 5_000) return { total: Number.NaN, rpc };
  }
  return { total: performance.now() - started, rpc };
}

/**
 * The rows: each service count with the registry's default reconcile (every
 * 30 s: the few seconds measured rarely meet one), then the largest count
 * with the registry reconciling every set each second (at 10,000 services
 * that is back to back: its worst case).
 */
async function propagation() {
  const rows = [];
  const runs = [...SERVICE_COUNTS.map((services) => ({ services, reconciling: false })), { services: SERVICE_COUNTS.at(-1), reconciling: true }];
  for (const { services, reconciling } of runs) {
    await withDatabase(async (url) => {
      const harbor = await startHarbor(url, { HARBOR_PORT_RANGE: "20000-31999", ...(reconciling ? { HARBOR_RECONCILE_INTERVAL_MS: "1000" } : {}) });
      try {
        await createMany(harbor.allocator, `svc-${services}`, services - 1);
        const { service } = await call(harbor.allocator, "createPortService", { name: "timed", nodeId: "", port: 0, app: "timed" });
        const steady = await greeter("steady");
        const moving = await greeter("moving");
        await call(harbor.registry, "registerInstance", { app: "timed", instanceId: "steady", host: "127.0.0.1", ports: [{ intPort: 4100, port: steady.port }], ttlSeconds: 600 });
        await waitFor("the worker putting the first instance in rotation", async () => (await greeting(service.port)) === "steady", 30_000, 20);
        const up = [];
        const down = [];
        // The first WARM_UP rounds of each fresh Harbor are run and not counted: they time
        // V8 compiling the path and Postgres preparing its statements, once per process.
        let bucketsBefore;
        for (let i = -WARM_UP; i < LATENCY_SAMPLES; i++) {
          if (i === 0) bucketsBefore = await harbor.propagationBuckets();
          const counted = i >= 0 ? { up, down } : { up: [], down: [] };
          counted.up.push(await timeUntil(() => call(harbor.registry, "registerInstance", { app: "timed", instanceId: "moving", host: "127.0.0.1", ports: [{ intPort: 4100, port: moving.port }], ttlSeconds: 600 }), service.port, (g) => g === "moving"));
          // Out of rotation: two connections in a row both reach "steady" (with both in
          // rotation, round-robin sends one of any two to "moving").
          let steadyInARow = 0;
          counted.down.push(await timeUntil(() => call(harbor.registry, "deregisterInstance", { app: "timed", instanceId: "moving" }), service.port, (g) => (steadyInARow = g === "steady" ? steadyInARow + 1 : 0) >= 2));
        }
        const bucketsAfter = await harbor.propagationBuckets();
        const inWorker = { p50: bucketPercentile(bucketsBefore, bucketsAfter, 50), p99: bucketPercentile(bucketsBefore, bucketsAfter, 99) };
        steady.server.close();
        moving.server.close();
        const stats = (samples) => {
          const sorted = (xs) => xs.filter(Number.isFinite).sort((a, b) => a - b);
          const total = sorted(samples.map((x) => x.total));
          const rpc = sorted(samples.map((x) => x.rpc));
          return { p50: percentile(total, 50), p99: percentile(total, 99), rpcP50: percentile(rpc, 50), rpcP99: percentile(rpc, 99) };
        };
        const row = { services, reconciling, up: stats(up), down: stats(down), inWorker };
        rows.push(row);
        log(`propagation: ${services} services${reconciling ? " (registry reconciling)" : ""} → up p99 ${row.up.p99.toFixed(1)} ms, down p99 ${row.down.p99.toFixed(1)} ms`);
      } finally {
        await harbor.stop();
      }
    });
  }
  return rows;
}

let allocation, latency;
try {
  allocation = only === "propagation" ? undefined : await allocationThroughput();
  latency = only === "allocation" ? undefined : await propagation();
} catch (err) {
  log(`fatal: ${err?.stack ?? err}`);
  await shutdown();
  process.exit(1);
}
const allocationLines = allocation && [
  `## Allocation throughput (${CONCURRENCY} concurrent gRPC clients, ${BATCH} creates per step)`,
  "",
  "| existing allocations | creates/s |",
  "|---:|---:|",
  `| 0, a fresh process's first ${BATCH} | ${allocation.cold.toFixed(0)} |`,
  ...allocation.rows.map((r) => `| ${r.existing.toLocaleString("en")} | ${r.rate.toFixed(0)} |`),
  "",
  `The steps run after ${WARM_CREATES.toLocaleString("en")} warm-up creates, deleted again (the first row is before them).`,
  "",
  `Duplicates: ${allocation.total - allocation.distinct} among ${allocation.total.toLocaleString("en")} allocations (count of (node, port) pairs vs. distinct).`,
  "",
];
const latencyLines = latency && [
  "## Propagation latency (RegisterInstance / DeregisterInstance call → a new TCP connection through the port reaches / no longer reaches the instance)",
  "",
  "| services | in rotation p50 ms | p99 ms | … of which the RPC, p50 / p99 | out of rotation p50 ms | p99 ms | … of which the RPC, p50 / p99 | registry → worker (worker's histogram), p50 / p99 ms |",
  "|---:|---:|---:|---:|---:|---:|---:|---:|",
  ...latency.map((r) => {
    const ms = (x) => (Number.isNaN(x) ? "—" : x.toFixed(1));
    const side = (d) => `${ms(d.p50)} | ${ms(d.p99)} | ${ms(d.rpcP50)} / ${ms(d.rpcP99)}`;
    return `| ${r.services.toLocaleString("en")}${r.reconciling ? ", registry reconciling every set each second" : ""} | ${side(r.up)} | ${side(r.down)} | ${r.inWorker.p50} / ${r.inWorker.p99} |`;
  }),
  "",
  `${LATENCY_SAMPLES} samples each, after ${WARM_UP} rounds of warm-up per fresh Harbor. ` + "Latency includes the gRPC call itself and the probing connections (out of rotation takes two in a row reaching the other instance, as round-robin would send one of any two to it); the last column is the worker's own `harbor_worker_propagation_seconds` over the counted samples, both directions (a registration or departure reaching the registry → the worker applying the set; bucket bounds 1, 2, 3, 5, 7.5, 10, 15, 20 ms …).",
  "",
];
const lines = [
  `# Control plane — ${new Date().toISOString()}`,
  "",
  `\`node bench/control-plane.mjs ${full ? "--full" : "--smoke"}${only ? ` --only=${only}` : ""}\` on ${execFileSync("nproc").toString().trim()} cores, node ${process.version}, \`harbor serve control-plane\` and, apart, \`harbor serve worker\` (as in production), with the machine's Postgres and NATS.`,
  "",
  ...(allocationLines ?? []),
  ...(latencyLines ?? []),
];
// A partial run is printed only: the results file keeps a whole run.
if (!only) {
  mkdirSync(join(ROOT, "bench/results"), { recursive: true });
  writeFileSync(join(ROOT, "bench/results/control-plane.md"), lines.join("\n"));
}
process.stdout.write(lines.join("\n"));
await shutdown();
process.exit(0);
