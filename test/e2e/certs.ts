import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import tls from "node:tls";

/** Writes a self-signed `<dir>/<base>.crt|.key` with the given common name (openssl, from the OS). */
export function makeCertificate(dir: string, base: string, commonName: string): { cert: Buffer; key: Buffer } {
  mkdirSync(dir, { recursive: true });
  const cert = join(dir, `${base}.crt`);
  const key = join(dir, `${base}.key`);
  execFileSync("openssl", ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", `/CN=${commonName}`, "-keyout", key, "-out", cert], {
    stdio: "ignore",
  });
  return { cert: readFileSync(cert), key: readFileSync(key) };
}

/** Connects with TLS (any certificate), sends a line, and returns the server's CN and what came back. */
export function tlsExchange(port: number, send: string): Promise<{ commonName: string; received: string }> {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ port, host: "127.0.0.1", rejectUnauthorized: false }, () => {
      const commonName = String(socket.getPeerCertificate().subject?.CN ?? "");
      let received = "";
      socket.setEncoding("utf8");
      socket.on("data", (d: string) => (received += d));
      socket.on("end", () => resolve({ commonName, received }));
      socket.end(send);
    });
    socket.once("error", reject);
    setTimeout(() => reject(new Error(`no TLS answer on ${port}`)), 5_000).unref();
  });
}
