import { X509Certificate, createPrivateKey } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import tls from "node:tls";
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
    return { certPath, keyPath, cert: readFile(certPath), key: readFile(keyPath) };
  }
  throw new FailedPreconditionError(
    `no certificate for HTTPS service "${serviceName}": looked for ${candidates.map((c) => `${c.certPath} + .key`).join(", ")}`,
  );
}

/** Reads a file or says which one could not be read (unreadable, a directory, gone since it was seen). */
function readFile(path: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    throw new FailedPreconditionError(`cannot read ${path}: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * Checks that a pair can serve TLS: the certificate file is PEM, the key
 * file a PEM private key (without a passphrase: nobody could type it), and
 * the key is the certificate's. Each failure names the file to fix, in one
 * line, instead of OpenSSL's "key values mismatch".
 */
export function checkCertificatePair(pair: CertificatePair): CertificatePair {
  const { certPath, keyPath } = pair;
  try {
    new X509Certificate(pair.cert);
  } catch (err) {
    throw new FailedPreconditionError(`${certPath} is not a PEM certificate (-----BEGIN CERTIFICATE-----): ${oneLine(err)}`, { cause: err });
  }
  if (/-----BEGIN (?:ENCRYPTED PRIVATE KEY|[A-Z ]*PRIVATE KEY-----\r?\nProc-Type: 4,ENCRYPTED)/.test(pair.key.toString("latin1"))) {
    throw new FailedPreconditionError(`${keyPath} is protected by a passphrase, which nobody is there to type: remove it (openssl pkey -in ${keyPath} -out ${keyPath})`);
  }
  try {
    createPrivateKey(pair.key);
  } catch (err) {
    throw new FailedPreconditionError(`${keyPath} is not a usable PEM private key (one without a passphrase): ${oneLine(err)}`, { cause: err });
  }
  try {
    tls.createSecureContext({ cert: pair.cert, key: pair.key });
  } catch (err) {
    if (/key values mismatch/i.test(String((err as Error).message))) {
      throw new FailedPreconditionError(`${keyPath} is not the private key of ${certPath}: put the key made with that certificate beside it`, { cause: err });
    }
    throw new FailedPreconditionError(`${certPath} with ${keyPath} cannot serve TLS: ${oneLine(err)}`, { cause: err });
  }
  return pair;
}

function oneLine(err: unknown): string {
  return String((err as Error)?.message ?? err).replace(/\s*\n\s*/g, " ");
}

/** Warn this long before a certificate expires. */
export const EXPIRY_WARNING_DAYS = 14;

/**
 * Why clients will refuse or soon refuse the certificate, if they will:
 * expired, not valid yet, or expiring within EXPIRY_WARNING_DAYS. The proxy
 * still serves it (the app's owner may be replacing it), and says so.
 */
export function certificateValidityProblem(pair: CertificatePair, now = Date.now()): string | undefined {
  const certificate = new X509Certificate(pair.cert);
  const from = Date.parse(certificate.validFrom);
  const to = Date.parse(certificate.validTo);
  if (now > to) return `${pair.certPath} expired on ${new Date(to).toISOString()}: clients will refuse it; replace it`;
  if (now < from) return `${pair.certPath} is not valid until ${new Date(from).toISOString()}: clients will refuse it until then (is this machine's clock right?)`;
  const days = Math.floor((to - now) / 86_400_000);
  if (days < EXPIRY_WARNING_DAYS) return `${pair.certPath} expires on ${new Date(to).toISOString()}, in ${days} day${days === 1 ? "" : "s"}: replace it before then`;
  return undefined;
}
