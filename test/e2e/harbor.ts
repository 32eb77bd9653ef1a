import { spawn, type ChildProcess } from "node:child_process";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createTestDatabase, freePort, freePortBlock, uniqueName, type TestDatabase } from "@harbor/testkit";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
/** Set by the e2e-kernel project: the worker programs nftables instead of copying bytes. */
export const KERNEL_MODE = process.env.HARBOR_E2E_WORKER_MODE === "kernel";
/** Relay processes the worker hands TCP connections to (the e2e-relays ring); 0: the worker carries them. */
export const RELAYS = Number(process.env.HARBOR_E2E_WORKER_RELAYS ?? 0);

/** The committed `harbor` executable, as a user runs it. */
export const HARBOR_BIN = resolve(ROOT, "services/cli/bin/harbor.js");

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface Background {
  child: ChildProcess;
  output(): string;
  /** Sends the signal and waits for the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export interface Harbor {
  env: Record<string, string>;
  range: { min: number; max: number };
  /** Everything the server logged so far (JSON lines). */
  logs(): string;
  cli(...args: string[]): Promise<CliResult>;
  /** Starts a long-running verb (run, watch, serve worker) with this Harbor's environment. */
  spawnCli(args: string[], options?: { cwd?: string; env?: Record<string, string> }): Background;
  /** Runs a verb with --json and parses stdout; fails the test with stderr when it exits non-zero. */
  json<T = unknown>(...args: string[]): Promise<T>;
  /** SIGTERM, and the exit code. */
  stop(): Promise<number | null>;
  /** Sends a signal (kill -9: SIGKILL) and waits for the exit; the database stays as `stop` would leave it. */
  kill(signal: NodeJS.Signals): Promise<number | null>;
}

export interface HarborOptions {
  /** Reuse this database (and leave it) instead of a fresh one dropped on stop: for restarts. */
  database?: TestDatabase;
  /** Reuse another Harbor's API address, NATS prefix and range: a restart of it. */
  like?: Harbor;
  env?: Record<string, string>;
}

/**
 * `harbor serve all` as a real process, on a fresh database of the machine's
 * Postgres, the machine's NATS under a prefix of its own, and a free block of
 * ports as its node's range.
 */
export async function startHarbor(options: HarborOptions = {}): Promise<Harbor> {
  const db: TestDatabase = options.database ?? (await createTestDatabase());
  const range = options.like?.range ?? (await freePortBlock(20));
  const env: Record<string, string> = {
    ...(process.env as Record<string, string>),
    DATABASE_URL: db.url,
    NATS_URL: process.env.NATS_URL ?? "nats://127.0.0.1:4222",
    HARBOR_NATS_PREFIX: options.like?.env.HARBOR_NATS_PREFIX ?? uniqueName("e2e"),
    HARBOR_API: options.like?.env.HARBOR_API ?? `127.0.0.1:${await freePort()}`,
    HARBOR_PORT_RANGE: `${range.min}-${range.max}`,
    HARBOR_WORKER_MODE: KERNEL_MODE ? "kernel" : "userspace",
    HARBOR_WORKER_RELAYS: String(RELAYS),
    LOG_LEVEL: "debug",
    ...options.env,
  };
  const child: ChildProcess = spawn(process.execPath, [HARBOR_BIN, "serve", "all"], { env, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout?.on("data", (c: Buffer) => (stdout += c.toString()));
  child.stderr?.on("data", (c: Buffer) => (stderr += c.toString()));
  const exited = new Promise<number | null>((r) => child.once("exit", (code) => r(code)));
  await new Promise<void>((resolveReady, reject) => {
    const timer = setInterval(() => {
      if (stdout.includes("Harbor is running")) {
        clearInterval(timer);
        resolveReady();
      }
    }, 20);
    void exited.then((code) => {
      clearInterval(timer);
      reject(new Error(`harbor serve all exited (${code}) before it was ready:\n${stderr.slice(-3000)}`));
    });
  });

  const cli = (...args: string[]) =>
    new Promise<CliResult>((resolveRun) => {
      const run = spawn(process.execPath, [HARBOR_BIN, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
      let out = "";
      let err = "";
      run.stdout.on("data", (c: Buffer) => (out += c.toString()));
      run.stderr.on("data", (c: Buffer) => (err += c.toString()));
      run.once("exit", (code) => resolveRun({ code: code ?? -1, stdout: out, stderr: err }));
    });

  let stopped: Promise<number | null> | undefined;
  // A server that dies under a test leaves the reason where the test run shows it.
  void exited.then((code) => {
    if (!stopped) {
      const errors = stderr.split("\n").filter((l) => !l.includes('"level":20') && !l.includes('"level":30'));
      process.stderr.write(`harbor serve all exited unexpectedly (code ${code}); last lines:\n${errors.slice(-15).join("\n")}\n`);
    }
  });
  return {
    env,
    range,
    logs: () => stderr,
    cli,
    spawnCli(args, spawnOptions = {}) {
      const run = spawn(process.execPath, [HARBOR_BIN, ...args], {
        env: { ...env, ...spawnOptions.env },
        cwd: spawnOptions.cwd,
        stdio: ["ignore", "pipe", "pipe"],
      });
      let output = "";
      run.stdout.on("data", (c: Buffer) => (output += c.toString()));
      run.stderr.on("data", (c: Buffer) => (output += c.toString()));
      const done = new Promise<number | null>((r) => run.once("exit", (code) => r(code)));
      return {
        child: run,
        output: () => output,
        stop: (signal = "SIGTERM") => {
          if (run.exitCode === null) run.kill(signal);
          return done;
        },
      };
    },
    async json<T>(...args: string[]) {
      const result = await cli(...args, "--json");
      if (result.code !== 0) throw new Error(`harbor ${args.join(" ")} exited ${result.code}: ${result.stderr}`);
      return JSON.parse(result.stdout) as T;
    },
    kill(signal) {
      return (stopped ??= (async () => {
        child.kill(signal);
        const code = await exited;
        if (!options.database) await db.drop();
        return code;
      })());
    },
    stop() {
      stopped ??= (async () => {
        child.kill("SIGTERM");
        const code = await exited;
        if (!options.database) await db.drop();
        return code;
      })();
      return stopped;
    },
  };
}
