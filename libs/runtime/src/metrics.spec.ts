import { collectDefaultMetrics, Registry } from "prom-client";
import { describe, expect, it } from "vitest";
import { createMetricsRegistry } from "./metrics.js";

const names = async (registry: Registry) => (await registry.getMetricsAsJSON()).map((m) => m.name).sort();
const value = async (registry: Registry, name: string) => (await registry.getSingleMetric(name)?.get())?.values[0]?.value ?? NaN;

describe("metrics registry", () => {
  it("has every default metric prom-client's collectDefaultMetrics makes, under the same names", async () => {
    const theirs = new Registry();
    collectDefaultMetrics({ register: theirs });
    expect(await names(createMetricsRegistry())).toEqual(await names(theirs));
  });

  it("counts the process's CPU seconds, user and system adding up to the total", async () => {
    const registry = createMetricsRegistry();
    await registry.metrics();
    const before = await value(registry, "process_cpu_seconds_total");
    const until = Date.now() + 50;
    while (Date.now() < until); // 50 ms of CPU
    await registry.metrics();
    const user = await value(registry, "process_cpu_user_seconds_total");
    const system = await value(registry, "process_cpu_system_seconds_total");
    const total = await value(registry, "process_cpu_seconds_total");
    expect(total - before).toBeGreaterThanOrEqual(0.04);
    expect(user + system).toBeCloseTo(total, 6);
  });
});
