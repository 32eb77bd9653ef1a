export { createContainerProxy, type ContainerProxy } from "./proxy.js";
export { loadContainerProxyConfig, type ContainerProxyConfig } from "./config.js";
export { findCertificate, certificateCandidates } from "./certs.js";
