// State of one room as the client sees it: confirmed messages ordered by seq
// and de-duplicated by id, the user's own messages that are not confirmed yet,
// members, typing users, and the bookkeeping needed to resume after a
// reconnect. Plain functions over plain objects, so they can be unit-tested
// without a browser. Arrays are replaced, never mutated in place, so a view
// holding an old snapshot never sees it change under its feet.

/** How long a "someone is typing" notice lasts after the last typing frame. */
export const TYPING_SHOW_MS = 5000;

/** @typedef {{id: string, name: string}} User */
/**
 * @typedef {object} Message
 * @property {string} id
 * @property {number} seq
 * @property {User} user
 * @property {string} text
 * @property {number} ts
 * @property {string} [cid]
 */
/**
 * The user's own message before the node confirmed it.
 * status: 'queued' (not sent yet: no connection), 'pending' (sent, waiting
 * for the ack), 'failed' (refused or timed out; `error` says why).
 * @typedef {object} Pending
 * @property {string} cid
 * @property {string} text
 * @property {number} createdAt
 * @property {'queued'|'pending'|'failed'} status
 * @property {number} [deadline]
 * @property {{code: string, text: string, retryable: boolean}} [error]
 */

/** A fresh, empty room. */
export function createRoom(name) {
  return {
    name,
    /** @type {Message[]} ascending seq, unique id */
    messages: [],
    /** @type {Pending[]} in the order the user wrote them */
    pending: [],
    /** @type {User[]} */
    members: [],
    /** @type {Record<string, {user: User, until: number}>} */
    typing: {},
    /** Highest seq received as a `msg` or in history: what `join since` resumes from. */
    lastSeq: 0,
    /** The latest page of history has been loaded at least once. */
    synced: false,
    /** Older messages exist on the node that are not loaded. */
    hasMore: false,
    /** null, 'latest' or 'older': the history request in flight. */
    historyRequest: null,
    /** Subscribed on the current connection (a `joined` frame came). */
    joined: false,
    /** The room's last seq as the node last reported it (joined, directory). */
    serverLastSeq: 0,
  };
}

