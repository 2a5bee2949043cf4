// How messages are laid out: grouping consecutive messages of one author,
// day separators, times.

/** Consecutive messages of one author closer than this share one header. */
export const GROUP_GAP_MS = 5 * 60 * 1000;

function dayKey(ts) {
  const d = new Date(ts);
  return `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`;
}

/**
 * Adds layout flags to a list of timeline entries ({user, ts, ...}):
 * `first` starts a group (show author and time), `day` is set on the first
 * entry of a calendar day (show a separator).
 * @template {{user: {id: string}, ts: number}} T
 * @param {T[]} items
 * @returns {(T & {first: boolean, day: number|null})[]}
 */
export function groupTimeline(items, gapMs = GROUP_GAP_MS) {
  const out = [];
  let prev = null;
  for (const it of items) {
    const newDay = !prev || dayKey(prev.ts) !== dayKey(it.ts);
    const first = newDay || !prev || prev.user.id !== it.user.id || it.ts - prev.ts > gapMs || it.ts < prev.ts;
    out.push({ ...it, first, day: newDay ? it.ts : null });
    prev = it;
  }
  return out;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long', month: 'long', day: 'numeric' });
const yearDayFmt = new Intl.DateTimeFormat(undefined, { year: 'numeric', month: 'long', day: 'numeric' });

export function formatTime(ts) {
  return timeFmt.format(new Date(ts));
}

const shortFmt = new Intl.DateTimeFormat(undefined, { hour: 'numeric', minute: '2-digit' });

/** Time without padding or seconds, for the narrow gutter. */
export function formatShortTime(ts) {
  return shortFmt.format(new Date(ts)).replace(/\s?[AP]\.?M\.?$/i, '');
}

export function formatFull(ts) {
  return fullFmt.format(new Date(ts));
}

/** "Today", "Yesterday", "Monday, March 3" or "March 3, 2023". */
export function formatDay(ts, now = Date.now()) {
  const d = new Date(ts);
  const today = new Date(now);
  if (dayKey(d) === dayKey(today)) return 'Today';
  const y = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(d) === dayKey(y)) return 'Yesterday';
  return d.getFullYear() === today.getFullYear() ? dayFmt.format(d) : yearDayFmt.format(d);
}

/** ISO string for a <time datetime> attribute. */
export function isoTime(ts) {
  return new Date(ts).toISOString();
}

/** Hues far enough apart to tell authors' badges apart at a glance. */
const HUES = [212, 262, 335, 18, 145, 190, 290, 40, 100, 0];

/** A stable hue for a user (FNV-1a over the name), for the author's initial badge. */
export function hueFor(id) {
  let h = 0x811c9dc5;
  for (const ch of String(id)) {
    h ^= ch.codePointAt(0);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return HUES[h % HUES.length];
}
