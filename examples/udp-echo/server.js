// Answers each datagram with the instance that got it: with several
// instances, Harbor's FIFO sends everything to the first one.
import dgram from "node:dgram";

const port = Number(process.env.STACKATO_HARBOR);
if (!port) {
  console.error("STACKATO_HARBOR is not set: run me with `harbor run`");
  process.exit(1);
}
const instance = process.env.INSTANCE_INDEX ?? "?";
const socket = dgram.createSocket("udp4");
socket.on("message", (msg, from) => socket.send(`instance ${instance}: ${msg.toString().trim()}\n`, from.port, from.address));
socket.bind(port, () => console.log(`udp echo on port ${port}`));
process.on("SIGTERM", () => process.exit(0));
