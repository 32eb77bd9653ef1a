export { createRegistry, type RegistryService, type RegistryDeps } from "./service.js";
export { loadRegistryConfig, DEFAULT_TTL_SECONDS, type RegistryConfig } from "./config.js";
export { RegistryStore } from "./store.js";
