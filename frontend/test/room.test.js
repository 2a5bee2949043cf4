import { describe, it, expect } from 'vitest';
import {
  createRoom,
  mergeMessages,
  receiveMessage,
  receiveHistory,
  resumeSince,
  olderHistoryRequest,
  addPending,
  ackPending,
  failPending,
  retryPending,
  requeuePending,
  takeQueued,
  expirePending,
  setMembers,
  applyPresence,
  noteTyping,
  expireTyping,
  typingNames,
  typingText,
  unreadInRoom,
  unreadFromDirectory,
  seenUpTo,
  TYPING_SHOW_MS,
} from '../src/lib/room.js';

const alice = { id: 'u-alice', name: 'alice' };
const bob = { id: 'u-bob', name: 'bob' };
const msg = (seq, user = bob, extra = {}) => ({ id: `m${seq}`, seq, user, text: `text ${seq}`, ts: 1000 + seq, ...extra });

describe('ordering and de-duplication', () => {
  it('keeps messages in seq order whatever order they arrive in', () => {
    const r = createRoom('general');
    mergeMessages(r, [msg(5), msg(2)]);
    mergeMessages(r, [msg(9), msg(1), msg(7)]);
    expect(r.messages.map((m) => m.seq)).toEqual([1, 2, 5, 7, 9]);
  });

  it('holds each id once, across replays and history overlap', () => {
    const r = createRoom('general');
    expect(mergeMessages(r, [msg(1), msg(2), msg(3)])).toBe(3);
    expect(mergeMessages(r, [msg(2), msg(3), msg(4)])).toBe(1);
    expect(receiveMessage(r, msg(4), alice.id)).toBe(false);
    expect(r.messages.map((m) => m.id)).toEqual(['m1', 'm2', 'm3', 'm4']);
  });

  it('does not replace the array when nothing changed', () => {
    const r = createRoom('general');
    mergeMessages(r, [msg(1)]);
    const before = r.messages;
    mergeMessages(r, [msg(1)]);
    expect(r.messages).toBe(before);
  });

  it('ignores malformed entries', () => {
    const r = createRoom('general');
    mergeMessages(r, [null, { seq: 3 }, { id: 'x', seq: 'abc' }, msg(1)]);
    expect(r.messages.map((m) => m.seq)).toEqual([1]);
  });

  it('tolerates gaps in seq', () => {
    const r = createRoom('general');
    receiveMessage(r, msg(1), alice.id);
    receiveMessage(r, msg(4), alice.id);
    expect(r.lastSeq).toBe(4);
    expect(r.messages.map((m) => m.seq)).toEqual([1, 4]);
  });
});

describe('resume bookkeeping', () => {
  it('joins plainly until the first page of history is loaded', () => {
    const r = createRoom('general');
    expect(resumeSince(r)).toBeUndefined();
    receiveHistory(r, [msg(8), msg(9)], true, 'latest', alice.id);
    expect(resumeSince(r)).toBe(9);
  });

  it('resumes from 0 for a room that was empty when loaded', () => {
    const r = createRoom('general');
    receiveHistory(r, [], false, 'latest', alice.id);
    expect(resumeSince(r)).toBe(0);
  });

  it('advances with live messages and replay, not with older history', () => {
    const r = createRoom('general');
    receiveHistory(r, [msg(50)], true, 'latest', alice.id);
    receiveMessage(r, msg(51), alice.id);
    receiveHistory(r, [msg(10), msg(11)], true, 'older', alice.id);
    expect(r.lastSeq).toBe(51);
    expect(resumeSince(r)).toBe(51);
  });

  it('does not advance on an ack, which may overtake lower seqs still in flight', () => {
    const r = createRoom('general');
    receiveHistory(r, [msg(3)], false, 'latest', alice.id);
    addPending(r, { cid: 'c1', text: 'hi', now: 1, online: true, timeoutMs: 10 });
    ackPending(r, { cid: 'c1', room: 'general', seq: 5, id: 'm5' }, alice);
    expect(r.lastSeq).toBe(3);
    expect(resumeSince(r)).toBe(3);
    // The missing seq 4 and the own message 5 then arrive in order.
    receiveMessage(r, msg(4), alice.id);
    receiveMessage(r, msg(5, alice, { text: 'hi', cid: 'c1' }), alice.id);
    expect(r.lastSeq).toBe(5);
    expect(r.messages.map((m) => m.seq)).toEqual([3, 4, 5]);
  });

  it('a reconnect replay adds exactly the missing messages', () => {
    const r = createRoom('general');
    receiveHistory(r, [msg(1), msg(2), msg(3)], false, 'latest', alice.id);
    const since = resumeSince(r);
    const stored = [1, 2, 3, 4, 5, 6].map((s) => msg(s));
    for (const m of stored.filter((m) => m.seq > since)) receiveMessage(r, m, alice.id);
    // A second replay from an older point (say another tab's state) adds nothing.
    for (const m of stored) receiveMessage(r, m, alice.id);
    expect(r.messages.map((m) => m.seq)).toEqual([1, 2, 3, 4, 5, 6]);
  });
});

