import { BackendRegistryClient, PortAllocatorClient } from "@harbor/proto";
import { DEFAULT_API_ADDRESS, callUnary, describeServiceError, grpc } from "@harbor/runtime";

/** A failure to report as one line on stderr; exit code 2 for usage, 1 otherwise. */
export class CliError extends Error {
  constructor(
    message: string,
    readonly exitCode = 1,
  ) {
    super(message);
  }
}

/** Request and response types of a ts-proto client method (its last, fullest overload). */
type RequestOf<F> = F extends (req: infer R, m: grpc.Metadata, o: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: any) => void) => any ? R : never;
type ResponseOf<F> = F extends (req: any, m: grpc.Metadata, o: Partial<grpc.CallOptions>, cb: (err: grpc.ServiceError | null, res: infer S) => void) => any ? S : never;

export interface Clients {
  address: string;
  allocator: PortAllocatorClient;
  registry: BackendRegistryClient;
  call<C extends grpc.Client, K extends keyof C & string>(client: C, method: K, request: RequestOf<C[K]>): Promise<ResponseOf<C[K]>>;
  close(): void;
}

export function createClients(address = DEFAULT_API_ADDRESS): Clients {
  const credentials = grpc.credentials.createInsecure();
  const allocator = new PortAllocatorClient(address, credentials);
  const registry = new BackendRegistryClient(address, credentials);
  return {
    address,
    allocator,
    registry,
    async call(client, method, request) {
      const fn = (client[method] as (...args: unknown[]) => grpc.ClientUnaryCall).bind(client);
      try {
        return await callUnary(fn, request, 10_000);
      } catch (err) {
        throw new CliError(describeServiceError(err, address));
      }
    },
    close() {
      allocator.close();
      registry.close();
    },
  };
}
