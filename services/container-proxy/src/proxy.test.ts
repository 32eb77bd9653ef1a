import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync } from "node:fs";
import http from "node:http";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Writable } from "node:stream";
import tls from "node:tls";
import { pino } from "pino";
import { afterEach, describe, expect, it, vi } from "vitest";
import { freePort, startSilentPort, waitFor } from "@harbor/testkit";
import type { ContainerProxyConfig } from "./config.js";
import { createContainerProxy, type ContainerProxy } from "./proxy.js";

/** An app root with a self-signed certs/harbor.crt|.key (openssl, from the OS). */
function appRoot(): string {
  const dir = mkdtempSync(join(tmpdir(), "harbor-proxy-"));
  mkdirSync(join(dir, "certs"));
  execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=proxy.example", "-keyout", join(dir, "certs/harbor.key"), "-out", join(dir, "certs/harbor.crt")], {
    stdio: "ignore",
  });
  return dir;
}

/** A pino logger whose JSON lines a test can read. */
function captureLogger() {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk, _enc, done) {
      for (const line of String(chunk).split("\n")) if (line) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level: "debug" }, stream), events: () => lines.map((l) => l.msg) };
}

/** Opens a TLS connection (any certificate), writes `send` and collects what comes back until the server closes. */
function exchange(port: number, send: string, options: { halfClose?: boolean; onOpen?: (socket: tls.TLSSocket) => void } = {}) {
  let received = "";
  let socket!: tls.TLSSocket;
  const closed = new Promise<string>((resolve, reject) => {
    socket = tls.connect({ port, host: "127.0.0.1", rejectUnauthorized: false }, () => {
      if (options.halfClose) socket.end(send);
      else socket.write(send);
      options.onOpen?.(socket);
    });
    socket.setEncoding("utf8");
    socket.on("data", (d: string) => (received += d));
    socket.on("end", () => socket.end());
    socket.on("close", () => resolve(received));
    socket.on("error", reject);
  });
  return { closed, received: () => received, socket: () => socket };
}

const roots = new Map<string, string>();
function root(): string {
  if (!roots.has("r")) roots.set("r", appRoot());
  return roots.get("r") as string;
}

