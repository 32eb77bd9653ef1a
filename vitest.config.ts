import { defineConfig } from "vitest/config";

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
    ],
  },
});
