import { readFileSync } from "node:fs";
import { isMap, isScalar, parseDocument } from "yaml";
import { expandAppName, validateAppName, validateServiceName } from "@harbor/core";
import { CliError } from "./client.js";

/** What Harbor reads of a stackato.yml. */
export interface Manifest {
  file: string;
  name?: string;
  /** The `…: harbor` services, names as written (`${name}` not yet expanded). */
  harborServices: string[];
  /** False when the manifest says `processes: web: ~` (no web process, so no PORT). */
  web: boolean;
  /** What looks like a mistake but may be meant: said on stderr, nothing refused. */
  warnings: string[];
}

/** The 1-based line of an offset in the text. */
function lineAt(text: string, offset: number): number {
  return text.slice(0, offset).split("\n").length;
}

function lineOf(text: string, node: unknown): string {
  const range = (node as { range?: [number, number, number] } | undefined)?.range;
  return range ? `:${lineAt(text, range[0])}` : "";
}

/**
 * Parses a stackato.yml. A service is Harbor's when its value is `harbor` or
 * a mapping with `type: harbor`. Errors name the file and the line.
 */
export function parseManifest(text: string, file: string): Manifest {
  const doc = parseDocument(text, { prettyErrors: false });
  const first = doc.errors[0];
  if (first) throw new CliError(`${file}:${lineAt(text, first.pos[0])}: ${first.message.split("\n")[0]}`, 2);
  const root = doc.contents;
  if (!isMap(root)) throw new CliError(`${file}: expected a mapping at the top (name:, services:, …)`, 2);
  const nameNode = root.get("name", true);
  let name: string | undefined;
  if (nameNode !== undefined) {
    if (!isScalar(nameNode) || typeof nameNode.value !== "string") throw new CliError(`${file}${lineOf(text, nameNode)}: name must be a string`, 2);
    name = nameNode.value;
  }
  // `my-port: harbor` at the top, not under services: (the seed's examples lose that line when
  // copied from a web page): the app would run without its port, so it is said. Only said: a
  // key of the manifest's own (description:, a zone, …) may well have the value harbor.
  const warnings: string[] = [];
  for (const pair of root.items) {
    // name: the app's own (it may be called harbor); services: checked below.
    if (!isScalar(pair.key) || ["name", "services"].includes(String(pair.key.value)) || !isScalar(pair.value)) continue;
    if (typeof pair.value.value === "string" && pair.value.value.toLowerCase() === "harbor") {
      const key = String(pair.key.value);
      warnings.push(`${file}${lineOf(text, pair.key)}: ${key}: harbor is at the top of the manifest, not under services:, so it is no harbor service; indent it under services: if it is meant as one`);
    }
  }
  const harborServices: string[] = [];
  const services = root.get("services", true);
  if (services !== undefined && services !== null && !(isScalar(services) && services.value === null)) {
    if (!isMap(services)) throw new CliError(`${file}${lineOf(text, services)}: services must be a mapping of name: type`, 2);
    for (const pair of services.items) {
      const where = `${file}${lineOf(text, pair.key)}`;
      const key = isScalar(pair.key) && (typeof pair.key.value === "string" || typeof pair.key.value === "number") ? String(pair.key.value) : undefined;
      const value = pair.value;
      const type = isScalar(value) ? value.value : isMap(value) ? (value.get("type") as unknown) : undefined;
      const label = key === undefined ? "a service" : `service ${key}`;
      // Harbor's vendor is `harbor`, written so. Anything that says harbor some other way is refused,
      // not skipped: skipped, the app would quietly go without its port. Other vendors are left alone.
      if (typeof type === "string" && type !== "harbor" && type.toLowerCase() === "harbor") {
        throw new CliError(`${where}: ${label}: type ${JSON.stringify(type)} is not harbor: Harbor's vendor is written in lower case`, 2);
      }
      if (type === undefined && isMap(value) && value.items.some((item) => isScalar(item.value) && String(item.value.value).toLowerCase() === "harbor")) {
        throw new CliError(`${where}: ${label}: give the vendor as type: harbor (or write ${key ?? "NAME"}: harbor)`, 2);
      }
      if (type !== "harbor") continue;
      if (key === undefined) throw new CliError(`${where}: a service name must be a string, e.g. my-port: harbor`, 2);
      harborServices.push(key);
    }
  }
  const processes = root.get("processes", true);
  let web = true;
  if (isMap(processes) && processes.has("web")) {
    const webNode = processes.get("web", true);
    web = !(webNode === null || (isScalar(webNode) && (webNode.value === null || webNode.value === "~")));
  }
  return { file, name, harborServices, web, warnings };
}

export function readManifest(file: string): Manifest {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new CliError(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code === "ENOENT" ? "no such file" : (err as Error).message}`, 2);
  }
  return parseManifest(text, file);
}

/** The app's name and its harbor service names with `${name}` expanded, validated. */
export function resolveManifest(manifest: Manifest, appOverride?: string): { app: string; services: string[] } {
  const app = appOverride ?? manifest.name;
  if (!app) throw new CliError(`${manifest.file}: no name: given; add one or pass --app`, 2);
  try {
    validateAppName(app);
    const services = manifest.harborServices.map((s) => validateServiceName(expandAppName(s, app)));
    // Names are unique ignoring case (their STACKATO_HARBOR_<NAME> forms would collide): two entries
    // that come to one name are one service, which the manifest cannot have meant.
    const seen = new Map<string, number>();
    services.forEach((name, i) => {
      const first = seen.get(name.toLowerCase());
      if (first !== undefined) {
        const [a, b] = [manifest.harborServices[first], manifest.harborServices[i]];
        throw new Error(`services ${a} and ${b} are one service, ${services[first]} (names are unique ignoring case); keep one`);
      }
      seen.set(name.toLowerCase(), i);
    });
    return { app, services };
  } catch (err) {
    throw new CliError(`${manifest.file}: ${(err as Error).message}`, 2);
  }
}
