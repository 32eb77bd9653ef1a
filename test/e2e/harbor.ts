import { spawn, type ChildProcess } from "node:child_process";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createTestDatabase, freePort, freePortBlock, uniqueName, type TestDatabase } from "@harbor/testkit";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
/** The committed `harbor` executable, as a user runs it. */
export const HARBOR_BIN = resolve(ROOT, "services/cli/bin/harbor.js");

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface Harbor {
  env: Record<string, string>;
  range: { min: number; max: number };
  /** Everything the server logged so far (JSON lines). */
  logs(): string;
  cli(...args: string[]): Promise<CliResult>;
  /** Runs a verb with --json and parses stdout; fails the test with stderr when it exits non-zero. */
  json<T = unknown>(...args: string[]): Promise<T>;
  /** SIGTERM, and the exit code. */
  stop(): Promise<number | null>;
}

/**
 * `harbor serve all` as a real process, on a fresh database of the machine's
 * Postgres, the machine's NATS under a prefix of its own, and a free block of
 * ports as its node's range.
 */
export async function startHarbor(extraEnv: Record<string, string> = {}): Promise<Harbor> {
  const db: TestDatabase = await createTestDatabase();
  const range = await freePortBlock(20);
  const api = `127.0.0.1:${await freePort()}`;
  const env: Record<string, string> = {
    ...(process.env as Record<string, string>),
    DATABASE_URL: db.url,
    NATS_URL: process.env.NATS_URL ?? "nats://127.0.0.1:4222",
    HARBOR_NATS_PREFIX: uniqueName("e2e"),
    HARBOR_API: api,
    HARBOR_PORT_RANGE: `${range.min}-${range.max}`,
    LOG_LEVEL: "debug",
    ...extraEnv,
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
    async json<T>(...args: string[]) {
      const result = await cli(...args, "--json");
      if (result.code !== 0) throw new Error(`harbor ${args.join(" ")} exited ${result.code}: ${result.stderr}`);
      return JSON.parse(result.stdout) as T;
    },
    stop() {
      stopped ??= (async () => {
        child.kill("SIGTERM");
        const code = await exited;
        await db.drop();
        return code;
      })();
      return stopped;
    },
  };
}
