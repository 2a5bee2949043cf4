// The chat client's engine: one WebSocket to the node, the open rooms and
// their state, reconnecting with backoff and resuming every room from the
// last seq it holds. No DOM here: the view subscribes to snapshots (the
// Svelte store contract) and calls the action methods.

import { backoffDelay } from './backoff.js';
import { describeError } from './errors.js';
import {
  createRoom,
  receiveMessage,
  receiveHistory,
  resumeSince,
  olderHistoryRequest,
  addPending,
  ackPending,
  failPending,
  retryPending,
  removePending,
  requeuePending,
  takeQueued,
  expirePending,
  setMembers,
  applyPresence,
  noteTyping,
  expireTyping,
  typingNames,
  unreadInRoom,
  unreadFromDirectory,
  seenUpTo,
} from './room.js';

/** An unacknowledged message turns "failed" (with Retry) after this long. */
export const ACK_TIMEOUT_MS = 10000;
/** `typing` is sent at most this often per room while the user types. */
export const TYPING_SEND_MS = 3000;
/** How often to ping the node, so a dead connection is noticed. */
export const PING_MS = 20000;
/** No frame at all for this long: the connection is dead, reconnect. */
export const DEAD_MS = 50000;
/** A connection that has not said `welcome` by then is given up. */
export const WELCOME_TIMEOUT_MS = 15000;
/** The room directory is refreshed this often. */
export const DIRECTORY_MS = 20000;
/** Notices fade after this long. */
export const NOTICE_MS = 10000;
/** After this many failed attempts in a row the client says "offline". */
export const OFFLINE_AFTER = 4;
/** History page size. */
export const PAGE = 50;
/** The room a new user lands in. */
export const DEFAULT_ROOM = 'general';

const EXPIRED = 'Your session has expired. Sign in again.';

