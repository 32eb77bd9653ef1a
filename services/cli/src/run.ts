import { spawn, type ChildProcess } from "node:child_process";
import dgram from "node:dgram";
import { existsSync } from "node:fs";
import net from "node:net";
import { hostname } from "node:os";
import { resolve } from "node:path";
import { createInterface } from "node:readline";
import { buildAppEnvironment } from "@harbor/core";
import { createContainerProxy, type ContainerProxy } from "@harbor/container-proxy";
import { createLogger, type Logger } from "@harbor/runtime";
import type { PortService } from "@harbor/proto";
import { applyManifest } from "./apply.js";
import { CliError, type Clients } from "./client.js";
import { readManifest, type Manifest } from "./manifest.js";
import { credentialsOf } from "./output.js";

export interface RunOptions {
  app?: string;
  instances: number;
  manifestFile?: string;
  command: string[];
  /** TTL of each registration; heartbeats go at a third of it. */
  ttlSeconds: number;
}

interface Instance {
  index: number;
  id: string;
  child: ChildProcess;
  /** int_port → the host port this instance listens on for it. */
  ports: Map<number, number>;
  proxies: ContainerProxy[];
  exited: Promise<number>;
  registered: boolean;
}

/**
 * `harbor run`: instances of an app on this machine, the way a platform runs
 * them. Each gets the seed's environment with its own host ports in place of
 * the int_ports (instances here share one host), is registered at 127.0.0.1
 * and heartbeats until it exits; HTTPS services get a container proxy beside
 * each instance. Everything started stays in this process's group and is
 * stopped with it.
 */
export async function runInstances(clients: Clients, options: RunOptions): Promise<number> {
  const logger = createLogger("harbor-run");
  const manifestFile = options.manifestFile ?? (existsSync("stackato.yml") ? "stackato.yml" : undefined);
  const manifest: Manifest | undefined = manifestFile ? readManifest(manifestFile) : undefined;
  for (const warning of manifest?.warnings ?? []) process.stderr.write(`harbor: warning: ${warning}\n`);
  const app = options.app ?? manifest?.name;
  if (!app) throw new CliError("give --app APP, or run where a stackato.yml with a name: is", 2);
  if (manifest) {
    const { applied } = await applyManifest(clients, manifest, app);
    for (const a of applied) if (a.action !== "unchanged") process.stderr.write(`harbor: ${a.action} ${a.service_name} (port ${a.port})\n`);
  }
  const { services } = await clients.call(clients.allocator, "listPortServices", { app, nodeId: "", unlessDigest: "" });
  const web = manifest?.web ?? true;
  const instances: Instance[] = [];
  let stopping = false;

  const stopAll = async (signal: NodeJS.Signals) => {
    if (stopping) return;
    stopping = true;
    for (const i of instances) if (i.child.exitCode === null) i.child.kill(signal === "SIGINT" ? "SIGTERM" : signal);
    const killer = setTimeout(() => instances.forEach((i) => i.child.exitCode === null && i.child.kill("SIGKILL")), 10_000);
    await Promise.all(instances.map((i) => i.exited));
    clearTimeout(killer);
  };
  process.on("SIGTERM", () => void stopAll("SIGTERM"));
  process.on("SIGINT", () => void stopAll("SIGINT"));

  try {
    for (let index = 0; index < options.instances; index++) {
      instances.push(await startInstance(index, app, services, web, options, logger));
    }
  } catch (err) {
    // What did start is stopped, listening proxies included: else this process would never exit.
    await stopAll("SIGTERM");
    await Promise.all(instances.flatMap((i) => i.proxies.map((p) => p.stop())));
    throw err;
  }

  const register = async (instance: Instance) => {
    if (instance.child.exitCode !== null || stopping) return;
    try {
      await clients.call(clients.registry, "registerInstance", {
        app,
        instanceId: instance.id,
        host: "127.0.0.1",
        ports: [...instance.ports].map(([intPort, port]) => ({ intPort, port })),
        ttlSeconds: options.ttlSeconds,
      });
      if (!instance.registered) logger.info({ app, instanceId: instance.id }, "instance-registered");
      instance.registered = true;
    } catch (err) {
      // Harbor may be restarting: keep trying; the next beat puts the instance back.
      if (instance.registered) logger.warn({ instanceId: instance.id, err: (err as Error).message }, "heartbeat-failed");
      instance.registered = false;
    }
  };
  const deregister = async (instance: Instance) => {
    await clients.call(clients.registry, "deregisterInstance", { app, instanceId: instance.id }).catch(() => undefined);
  };

  await Promise.all(instances.map(register));
  const beat = setInterval(() => void Promise.all(instances.map(register)), Math.max(1, options.ttlSeconds / 3) * 1000);
  const codes = await Promise.all(
    instances.map(async (instance) => {
      const code = await instance.exited;
      await deregister(instance);
      await Promise.all(instance.proxies.map((p) => p.stop()));
      process.stderr.write(`harbor: ${app}/${instance.index} exited with ${code}\n`);
      return code;
    }),
  );
  clearInterval(beat);
  return stopping ? 0 : (codes.find((c) => c !== 0) ?? 0);
}

