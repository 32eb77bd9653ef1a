export * from "./errors.js";
export * from "./clock.js";
export * from "./naming.js";
export * from "./credentials.js";
export * from "./pickers.js";
export * from "./auth.js";
export * from "./networks.js";
