import { runCli } from "./program.js";

// The `harbor` command: the process ends with the verb's exit code (tests call runCli with their own buffers).
const code = await runCli(process.argv);
if (code !== 0) process.exitCode = code;
