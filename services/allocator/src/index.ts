export { createAllocator, type Allocator, type AllocatorDeps } from "./service.js";
export { loadAllocatorConfig, DEFAULT_NODE_ID, DEFAULT_PORT_RANGE, type AllocatorConfig } from "./config.js";
