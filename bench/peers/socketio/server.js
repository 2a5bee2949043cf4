// A plain Socket.IO 4 chat server: clients "join" a room and "send" a text;
// every member of the room gets it as "msg". With REDIS_URL set, processes
// share rooms through @socket.io/redis-adapter.
//
//   PORT=3001 REDIS_URL=redis://127.0.0.1:6379 node server.js
"use strict";

const { createServer } = require("node:http");
const { Server } = require("socket.io");

const port = Number(process.env.PORT || 3001);
const host = process.env.HOST || "127.0.0.1";

async function main() {
  const httpServer = createServer();
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
  });

  if (process.env.REDIS_URL) {
    const { createClient } = require("redis");
    const { createAdapter } = require("@socket.io/redis-adapter");
    const pubClient = createClient({ url: process.env.REDIS_URL });
    const subClient = pubClient.duplicate();
    await Promise.all([pubClient.connect(), subClient.connect()]);
    io.adapter(createAdapter(pubClient, subClient));
  }

  io.on("connection", (socket) => {
    socket.on("join", (room, ack) => {
      socket.join(String(room));
      if (typeof ack === "function") ack({ ok: true });
    });
    socket.on("send", (room, text) => {
      io.to(String(room)).emit("msg", { room, text });
    });
  });

  httpServer.listen(port, host, () => {
    console.log(`socket.io listening on ${host}:${port}`);
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
