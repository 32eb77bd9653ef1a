export * from "./subjects.js";
export * from "./bus.js";
export { InProcessBus } from "./memory.js";
export { NatsBus } from "./nats.js";
export * from "./typed.js";
export * from "./connect.js";
