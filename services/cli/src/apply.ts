import { grpc } from "@harbor/runtime";
import { CliError, type Clients } from "./client.js";
import { resolveManifest, type Manifest } from "./manifest.js";
import { serviceOutput, type ServiceOutput } from "./output.js";

export interface Applied extends ServiceOutput {
  action: "created" | "bound" | "unchanged";
}

/**
 * Makes the manifest's harbor services exist and be bound to its app:
 * creates the missing ones (bound in the same step), binds the unbound ones,
 * leaves the rest. Running it twice changes nothing.
 */
export async function applyManifest(clients: Clients, manifest: Manifest, appOverride?: string): Promise<{ app: string; applied: Applied[] }> {
  const { app, services } = resolveManifest(manifest, appOverride);
  const applied: Applied[] = [];
  for (const name of services) {
    const existing = await clients
      .call(clients.allocator, "getPortService", { name, app })
      .then((r) => r.service)
      .catch((err: unknown) => {
        if (err instanceof CliError && err.grpcCode === grpc.status.NOT_FOUND) return undefined;
        throw err;
      });
    if (!existing) {
      const { service } = await clients.call(clients.allocator, "createPortService", { name, app, nodeId: "", port: 0 });
      applied.push({ ...serviceOutput(service!), action: "created" });
    } else if (!existing.bindings.some((b) => b.app === app)) {
      const { service } = await clients.call(clients.allocator, "bindPortService", { name, app });
      applied.push({ ...serviceOutput(service!), action: "bound" });
    } else {
      applied.push({ ...serviceOutput(existing), action: "unchanged" });
    }
  }
  return { app, applied };
}

