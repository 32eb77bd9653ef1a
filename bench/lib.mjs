// What the benches share: child processes that never outlive the bench, and
// reading a process tree's CPU and memory from /proc, and its /metrics.
import { spawn, spawnSync } from "node:child_process";
import { createWriteStream, readFileSync, readdirSync, writeFileSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { join } from "node:path";

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** A deadline for Promise.race: unref'd, so a won race leaves nothing keeping the process alive. */
export const deadline = (ms) => new Promise((r) => setTimeout(r, ms).unref());
/** A process's Prometheus text from `http://<address>/metrics`. */
export function fetchMetrics(address, timeoutMs = 5_000) {
  return new Promise((resolve, reject) => {
    const req = http.get(`http://${address}/metrics`, { agent: false, timeout: timeoutMs }, (res) => {
      let body = "";
      res.on("data", (c) => (body += c));
      res.on("end", () => resolve(body));
    });
    req.on("timeout", () => req.destroy(new Error("metrics timed out")));
    req.on("error", reject);
  });
}

export const oneLine = (err, max = 120) => String(err?.message ?? err).split("\n").map((s) => s.trim()).filter(Boolean).join(" ").slice(0, max);

/** Polls `probe` until it answers truthy; throws, naming `what` and the last error, after timeoutMs. */
export async function waitFor(what, probe, timeoutMs = 60_000, everyMs = 100) {
  const until = Date.now() + timeoutMs;
  let last;
  while (Date.now() < until) {
    try {
      if (await probe()) return;
    } catch (err) {
      last = err;
    }
    await sleep(everyMs);
  }
  throw new Error(`${what}: not within ${timeoutMs / 1000} s${last ? ` (${oneLine(last)})` : ""}`);
}

/** A TCP port on `host` that was free a moment ago. */
export const freePort = (host = "127.0.0.1") =>
  new Promise((resolve) => {
    const s = net.createServer().listen(0, host, () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });

export const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid] : (s[mid - 1] + s[mid]) / 2;
};

/** Runs `fn(i)` for every i < count, `concurrency` at a time. */
export async function pool(count, concurrency, fn) {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      for (let i = next++; i < count; i = next++) await fn(i);
    }),
  );
}

/** A unary call of a grpc-js client, as a promise. */
export const grpcCall = (client, method, request, timeoutMs = 60_000) =>
  new Promise((resolve, reject) => client[method](request, { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res))));

