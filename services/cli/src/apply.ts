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
 * leaves the rest. Running it twice changes nothing. A manifest the server
 * refuses part-way (no free port, another space's app, …) is refused whole:
 * what this run created is deleted again and what it bound unbound.
 */
export async function applyManifest(clients: Clients, manifest: Manifest, appOverride?: string): Promise<{ app: string; applied: Applied[] }> {
  const { app, services } = resolveManifest(manifest, appOverride);
  const applied: Applied[] = [];
  for (const name of services) {
    try {
      applied.push(await applyOne(clients, name, app));
    } catch (err) {
      throw await undo(clients, app, applied, name, err);
    }
  }
  return { app, applied };
}

async function applyOne(clients: Clients, name: string, app: string): Promise<Applied> {
  const existing = await clients
    .call(clients.allocator, "getPortService", { name, app })
    .then((r) => r.service)
    .catch((err: unknown) => {
      if (err instanceof CliError && err.grpcCode === grpc.status.NOT_FOUND) return undefined;
      throw err;
    });
  if (!existing) {
    const { service } = await clients.call(clients.allocator, "createPortService", { name, app, nodeId: "", port: 0 });
    return { ...serviceOutput(service!), action: "created" };
  }
  if (!existing.bindings.some((b) => b.app === app)) {
    const { service } = await clients.call(clients.allocator, "bindPortService", { name, app });
    return { ...serviceOutput(service!), action: "bound" };
  }
  return { ...serviceOutput(existing), action: "unchanged" };
}

/** Takes back, newest first, what this run did before `failed` was refused; the error says what happened. */
async function undo(clients: Clients, app: string, applied: Applied[], failed: string, err: unknown): Promise<unknown> {
  const done = applied.filter((a) => a.action !== "unchanged").reverse();
  if (done.length === 0) return err;
  const undone: string[] = [];
  const left: string[] = [];
  for (const a of done) {
    const what = `${a.action} ${a.service_name}`;
    try {
      if (a.action === "created") await clients.call(clients.allocator, "deletePortService", { name: a.service_name });
      else await clients.call(clients.allocator, "unbindPortService", { name: a.service_name, app });
      undone.push(what);
    } catch (undoErr) {
      left.push(`${what} (${(undoErr as Error).message})`);
    }
  }
  const outcome =
    left.length === 0
      ? `(nothing changed: undid ${undone.join(", ")})`
      : `(undoing failed, left as it is: ${left.join(", ")}; see harbor services --app ${app})`;
  const cause = err instanceof CliError ? err : new CliError((err as Error).message ?? String(err));
  return new CliError(`${failed}: ${cause.message} ${outcome}`, cause.exitCode, cause.grpcCode);
}