describe('scroll-back', () => {
  it('asks for the page before the oldest message', () => {
    const r = createRoom('general');
    r.joined = true;
    receiveHistory(r, [msg(51), msg(52)], true, 'latest', alice.id);
    expect(olderHistoryRequest(r, 50)).toEqual({ op: 'history', room: 'general', before: 51, limit: 50 });
  });

  it('asks nothing while a request is in flight, when nothing is older, or when not joined', () => {
    const r = createRoom('general');
    r.joined = true;
    receiveHistory(r, [msg(51)], true, 'latest', alice.id);
    r.historyRequest = 'older';
    expect(olderHistoryRequest(r)).toBeNull();
    receiveHistory(r, [msg(1)], false, 'older', alice.id);
    expect(r.historyRequest).toBeNull();
    expect(olderHistoryRequest(r)).toBeNull();
    r.hasMore = true;
    r.joined = false;
    expect(olderHistoryRequest(r)).toBeNull();
  });
});

describe('own messages: pending → sent → failed', () => {
  it('shows at once as pending and turns to sent on ack', () => {
    const r = createRoom('general');
    addPending(r, { cid: 'c1', text: 'hello', now: 100, online: true, timeoutMs: 10000 });
    expect(r.pending).toMatchObject([{ cid: 'c1', status: 'pending', deadline: 10100 }]);
    expect(ackPending(r, { cid: 'c1', seq: 7, id: 'm7' }, alice)).toBe(true);
    expect(r.pending).toEqual([]);
    expect(r.messages).toMatchObject([{ id: 'm7', seq: 7, text: 'hello', user: alice, cid: 'c1' }]);
  });

  it('the msg echo after the ack replaces the provisional copy, without a duplicate', () => {
    const r = createRoom('general');
    addPending(r, { cid: 'c1', text: 'hello', now: 100, online: true, timeoutMs: 10000 });
    ackPending(r, { cid: 'c1', seq: 7, id: 'm7' }, alice);
    receiveMessage(r, { id: 'm7', seq: 7, user: alice, text: 'hello', ts: 555, cid: 'c1' }, alice.id);
    expect(r.messages).toHaveLength(1);
    expect(r.messages[0].ts).toBe(555);
    expect(r.messages[0].provisional).toBeUndefined();
  });

  it('the msg echo before the ack resolves the pending message too', () => {
    const r = createRoom('general');
    addPending(r, { cid: 'c1', text: 'hello', now: 100, online: true, timeoutMs: 10000 });
    receiveMessage(r, { id: 'm7', seq: 7, user: alice, text: 'hello', ts: 555, cid: 'c1' }, alice.id);
    expect(r.pending).toEqual([]);
    ackPending(r, { cid: 'c1', seq: 7, id: 'm7' }, alice);
    expect(r.messages).toHaveLength(1);
  });

  it("another user's message with the same cid does not resolve mine", () => {
    const r = createRoom('general');
    addPending(r, { cid: 'c1', text: 'hello', now: 100, online: true, timeoutMs: 10000 });
    receiveMessage(r, msg(3, bob, { cid: 'c1' }), alice.id);
    expect(r.pending).toHaveLength(1);
  });

  it('fails on an error and goes back to pending on retry, with the same cid', () => {
    const r = createRoom('general');
    addPending(r, { cid: 'c1', text: 'hello', now: 100, online: true, timeoutMs: 10000 });
    failPending(r, 'c1', { code: 'unavailable', text: 'x', retryable: true });
    expect(r.pending[0]).toMatchObject({ cid: 'c1', status: 'failed', error: { code: 'unavailable' } });
    retryPending(r, 'c1', { now: 200, online: true, timeoutMs: 10000 });
    expect(r.pending[0]).toMatchObject({ cid: 'c1', status: 'pending', deadline: 10200 });
    expect(r.pending[0].error).toBeUndefined();
  });

  it('times out when no ack comes', () => {
    const r = createRoom('general');
    addPending(r, { cid: 'c1', text: 'a', now: 0, online: true, timeoutMs: 1000 });
    addPending(r, { cid: 'c2', text: 'b', now: 500, online: true, timeoutMs: 1000 });
    expect(expirePending(r, 999, { code: 'timeout' })).toEqual([]);
    expect(expirePending(r, 1000, { code: 'timeout' })).toEqual(['c1']);
    expect(r.pending.map((p) => p.status)).toEqual(['failed', 'pending']);
  });

  it('queues while offline and puts queued and in-flight messages back on the wire after a rejoin', () => {
    const r = createRoom('general');
    addPending(r, { cid: 'c1', text: 'a', now: 0, online: true, timeoutMs: 1000 });
    addPending(r, { cid: 'c2', text: 'b', now: 0, online: false, timeoutMs: 1000 });
    addPending(r, { cid: 'c3', text: 'c', now: 0, online: true, timeoutMs: 1000 });
    failPending(r, 'c3', { code: 'too_large' });
    requeuePending(r);
    expect(r.pending.map((p) => p.status)).toEqual(['queued', 'queued', 'failed']);
    const out = takeQueued(r, { now: 50, timeoutMs: 1000 });
    expect(out.map((p) => p.cid)).toEqual(['c1', 'c2']);
    expect(r.pending.map((p) => p.status)).toEqual(['pending', 'pending', 'failed']);
    // A queued message never times out while waiting for the connection.
    requeuePending(r);
    expect(expirePending(r, 1e9, { code: 'timeout' })).toEqual([]);
  });

  it('a failed message found in a replay counts as sent', () => {
    const r = createRoom('general');
    addPending(r, { cid: 'c1', text: 'a', now: 0, online: true, timeoutMs: 1000 });
    failPending(r, 'c1', { code: 'timeout' });
    receiveMessage(r, msg(3, alice, { cid: 'c1' }), alice.id);
    expect(r.pending).toEqual([]);
    expect(r.messages).toHaveLength(1);
  });
});

