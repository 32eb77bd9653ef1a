import { DEFAULT_SERVE_TARGET, isServeTarget } from "./targets.js";

// The `harbor` command: the process ends with the verb's exit code (tests call runCli with their own buffers).
//
// `harbor serve [target]` with nothing else is how every service is started
// (`npm start`, a unit file, a container). It goes to serve.js without the
// verbs' parser, so that a long-running process holds its service and not
// commander with every verb's definition (about 1 MiB of a worker's idle RSS).
// Any option, `--help` or `--api` say, or an unknown target takes the parser,
// which explains or refuses as for any verb.
const [verb, target, ...rest] = process.argv.slice(2);
const serveTarget = verb === "serve" && rest.length === 0 ? (target ?? DEFAULT_SERVE_TARGET) : undefined;

const code =
  serveTarget !== undefined && isServeTarget(serveTarget)
    ? await (await import("./serve.js")).serve(serveTarget, process.env)
    : await (await import("./program.js")).runCli(process.argv);
if (code !== 0) process.exitCode = code;
