import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { oneLine } from "./output.js";
import { connectBus, createSubjects, isValidPrefix, DEFAULT_NATS_PREFIX, type Bus } from "@harbor/bus";
import { readFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { Authenticator, ConfigError, HarborError, OPERATOR, isLoopbackHost, parseTokens } from "@harbor/core";
import type { EmbeddedPostgres, Pool } from "@harbor/db";
import type { AllocatorConfig } from "@harbor/allocator";
import {
  ComponentGroup,
  DEFAULT_API_ADDRESS,
  EnvReader,
  parseAddress,
  createGrpcServer,
  createLogger,
  createMetricsRegistry,
  createMetricsServer,
  Counter,
  redactUrl,
  runUntilSignalled,
  type Component,
  type GrpcServer,
  type GrpcService,
  type Logger,
} from "@harbor/runtime";


import type { ServeTarget } from "./targets.js";

const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");

interface SharedConfig {
  api: string;
  databaseUrl?: string;
  natsUrl?: string;
  natsPrefix: string;
  natsToken?: string;
  natsUser?: string;
  natsPass?: string;
  dataDir: string;
  metricsAddress?: string;
  auth: Authenticator;
  /** Serve an API beyond loopback without tokens (an operator's explicit choice). */
  allowInsecureApi: boolean;
}

function loadSharedConfig(env: Record<string, string | undefined>, apiFlag?: string): SharedConfig {
  const reader = new EnvReader(env);
  const config: SharedConfig = {
    api: apiFlag ?? reader.address("HARBOR_API", DEFAULT_API_ADDRESS),
    databaseUrl: reader.optional("DATABASE_URL"),
    natsUrl: reader.optional("NATS_URL"),
    natsPrefix: reader.string("HARBOR_NATS_PREFIX", DEFAULT_NATS_PREFIX),
    natsToken: reader.optional("NATS_TOKEN"),
    natsUser: reader.optional("NATS_USER"),
    natsPass: reader.optional("NATS_PASSWORD"),
    dataDir: reader.string("HARBOR_DATA_DIR", resolve(REPO_ROOT, ".harbor")),
    metricsAddress: reader.optional("HARBOR_METRICS_ADDRESS") === undefined ? undefined : reader.address("HARBOR_METRICS_ADDRESS", "127.0.0.1:9300"),
    auth: new Authenticator(new Map()),
    allowInsecureApi: false,
  };
  if (!isValidPrefix(config.natsPrefix)) reader.problem(`HARBOR_NATS_PREFIX=${config.natsPrefix}: use letters, digits, - and _ only`);
  const tokensFile = reader.optional("HARBOR_TOKENS_FILE");
  let spec = reader.optional("HARBOR_TOKENS") ?? "";
  if (tokensFile) {
    try {
      spec += "\n" + readFileSync(tokensFile, "utf8");
    } catch (err) {
      reader.problem(`HARBOR_TOKENS_FILE=${tokensFile}: ${(err as Error).message}`);
    }
  }
  const { tokens, problems } = parseTokens(spec);
  for (const problem of problems) reader.problem(`HARBOR_TOKENS: ${problem}`);
  config.auth = new Authenticator(tokens);
  config.allowInsecureApi = reader.bool("HARBOR_ALLOW_INSECURE_API", false);
  reader.finish();
  return config;
}

/** A component from a start and a stop function. */
function component(name: string, start: () => Promise<void>, stop: () => Promise<void>): Component {
  return { name, start, stop };
}

/**
 * `harbor serve`: the process entry of every service. Reads the environment,
 * composes the service factories and runs them until SIGTERM. `all` is the
 * one-process mode of `npm start`.
 */
export async function serve(target: ServeTarget, env: Record<string, string | undefined>, apiFlag?: string): Promise<number> {
  const logger = createLogger(`harbor-${target}`);
  try {
    if (target === "container-proxy") {
      // The HTTPS sidecar of one app instance: no database, no bus.
      const { createContainerProxy, loadContainerProxyConfig } = await import("@harbor/container-proxy");
      await runUntilSignalled(createContainerProxy(loadContainerProxyConfig(env), { logger }), logger);
      return 0;
    }
    // Each process loads only what it runs: a worker needs no Postgres client, no gRPC server.
    const hasAllocator = target === "all" || target === "control-plane" || target === "allocator";
    const hasRegistry = target === "all" || target === "control-plane" || target === "registry";
    const { createAllocator, loadAllocatorConfig } = hasAllocator ? await import("@harbor/allocator") : { createAllocator: undefined, loadAllocatorConfig: undefined };
    const { createRegistry, loadRegistryConfig } = hasRegistry ? await import("@harbor/registry") : { createRegistry: undefined, loadRegistryConfig: undefined };
    const { createWorker, loadWorkerConfig } = target === "all" || target === "worker" ? await import("@harbor/worker") : { createWorker: undefined, loadWorkerConfig: undefined };
    const db = target === "worker" ? undefined : await import("@harbor/db");
    const shared = loadSharedConfig(env, apiFlag);
    const allocatorConfig = loadAllocatorConfig?.(env);
    const registryConfig = loadRegistryConfig?.(env);
    const workerConfig = loadWorkerConfig?.({ ...env, HARBOR_API: shared.api });
    if (target !== "all" && target !== "worker" && !shared.databaseUrl) {
      throw new ConfigError([`DATABASE_URL: required for \`harbor serve ${target}\` (only \`serve all\` embeds a Postgres)`]);
    }
    // Without tokens every caller is an operator: only loopback may reach such an API.
    if (target !== "worker" && !shared.auth.enabled && !isLoopback(shared.api) && !shared.allowInsecureApi) {
      throw new ConfigError([
        `HARBOR_API=${shared.api}: an API beyond loopback needs tokens (HARBOR_TOKENS or HARBOR_TOKENS_FILE), or HARBOR_ALLOW_INSECURE_API=true to serve it without`,
      ]);
    }
    if (target !== "worker") {
      if (shared.auth.enabled) logger.info("api-authentication-on");
      else logger.warn({ api: shared.api, insecure: shared.allowInsecureApi }, "api-authentication-off-every-caller-is-operator");
    }
    const subjects = createSubjects(shared.natsPrefix);
    const metrics = createMetricsRegistry();
    const components: Component[] = [];
    // Aborted at SIGTERM/SIGINT: a start still waiting for NATS gives up.
    const shutdown = new AbortController();
    if (shared.metricsAddress) components.push(createMetricsServer(shared.metricsAddress, metrics, logger));
    let pool: Pool | undefined;
    let bus: Bus | undefined;
    let embedded: EmbeddedPostgres | undefined;
    let server: GrpcServer | undefined;

    if (db) {
      const { createPool, startEmbeddedPostgres } = db;
      components.push(
        component(
          "database",
          async () => {
            let url = shared.databaseUrl;
            if (!url) {
              embedded = await startEmbeddedPostgres({ dataDir: resolve(shared.dataDir, "postgres"), logger: logger.child({ component: "embedded-postgres" }) });
              url = embedded.url;
            }
            pool = createPool({ url, logger, max: 20 });
            logger.info({ database: redactUrl(url), embedded: embedded !== undefined }, "database-ready");
          },
          async () => {
            await pool?.end().catch(() => undefined);
            await embedded?.stop();
          },
        ),
      );
    }
    components.push(
      component(
        "bus",
        async () => {
          bus = await connectBus({
            signal: shutdown.signal,
            url: shared.natsUrl,
            fallbackToInProcess: target === "all",
            logger: logger.child({ component: "bus" }),
            token: shared.natsToken,
            user: shared.natsUser,
            pass: shared.natsPass,
          });
          logger.info({ bus: bus.kind, prefix: shared.natsPrefix }, "bus-ready");
          let reconnects = 0;
          bus.onReconnect(() => reconnects++);
          new Counter({
            name: "harbor_nats_reconnects_total",
            help: "Times this process reconnected to NATS",
            registers: [metrics],
            collect() {
              this.reset();
              this.inc(reconnects);
            },
          });
        },
        async () => {
          await bus?.close();
        },
      ),
    );

    const grpcServices: GrpcService[] = [];
    const deps = () => ({ pool: pool as Pool, bus: bus as Bus, subjects, logger, auth: shared.auth, metrics });
    if (allocatorConfig && createAllocator) {
      let stopAllocator: (() => Promise<void>) | undefined;
      components.push(
        component(
          "allocator",
          async () => {
            const allocator = createAllocator(allocatorConfig, deps());
            grpcServices.push(allocator.grpc);
            await allocator.start();
            stopAllocator = () => allocator.stop();
          },
          async () => stopAllocator?.(),
        ),
      );
    }
    if (registryConfig && createRegistry) {
      let stopRegistry: (() => Promise<void>) | undefined;
      components.push(
        component(
          "registry",
          async () => {
            const registry = createRegistry(registryConfig, deps());
            grpcServices.push(registry.grpc);
            await registry.start();
            stopRegistry = () => registry.stop();
          },
          async () => stopRegistry?.(),
        ),
      );
    }
    if (target !== "worker") {
      components.push(
        component(
          "grpc-server",
          async () => {
            server = createGrpcServer({ address: shared.api, services: grpcServices, logger: logger.child({ component: "grpc" }) });
            await server.start();
          },
          async () => server?.stop(),
        ),
      );
    }
    if (workerConfig && createWorker) {
      let stopWorker: (() => Promise<void>) | undefined;
      components.push(
        component(
          "worker",
          async () => {
            // In one process the worker calls the API this process just bound (its port may have been 0).
            const api = server?.boundAddress;
            let config = api ? { ...workerConfig, allocatorAddress: api, registryAddress: api } : workerConfig;
            if (target === "all" && shared.auth.enabled && !config.token) {
              // The in-process worker calls the API with a token of its own, made for this run.
              const internal = randomBytes(24).toString("hex");
              shared.auth.add(internal, OPERATOR);
              config = { ...config, token: internal };
            }
            const worker = createWorker(config, { bus: bus as Bus, subjects, logger, metrics });
            await worker.start();
            stopWorker = () => worker.stop();
          },
          async () => stopWorker?.(),
        ),
      );
    }

    const group = new ComponentGroup(components, logger, 30_000);
    await runUntilSignalled(
      {
        name: "harbor",
        start: async () => {
          await group.start();
          if (target === "all") printBanner(server?.boundAddress ?? shared.api, allocatorConfig, embedded, bus, shared);
        },
        stop: () => group.stop(),
      },
      logger,
      shutdown,
    );
    return 0;
  } catch (err) {
    // A refusal Harbor explains (a setting, a request) is the one line; anything else is logged in full too.
    const explained = err instanceof ConfigError || err instanceof HarborError;
    if (!explained) logger.error({ err }, "serve-failed");
    process.stderr.write(`harbor: ${oneLine((err as Error).message ?? String(err))}\n`);
    return err instanceof ConfigError ? 2 : 1;
  }
}

function isLoopback(address: string): boolean {
  return isLoopbackHost(parseAddress(address)?.host ?? "");
}

function printBanner(
  api: string,
  allocator: AllocatorConfig | undefined,
  embedded: EmbeddedPostgres | undefined,
  bus: Bus | undefined,
  shared: SharedConfig,
): void {
  const node = allocator?.defaultNode;
  const lines = [
    `Harbor is running. API: ${api}${api === DEFAULT_API_ADDRESS ? "" : ` (set HARBOR_API=${api} for the CLI)`}`,
    shared.auth.enabled ? "  tokens required (HARBOR_TOKEN for the CLI)" : "  no tokens configured: every caller is an operator, so keep the API on loopback",
    node ? `  node ${node.nodeId}: ports ${node.range.min}-${node.range.max} on ${node.host}` : "",
    `  database: ${embedded ? `embedded Postgres, data in ${embedded.dataDir}` : redactUrl(shared.databaseUrl ?? "")}`,
    `  events: ${bus?.kind === "nats" ? `NATS ${shared.natsUrl ?? "nats://127.0.0.1:4222"}, subjects ${shared.natsPrefix}.v1.>` : "in-process bus (no NATS found; set NATS_URL to use one)"}`,
    "Try it (from this folder):",
    "  npx harbor create-service debug-port --app demo",
    "  npx harbor service debug-port",
    "  npx harbor register-instance demo demo-0 --host 127.0.0.1 --port 4100",
    "Stop with Ctrl-C.",
  ];
  process.stdout.write(lines.filter(Boolean).join("\n") + "\n");
}
