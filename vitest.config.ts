import { execFileSync } from "node:child_process";
import { defineConfig } from "vitest/config";

/** The kernel fast path needs nftables and CAP_NET_ADMIN; without them its e2e ring is left out, saying so. */
function nftablesUsable(): boolean {
  try {
    execFileSync("nft", ["list", "tables"], { stdio: "ignore" });
    return true;
  } catch {
    process.stderr.write("e2e-kernel: nftables is not usable here (needs nft and CAP_NET_ADMIN); kernel-mode tests not run\n");
    return false;
  }
}

/** The TCP and UDP end-to-end tests again, with the worker set up another way. */
function dataPlaneRing(name: string, env: Record<string, string>) {
  return { test: { name, include: ["test/e2e/tcp.test.ts", "test/e2e/udp.test.ts"], env, testTimeout: 60_000, hookTimeout: 90_000 } };
}

// Three rings: unit specs beside pure code (fakes allowed), service tests
// against the machine's real Postgres and NATS, end-to-end tests that run the
// real processes. `npm test` runs all three.
export default defineConfig({
  test: {
    reporters: ["default", "./test/summary-reporter.mjs"],
    projects: [
      {
        test: {
          name: "unit",
          include: ["libs/*/src/**/*.spec.ts", "services/*/src/**/*.spec.ts"],
        },
      },
      {
        test: {
          name: "service",
          include: ["libs/*/src/**/*.test.ts", "services/*/src/**/*.test.ts"],
          testTimeout: 30_000,
          hookTimeout: 60_000,
        },
      },
      {
        test: {
          name: "e2e",
          include: ["test/e2e/**/*.test.ts"],
          testTimeout: 60_000,
          hookTimeout: 90_000,
        },
      },
      // The same data-plane e2e tests with two relay processes carrying the worker's TCP connections.
      dataPlaneRing("e2e-relays", { HARBOR_E2E_WORKER_RELAYS: "2" }),
      // The same data-plane e2e tests with the worker programming nftables.
      ...(nftablesUsable() ? [dataPlaneRing("e2e-kernel", { HARBOR_E2E_WORKER_MODE: "kernel" })] : []),
    ],
  },
});
