export * from "./net.js";
export * from "./wait.js";
export * from "./database.js";
export * from "./names.js";
export * from "./udp.js";
export * from "./nats.js";