/** Index of the first message whose seq is >= seq (binary search). */
function lowerBound(messages, seq) {
  let lo = 0;
  let hi = messages.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (messages[mid].seq < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function normalize(m) {
  return {
    id: String(m.id),
    seq: Number(m.seq),
    user: { id: String(m.user?.id ?? ''), name: String(m.user?.name ?? '') },
    text: String(m.text ?? ''),
    ts: Number(m.ts) || 0,
    cid: m.cid == null ? undefined : String(m.cid),
  };
}

/**
 * Merges messages into the room: ordered by seq, one copy per id. A message
 * already held is updated in place (a later copy from the node wins over the
 * provisional one built from an `ack`). Returns how many were new.
 * @param {ReturnType<typeof createRoom>} room
 * @param {object[]} incoming
 * @returns {number}
 */
export function mergeMessages(room, incoming) {
  if (!incoming || incoming.length === 0) return 0;
  const next = room.messages.slice();
  let byId = null;
  let added = 0;
  let changed = false;
  for (const raw of incoming) {
    if (raw == null || raw.id == null || !Number.isFinite(Number(raw.seq))) continue;
    const m = normalize(raw);
    const at = lowerBound(next, m.seq);
    if (at < next.length && next[at].seq === m.seq) {
      // Same seq: the same message again (replay, history overlap, ack + msg).
      if (next[at].id === m.id && (next[at].ts !== m.ts || next[at].text !== m.text || next[at].provisional)) {
        next[at] = m;
        changed = true;
      }
      continue;
    }
    if (!byId) byId = new Set(next.map((x) => x.id));
    if (byId.has(m.id)) continue;
    next.splice(at, 0, m);
    byId.add(m.id);
    added += 1;
  }
  if (added > 0 || changed) room.messages = next;
  return added;
}

/** Raises the resume point; only frames the node streamed in order may do so. */
function advanceLastSeq(room, seq) {
  if (Number.isFinite(seq) && seq > room.lastSeq) room.lastSeq = seq;
  if (room.lastSeq > room.serverLastSeq) room.serverLastSeq = room.lastSeq;
}

/**
 * A `msg` frame (live or replayed after `join since`). Resolves the matching
 * pending message when it is the user's own. Returns true when it was new.
 * @param {ReturnType<typeof createRoom>} room
 * @param {Message} msg
 * @param {string|undefined} meId
 */
export function receiveMessage(room, msg, meId) {
  const added = mergeMessages(room, [msg]) > 0;
  advanceLastSeq(room, Number(msg.seq));
  if (msg.cid != null && meId != null && msg.user?.id === meId) {
    removePending(room, String(msg.cid));
  }
  if (msg.user?.id && room.typing[msg.user.id]) {
    const { [msg.user.id]: _, ...rest } = room.typing;
    room.typing = rest;
  }
  return added;
}

/**
 * A `history` answer. `kind` is the request it answers: 'latest' (first load)
 * or 'older' (scroll-back).
 */
export function receiveHistory(room, messages, hasMore, kind, meId) {
  const list = Array.isArray(messages) ? messages : [];
  const added = mergeMessages(room, list);
  if (kind === 'latest') {
    // The latest page is contiguous up to the node's newest message.
    for (const m of list) advanceLastSeq(room, Number(m.seq));
    room.synced = true;
  }
  room.hasMore = Boolean(hasMore);
  room.historyRequest = null;
  if (meId != null) {
    for (const m of list) {
      if (m.cid != null && m.user?.id === meId) removePending(room, String(m.cid));
    }
  }
  return added;
}

/** The seq a `join` should resume from, or undefined for a plain join. */
export function resumeSince(room) {
  return room.synced ? room.lastSeq : undefined;
}

/** The history request to send for scroll-back, or null when none is due. */
export function olderHistoryRequest(room, limit = 50) {
  if (!room.joined || !room.synced || !room.hasMore || room.historyRequest) return null;
  const oldest = room.messages[0];
  if (!oldest) return null;
  return { op: 'history', room: room.name, before: oldest.seq, limit };
}

/** Adds the user's own message as pending (or queued while offline). */
export function addPending(room, { cid, text, now, online, timeoutMs }) {
  const p = {
    cid,
    text,
    createdAt: now,
    status: online ? 'pending' : 'queued',
    deadline: online ? now + timeoutMs : undefined,
  };
  room.pending = [...room.pending, p];
  return p;
}

function updatePending(room, cid, fn) {
  let found = false;
  room.pending = room.pending.map((p) => {
    if (p.cid !== cid) return p;
    found = true;
    return fn(p);
  });
  return found;
}

export function removePending(room, cid) {
  const before = room.pending.length;
  room.pending = room.pending.filter((p) => p.cid !== cid);
  return room.pending.length !== before;
}

/**
 * An `ack`: the message is durable. It leaves the pending list and takes its
 * place by seq (provisionally, until its `msg` frame brings the node's copy).
 * The resume point does not move: an ack may overtake others' messages with
 * lower seqs that are still on their way.
 */
export function ackPending(room, ack, me) {
  const p = room.pending.find((x) => x.cid === ack.cid);
  if (p) {
    removePending(room, p.cid);
    const held = room.messages.some((m) => m.id === String(ack.id));
    if (!held) {
      const m = { id: ack.id, seq: ack.seq, user: me, text: p.text, ts: p.createdAt, cid: p.cid };
      mergeMessages(room, [m]);
      const at = room.messages.findIndex((x) => x.id === String(ack.id));
      if (at >= 0) {
        const copy = room.messages.slice();
        copy[at] = { ...copy[at], provisional: true };
        room.messages = copy;
      }
    }
    return true;
  }
  return false;
}

/** Marks a pending message failed, with the reason shown to the user. */
export function failPending(room, cid, error) {
  return updatePending(room, cid, (p) => ({ ...p, status: 'failed', deadline: undefined, error }));
}

/** A retry puts the message back on the wire (or in the queue) with the same cid. */
export function retryPending(room, cid, { now, online, timeoutMs }) {
  return updatePending(room, cid, (p) => ({
    ...p,
    status: online ? 'pending' : 'queued',
    deadline: online ? now + timeoutMs : undefined,
    error: undefined,
  }));
}

/** After a connection drops: whatever was in flight waits for the next one. */
export function requeuePending(room) {
  if (!room.pending.some((p) => p.status === 'pending')) return;
  room.pending = room.pending.map((p) =>
    p.status === 'pending' ? { ...p, status: 'queued', deadline: undefined } : p,
  );
}

/** Pending messages to put on the wire once the room is joined again. */
export function takeQueued(room, { now, timeoutMs }) {
  const out = [];
  room.pending = room.pending.map((p) => {
    if (p.status !== 'queued' && p.status !== 'pending') return p;
    out.push(p);
    return { ...p, status: 'pending', deadline: now + timeoutMs };
  });
  return out;
}

/** Fails the pending messages whose ack is overdue. Returns their cids. */
export function expirePending(room, now, error) {
  const late = room.pending.filter((p) => p.status === 'pending' && p.deadline != null && p.deadline <= now);
  for (const p of late) failPending(room, p.cid, error);
  return late.map((p) => p.cid);
}

/** Replaces the member list (from `joined`). */
export function setMembers(room, members) {
  const seen = new Set();
  room.members = sortMembers(
    (members || []).filter((u) => u && u.id != null && !seen.has(u.id) && seen.add(u.id)),
  );
}

function sortMembers(list) {
  return list.slice().sort((a, b) => a.name.localeCompare(b.name) || String(a.id).localeCompare(String(b.id)));
}

/** Applies a `presence` frame. */
export function applyPresence(room, joined = [], left = []) {
  const byId = new Map(room.members.map((u) => [u.id, u]));
  for (const u of left || []) if (u && u.id != null) byId.delete(u.id);
  for (const u of joined || []) if (u && u.id != null) byId.set(u.id, u);
  room.members = sortMembers([...byId.values()]);
  if (left && left.length) {
    const gone = new Set(left.map((u) => u && u.id));
    const rest = {};
    for (const [id, t] of Object.entries(room.typing)) if (!gone.has(id)) rest[id] = t;
    room.typing = rest;
  }
}

/** Someone else is typing: show it for TYPING_SHOW_MS. */
export function noteTyping(room, user, now, meId) {
  if (!user || user.id == null || user.id === meId) return;
  room.typing = { ...room.typing, [user.id]: { user, until: now + TYPING_SHOW_MS } };
}

/** Drops typing notices that have run out. Returns true when any did. */
export function expireTyping(room, now) {
  const entries = Object.entries(room.typing);
  const alive = entries.filter(([, t]) => t.until > now);
  if (alive.length === entries.length) return false;
  room.typing = Object.fromEntries(alive);
  return true;
}

/** Names of the users typing now, sorted. */
export function typingNames(room, now) {
  return Object.values(room.typing)
    .filter((t) => t.until > now)
    .map((t) => t.user.name)
    .sort((a, b) => a.localeCompare(b));
}

/** "alice is typing…", "alice and bob are typing…", "alice, bob and 2 others are typing…" */
export function typingText(names) {
  if (!names || names.length === 0) return '';
  if (names.length === 1) return `${names[0]} is typing…`;
  if (names.length === 2) return `${names[0]} and ${names[1]} are typing…`;
  if (names.length === 3) return `${names[0]}, ${names[1]} and ${names[2]} are typing…`;
  return `${names[0]}, ${names[1]} and ${names.length - 2} others are typing…`;
}

/**
 * Unread messages in an open room: others' messages with seq above the last
 * one the user saw. With nothing seen yet, nothing counts as unread.
 */
export function unreadInRoom(room, lastSeen, meId) {
  if (lastSeen == null) return 0;
  let n = 0;
  for (let i = room.messages.length - 1; i >= 0; i -= 1) {
    const m = room.messages[i];
    if (m.seq <= lastSeen) break;
    if (m.user.id !== meId) n += 1;
  }
  // Messages the node has that are not loaded (e.g. before the first sync).
  const beyond = room.serverLastSeq - Math.max(lastSeen, room.lastSeq);
  return n + (beyond > 0 ? beyond : 0);
}

/** Unread estimate for a room that is not open: its last seq minus the last seen. */
export function unreadFromDirectory(lastSeq, lastSeen) {
  if (lastSeen == null || !Number.isFinite(lastSeq)) return 0;
  return Math.max(0, lastSeq - lastSeen);
}

/** The seq to remember as seen when the user has read the room to its end. */
export function seenUpTo(room) {
  const last = room.messages[room.messages.length - 1];
  return Math.max(room.lastSeq, last ? last.seq : 0);
}
