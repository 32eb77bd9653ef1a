/** What `harbor serve` can run. */
/** `control-plane` is the allocator and the registry in one process, for a worker that runs apart. */
export const SERVE_TARGETS = ["all", "control-plane", "allocator", "registry", "worker", "container-proxy"] as const;
export type ServeTarget = (typeof SERVE_TARGETS)[number];
/** What `harbor serve` runs when no target is named: everything in one process. */
export const DEFAULT_SERVE_TARGET: ServeTarget = "all";

export function isServeTarget(value: string): value is ServeTarget {
  return (SERVE_TARGETS as readonly string[]).includes(value);
}
