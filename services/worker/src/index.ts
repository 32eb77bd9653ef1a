export { createWorker, type Worker, type WorkerDeps } from "./service.js";
export { loadWorkerConfig, type WorkerConfig } from "./config.js";
