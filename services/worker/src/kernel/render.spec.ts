import { describe, expect, it } from "vitest";
import { renderTable, tableName } from "./render.js";

const b = (host: string, port: number) => ({ instanceId: `${host}:${port}`, app: "a", host, port, availableSince: undefined });

describe("kernel mode - nftables rules", () => {
  it("TCP: round-robin per connection over the backends; UDP: DNAT to the FIFO primary", () => {
    const script = renderTable("harbor_t_n1", "10.0.0.5", [
      { port: 30001, protocol: "tcp", backends: [b("10.0.1.1", 4100), b("10.0.1.2", 4100), b("10.0.1.3", 4100)] },
      { port: 30002, protocol: "udp", backends: [b("10.0.1.1", 4101), b("10.0.1.2", 4101)] },
    ]);
    expect(script).toContain("ip daddr 10.0.0.5 tcp dport 30001 counter dnat to numgen inc mod 3 map { 0 : 10.0.1.1 . 4100, 1 : 10.0.1.2 . 4100, 2 : 10.0.1.3 . 4100 }");
    expect(script).toContain("ip daddr 10.0.0.5 udp dport 30002 counter dnat to 10.0.1.1:4101");
    // Replaced whole, in one transaction.
    expect(script.indexOf("delete table ip harbor_t_n1")).toBeLessThan(script.indexOf("table ip harbor_t_n1 {\n"));
    expect(script.match(/dport 30001/g)).toHaveLength(2);
  });

  it("no backend: TCP refused at once, UDP answered unreachable", () => {
    const script = renderTable("t", "127.0.0.1", [
      { port: 1, protocol: "tcp", backends: [] },
      { port: 2, protocol: "udp", backends: [] },
    ]);
    expect(script).toContain("tcp dport 1 counter reject with tcp reset");
    expect(script).toContain("udp dport 2 counter reject\n");
  });

  it("table names are nftables identifiers", () => {
    expect(tableName("e2e_ab12", "edge-1")).toBe("harbor_e2e_ab12_edge_1");
  });
});
