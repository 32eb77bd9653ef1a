import net from "node:net";
import tls from "node:tls";
import type { Logger } from "pino";
import { spliceSockets, type Component } from "@harbor/runtime";
import { certificateValidityProblem, checkCertificatePair, findCertificate } from "./certs.js";
import type { ContainerProxyConfig } from "./config.js";

export interface ContainerProxy extends Component {
  readonly certPath: string;
  readonly port: number;
}

/** How long open connections may finish after stop() when the config does not say. */
export const DEFAULT_DRAIN_TIMEOUT_MS = 10_000;
/** How long the app's web server may take to accept a connection before the client gets a 502. */
export const DEFAULT_APP_CONNECT_TIMEOUT_MS = 5_000;

const BAD_GATEWAY_BODY = "502 Bad Gateway: the app is not answering on its web port\n";
/** What an HTTPS client is told when the app's web server cannot be reached. */
const BAD_GATEWAY =
  "HTTP/1.1 502 Bad Gateway\r\n" +
  "Content-Type: text/plain; charset=utf-8\r\n" +
  `Content-Length: ${Buffer.byteLength(BAD_GATEWAY_BODY)}\r\n` +
  "Connection: close\r\n" +
  "\r\n" +
  BAD_GATEWAY_BODY;

/**
 * TLS on the instance's int_port with the app's certificate, plain bytes to
 * the app's web server (HTTP passes through untouched, keep-alive and
 * upgrades included). The certificate is found and checked at construction,
 * so a missing or unusable one fails before anything listens.
 */
export function createContainerProxy(config: ContainerProxyConfig, deps: { logger: Logger }): ContainerProxy {
  const logger = deps.logger.child({ component: "container-proxy", serviceName: config.serviceName });
  const certificate = checkCertificatePair(findCertificate(config.appRoot, config.serviceName));
  const appAddress = `${config.appHost}:${config.appPort}`;
  const appConnectTimeoutMs = config.appConnectTimeoutMs ?? DEFAULT_APP_CONNECT_TIMEOUT_MS;
  /** Every connection, from accept (before its handshake) to close, so stop can end them all. */
  const open = new Set<net.Socket>();
  const server = tls.createServer(
    { cert: certificate.cert, key: certificate.key, handshakeTimeout: config.handshakeTimeoutMs, allowHalfOpen: true },
    (client) => forward(client),
  );

  function forward(client: tls.TLSSocket): void {
    // Until the pair is spliced nothing else listens for the client's errors; unhandled, one would end the process.
    client.on("error", (err) => logger.debug({ err: err.message }, "client-connection-failed"));
    const app = net.connect({ host: config.appHost, port: config.appPort, allowHalfOpen: true });
    // An app host that drops the SYN would otherwise hold the client until the OS gives up (minutes).
    const connectTimer = setTimeout(() => app.destroy(new Error(`no answer in ${appConnectTimeoutMs} ms`)), appConnectTimeoutMs);
    app.once("close", () => clearTimeout(connectTimer));
    const onClientGone = () => app.destroy();
    const onAppError = (err: Error) => {
      client.removeListener("close", onClientGone);
      logger.warn({ err: err.message, app: appAddress }, "app-connect-failed");
      badGateway(client);
    };
    client.once("close", onClientGone);
    app.once("error", onAppError);
    app.once("connect", () => {
      clearTimeout(connectTimer);
      // From here the splice owns both sides and their errors.
      app.removeListener("error", onAppError);
      client.removeListener("close", onClientGone);
      if (client.destroyed) app.destroy();
      else spliceSockets(client, app);
    });
  }

  /**
   * HTTP speaks first from the client: once its request starts arriving it
   * gets a 502 it can show, the rest of what it sends is read and dropped,
   * and the connection closes when it closes its side (or goes quiet).
   */
  function badGateway(client: tls.TLSSocket): void {
    if (client.destroyed) return;
    client.setTimeout(config.handshakeTimeoutMs, () => client.destroy());
    client.once("data", () => {
      if (!client.writableEnded) client.end(BAD_GATEWAY);
    });
    client.on("data", () => undefined);
    client.once("end", () => {
      if (!client.writableEnded) client.end();
    });
  }

  server.on("connection", (socket: net.Socket) => {
    open.add(socket);
    socket.once("close", () => open.delete(socket));
  });
  // With a listener here Node leaves the socket to us: a failed or timed-out handshake ends it.
  server.on("tlsClientError", (err, socket) => {
    logger.debug({ err: err.message }, "tls-handshake-failed");
    socket.destroy();
  });
  // A failed bind is start()'s to report; after that (accept failing with EMFILE, say) the
  // server keeps listening, and an unhandled "error" would end the process.
  server.on("error", (err) => {
    if (listening) logger.warn({ err: err.message, port }, "container-proxy-accept-failed");
  });
  let port = config.listenPort;
  let listening = false;
  let stopping: Promise<void> | undefined;

  /** Stops accepting, lets open connections finish up to the drain deadline, then cuts the rest. */
  async function drain(): Promise<void> {
    const drainTimeoutMs = config.drainTimeoutMs ?? DEFAULT_DRAIN_TIMEOUT_MS;
    logger.info({ port, open: open.size, drainTimeoutMs }, "container-proxy-draining");
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        if (open.size > 0) logger.warn({ port, open: open.size }, "container-proxy-drain-timed-out");
        for (const socket of open) socket.destroy();
      }, drainTimeoutMs);
      // Resolves once the last connection has closed, on its own or cut at the deadline.
      server.close(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    logger.info({ port }, "container-proxy-stopped");
  }

  return {
    name: "container-proxy",
    certPath: certificate.certPath,
    get port() {
      return port;
    },
    async start() {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen({ host: config.listenHost, port: config.listenPort }, () => {
          server.removeListener("error", reject);
          resolve();
        });
      });
      listening = true;
      port = (server.address() as net.AddressInfo).port;
      logger.info({ port, app: appAddress, cert: certificate.certPath }, "container-proxy-listening");
      const validity = certificateValidityProblem(certificate);
      if (validity) logger.warn({ cert: certificate.certPath, problem: validity }, "container-proxy-certificate-validity");
    },
    stop() {
      if (!listening) return stopping ?? Promise.resolve();
      listening = false;
      stopping = drain();
      return stopping;
    },
  };
}
