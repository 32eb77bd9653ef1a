import { accessSync, constants, existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { FailedPreconditionError } from "@harbor/core";

export interface CertificatePair {
  certPath: string;
  keyPath: string;
  cert: Buffer;
  key: Buffer;
}

/** Where a service's certificate may be, in the order they are tried. */
export function certificateCandidates(appRoot: string, serviceName: string): Array<{ certPath: string; keyPath: string }> {
  const out: Array<{ certPath: string; keyPath: string }> = [];
  for (const base of [serviceName, "harbor"]) {
    // The seed says `certs/` in its tree and `cert` in its text: accept both.
    for (const folder of ["certs", "cert"]) {
      out.push({ certPath: join(appRoot, folder, `${base}.crt`), keyPath: join(appRoot, folder, `${base}.key`) });
    }
  }
  return out;
}

/**
 * The app's certificate for a service: `certs/<service-name>.crt|.key` if
 * present, else `certs/harbor.crt|.key` (`cert/` too). A pair with one half
 * missing, or a file that cannot be read, is an error naming the files.
 */
export function findCertificate(appRoot: string, serviceName: string): CertificatePair {
  const candidates = certificateCandidates(appRoot, serviceName);
  for (const { certPath, keyPath } of candidates) {
    const hasCert = existsSync(certPath);
    const hasKey = existsSync(keyPath);
    if (!hasCert && !hasKey) continue;
    if (!hasCert || !hasKey) {
      throw new FailedPreconditionError(`found ${hasCert ? certPath : keyPath} but not ${hasCert ? keyPath : certPath}; a certificate needs both files`);
    }
    for (const path of [certPath, keyPath]) {
      try {
        accessSync(path, constants.R_OK);
      } catch (err) {
        throw new FailedPreconditionError(`cannot read ${path}: ${(err as Error).message}`, { cause: err });
      }
    }
    return { certPath, keyPath, cert: readFileSync(certPath), key: readFileSync(keyPath) };
  }
  throw new FailedPreconditionError(
    `no certificate for HTTPS service "${serviceName}": looked for ${candidates.map((c) => `${c.certPath} + .key`).join(", ")}`,
  );
}