/** A fresh database `<prefix>_<stamp>` on the machine's Postgres; `drop()` removes it. */
export async function createDatabase(prefix) {
  const { default: pg } = await import("pg");
  const name = `${prefix}_${Date.now().toString(36)}`;
  const admin = new pg.Client({ connectionString: "postgres://postgres@127.0.0.1:5432/postgres" });
  await admin.connect();
  await admin.query(`CREATE DATABASE ${name}`);
  let dropped;
  return {
    url: `postgres://postgres@127.0.0.1:5432/${name}`,
    // Idempotent: the run's cleanups and its own finally may both call it.
    drop: () =>
      (dropped ??= (async () => {
        await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`);
        await admin.end();
      })()),
  };
}

// ---------------------------------------------------------------- /proc

export const CLK_TCK = Number(spawnSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).stdout.trim()) || 100;

/** ppid and utime + stime (clock ticks) of a process; undefined once it is gone. */
export function readStat(pid) {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = s.slice(s.lastIndexOf(")") + 2).split(" "); // fields from #3 (state) on
    return { ppid: Number(f[1]), ticks: Number(f[11]) + Number(f[12]) }; // #4 ppid, #14 utime, #15 stime
  } catch {
    return undefined;
  }
}

/** The process and all its descendants (nginx's workers, a Harbor worker's relays). */
export function processTree(root) {
  const children = new Map();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const st = readStat(name);
    if (st) children.set(st.ppid, [...(children.get(st.ppid) ?? []), Number(name)]);
  }
  const out = [];
  for (const queue = [root]; queue.length > 0; ) {
    const pid = queue.shift();
    out.push(pid);
    queue.push(...(children.get(pid) ?? []));
  }
  return out;
}

/** utime + stime of the tree, in clock ticks. */
export const treeCpuTicks = (root) => processTree(root).reduce((sum, pid) => sum + (readStat(pid)?.ticks ?? 0), 0);

/** VmRSS of the tree, in KiB (a process that exits meanwhile counts 0). */
export function treeRssKiB(root) {
  let kib = 0;
  for (const pid of processTree(root)) {
    try {
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
      if (m) kib += Number(m[1]);
    } catch {
      /* exited */
    }
  }
  return kib;
}

// ---------------------------------------------------------------- processes

/**
 * Child processes of one bench run. Every child runs in its own process group
 * (detached) so that killing the group also takes its children; all are
 * tracked in `live` and killed on exit, Ctrl-C and errors (installHandlers).
 * Output goes to `rawDir`/<name>.out|.err.
 */
export function createProcesses({ rawDir, log, shutdownGraceMs = 5_000, stopGraceMs = 5_000 }) {
  const live = new Map(); // pid -> { name, child, exited }
  const cleanups = []; // async functions run once at shutdown (after processes are gone)

  function track(name, child) {
    const exited = new Promise((res) => child.once("exit", (code, signal) => res({ code, signal })));
    if (child.pid === undefined) return exited; // failed to spawn; 'error' will fire
    live.set(child.pid, { name, child, exited });
    exited.then(() => live.delete(child.pid));
    return exited;
  }

  function killGroup(pid, signal) {
    try {
      process.kill(-pid, signal);
    } catch {
      try {
        process.kill(pid, signal);
      } catch {
        /* gone already */
      }
    }
  }

  /**
   * Starts a long-running process. With readyText, resolves once its stdout
   * or stderr contains it (fails if the process exits first); without, once
   * it has not failed at once.
   */
  async function startProcess(name, cmd, argv, { env, readyText, readyTimeoutMs = 30_000 } = {}) {
    const child = spawn(cmd, argv, { env: { ...process.env, ...env }, detached: true, stdio: ["ignore", "pipe", "pipe"] });
    const spawnError = new Promise((_, rej) => child.once("error", (err) => rej(new Error(`${name}: ${err.message}`))));
    spawnError.catch(() => {});
    const exited = track(name, child);
    child.stdout.pipe(createWriteStream(join(rawDir, `${name}.out`)));
    child.stderr.pipe(createWriteStream(join(rawDir, `${name}.err`)));
    let errTail = "";
    child.stderr.on("data", (c) => (errTail = (errTail + c).slice(-2000)));
    const lastErrLine = () => errTail.trim().split("\n").pop()?.replace(/^\[\w+\]\s+\(\d+\)\s*:\s*/, "") || "no stderr";
    const proc = { name, pid: child.pid, child, exited };
    if (!readyText) {
      // Give it a moment to fail on a bad config before we call it started.
      const early = await Promise.race([exited, spawnError, deadline(300).then(() => null)]);
      if (early) {
        await deadline(100); // let the last stderr arrive
        throw new Error(`${name} exited at once (code ${early.code}): ${lastErrLine()}`);
      }
      return proc;
    }
    let seen = "";
    const ready = new Promise((res) => {
      for (const stream of [child.stdout, child.stderr]) {
        stream.on("data", (chunk) => {
          seen = (seen + chunk).slice(-65_536);
          if (seen.includes(readyText)) res(true);
        });
      }
    });
    const result = await Promise.race([
      ready,
      spawnError,
      exited.then((e) => {
        throw new Error(`${name} exited (code ${e.code}) before it was ready: ${lastErrLine()}`);
      }),
      deadline(readyTimeoutMs).then(() => {
        throw new Error(`${name} not ready within ${readyTimeoutMs / 1000} s`);
      }),
    ]);
    return result && proc;
  }

  /** SIGTERM to the process group, SIGKILL after graceMs. */
  async function stopProcess(proc, graceMs = stopGraceMs) {
    if (!proc || !live.has(proc.pid)) return;
    killGroup(proc.pid, "SIGTERM");
    const done = await Promise.race([proc.exited, deadline(graceMs).then(() => null)]);
    if (!done) {
      killGroup(proc.pid, "SIGKILL");
      await Promise.race([proc.exited, deadline(2_000)]);
    }
  }

  /** Runs a command to completion (killed after timeoutMs); never throws for a non-zero exit. */
  function runCommand(cmd, argv, { env, timeoutMs = 60_000, rawFile } = {}) {
    return new Promise((res) => {
      const child = spawn(cmd, argv, { env: { ...process.env, ...env }, detached: true, stdio: ["ignore", "pipe", "pipe"] });
      let stdout = "";
      let stderr = "";
      let timedOut = false;
      child.stdout.on("data", (c) => (stdout += c));
      child.stderr.on("data", (c) => (stderr += c));
      const timer = setTimeout(() => {
        timedOut = true;
        killGroup(child.pid, "SIGKILL");
      }, timeoutMs);
      child.once("error", (err) => {
        clearTimeout(timer);
        res({ code: -1, stdout, stderr: err.message, timedOut });
      });
      track(cmd, child).then(({ code, signal }) => {
        clearTimeout(timer);
        if (rawFile) writeFileSync(join(rawDir, rawFile), stdout + (stderr ? `\n--- stderr ---\n${stderr}` : ""));
        res({ code: code ?? (signal ? -1 : 0), stdout, stderr: timedOut ? `timed out after ${timeoutMs / 1000} s` : stderr, timedOut });
      });
    });
  }

  let shuttingDown;
  /** Every live process: SIGTERM, SIGKILL after the grace period; then the cleanups, last first. */
  function shutdown() {
    shuttingDown ??= (async () => {
      const procs = [...live.values()];
      for (const p of procs) killGroup(p.child.pid, "SIGTERM");
      await Promise.race([Promise.all(procs.map((p) => p.exited)), deadline(shutdownGraceMs)]);
      for (const p of live.values()) killGroup(p.child.pid, "SIGKILL");
      await Promise.race([Promise.all(procs.map((p) => p.exited)), deadline(2_000)]);
      for (const fn of cleanups.splice(0).reverse()) {
        try {
          await fn();
        } catch (err) {
          log(`cleanup: ${oneLine(err)}`);
        }
      }
    })();
    return shuttingDown;
  }

  /** Nothing outlives the bench: on exit, a signal or an unhandled error, every child goes. */
  function installHandlers(onExit = () => {}) {
    process.on("exit", () => {
      for (const p of live.values()) killGroup(p.child.pid, "SIGKILL");
      onExit();
    });
    for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
      process.on(sig, () => {
        log(`${sig}: stopping everything`);
        shutdown().finally(() => process.exit(130));
      });
    }
    for (const event of ["uncaughtException", "unhandledRejection"]) {
      process.on(event, (err) => {
        log(`fatal: ${err?.stack ?? err}`);
        shutdown().finally(() => process.exit(1));
      });
    }
  }

  /** Whether shutdown has begun (an error then is the shutdown's doing, not the bench's). */
  const isShuttingDown = () => shuttingDown !== undefined;

  return { live, cleanups, track, killGroup, startProcess, stopProcess, runCommand, shutdown, isShuttingDown, installHandlers };
}
