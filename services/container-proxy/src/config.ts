import { validatePort, validateServiceName } from "@harbor/core";
import { EnvReader } from "@harbor/runtime";

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
}

export function loadContainerProxyConfig(env: Record<string, string | undefined> = process.env, cwd = process.cwd()): ContainerProxyConfig {
  const reader = new EnvReader(env);
  const serviceName = reader.string("HARBOR_PROXY_SERVICE", "");
  const listenPort = reader.int("HARBOR_PROXY_LISTEN_PORT", 0, 0, 65535);
  const appPort = reader.int("HARBOR_PROXY_APP_PORT", reader.int("PORT", 0, 0, 65535), 0, 65535);
  const check = (fn: () => unknown, name: string) => {
    try {
      fn();
    } catch (err) {
      reader.problem(`${name}: ${(err as Error).message}`);
    }
  };
  check(() => validateServiceName(serviceName), "HARBOR_PROXY_SERVICE (the harbor service's name)");
  check(() => validatePort(listenPort, "listen port"), "HARBOR_PROXY_LISTEN_PORT (the instance's int_port)");
  check(() => validatePort(appPort, "app port"), "HARBOR_PROXY_APP_PORT or PORT (the app's web port)");
  const config: ContainerProxyConfig = {
    serviceName,
    listenHost: reader.string("HARBOR_PROXY_LISTEN_HOST", "0.0.0.0"),
    listenPort,
    appHost: reader.string("HARBOR_PROXY_APP_HOST", "127.0.0.1"),
    appPort,
    appRoot: reader.string("HARBOR_APP_ROOT", cwd),
    handshakeTimeoutMs: reader.int("HARBOR_PROXY_HANDSHAKE_TIMEOUT_MS", 10_000, 100, 120_000),
  };
  reader.finish();
  return config;
}
