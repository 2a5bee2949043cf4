// A plain Socket.IO 4 chat server: clients "join" a room and "send" a text;
// every member of the room gets it as "msg". With REDIS_URL set, processes
// share rooms through @socket.io/redis-adapter.
//
//   PORT=3001 REDIS_URL=redis://127.0.0.1:6379 node server.js
//
// Tuned as the Socket.IO v4 docs advise ("Performance tuning", "Memory
// usage"): the ws native add-ons bufferutil and utf-8-validate are installed
// (optional dependencies), permessage-deflate stays off (the default of both
// Socket.IO and ws, spelled out below), and the first HTTP request of each
// session is not kept in memory. At start the server says which add-ons load.
"use strict";

const http = require("node:http");
const { createServer } = http;
const { isUtf8 } = require("node:buffer");
const { Server } = require("socket.io");

// ws (under engine.io) uses an add-on only where Node has no built-in of its
// own and no WS_NO_* variable forbids it: bufferutil unless Node provides
// http.websocketMask, utf-8-validate unless Node provides buffer.isUtf8.
const ADDONS = [
  {
    name: "bufferutil",
    builtin: http.websocketMask,
    instead: "http.websocketMask",
    off: "WS_NO_BUFFER_UTIL",
  },
  {
    name: "utf-8-validate",
    builtin: isUtf8,
    instead: "buffer.isUtf8",
    off: "WS_NO_UTF_8_VALIDATE",
  },
];

function addonStatus({ name, builtin, off, instead }) {
  try {
    require.resolve(name);
  } catch {
    return `${name}: not installed (ws uses its JavaScript code)`;
  }
  let native;
  try {
    // Both packages fall back to their own JavaScript when the binary fails.
    native = require(name) !== require(`${name}/fallback`);
  } catch (err) {
    return `${name}: failed to load (${err.message})`;
  }
  if (!native) return `${name}: installed, but its native binary did not load`;
  if (process.env[off]) return `${name}: native binary loaded, not used (${off} is set)`;
  if (builtin) return `${name}: native binary loaded, not used (ws prefers Node's ${instead})`;
  return `${name}: native binary loaded and used by ws`;
}

const port = Number(process.env.PORT || 3001);
const host = process.env.HOST || "127.0.0.1";

async function main() {
  const httpServer = createServer();
  const io = new Server(httpServer, {
    transports: ["websocket"],
    serveClient: false,
    perMessageDeflate: false,
  });
  // Nothing here reads the handshake request after the upgrade.
  io.engine.on("connection", (rawSocket) => {
    rawSocket.request = null;
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
    console.log(`socket.io listening on ${host}:${port} (node ${process.versions.node})`);
    for (const addon of ADDONS) console.log(`ws add-on ${addonStatus(addon)}`);
  });
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
