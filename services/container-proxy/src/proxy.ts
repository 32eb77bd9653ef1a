import net from "node:net";
import tls from "node:tls";
import type { Logger } from "pino";
import { spliceSockets, type Component } from "@harbor/runtime";
import { findCertificate } from "./certs.js";
import type { ContainerProxyConfig } from "./config.js";

export interface ContainerProxy extends Component {
  readonly certPath: string;
  readonly port: number;
}

/**
 * TLS on the instance's int_port with the app's certificate, plain bytes to
 * the app's web server (HTTP passes through untouched, keep-alive and
 * upgrades included). The certificate is found at construction, so a
 * missing one fails before anything listens.
 */
export function createContainerProxy(config: ContainerProxyConfig, deps: { logger: Logger }): ContainerProxy {
  const logger = deps.logger.child({ component: "container-proxy", serviceName: config.serviceName });
  const certificate = findCertificate(config.appRoot, config.serviceName);
  /** Every connection, from accept (before its handshake) to close, so stop can end them all. */
  const open = new Set<net.Socket>();
  const server = tls.createServer(
    { cert: certificate.cert, key: certificate.key, handshakeTimeout: config.handshakeTimeoutMs, allowHalfOpen: true },
    (client) => {
      const app = net.connect({ host: config.appHost, port: config.appPort, allowHalfOpen: true });
      app.once("error", (err) => {
        logger.warn({ err: err.message, app: `${config.appHost}:${config.appPort}` }, "app-connect-failed");
        client.destroy();
      });
      app.once("connect", () => spliceSockets(client, app));
    },
  );
  server.on("connection", (socket: net.Socket) => {
    open.add(socket);
    socket.once("close", () => open.delete(socket));
  });
  // With a listener here Node leaves the socket to us: a failed or timed-out handshake ends it.
  server.on("tlsClientError", (err, socket) => {
    logger.debug({ err: err.message }, "tls-handshake-failed");
    socket.destroy();
  });
  let port = config.listenPort;
  let listening = false;

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
      logger.info({ port, app: `${config.appHost}:${config.appPort}`, cert: certificate.certPath }, "container-proxy-listening");
    },
    async stop() {
      if (!listening) return;
      listening = false;
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of open) socket.end();
        // Connections that do not finish within the grace are cut.
        setTimeout(() => {
          for (const socket of open) socket.destroy();
        }, 5_000).unref();
      });
    },
  };
}
