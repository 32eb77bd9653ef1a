// Guess the number, over TCP, for everyone connected to this instance.
// Harbor gives the port to listen on in STACKATO_HARBOR (one harbor service).
import net from "node:net";

const port = Number(process.env.STACKATO_HARBOR);
if (!port) {
  console.error("STACKATO_HARBOR is not set: run me with `harbor run`");
  process.exit(1);
}
const instance = process.env.INSTANCE_INDEX ?? "?";
const players = new Set();
let secret = 1 + Math.floor(Math.random() * 100);

function broadcast(line) {
  for (const p of players) p.write(line + "\n");
}

net
  .createServer((socket) => {
    players.add(socket);
    socket.setEncoding("utf8");
    socket.write(`welcome to instance ${instance}: guess my number (1-100), ${players.size} playing\n`);
    let buffer = "";
    socket.on("data", (chunk) => {
      buffer += chunk;
      let i;
      while ((i = buffer.indexOf("\n")) >= 0) {
        const guess = Number(buffer.slice(0, i).trim());
        buffer = buffer.slice(i + 1);
        if (!Number.isInteger(guess)) socket.write("a whole number, please\n");
        else if (guess < secret) socket.write("higher\n");
        else if (guess > secret) socket.write("lower\n");
        else {
          broadcast(`${guess} is right! a new number is chosen`);
          secret = 1 + Math.floor(Math.random() * 100);
        }
      }
    });
    socket.on("close", () => players.delete(socket));
    socket.on("error", () => players.delete(socket));
  })
  .listen(port, () => console.log(`game on port ${port}`));

process.on("SIGTERM", () => process.exit(0));
