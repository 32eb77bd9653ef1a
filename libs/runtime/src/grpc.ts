import * as grpc from "@grpc/grpc-js";
import { HarborError, type Authenticator, type Caller, type ErrorKind } from "@harbor/core";
import { PROTO_FILES, PROTO_ROOT } from "@harbor/proto";
import type { Component } from "./lifecycle.js";
import type { Logger } from "./logger.js";

export interface GrpcService {
  /** Full name for the health service, e.g. harbor.v1.PortAllocator. */
  readonly fullName: string;
  readonly definition: grpc.ServiceDefinition;
  readonly implementation: grpc.UntypedServiceImplementation;
}

const CODES: Record<ErrorKind, grpc.status> = {
  "invalid-argument": grpc.status.INVALID_ARGUMENT,
  "already-exists": grpc.status.ALREADY_EXISTS,
  "not-found": grpc.status.NOT_FOUND,
  "resource-exhausted": grpc.status.RESOURCE_EXHAUSTED,
  "failed-precondition": grpc.status.FAILED_PRECONDITION,
  unavailable: grpc.status.UNAVAILABLE,
  unauthenticated: grpc.status.UNAUTHENTICATED,
  "permission-denied": grpc.status.PERMISSION_DENIED,
  internal: grpc.status.INTERNAL,
};

/** The one mapping from domain errors to gRPC status. Anything unexpected is INTERNAL, with the cause logged, not sent. */
export function toGrpcError(err: unknown, logger: Logger, method: string): Partial<grpc.StatusObject> {
  if (err instanceof HarborError) {
    if (err.kind === "internal" || err.kind === "unavailable") logger.warn({ err, method }, "rpc-failed");
    else logger.debug({ method, kind: err.kind, message: err.message }, "rpc-rejected");
    return { code: CODES[err.kind], details: err.message };
  }
  logger.error({ err, method }, "rpc-internal-error");
  return { code: grpc.status.INTERNAL, details: "internal error; see the server's log" };
}

/** The caller of a call, from its `authorization` metadata; throws UNAUTHENTICATED. */
export function callerOf(call: { metadata: grpc.Metadata }, auth: Authenticator): Caller {
  const value = call.metadata.get("authorization")[0];
  return auth.authenticate(typeof value === "string" ? value : undefined);
}

/**
 * Wraps an async unary handler: authenticates the caller first, and calls
 * the callback exactly once, with the result or with a mapped error.
 */
export function unary<Req, Res>(
  logger: Logger,
  auth: Authenticator,
  method: string,
  handler: (request: Req, caller: Caller, call: grpc.ServerUnaryCall<Req, Res>) => Promise<Res>,
): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    let answered = false;
    const answer = (err: Partial<grpc.StatusObject> | null, value?: Res) => {
      if (answered) return;
      answered = true;
      if (err) callback(err as grpc.ServerErrorResponse);
      else callback(null, value);
    };
    Promise.resolve()
      .then(() => handler(call.request, callerOf(call, auth), call))
      .then(
        (value) => answer(null, value),
        (err: unknown) => answer(toGrpcError(err, logger, method)),
      );
  };
}

export interface GrpcServerOptions {
  address: string;
  services: GrpcService[];
  logger: Logger;
  /** Grace for open calls and streams on stop before they are cut. */
  shutdownGraceMs?: number;
}

export interface GrpcServer extends Component {
  /** host:port actually bound (useful with port 0). */
  readonly boundAddress: string;
}

