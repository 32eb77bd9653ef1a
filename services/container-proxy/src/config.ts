import { isLoopbackHost, validateServiceName } from "@harbor/core";
import { EnvReader } from "@harbor/runtime";
import { DEFAULT_APP_CONNECT_TIMEOUT_MS, DEFAULT_DRAIN_TIMEOUT_MS } from "./proxy.js";

export interface ContainerProxyConfig {
  serviceName: string;
  /** Where the proxy listens with TLS: the instance's int_port. */
  listenHost: string;
  listenPort: number;
  /** The app's own plain-HTTP web server. */
  appHost: string;
  appPort: number;
  /** The app's root folder, holding certs/ (or cert/). */
  appRoot: string;
  handshakeTimeoutMs: number;
  /** How long the app may take to accept a connection before the client gets a 502 (default DEFAULT_APP_CONNECT_TIMEOUT_MS). */
  appConnectTimeoutMs?: number;
  /** On stop, how long open connections may finish before they are cut (default DEFAULT_DRAIN_TIMEOUT_MS). */
  drainTimeoutMs?: number;
}

export function loadContainerProxyConfig(env: Record<string, string | undefined> = process.env, cwd = process.cwd()): ContainerProxyConfig {
  const reader = new EnvReader(env);
  const given = (name: string) => reader.optional(name) !== undefined;

  const serviceName = reader.string("HARBOR_PROXY_SERVICE", "");
  if (!given("HARBOR_PROXY_SERVICE")) {
    reader.problem("HARBOR_PROXY_SERVICE: required (the harbor service's name, e.g. custom-cert-https; it picks certs/<name>.crt)");
  } else {
    try {
      validateServiceName(serviceName);
    } catch (err) {
      reader.problem(`HARBOR_PROXY_SERVICE=${serviceName}: ${(err as Error).message}`);
    }
  }

  // A port that is missing is "required"; a malformed one is reported once, by the reader, with its value.
  const port = (name: string, what: string, label = name): number => {
    if (!given(name)) {
      reader.problem(`${label}: required (${what})`);
      return 0;
    }
    return reader.int(name, 0, 1, 65535);
  };
  const listenPort = port("HARBOR_PROXY_LISTEN_PORT", "the instance's int_port, where the proxy listens with TLS");
  const appPort = given("HARBOR_PROXY_APP_PORT")
    ? port("HARBOR_PROXY_APP_PORT", "the app's web port")
    : port("PORT", "the app's web port, where the proxy forwards plain HTTP", "HARBOR_PROXY_APP_PORT or PORT");

  const config: ContainerProxyConfig = {
    serviceName,
    listenHost: reader.string("HARBOR_PROXY_LISTEN_HOST", "0.0.0.0"),
    listenPort,
    appHost: reader.string("HARBOR_PROXY_APP_HOST", "127.0.0.1"),
    appPort,
    appRoot: reader.string("HARBOR_APP_ROOT", cwd),
    handshakeTimeoutMs: reader.int("HARBOR_PROXY_HANDSHAKE_TIMEOUT_MS", 10_000, 100, 120_000),
    appConnectTimeoutMs: reader.int("HARBOR_PROXY_APP_CONNECT_TIMEOUT_MS", DEFAULT_APP_CONNECT_TIMEOUT_MS, 100, 120_000),
    drainTimeoutMs: reader.int("HARBOR_DRAIN_TIMEOUT_MS", DEFAULT_DRAIN_TIMEOUT_MS, 0, 600_000),
  };
  const sameHost = config.appHost === config.listenHost || (isLocal(config.appHost) && isLocal(config.listenHost));
  if (listenPort !== 0 && listenPort === appPort && sameHost) {
    reader.problem(
      `HARBOR_PROXY_LISTEN_PORT and the app's web port are both ${listenPort}: the proxy would forward to itself; ` +
        `the app must serve plain HTTP on another port (PORT)`,
    );
  }
  reader.finish();
  return config;
}

/** Loopback or the wildcard: an address where this machine's own ports are. */
function isLocal(host: string): boolean {
  return isLoopbackHost(host) || host === "0.0.0.0" || host === "::";
}
