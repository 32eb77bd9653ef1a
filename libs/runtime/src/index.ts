export * from "./logger.js";
export * from "./config.js";
export * from "./lifecycle.js";
export * from "./grpc.js";
export * from "./splice.js";
export * from "./metrics.js";
