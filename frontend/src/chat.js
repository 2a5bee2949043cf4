// The one ChatClient of the page, wired to the browser: fetch, WebSocket,
// localStorage and the online/visibility events.

import { ChatClient } from './lib/client.js';
import { createApi } from './lib/api.js';
import { createPrefs } from './lib/prefs.js';
import { normalizeRoom, roomProblem } from './lib/validate.js';

/** The room named in the address (`/#rust`), if it is a valid room name. */
export function roomFromHash() {
  let raw = location.hash.replace(/^#/, '');
  try {
    raw = decodeURIComponent(raw);
  } catch {
    return null;
  }
  const name = normalizeRoom(raw);
  return name && !roomProblem(name) ? name : null;
}

function localStore() {
  try {
    return window.localStorage;
  } catch {
    return undefined; // storage disabled: nothing is remembered
  }
}

export const client = new ChatClient({
  api: createApi(),
  prefs: createPrefs(localStore()),
  WebSocketImpl: WebSocket,
  wsUrl: (token) =>
    `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws?token=${encodeURIComponent(token)}`,
  isOnline: () => navigator.onLine !== false,
  initialRoom: roomFromHash,
});

window.addEventListener('online', () => client.networkChanged(true));
window.addEventListener('offline', () => client.networkChanged(false));
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible') client.reconnectNow();
});