const cleanups: Array<() => Promise<void> | void> = [];
afterEach(async () => {
  vi.restoreAllMocks();
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function startProxy(appPort: number, extra: Partial<ContainerProxyConfig> = {}) {
  const capture = captureLogger();
  const config: ContainerProxyConfig = {
    serviceName: "web-https",
    listenHost: "127.0.0.1",
    listenPort: 0,
    appHost: "127.0.0.1",
    appPort,
    appRoot: root(),
    handshakeTimeoutMs: 2_000,
    ...extra,
  };
  const proxy: ContainerProxy = createContainerProxy(config, { logger: capture.logger });
  await proxy.start();
  cleanups.push(() => proxy.stop());
  return { proxy, ...capture };
}

async function startApp(handler: http.RequestListener): Promise<http.Server> {
  const app = http.createServer(handler);
  await new Promise<void>((resolve) => app.listen(0, "127.0.0.1", resolve));
  cleanups.push(() => new Promise<void>((resolve) => app.close(() => resolve())));
  return app;
}

const GET = (path: string, close = true) => `GET ${path} HTTP/1.1\r\nHost: app.example\r\n${close ? "Connection: close\r\n" : ""}\r\n`;

describe("container proxy - forwarding", () => {
  it("answers HTTPS with the app's plain HTTP answer", async () => {
    const app = await startApp((req, res) => res.end(`plain ${req.url}`));
    const { proxy } = await startProxy((app.address() as net.AddressInfo).port);
    const answer = await exchange(proxy.port, GET("/hello")).closed;
    expect(answer).toMatch(/^HTTP\/1\.1 200 OK/);
    expect(answer).toMatch(/plain \/hello$/);
  });

  it("half-close passes through: a client that ends its sending side still gets the answer", async () => {
    // A raw app that answers only once the request side is closed.
    const app = net.createServer({ allowHalfOpen: true }, (socket) => {
      let got = "";
      socket.on("data", (d) => (got += String(d)));
      socket.on("end", () => setTimeout(() => socket.end(`got ${got.length} bytes`), 50));
    });
    await new Promise<void>((resolve) => app.listen(0, "127.0.0.1", resolve));
    cleanups.push(() => new Promise<void>((resolve) => app.close(() => resolve())));
    const { proxy } = await startProxy((app.address() as net.AddressInfo).port);
    expect(await exchange(proxy.port, "0123456789", { halfClose: true }).closed).toBe("got 10 bytes");
  });
});

describe("container proxy - app down", () => {
  it("answers 502 Bad Gateway over TLS and keeps serving", async () => {
    const appPort = await freePort();
    const { proxy, events } = await startProxy(appPort);
    const answer = await exchange(proxy.port, GET("/")).closed;
    expect(answer).toMatch(/^HTTP\/1\.1 502 Bad Gateway\r\n/);
    expect(answer).toMatch(/\r\nConnection: close\r\n/);
    expect(events()).toContain("app-connect-failed");
    // The app comes up on its port: the same proxy now forwards.
    const app = http.createServer((_req, res) => res.end("up now"));
    await new Promise<void>((resolve) => app.listen(appPort, "127.0.0.1", resolve));
    cleanups.push(() => new Promise<void>((resolve) => app.close(() => resolve())));
    expect(await exchange(proxy.port, GET("/")).closed).toMatch(/^HTTP\/1\.1 200 OK[\s\S]*up now$/);
  });

  it("an app host that never answers the connect (SYN dropped) gets the client a 502 at the connect timeout, not minutes later", async () => {
    const silent = await startSilentPort();
    cleanups.push(() => silent.close());
    const { proxy, events } = await startProxy(silent.port, { appConnectTimeoutMs: 300 });
    const answer = await exchange(proxy.port, GET("/")).closed;
    expect(answer).toMatch(/^HTTP\/1\.1 502 Bad Gateway\r\n/);
    expect(events()).toContain("app-connect-failed");
  });

  it("a client that sends its request and half-closes still gets the 502", async () => {
    const { proxy } = await startProxy(await freePort());
    expect(await exchange(proxy.port, GET("/"), { halfClose: true }).closed).toMatch(/^HTTP\/1\.1 502 Bad Gateway\r\n/);
  });
});

describe("container proxy - stop", () => {
  it("drains: a request in flight when stop begins still gets its answer, new connections are refused", async () => {
    const app = await startApp((_req, res) => setTimeout(() => res.end("slow answer"), 300));
    const { proxy, events } = await startProxy((app.address() as net.AddressInfo).port);
    let stopped: Promise<void> | undefined;
    const inFlight = exchange(proxy.port, GET("/slow"), { onOpen: () => setTimeout(() => (stopped = proxy.stop()), 50) });
    await waitFor(() => stopped !== undefined, "stop to begin");
    await expect(
      new Promise((resolve, reject) => net.connect({ port: proxy.port, host: "127.0.0.1" }).once("connect", resolve).once("error", reject)),
    ).rejects.toThrow(/ECONNREFUSED/);
    expect(await inFlight.closed).toMatch(/^HTTP\/1\.1 200 OK[\s\S]*slow answer$/);
    await stopped;
    expect(events()).toContain("container-proxy-stopped");
  });

  it("cuts connections still open at the drain deadline", async () => {
    const app = await startApp((_req, res) => res.end("kept alive"));
    const { proxy } = await startProxy((app.address() as net.AddressInfo).port, { drainTimeoutMs: 200 });
    const idle = exchange(proxy.port, GET("/", false));
    await waitFor(() => idle.received().endsWith("kept alive"), "the first answer");
    const started = Date.now();
    await proxy.stop();
    await idle.closed;
    expect(Date.now() - started).toBeLessThan(2_000);
  });

  it("stop is idempotent: a second call waits for the same drain", async () => {
    const app = await startApp((_req, res) => setTimeout(() => res.end("slow answer"), 200));
    const { proxy } = await startProxy((app.address() as net.AddressInfo).port);
    const inFlight = exchange(proxy.port, GET("/slow"));
    await waitFor(() => inFlight.socket()?.readyState === "open", "the connection");
    await new Promise((resolve) => setTimeout(resolve, 30));
    const first = proxy.stop();
    await proxy.stop();
    expect(inFlight.received()).toMatch(/slow answer$/);
    await first;
  });
});

describe("container proxy - listener errors", () => {
  it("an error on the listening server after start (accept EMFILE) is logged, not thrown", async () => {
    const created: tls.Server[] = [];
    const real = tls.createServer;
    vi.spyOn(tls, "createServer").mockImplementation(((...args: Parameters<typeof tls.createServer>) => {
      const server = real(...args);
      created.push(server);
      return server;
    }) as typeof tls.createServer);
    const app = await startApp((_req, res) => res.end("still here"));
    const { proxy, events } = await startProxy((app.address() as net.AddressInfo).port);
    expect(created).toHaveLength(1);
    const emfile = Object.assign(new Error("accept EMFILE"), { code: "EMFILE", syscall: "accept" });
    expect(() => created[0]?.emit("error", emfile)).not.toThrow();
    expect(events()).toContain("container-proxy-accept-failed");
    expect(await exchange(proxy.port, GET("/")).closed).toMatch(/still here$/);
  });
});

describe("container proxy - certificate at start", () => {
  it("a key that does not match the certificate fails at construction with a FailedPreconditionError naming both files", async () => {
    const { FailedPreconditionError } = await import("@harbor/core");
    const other = appRoot();
    const dir = mkdtempSync(join(tmpdir(), "harbor-proxy-mixed-"));
    mkdirSync(join(dir, "certs"));
    execFileSync("cp", [join(root(), "certs/harbor.crt"), join(dir, "certs/harbor.crt")]);
    execFileSync("cp", [join(other, "certs/harbor.key"), join(dir, "certs/harbor.key")]);
    const make = () =>
      createContainerProxy(
        { serviceName: "web-https", listenHost: "127.0.0.1", listenPort: 0, appHost: "127.0.0.1", appPort: 1, appRoot: dir, handshakeTimeoutMs: 1_000 },
        { logger: captureLogger().logger },
      );
    expect(make).toThrow(FailedPreconditionError);
    expect(make).toThrow(/certs\/harbor\.key is not the private key of .*certs\/harbor\.crt/);
  });
});
