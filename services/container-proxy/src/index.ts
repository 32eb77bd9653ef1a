export { createContainerProxy, type ContainerProxy } from "./proxy.js";
export { loadContainerProxyConfig, type ContainerProxyConfig } from "./config.js";
export { findCertificate, checkCertificatePair, certificateCandidates, type CertificatePair } from "./certs.js";
