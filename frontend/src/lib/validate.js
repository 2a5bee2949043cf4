// The protocol's rules for names, room names and message text, checked before
// anything is sent so the user learns about a mistake at once.

export const NAME_RE = /^[A-Za-z0-9_.-]{1,32}$/;
export const ROOM_RE = /^[a-z0-9_-]{1,64}$/;
/** The node's default text limit (it may be configured otherwise). */
export const TEXT_LIMIT = 4000;

/** Returns null when the guest name is acceptable, else a sentence saying why not. */
export function nameProblem(name) {
  const n = (name ?? '').trim();
  if (n.length === 0) return 'Enter a name.';
  if (n.length > 32) return 'A name has at most 32 characters.';
  if (!NAME_RE.test(n)) return 'Use only letters, digits, and _ . - in a name.';
  return null;
}

/**
 * Turns what the user typed into a room name: lower case, spaces to dashes,
 * a leading "#" dropped.
 */
export function normalizeRoom(input) {
  return (input ?? '')
    .trim()
    .replace(/^#+/, '')
    .toLowerCase()
    .replace(/\s+/g, '-');
}

/** Returns null when the (normalized) room name is acceptable, else why not. */
export function roomProblem(room) {
  if (!room) return 'Enter a room name.';
  if (room.length > 64) return 'A room name has at most 64 characters.';
  if (!ROOM_RE.test(room)) return 'Use only a–z, digits, _ and - in a room name.';
  return null;
}

/** Length in Unicode characters, as the node counts it. */
export function charCount(text) {
  let n = 0;
  for (const _ of text ?? '') n += 1;
  return n;
}

/** Text worth sending: not empty and not only whitespace. */
export function isSendable(text) {
  return (text ?? '').trim().length > 0;
}
