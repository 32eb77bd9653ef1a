// A plain HTTP app on $PORT. Its harbor service's name ends in "https", so
// Harbor's container proxy serves it over TLS on the service's port with
// certs/custom-cert-https.crt (else certs/harbor.crt).
import http from "node:http";

const port = Number(process.env.PORT);
if (!port) {
  console.error("PORT is not set: run me with `harbor run`");
  process.exit(1);
}
http
  .createServer((req, res) => {
    res.setHeader("content-type", "text/plain");
    res.end(`hello over HTTPS from instance ${process.env.INSTANCE_INDEX ?? "?"}: ${req.method} ${req.url}\n`);
  })
  .listen(port, "127.0.0.1", () => console.log(`http on ${port}`));
process.on("SIGTERM", () => process.exit(0));