function defaultCid() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 12)}`;
}

export class ChatClient {
  /**
   * @param {object} deps
   * @param {ReturnType<import('./api.js').createApi>} deps.api
   * @param {ReturnType<import('./prefs.js').createPrefs>} deps.prefs
   * @param {typeof WebSocket} deps.WebSocketImpl
   * @param {(token: string) => string} deps.wsUrl
   * @param {() => boolean} [deps.isOnline] the browser's idea of the network
   * @param {() => number} [deps.random]
   * @param {() => string} [deps.newCid]
   * @param {() => string|null} [deps.initialRoom] a room asked for by the address (a shared link)
   */
  constructor({
    api,
    prefs,
    WebSocketImpl,
    wsUrl,
    isOnline = () => true,
    random = Math.random,
    newCid = defaultCid,
    initialRoom = () => null,
  }) {
    this.initialRoom = initialRoom;
    this.api = api;
    this.prefs = prefs;
    this.WebSocketImpl = WebSocketImpl;
    this.wsUrl = wsUrl;
    this.isOnline = isOnline;
    this.random = random;
    this.newCid = newCid;

    this.phase = 'signed-out';
    this.signInError = null;
    this.signingIn = false;
    this.token = null;
    this.user = null;

    this.ws = null;
    this.welcomed = false;
    this.everConnected = false;
    this.closing = false;
    this.status = 'idle';
    this.attempt = 0;
    this.retryAt = null;
    this.retryTimer = null;
    this.connectedAt = 0;
    this.lastFrameAt = 0;
    this.lastPingAt = 0;
    this.ticker = null;
    this.lastDirectoryAt = 0;

    /** @type {string[]} */
    this.open = [];
    /** @type {Map<string, ReturnType<typeof createRoom>>} */
    this.rooms = new Map();
    this.active = null;
    this.directory = [];
    this.seen = {};
    this.lastTypingSent = new Map();
    this.notices = [];
    this.noticeSeq = 0;

    this.listeners = new Set();
    this.emitQueued = false;
  }

  // ---- store contract -------------------------------------------------

  subscribe(run) {
    this.listeners.add(run);
    run(this.getState());
    return () => this.listeners.delete(run);
  }

  emit() {
    if (this.emitQueued) return;
    this.emitQueued = true;
    queueMicrotask(() => {
      this.emitQueued = false;
      const s = this.getState();
      for (const run of this.listeners) run(s);
    });
  }

  getState() {
    const now = Date.now();
    const me = this.user?.id;
    const rooms = this.open.map((name) => {
      const r = this.rooms.get(name);
      return {
        name,
        messages: r.messages,
        pending: r.pending,
        members: r.members,
        typing: typingNames(r, now),
        hasMore: r.hasMore,
        loadingOlder: r.historyRequest === 'older',
        synced: r.synced,
        joined: r.joined,
        lastSeq: r.lastSeq,
        seen: this.seen[name] ?? null,
        unread: unreadInRoom(r, this.seen[name], me),
      };
    });
    const openSet = new Set(this.open);
    const directory = this.directory
      .filter((d) => !openSet.has(d.name))
      .map((d) => ({ ...d, unread: unreadFromDirectory(d.last_seq, this.seen[d.name]) }));
    const membersOnline = Object.fromEntries(this.directory.map((d) => [d.name, d.members]));
    return {
      phase: this.phase,
      signInError: this.signInError,
      signingIn: this.signingIn,
      user: this.user,
      conn: { status: this.status, attempt: this.attempt, retryAt: this.retryAt },
      active: this.active,
      rooms,
      directory,
      membersOnline,
      notices: this.notices,
      totalUnread: rooms.reduce((n, r) => n + (r.name === this.active ? 0 : r.unread), 0),
    };
  }

  // ---- session --------------------------------------------------------

  /** At start-up: resume a stored session, checking the token first. */
  async resume() {
    const token = this.prefs.token();
    if (!token) {
      this.phase = 'signed-out';
      this.emit();
      return;
    }
    this.phase = 'checking';
    this.emit();
    let user = this.prefs.user();
    try {
      const res = await this.api.me(token);
      if (res?.user?.id) user = res.user;
    } catch (e) {
      if (e?.status === 401) {
        this.prefs.clearSession();
        this.phase = 'signed-out';
        this.signInError = EXPIRED;
        this.emit();
        return;
      }
      // Unreachable node or no /me: go ahead, the socket will tell.
    }
    this.startSession(token, user);
  }

  /** Signs in as a guest with the given name. Throws the ApiError on failure. */
  async signIn(name) {
    this.signingIn = true;
    this.signInError = null;
    this.emit();
    try {
      const res = await this.api.guest(name);
      this.prefs.setSession(res.token, res.user);
      this.startSession(res.token, res.user);
    } catch (e) {
      this.signInError =
        e?.code === 'network'
          ? 'Cannot reach the server. Check your connection and try again.'
          : e?.message || 'Could not sign in.';
      throw e;
    } finally {
      this.signingIn = false;
      this.emit();
    }
  }

  startSession(token, user) {
    this.token = token;
    this.user = user || null;
    this.phase = 'ready';
    this.signInError = null;
    this.seen = user ? this.prefs.seen(user.id) : {};
    const stored = this.prefs.rooms();
    const wanted = this.initialRoom();
    this.open = stored.length ? [...new Set(stored)] : [wanted || DEFAULT_ROOM];
    if (wanted && !this.open.includes(wanted)) this.open.push(wanted);
    this.rooms = new Map(this.open.map((n) => [n, createRoom(n)]));
    const active = wanted || this.prefs.active();
    this.active = active && this.open.includes(active) ? active : this.open[0];
    this.prefs.setActive(this.active);
    this.prefs.setRooms(this.open);
    this.attempt = 0;
    this.everConnected = false;
    this.startTicker();
    this.connect();
    this.refreshDirectory();
    this.emit();
  }

  /** Ends the session; `reason` is shown on the sign-in form. */
  signOut(reason = null) {
    this.closing = true;
    this.dropSocket();
    this.closing = false;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.stopTicker();
    this.prefs.clearSession();
    this.token = null;
    this.user = null;
    this.rooms = new Map();
    this.open = [];
    this.active = null;
    this.directory = [];
    this.notices = [];
    this.status = 'idle';
    this.phase = 'signed-out';
    this.signInError = reason;
    this.emit();
  }

  // ---- connection -----------------------------------------------------

  connect() {
    if (this.ws || !this.token || this.phase !== 'ready') return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.retryAt = null;
    this.status = this.everConnected || this.attempt > 0 ? this.failingStatus() : 'connecting';
    let ws;
    try {
      ws = new this.WebSocketImpl(this.wsUrl(this.token));
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    this.welcomed = false;
    this.connectedAt = Date.now();
    this.lastFrameAt = Date.now();
    ws.onmessage = (ev) => {
      if (this.ws !== ws) return;
      this.lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame && typeof frame === 'object') this.handleFrame(frame);
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.onClosed();
    };
    ws.onerror = () => {};
    this.emit();
  }

  failingStatus() {
    return !this.isOnline() || this.attempt >= OFFLINE_AFTER ? 'offline' : 'reconnecting';
  }

  /** Closes the current socket without waiting for its close event. */
  dropSocket() {
    const ws = this.ws;
    if (!ws) return false;
    this.ws = null;
    ws.onmessage = null;
    ws.onclose = null;
    try {
      ws.close();
    } catch {
      // already closed
    }
    return true;
  }

  onClosed() {
    const wasWelcomed = this.welcomed;
    this.welcomed = false;
    for (const r of this.rooms.values()) {
      r.joined = false;
      r.members = [];
      r.typing = {};
      r.historyRequest = null;
      requeuePending(r);
    }
    if (this.phase !== 'ready' || this.closing) return;
    this.status = this.failingStatus();
    this.emit();
    if (wasWelcomed) {
      this.scheduleReconnect();
      return;
    }
    // Closed before `welcome`: the node may have refused the token (HTTP 401,
    // which a browser WebSocket cannot see). Ask the REST API.
    const token = this.token;
    this.api.me(token).then(
      () => this.token === token && this.scheduleReconnect(),
      (e) => {
        if (this.token !== token) return;
        if (e?.status === 401) this.signOut(EXPIRED);
        else this.scheduleReconnect();
      },
    );
  }

  scheduleReconnect() {
    if (this.phase !== 'ready' || this.ws || this.retryTimer) return;
    this.attempt += 1;
    const delay = backoffDelay(this.attempt, { random: this.random });
    this.retryAt = Date.now() + delay;
    this.status = this.failingStatus();
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      this.connect();
    }, delay);
    this.emit();
  }

  /** Reconnect at once (the user asked, or the network came back). */
  reconnectNow() {
    if (this.phase !== 'ready' || this.ws) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.connect();
  }

  /** The browser's online/offline events. */
  networkChanged(online) {
    if (online) {
      this.reconnectNow();
    } else if (this.status !== 'connected') {
      this.status = 'offline';
      this.emit();
    }
  }

  send(frame) {
    if (!this.ws || !this.welcomed) return false;
    try {
      this.ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  get connected() {
    return Boolean(this.ws && this.welcomed);
  }

  joinRoom(room) {
    const since = resumeSince(room);
    this.send(since === undefined ? { op: 'join', room: room.name } : { op: 'join', room: room.name, since });
  }

  // ---- frames ---------------------------------------------------------

  handleFrame(f) {
    const room = typeof f.room === 'string' ? this.rooms.get(f.room) : undefined;
    switch (f.op) {
      case 'welcome':
        this.welcomed = true;
        this.everConnected = true;
        this.attempt = 0;
        this.retryAt = null;
        this.status = 'connected';
        if (f.user?.id) {
          if (!this.user || this.user.id !== f.user.id) this.seen = this.prefs.seen(f.user.id);
          this.user = f.user;
        }
        this.lastPingAt = Date.now();
        for (const name of this.open) this.joinRoom(this.rooms.get(name));
        this.refreshDirectory();
        break;
      case 'joined':
        if (!room) break;
        room.joined = true;
        setMembers(room, f.members);
        if (Number.isFinite(f.last_seq) && f.last_seq > room.serverLastSeq) room.serverLastSeq = f.last_seq;
        this.updateDirectory(room.name, { last_seq: f.last_seq, members: room.members.length });
        if (!room.synced && !room.historyRequest) {
          room.historyRequest = 'latest';
          this.send({ op: 'history', room: room.name, limit: PAGE });
        }
        for (const p of takeQueued(room, { now: Date.now(), timeoutMs: ACK_TIMEOUT_MS })) {
          this.send({ op: 'send', room: room.name, text: p.text, cid: p.cid });
        }
        break;
      case 'msg':
        if (!room) break;
        receiveMessage(room, f, this.user?.id);
        this.bumpDirectory(room.name, f.seq);
        break;
      case 'ack':
        if (!room) break;
        ackPending(room, f, this.user || { id: '', name: '' });
        break;
      case 'presence':
        if (!room) break;
        applyPresence(room, f.joined, f.left);
        this.updateDirectory(room.name, { members: room.members.length });
        break;
      case 'typing':
        if (!room) break;
        noteTyping(room, f.user, Date.now(), this.user?.id);
        break;
      case 'history':
        if (!room) break;
        receiveHistory(room, f.messages, f.has_more, room.historyRequest || 'older', this.user?.id);
        break;
      case 'pong':
        break;
      case 'error':
        this.handleError(f);
        break;
      default:
        return; // unknown ops are ignored: the protocol may grow
    }
    this.emit();
  }

  handleError(f) {
    const err = describeError(f.code, f.message);
    const ref = f.ref == null ? null : String(f.ref);
    if (ref) {
      for (const room of this.rooms.values()) {
        if (!room.pending.some((p) => p.cid === ref)) continue;
        if (err.code === 'not_joined') {
          // The node forgot us in this room: join again, the message follows.
          requeuePending(room);
          room.pending = room.pending.map((p) => (p.cid === ref ? { ...p, status: 'queued', deadline: undefined } : p));
          room.joined = false;
          this.joinRoom(room);
        } else {
          failPending(room, ref, err);
        }
        return;
      }
      if (ref === 'history') {
        for (const room of this.rooms.values()) room.historyRequest = null;
      }
    }
    if (err.code === 'not_joined' && this.active && this.rooms.has(this.active)) {
      this.joinRoom(this.rooms.get(this.active));
    }
    this.notify(err.text);
  }

  notify(text) {
    const now = Date.now();
    // The same words again within the fade time: refresh instead of stacking.
    this.notices = this.notices.filter((n) => n.text !== text);
    this.notices = [...this.notices, { id: ++this.noticeSeq, text, until: now + NOTICE_MS }].slice(-4);
    this.emit();
  }

  dismissNotice(id) {
    this.notices = this.notices.filter((n) => n.id !== id);
    this.emit();
  }

  // ---- rooms ----------------------------------------------------------

  /** Opens (joins) a room and makes it the active one. */
  openRoom(name) {
    if (!this.rooms.has(name)) {
      this.open = [...this.open, name];
      const room = createRoom(name);
      const d = this.directory.find((x) => x.name === name);
      if (d) room.serverLastSeq = d.last_seq || 0;
      this.rooms.set(name, room);
      this.prefs.setRooms(this.open);
      if (this.connected) this.joinRoom(room);
    }
    this.setActive(name);
  }

  /** Leaves a room and forgets its state. */
  closeRoom(name) {
    if (!this.rooms.has(name)) return;
    if (this.connected) this.send({ op: 'leave', room: name });
    const at = this.open.indexOf(name);
    this.open = this.open.filter((n) => n !== name);
    this.rooms.delete(name);
    this.prefs.setRooms(this.open);
    if (this.active === name) {
      this.active = this.open[Math.min(at, this.open.length - 1)] ?? null;
      this.prefs.setActive(this.active);
    }
    this.refreshDirectory();
    this.emit();
  }

  setActive(name) {
    if (name !== null && !this.rooms.has(name)) return;
    this.active = name;
    this.prefs.setActive(name);
    this.emit();
  }

  /** The user has seen the room up to its latest message. */
  markSeen(name) {
    const room = this.rooms.get(name);
    if (!room || !this.user || !room.synced) return;
    const upTo = seenUpTo(room);
    if (upTo <= (this.seen[name] ?? -1)) return;
    this.seen = { ...this.seen, [name]: upTo };
    this.prefs.setSeen(this.user.id, this.seen);
    this.emit();
  }

  /** Asks for the page of history before the oldest message held. */
  loadOlder(name) {
    const room = this.rooms.get(name);
    if (!room || !this.connected) return false;
    const req = olderHistoryRequest(room, PAGE);
    if (!req) return false;
    room.historyRequest = 'older';
    this.send(req);
    this.emit();
    return true;
  }

  refreshDirectory() {
    if (this.phase !== 'ready') return;
    this.lastDirectoryAt = Date.now();
    this.api.rooms().then(
      (res) => {
        if (this.phase !== 'ready' || !Array.isArray(res?.rooms)) return;
        this.directory = res.rooms
          .filter((r) => r && typeof r.name === 'string')
          .map((r) => ({ name: r.name, members: Number(r.members) || 0, last_seq: Number(r.last_seq) || 0 }))
          .sort((a, b) => a.name.localeCompare(b.name));
        for (const d of this.directory) {
          const room = this.rooms.get(d.name);
          if (room && d.last_seq > room.serverLastSeq) room.serverLastSeq = d.last_seq;
        }
        this.emit();
      },
      () => {},
    );
  }

  updateDirectory(name, patch) {
    const i = this.directory.findIndex((d) => d.name === name);
    const clean = Object.fromEntries(Object.entries(patch).filter(([, v]) => Number.isFinite(v)));
    if (i < 0) {
      this.directory = [...this.directory, { name, members: 0, last_seq: 0, ...clean }].sort((a, b) =>
        a.name.localeCompare(b.name),
      );
    } else {
      const copy = this.directory.slice();
      copy[i] = { ...copy[i], ...clean };
      if (clean.last_seq != null && clean.last_seq < this.directory[i].last_seq) copy[i].last_seq = this.directory[i].last_seq;
      this.directory = copy;
    }
  }

  bumpDirectory(name, seq) {
    const d = this.directory.find((x) => x.name === name);
    if (d && Number.isFinite(seq) && seq > d.last_seq) this.updateDirectory(name, { last_seq: seq });
  }

  // ---- messages -------------------------------------------------------

  /** Sends a message; it shows at once as pending. Returns its cid. */
  sendMessage(name, text) {
    const room = this.rooms.get(name);
    if (!room) return null;
    const cid = this.newCid();
    const online = this.connected && room.joined;
    addPending(room, { cid, text, now: Date.now(), online, timeoutMs: ACK_TIMEOUT_MS });
    if (online) this.send({ op: 'send', room: name, text, cid });
    this.lastTypingSent.delete(name);
    this.emit();
    return cid;
  }

  /** Re-sends a failed message with the same cid (never a duplicate). */
  retry(name, cid) {
    const room = this.rooms.get(name);
    if (!room) return;
    const p = room.pending.find((x) => x.cid === cid);
    if (!p) return;
    const online = this.connected && room.joined;
    retryPending(room, cid, { now: Date.now(), online, timeoutMs: ACK_TIMEOUT_MS });
    if (online) this.send({ op: 'send', room: name, text: p.text, cid });
    this.emit();
  }

  /** Drops a failed message. Returns its text (for editing). */
  discard(name, cid) {
    const room = this.rooms.get(name);
    const p = room?.pending.find((x) => x.cid === cid);
    if (!p) return null;
    removePending(room, cid);
    this.emit();
    return p.text;
  }

  /** The user is typing in a room: tell the others, at most every few seconds. */
  typing(name) {
    const room = this.rooms.get(name);
    if (!room || !room.joined || !this.connected) return;
    const now = Date.now();
    const last = this.lastTypingSent.get(name) ?? -Infinity;
    if (now - last < TYPING_SEND_MS) return;
    this.lastTypingSent.set(name, now);
    this.send({ op: 'typing', room: name });
  }

  // ---- timers ---------------------------------------------------------

  startTicker() {
    this.stopTicker();
    this.ticker = setInterval(() => this.tick(), 1000);
  }

  stopTicker() {
    clearInterval(this.ticker);
    this.ticker = null;
  }

  tick() {
    const now = Date.now();
    let changed = false;
    for (const room of this.rooms.values()) {
      if (expireTyping(room, now)) changed = true;
      if (expirePending(room, now, describeError('timeout')).length) changed = true;
    }
    const before = this.notices.length;
    this.notices = this.notices.filter((n) => n.until > now);
    if (this.notices.length !== before) changed = true;

    if (this.ws && !this.welcomed && now - this.connectedAt > WELCOME_TIMEOUT_MS) {
      this.dropSocket();
      this.onClosed();
    } else if (this.ws && this.welcomed) {
      if (now - this.lastFrameAt > DEAD_MS) {
        this.dropSocket();
        this.onClosed();
      } else if (now - this.lastPingAt >= PING_MS) {
        this.lastPingAt = now;
        this.send({ op: 'ping', t: now });
      }
    }
    if (now - this.lastDirectoryAt >= DIRECTORY_MS) this.refreshDirectory();
    if (this.retryTimer && this.retryAt) changed = true; // the countdown moves
    if (changed) this.emit();
  }
}
