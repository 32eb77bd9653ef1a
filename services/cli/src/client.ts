import { BackendRegistryClient, PortAllocatorClient } from "@harbor/proto";
import { CLIENT_OPTIONS, DEFAULT_API_ADDRESS, describeServiceError, grpc, invoke, isServiceError, parseAddress, tokenMetadata, type RequestOf, type ResponseOf } from "@harbor/runtime";

/** A failure to report as one line on stderr; exit code 2 for usage, 1 otherwise. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
    /** The gRPC status when a call failed. */
    readonly grpcCode?: grpc.status,
  ) {
    super(message);
  }
}

export interface Clients {
  address: string;
  allocator: PortAllocatorClient;
  registry: BackendRegistryClient;
  call<C extends grpc.Client, K extends keyof C & string>(client: C, method: K, request: RequestOf<C[K]>): Promise<ResponseOf<C[K]>>;
  close(): void;
}

export function createClients(address = DEFAULT_API_ADDRESS, token?: string): Clients {
  // Checked here, not by gRPC: "nohost" would quietly mean port 443, "a b" a resolver's message.
  if (!parseAddress(address)) throw new CliError(`the API address ${JSON.stringify(address)} is not HOST:PORT (from --api or HARBOR_API), e.g. ${DEFAULT_API_ADDRESS}`, 2);
  const credentials = grpc.credentials.createInsecure();
  const allocator = new PortAllocatorClient(address, credentials, CLIENT_OPTIONS);
  const registry = new BackendRegistryClient(address, credentials, CLIENT_OPTIONS);
  return {
    address,
    allocator,
    registry,
    async call(client, method, request) {
      try {
        return await invoke(client, method, request, 10_000, tokenMetadata(token));
      } catch (err) {
        throw new CliError(describeServiceError(err, address), 1, isServiceError(err) ? err.code : undefined);
      }
    },
    close() {
      allocator.close();
      registry.close();
    },
  };
}
