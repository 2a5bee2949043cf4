// What the client keeps in localStorage: the token and user, the open rooms,
// the active room, and per user the last seq seen in each room (for unread
// counts). Every read survives missing or corrupt values.

const KEY = {
  token: 'scalable-chat.token',
  user: 'scalable-chat.user',
  rooms: 'scalable-chat.rooms',
  active: 'scalable-chat.active',
  seen: (userId) => `scalable-chat.seen.${userId}`,
};

function read(storage, key, fallback) {
  try {
    const raw = storage?.getItem(key);
    if (raw == null) return fallback;
    return JSON.parse(raw);
  } catch {
    return fallback;
  }
}

function write(storage, key, value) {
  try {
    if (value == null) storage?.removeItem(key);
    else storage?.setItem(key, JSON.stringify(value));
  } catch {
    // Storage full or denied (private mode): the client still works, it just forgets.
  }
}

/** @param {Storage | undefined} storage */
export function createPrefs(storage) {
  return {
    token: () => {
      const t = read(storage, KEY.token, null);
      return typeof t === 'string' && t ? t : null;
    },
    user: () => {
      const u = read(storage, KEY.user, null);
      return u && typeof u.id === 'string' && typeof u.name === 'string' ? u : null;
    },
    setSession(token, user) {
      write(storage, KEY.token, token);
      write(storage, KEY.user, user);
    },
    clearSession() {
      write(storage, KEY.token, null);
      write(storage, KEY.user, null);
    },
    rooms: () => {
      const r = read(storage, KEY.rooms, []);
      return Array.isArray(r) ? r.filter((x) => typeof x === 'string') : [];
    },
    setRooms: (rooms) => write(storage, KEY.rooms, rooms),
    active: () => {
      const a = read(storage, KEY.active, null);
      return typeof a === 'string' ? a : null;
    },
    setActive: (room) => write(storage, KEY.active, room),
    seen(userId) {
      const s = read(storage, KEY.seen(userId), {});
      return s && typeof s === 'object' && !Array.isArray(s) ? s : {};
    },
    setSeen: (userId, seen) => write(storage, KEY.seen(userId), seen),
  };
}
