#!/usr/bin/env node
// The `harbor` command. Committed so that node_modules/.bin/harbor exists right
// after `npm ci`; the first run builds the workspace if it has not been built.
import { existsSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { dirname, resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const main = resolve(here, "../dist/main.js");
if (!existsSync(main)) {
  const root = resolve(here, "../../..");
  process.stderr.write(`harbor: first run, building the workspace in ${root} …\n`);
  const built = spawnSync("npm", ["run", "build", "--silent"], { cwd: root, stdio: ["ignore", 2, 2] });
  if (built.status !== 0 || !existsSync(main)) {
    process.stderr.write(`harbor: the build failed; run \`npm run build\` in ${root} and try again\n`);
    process.exit(1);
  }
}
await import(pathToFileURL(main).href);