/** A gRPC server with health (grpc.health.v1) and reflection, as one component. */
export function createGrpcServer(options: GrpcServerOptions): GrpcServer {
  const { logger } = options;
  // Every request of the API is small; a large one is refused before it is parsed.
  // Channelz (per-call statistics) is never served here; turned off, it costs nothing per call.
  const server = new grpc.Server({ "grpc.max_receive_message_length": 64 * 1024, "grpc.enable_channelz": 0 });
  const statusMap: Record<string, "SERVING" | "NOT_SERVING"> = { "": "SERVING" };
  for (const s of options.services) statusMap[s.fullName] = "SERVING";
  let health: { setStatus(service: string, status: "SERVING" | "NOT_SERVING"): void } | undefined;

  let boundAddress = options.address;
  let started = false;
  let stopping: Promise<void> | undefined;

  return {
    name: "grpc-server",
    get boundAddress() {
      return boundAddress;
    },
    async start() {
      // Loaded here, not at import: processes that only call gRPC (workers) never need them.
      const [{ HealthImplementation }, protoLoader, { ReflectionService }] = await Promise.all([
        import("grpc-health-check"),
        import("@grpc/proto-loader"),
        import("@grpc/reflection"),
      ]);
      const implementation = new HealthImplementation(statusMap);
      implementation.addToServer(server);
      health = implementation;
      new ReflectionService(protoLoader.loadSync(PROTO_FILES, { includeDirs: [PROTO_ROOT] })).addToServer(server);
      for (const s of options.services) server.addService(s.definition, s.implementation);
      const port = await new Promise<number>((resolve, reject) =>
        server.bindAsync(options.address, grpc.ServerCredentials.createInsecure(), (err, p) => (err ? reject(err) : resolve(p))),
      );
      boundAddress = options.address.replace(/:\d+$/, `:${port}`);
      started = true;
      logger.info({ address: boundAddress, services: options.services.map((s) => s.fullName) }, "grpc-listening");
    },
    stop() {
      stopping ??= (async () => {
        if (!started) return;
        for (const name of Object.keys(statusMap)) health?.setStatus(name, "NOT_SERVING");
        await new Promise<void>((resolve) => {
          const timer = setTimeout(() => {
            server.forceShutdown();
            resolve();
          }, options.shutdownGraceMs ?? 5_000);
          server.tryShutdown(() => {
            clearTimeout(timer);
            resolve();
          });
        });
        logger.info("grpc-stopped");
      })();
      return stopping;
    },
  };
}

/**
 * Options for Harbor's gRPC clients. A node's listing is one message: 10,000
 * services with five backends each is ~6 MiB of sets, past gRPC's default 4
 * MiB, and a worker refused it would stay on stale state for good.
 */
export const CLIENT_OPTIONS: grpc.ClientOptions = { "grpc.max_receive_message_length": 256 * 1024 * 1024 };

/** A promise for one unary call with a deadline, on a ts-proto grpc-js client method. */
/** Metadata carrying a bearer token, when there is one. */
export function tokenMetadata(token: string | undefined): grpc.Metadata {
  const metadata = new grpc.Metadata();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return metadata;
}

export function callUnary<Req, Res>(
  method: (req: Req, metadata: grpc.Metadata, options: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: Res) => void) => grpc.ClientUnaryCall,
  request: Req,
  timeoutMs = 10_000,
  metadata = new grpc.Metadata(),
): Promise<Res> {
  return new Promise((resolve, reject) => {
    method(request, metadata, { deadline: Date.now() + timeoutMs }, (err, res) => (err ? reject(err) : resolve(res)));
  });
}

/** Request and response types of a ts-proto client method (its last, fullest overload). */
export type RequestOf<F> = F extends (req: infer R, m: grpc.Metadata, o: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: any) => void) => any ? R : never;
export type ResponseOf<F> = F extends (req: any, m: grpc.Metadata, o: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: infer S) => void) => any ? S : never;

/** Calls a unary method by name: `invoke(client, "createPortService", request)`. */
export function invoke<C extends grpc.Client, K extends keyof C & string>(
  client: C,
  method: K,
  request: RequestOf<C[K]>,
  timeoutMs = 10_000,
  metadata = new grpc.Metadata(),
): Promise<ResponseOf<C[K]>> {
  const fn = (client[method] as (...args: unknown[]) => grpc.ClientUnaryCall).bind(client);
  return callUnary(fn as never, request, timeoutMs, metadata) as Promise<ResponseOf<C[K]>>;
}

export function isServiceError(err: unknown): err is grpc.ServiceError {
  return typeof err === "object" && err !== null && "code" in err && "details" in err && "metadata" in err;
}

/** One line a person can read for a failed call: the server's message, or what went wrong reaching it. */
export function describeServiceError(err: unknown, address: string): string {
  if (!isServiceError(err)) return err instanceof Error ? err.message : String(err);
  if (err.code === grpc.status.UNAVAILABLE && /Name resolution failed/i.test(err.details)) {
    return `cannot reach harbor at ${address} (its host name does not resolve); is the address right? (set HARBOR_API or --api)`;
  }
  if (err.code === grpc.status.UNAVAILABLE && /ECONNREFUSED|No connection established|connect/i.test(err.details)) {
    const cause = /ECONNREFUSED/.test(err.details) ? "connection refused" : "no connection";
    return `cannot reach harbor at ${address} (${cause}); is \`harbor serve\` running? (set HARBOR_API or --api)`;
  }
  if (err.code === grpc.status.DEADLINE_EXCEEDED) return `harbor at ${address} did not answer in time`;
  return err.details || grpc.status[err.code] || "request failed";
}

export { grpc };
