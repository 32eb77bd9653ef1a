/** What `harbor serve` can run. */
export const SERVE_TARGETS = ["all", "allocator", "registry", "worker", "container-proxy"] as const;
export type ServeTarget = (typeof SERVE_TARGETS)[number];
