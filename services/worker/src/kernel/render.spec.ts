import { describe, expect, it } from "vitest";
import { portRules, renderDelta, renderTable, tableName, type KernelPort } from "./render.js";

const b = (host: string, port: number) => ({ instanceId: `${host}:${port}`, app: "a", host, port, availableSince: undefined });

const ports: KernelPort[] = [
  { port: 30001, protocol: "tcp", backends: [b("10.0.1.1", 4100), b("10.0.1.2", 4100), b("10.0.1.3", 4100)] },
  { port: 30002, protocol: "udp", backends: [b("10.0.1.1", 4101), b("10.0.1.2", 4101)] },
];

describe("kernel mode - nftables rules", () => {
  it("TCP: round-robin per connection over the backends; UDP: DNAT to the FIFO primary; one chain per port, found by port", () => {
    const script = renderTable("harbor_t_n1", "10.0.0.5", portRules(ports));
    expect(script).toContain("chain p_tcp_30001 {\n    meta l4proto tcp counter name flows_tcp dnat to numgen inc mod 3 map { 0 : 10.0.1.1 . 4100, 1 : 10.0.1.2 . 4100, 2 : 10.0.1.3 . 4100 }\n  }");
    expect(script).toContain("chain p_udp_30002 {\n    meta l4proto udp counter name flows_udp dnat to 10.0.1.1:4101\n  }");
    // Both hooks dispatch through the verdict maps: one lookup per packet, however many ports.
    expect(script.match(/ip daddr 10\.0\.0\.5 tcp dport vmap @tcp_ports/g)).toHaveLength(2);
    expect(script).toContain("add element ip harbor_t_n1 tcp_ports { 30001 : goto p_tcp_30001 }");
    expect(script).toContain("add element ip harbor_t_n1 udp_ports { 30002 : goto p_udp_30002 }");
    // Replaced whole, in one transaction.
    expect(script.indexOf("delete table ip harbor_t_n1")).toBeLessThan(script.indexOf("table ip harbor_t_n1 {\n"));
  });

  it("no backend: TCP refused at once, UDP answered unreachable", () => {
    const script = renderTable("t", "127.0.0.1", portRules([
      { port: 1, protocol: "tcp", backends: [] },
      { port: 2, protocol: "udp", backends: [] },
    ]));
    expect(script).toContain("chain p_tcp_1 {\n    counter name flows_tcp reject with tcp reset\n");
    expect(script).toContain("chain p_udp_2 {\n    counter name flows_udp reject\n");
  });

  it("a change touches only the ports that came, went or changed", () => {
    const before = portRules(ports);
    expect(renderDelta("t", before, portRules(ports))).toBe("");
    const after = portRules([
      { port: 30001, protocol: "tcp", backends: [b("10.0.1.1", 4100), b("10.0.1.3", 4100)] },
      { port: 30003, protocol: "tcp", backends: [b("10.0.1.9", 4102)] },
    ]);
    expect(renderDelta("t", before, after).split("\n").filter(Boolean)).toEqual([
      "delete element ip t udp_ports { 30002 }",
      "delete chain ip t p_udp_30002",
      "flush chain ip t p_tcp_30001",
      "add rule ip t p_tcp_30001 meta l4proto tcp counter name flows_tcp dnat to numgen inc mod 2 map { 0 : 10.0.1.1 . 4100, 1 : 10.0.1.3 . 4100 }",
      "add chain ip t p_tcp_30003",
      "add rule ip t p_tcp_30003 meta l4proto tcp counter name flows_tcp dnat to 10.0.1.9:4102",
      "add element ip t tcp_ports { 30003 : goto p_tcp_30003 }",
    ]);
  });

  it("table names are nftables identifiers of at most 60 characters, one per node id", () => {
    expect(tableName("e2e_ab12", "edge_1")).toBe("harbor_e2e_ab12_edge_1");
    const long = "n".repeat(70);
    const names = [tableName("e2e_ab12", "edge-1"), tableName("e2e_ab12", "edge.1"), tableName("e2e_ab12", "edge_1"), tableName("p", `${long}a`), tableName("p", `${long}b`)];
    for (const name of names) expect(name).toMatch(/^harbor_[A-Za-z0-9_]{1,53}$/);
    expect(names[0]).toMatch(/^harbor_e2e_ab12_edge_1_[0-9a-f]{8}$/);
    expect(new Set(names).size).toBe(names.length);
    expect(tableName("e2e_ab12", "edge-1")).toBe(names[0]);
  });

  it("a whole table starts its flow counters from the counts it is given", () => {
    const script = renderTable("t", "127.0.0.1", portRules([]), { tcp: 12, udp: 3 });
    expect(script).toContain("counter flows_tcp { packets 12 bytes 0 }");
    expect(script).toContain("counter flows_udp { packets 3 bytes 0 }");
  });
});
