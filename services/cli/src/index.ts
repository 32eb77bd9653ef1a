export { runCli, type CliIo } from "./program.js";
