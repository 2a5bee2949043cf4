import { describe, it, expect } from 'vitest';
import { backoffDelay } from '../src/lib/backoff.js';
import { nameProblem, normalizeRoom, roomProblem, charCount, isSendable } from '../src/lib/validate.js';
import { describeError } from '../src/lib/errors.js';
import { groupTimeline, formatDay, GROUP_GAP_MS } from '../src/lib/format.js';
import { createPrefs } from '../src/lib/prefs.js';

describe('backoff', () => {
  it('grows exponentially, with jitter between half and the full step', () => {
    const lo = (n) => backoffDelay(n, { random: () => 0 });
    const hi = (n) => backoffDelay(n, { random: () => 1 });
    expect([lo(1), hi(1)]).toEqual([250, 500]);
    expect([lo(2), hi(2)]).toEqual([500, 1000]);
    expect([lo(4), hi(4)]).toEqual([2000, 4000]);
  });

  it('is capped', () => {
    expect(backoffDelay(50, { random: () => 1 })).toBe(30000);
    expect(backoffDelay(1000, { random: () => 0 })).toBe(15000);
  });
});

describe('validation', () => {
  it('checks guest names', () => {
    expect(nameProblem('alice')).toBeNull();
    expect(nameProblem('a.b-c_9')).toBeNull();
    expect(nameProblem('')).toMatch(/Enter/);
    expect(nameProblem('has space')).toMatch(/letters/);
    expect(nameProblem('x'.repeat(33))).toMatch(/32/);
  });

  it('normalizes and checks room names', () => {
    expect(normalizeRoom('  #Rust Lang ')).toBe('rust-lang');
    expect(roomProblem('rust-lang')).toBeNull();
    expect(roomProblem('')).toMatch(/Enter/);
    expect(roomProblem('café')).toMatch(/a–z/);
    expect(roomProblem('x'.repeat(65))).toMatch(/64/);
  });

  it('counts Unicode characters as the node does', () => {
    expect(charCount('héllo')).toBe(5);
    expect(charCount('👋🏽')).toBe(2);
    expect('👋🏽'.length).toBe(4);
  });

  it('refuses whitespace-only text', () => {
    expect(isSendable('  \n\t ')).toBe(false);
    expect(isSendable(' hi ')).toBe(true);
  });
});

describe('errors in words', () => {
  it('names every protocol error code', () => {
    for (const code of ['bad_request', 'too_large', 'not_joined', 'rate_limited', 'unavailable', 'forbidden', 'internal']) {
      const e = describeError(code, 'server says');
      expect(e.text.length).toBeGreaterThan(10);
      expect(e.code).toBe(code);
    }
    expect(describeError('rate_limited').text).toMatch(/too fast/);
    expect(describeError('too_large', 'text is 4001 characters; the limit is 4000').text).toBe('Text is 4001 characters; the limit is 4000.');
    expect(describeError('too_large').text).toMatch(/too long/);
    expect(describeError('unavailable').retryable).toBe(true);
    expect(describeError('too_large').retryable).toBe(false);
  });

  it('falls back to the server message for unknown codes', () => {
    expect(describeError('brand_new', 'Something new happened').text).toBe('Something new happened');
  });
});

describe('grouping', () => {
  const u = (id) => ({ id, name: id });
  const t0 = new Date(2024, 4, 10, 12, 0).getTime();

  it('groups consecutive messages of one author', () => {
    const g = groupTimeline([
      { user: u('a'), ts: t0 },
      { user: u('a'), ts: t0 + 1000 },
      { user: u('b'), ts: t0 + 2000 },
      { user: u('a'), ts: t0 + 3000 },
      { user: u('a'), ts: t0 + 3000 + GROUP_GAP_MS + 1 },
    ]);
    expect(g.map((x) => x.first)).toEqual([true, false, true, true, true]);
    expect(g.map((x) => x.day !== null)).toEqual([true, false, false, false, false]);
  });

  it('starts a new group on a new day', () => {
    const g = groupTimeline([
      { user: u('a'), ts: new Date(2024, 4, 10, 23, 59).getTime() },
      { user: u('a'), ts: new Date(2024, 4, 11, 0, 1).getTime() },
    ]);
    expect(g.map((x) => [x.first, x.day !== null])).toEqual([
      [true, true],
      [true, true],
    ]);
  });

  it('labels days', () => {
    const now = new Date(2024, 4, 10, 12).getTime();
    expect(formatDay(now - 1000, now)).toBe('Today');
    expect(formatDay(now - 86400000, now)).toBe('Yesterday');
  });
});

describe('prefs', () => {
  function memoryStorage() {
    const m = new Map();
    return {
      getItem: (k) => (m.has(k) ? m.get(k) : null),
      setItem: (k, v) => m.set(k, String(v)),
      removeItem: (k) => m.delete(k),
      m,
    };
  }

  it('round-trips the session, rooms and seen seqs', () => {
    const s = memoryStorage();
    const p = createPrefs(s);
    p.setSession('tok', { id: 'u1', name: 'alice' });
    p.setRooms(['general', 'rust']);
    p.setSeen('u1', { general: 4 });
    const q = createPrefs(s);
    expect(q.token()).toBe('tok');
    expect(q.user()).toEqual({ id: 'u1', name: 'alice' });
    expect(q.rooms()).toEqual(['general', 'rust']);
    expect(q.seen('u1')).toEqual({ general: 4 });
    expect(q.seen('u2')).toEqual({});
    q.clearSession();
    expect(q.token()).toBeNull();
  });

  it('survives corrupt values and a missing storage', () => {
    const s = memoryStorage();
    s.setItem('scalable-chat.rooms', '{not json');
    s.setItem('scalable-chat.user', '"str"');
    const p = createPrefs(s);
    expect(p.rooms()).toEqual([]);
    expect(p.user()).toBeNull();
    const none = createPrefs(undefined);
    expect(none.token()).toBeNull();
    none.setRooms(['x']);
  });
});