async function startInstance(index: number, app: string, services: PortService[], web: boolean, options: RunOptions, logger: Logger): Promise<Instance> {
  const ports = new Map<number, number>();
  for (const s of services) ports.set(s.intPort, await freeTcpAndUdpPort());
  const webPort = web ? await freeTcpAndUdpPort() : undefined;
  const env = buildAppEnvironment(
    app,
    services.map((s) => ({ serviceName: s.serviceName, credentials: { ...credentialsOf(s), int_port: ports.get(s.intPort) as number } })),
  );
  const id = `${hostname().split(".")[0]}-${process.pid}-${index}`;
  const proxies: ContainerProxy[] = [];
  try {
    for (const s of services.filter((x) => x.httpsProxy)) {
      if (webPort === undefined) throw new CliError(`HTTPS service ${s.serviceName} forwards to the app's web port, but the manifest has no web process`, 2);
      const proxy = createContainerProxy(
        {
          serviceName: s.serviceName,
          listenHost: "127.0.0.1",
          listenPort: ports.get(s.intPort) as number,
          appHost: "127.0.0.1",
          appPort: webPort,
          appRoot: resolve("."),
          handshakeTimeoutMs: 10_000,
        },
        { logger },
      );
      await proxy.start();
      proxies.push(proxy);
    }
  } catch (err) {
    // This instance's proxies that did start must not keep the process alive.
    await Promise.all(proxies.map((p) => p.stop()));
    throw err;
  }
  const [command, ...args] = options.command;
  const child = spawn(command as string, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: {
      ...process.env,
      ...env,
      ...(webPort === undefined ? {} : { PORT: String(webPort), VCAP_APP_PORT: String(webPort) }),
      INSTANCE_INDEX: String(index),
      STACKATO_APP_INSTANCE_INDEX: String(index),
    },
  });
  const label = `[${app}/${index}]`;
  for (const [stream, out] of [
    [child.stdout, process.stdout],
    [child.stderr, process.stderr],
  ] as const) {
    if (stream) createInterface({ input: stream }).on("line", (line) => out.write(`${label} ${line}\n`));
  }
  const exited = new Promise<number>((resolveExit) => {
    child.once("error", (err) => {
      process.stderr.write(`harbor: cannot start ${command}: ${err.message}\n`);
      resolveExit(127);
    });
    child.once("exit", (code, signal) => resolveExit(code ?? (signal ? 128 : 1)));
  });
  process.stderr.write(
    `harbor: started ${app}/${index} (pid ${child.pid})${webPort ? `, PORT=${webPort}` : ""}${[...ports].map(([i, p]) => `, int_port ${i} on ${p}`).join("")}\n`,
  );
  return { index, id, child, ports, proxies, exited, registered: false };
}

/** A port free for both TCP and UDP on 127.0.0.1, so a `both` service's app can listen on either. */
async function freeTcpAndUdpPort(): Promise<number> {
  for (let attempt = 0; attempt < 20; attempt++) {
    const port = await new Promise<number>((resolvePort, reject) => {
      const server = net.createServer();
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => {
        const p = (server.address() as net.AddressInfo).port;
        server.close(() => resolvePort(p));
      });
    });
    const udpFree = await new Promise<boolean>((resolveFree) => {
      const socket = dgram.createSocket("udp4");
      socket.once("error", () => resolveFree(false));
      socket.bind(port, "127.0.0.1", () => socket.close(() => resolveFree(true)));
    });
    if (udpFree) return port;
  }
  throw new CliError("no port free for both TCP and UDP on 127.0.0.1");
}