describe('presence and typing', () => {
  it('tracks members from joined and presence frames', () => {
    const r = createRoom('general');
    setMembers(r, [bob, alice, bob]);
    expect(r.members.map((u) => u.name)).toEqual(['alice', 'bob']);
    applyPresence(r, [{ id: 'u-carol', name: 'carol' }], [bob]);
    expect(r.members.map((u) => u.name)).toEqual(['alice', 'carol']);
  });

  it('shows typing for a few seconds after the last typing frame, never for oneself', () => {
    const r = createRoom('general');
    noteTyping(r, bob, 0, alice.id);
    noteTyping(r, alice, 0, alice.id);
    expect(typingNames(r, 1000)).toEqual(['bob']);
    noteTyping(r, bob, 3000, alice.id);
    expect(typingNames(r, 3000 + TYPING_SHOW_MS - 1)).toEqual(['bob']);
    expect(expireTyping(r, 3000 + TYPING_SHOW_MS)).toBe(true);
    expect(typingNames(r, 3000 + TYPING_SHOW_MS)).toEqual([]);
  });

  it("a message from a typing user ends the typing notice", () => {
    const r = createRoom('general');
    noteTyping(r, bob, 0, alice.id);
    receiveMessage(r, msg(1, bob), alice.id);
    expect(typingNames(r, 1)).toEqual([]);
  });

  it('words the typing line', () => {
    expect(typingText([])).toBe('');
    expect(typingText(['alice'])).toBe('alice is typing…');
    expect(typingText(['alice', 'bob'])).toBe('alice and bob are typing…');
    expect(typingText(['a', 'b', 'c'])).toBe('a, b and c are typing…');
    expect(typingText(['a', 'b', 'c', 'd', 'e'])).toBe('a, b and 3 others are typing…');
  });
});

describe('unread counts', () => {
  it("counts others' messages after the last seen seq", () => {
    const r = createRoom('general');
    receiveHistory(r, [msg(1), msg(2, alice), msg(3), msg(4)], false, 'latest', alice.id);
    expect(unreadInRoom(r, 1, alice.id)).toBe(2);
    expect(unreadInRoom(r, 4, alice.id)).toBe(0);
    expect(unreadInRoom(r, null, alice.id)).toBe(0);
  });

  it('counts what the node has beyond what is loaded', () => {
    const r = createRoom('general');
    r.serverLastSeq = 12;
    expect(unreadInRoom(r, 10, alice.id)).toBe(2);
  });

  it('estimates rooms that are not open from their last seq', () => {
    expect(unreadFromDirectory(20, 15)).toBe(5);
    expect(unreadFromDirectory(20, 25)).toBe(0);
    expect(unreadFromDirectory(20, undefined)).toBe(0);
  });

  it('marks seen up to the newest message held', () => {
    const r = createRoom('general');
    receiveHistory(r, [msg(3)], false, 'latest', alice.id);
    addPending(r, { cid: 'c', text: 'x', now: 0, online: true, timeoutMs: 1 });
    ackPending(r, { cid: 'c', seq: 9, id: 'm9' }, alice);
    expect(seenUpTo(r)).toBe(9);
  });
});
