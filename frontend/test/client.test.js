import { describe, it, expect, beforeEach, afterEach, vi } from 'vitest';
import { ChatClient, ACK_TIMEOUT_MS, TYPING_SEND_MS } from '../src/lib/client.js';
import { createPrefs } from '../src/lib/prefs.js';
import { ApiError } from '../src/lib/api.js';

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.sent = [];
    this.closed = false;
    FakeSocket.all.push(this);
  }
  send(data) {
    if (this.closed) throw new Error('closed');
    this.sent.push(JSON.parse(data));
  }
  close() {
    this.closed = true;
  }
  // test side
  frame(f) {
    this.onmessage?.({ data: JSON.stringify(f) });
  }
  drop() {
    this.closed = true;
    this.onclose?.({ code: 1006 });
  }
  ops(op) {
    return this.sent.filter((f) => f.op === op);
  }
  static last() {
    return FakeSocket.all[FakeSocket.all.length - 1];
  }
}

function memoryStorage() {
  const m = new Map();
  return { getItem: (k) => (m.has(k) ? m.get(k) : null), setItem: (k, v) => m.set(k, String(v)), removeItem: (k) => m.delete(k) };
}

const alice = { id: 'u-alice', name: 'alice' };
const bob = { id: 'u-bob', name: 'bob' };

function setup({ meStatus = 200, rooms = [] } = {}) {
  FakeSocket.all = [];
  const storage = memoryStorage();
  const prefs = createPrefs(storage);
  let cidN = 0;
  const api = {
    me: vi.fn(async () => {
      if (meStatus === 200) return { user: alice };
      throw new ApiError(meStatus, meStatus === 0 ? 'network' : 'unauthorized', 'no');
    }),
    guest: vi.fn(async (name) => ({ token: 'tok', user: { id: 'u-alice', name } })),
    rooms: vi.fn(async () => ({ rooms })),
  };
  const client = new ChatClient({
    api,
    prefs,
    WebSocketImpl: FakeSocket,
    wsUrl: (t) => `ws://node/ws?token=${t}`,
    random: () => 0.5,
    newCid: () => `cid-${++cidN}`,
  });
  return { client, api, prefs, storage, setMeStatus: (s) => (meStatus = s) };
}

async function signedIn(opts) {
  const ctx = setup(opts);
  await ctx.client.signIn('alice');
  const ws = FakeSocket.last();
  ws.frame({ op: 'welcome', user: alice, node: 'n1', session: 's1', protocol: 1 });
  return { ...ctx, ws };
}

const m = (seq, user = bob, extra = {}) => ({ op: 'msg', room: 'general', seq, id: `m${seq}`, user, text: `t${seq}`, ts: seq, ...extra });

beforeEach(() => {
  vi.useFakeTimers();
});
afterEach(() => {
  vi.useRealTimers();
});

describe('ChatClient', () => {
  it('signs in, connects with the token and joins the default room, then loads its history', async () => {
    const { client, ws } = await signedIn();
    expect(ws.url).toBe('ws://node/ws?token=tok');
    expect(ws.ops('join')).toEqual([{ op: 'join', room: 'general' }]);
    ws.frame({ op: 'joined', room: 'general', last_seq: 2, members: [alice] });
    expect(ws.ops('history')).toEqual([{ op: 'history', room: 'general', limit: 50 }]);
    ws.frame({ op: 'history', room: 'general', messages: [m(1), m(2)].map(({ op, ...x }) => x), has_more: false });
    const s = client.getState();
    expect(s.conn.status).toBe('connected');
    expect(s.rooms[0].messages.map((x) => x.seq)).toEqual([1, 2]);
    expect(s.rooms[0].members).toEqual([alice]);
  });

  it('shows a sent message as pending, then sent on ack', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'joined', room: 'general', last_seq: 0, members: [alice] });
    const cid = client.sendMessage('general', 'hello');
    expect(ws.ops('send')).toEqual([{ op: 'send', room: 'general', text: 'hello', cid }]);
    expect(client.getState().rooms[0].pending).toMatchObject([{ cid, status: 'pending' }]);
    ws.frame({ op: 'ack', cid, room: 'general', seq: 1, id: 'm1' });
    ws.frame(m(1, alice, { text: 'hello', cid }));
    const r = client.getState().rooms[0];
    expect(r.pending).toEqual([]);
    expect(r.messages).toHaveLength(1);
  });

  it('an error with the cid as ref fails that message; retry re-sends the same cid', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'joined', room: 'general', last_seq: 0, members: [] });
    const cid = client.sendMessage('general', 'hi');
    ws.frame({ op: 'error', code: 'unavailable', message: 'store down', ref: cid });
    expect(client.getState().rooms[0].pending[0]).toMatchObject({ status: 'failed', error: { code: 'unavailable' } });
    client.retry('general', cid);
    expect(ws.ops('send').map((f) => f.cid)).toEqual([cid, cid]);
    expect(client.getState().rooms[0].pending[0].status).toBe('pending');
  });

  it('a too-long message is refused in words', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'joined', room: 'general', last_seq: 0, members: [] });
    const cid = client.sendMessage('general', 'x'.repeat(4001));
    ws.frame({ op: 'error', code: 'too_large', message: 'text is longer than 4000 characters', ref: cid });
    const p = client.getState().rooms[0].pending[0];
    expect(p.status).toBe('failed');
    expect(p.error.text).toMatch(/4000/);
    expect(p.error.label).toMatch(/too long/);
    expect(p.error.retryable).toBe(false);
  });

  it('times out a message that gets no ack', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'joined', room: 'general', last_seq: 0, members: [] });
    client.sendMessage('general', 'hi');
    vi.advanceTimersByTime(ACK_TIMEOUT_MS + 1000);
    expect(client.getState().rooms[0].pending[0]).toMatchObject({ status: 'failed', error: { code: 'timeout' } });
  });

  it('errors without a message to attach to become notices', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'error', code: 'rate_limited', message: 'slow down', ref: 'typing' });
    expect(client.getState().notices.map((n) => n.text)).toEqual([expect.stringMatching(/too fast/)]);
    vi.advanceTimersByTime(11000);
    expect(client.getState().notices).toEqual([]);
  });

  it('reconnects with backoff and resumes each room from the last seq held, without duplicates', async () => {
    const { client, ws } = await signedIn();
    client.openRoom('rust');
    ws.frame({ op: 'joined', room: 'general', last_seq: 2, members: [] });
    ws.frame({ op: 'history', room: 'general', messages: [m(1), m(2)], has_more: false });
    ws.frame({ op: 'joined', room: 'rust', last_seq: 0, members: [] });
    ws.frame({ op: 'history', room: 'rust', messages: [], has_more: false });
    ws.frame(m(3));

    ws.drop();
    expect(client.getState().conn.status).toBe('reconnecting');
    expect(FakeSocket.all).toHaveLength(1);
    vi.advanceTimersByTime(1000);
    expect(FakeSocket.all).toHaveLength(2);
    const ws2 = FakeSocket.last();
    ws2.frame({ op: 'welcome', user: alice, node: 'n1', session: 's2', protocol: 1 });
    expect(ws2.ops('join')).toEqual([
      { op: 'join', room: 'general', since: 3 },
      { op: 'join', room: 'rust', since: 0 },
    ]);
    // The replay, overlapping what we hold.
    ws2.frame(m(3));
    ws2.frame(m(4));
    ws2.frame(m(6));
    ws2.frame({ op: 'joined', room: 'general', last_seq: 6, members: [] });
    expect(ws2.ops('history')).toEqual([]);
    const r = client.getState().rooms.find((x) => x.name === 'general');
    expect(r.messages.map((x) => x.seq)).toEqual([1, 2, 3, 4, 6]);
    expect(client.getState().conn.status).toBe('connected');
  });

  it('messages in flight or written while disconnected are sent after the rejoin', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'joined', room: 'general', last_seq: 0, members: [] });
    ws.frame({ op: 'history', room: 'general', messages: [], has_more: false });
    const c1 = client.sendMessage('general', 'in flight');
    ws.drop();
    const c2 = client.sendMessage('general', 'written offline');
    expect(client.getState().rooms[0].pending.map((p) => p.status)).toEqual(['queued', 'queued']);
    vi.advanceTimersByTime(1000);
    const ws2 = FakeSocket.last();
    ws2.frame({ op: 'welcome', user: alice, node: 'n1', session: 's2', protocol: 1 });
    // The first attempt had got through: the replay shows it.
    ws2.frame(m(1, alice, { text: 'in flight', cid: c1 }));
    ws2.frame({ op: 'joined', room: 'general', last_seq: 1, members: [] });
    expect(ws2.ops('send')).toEqual([{ op: 'send', room: 'general', text: 'written offline', cid: c2 }]);
  });

  it('backs off exponentially while the node stays down and says offline after a while', async () => {
    const { client, ws } = await signedIn();
    const delays = [];
    ws.drop();
    for (let i = 0; i < 6; i += 1) {
      const before = Date.now();
      const n = FakeSocket.all.length;
      while (FakeSocket.all.length === n) await vi.advanceTimersByTimeAsync(50);
      delays.push(Date.now() - before);
      // Refused before welcome: the client checks the token, then backs off again.
      client.api.me.mockImplementationOnce(async () => {
        throw new ApiError(0, 'network', 'down');
      });
      FakeSocket.last().drop();
      await vi.advanceTimersByTimeAsync(0);
    }
    for (let i = 1; i < delays.length; i += 1) expect(delays[i]).toBeGreaterThanOrEqual(delays[i - 1]);
    expect(delays[5]).toBeGreaterThan(delays[0] * 8);
    expect(client.getState().conn.status).toBe('offline');
  });

  it('signs out when the socket closes before welcome and the token is refused', async () => {
    const ctx = setup();
    await ctx.client.signIn('alice');
    ctx.setMeStatus(401);
    FakeSocket.last().drop();
    await vi.advanceTimersByTimeAsync(0);
    const s = ctx.client.getState();
    expect(s.phase).toBe('signed-out');
    expect(s.signInError).toMatch(/expired/);
    expect(ctx.prefs.token()).toBeNull();
  });

  it('checks a stored token at start-up', async () => {
    const ctx = setup({ meStatus: 401 });
    ctx.prefs.setSession('old', alice);
    await ctx.client.resume();
    expect(ctx.client.getState().phase).toBe('signed-out');
    expect(FakeSocket.all).toHaveLength(0);

    const ok = setup();
    ok.prefs.setSession('good', alice);
    ok.prefs.setRooms(['rust', 'general']);
    ok.prefs.setActive('general');
    await ok.client.resume();
    const s = ok.client.getState();
    expect(s.phase).toBe('ready');
    expect(s.active).toBe('general');
    expect(s.rooms.map((r) => r.name)).toEqual(['rust', 'general']);
    expect(FakeSocket.last().url).toMatch(/token=good/);
  });

  it('sends typing at most every few seconds per room', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'joined', room: 'general', last_seq: 0, members: [] });
    client.typing('general');
    vi.advanceTimersByTime(1000);
    client.typing('general');
    vi.advanceTimersByTime(TYPING_SEND_MS);
    client.typing('general');
    expect(ws.ops('typing')).toHaveLength(2);
  });

  it('shows who else is typing', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'joined', room: 'general', last_seq: 0, members: [] });
    ws.frame({ op: 'typing', room: 'general', user: bob });
    expect(client.getState().rooms[0].typing).toEqual(['bob']);
    vi.advanceTimersByTime(6000);
    expect(client.getState().rooms[0].typing).toEqual([]);
  });

  it('loads older pages on request, one at a time', async () => {
    const { client, ws } = await signedIn();
    ws.frame({ op: 'joined', room: 'general', last_seq: 100, members: [] });
    ws.frame({ op: 'history', room: 'general', messages: [m(99), m(100)], has_more: true });
    expect(client.loadOlder('general')).toBe(true);
    expect(client.loadOlder('general')).toBe(false);
    expect(ws.ops('history').at(-1)).toEqual({ op: 'history', room: 'general', before: 99, limit: 50 });
    ws.frame({ op: 'history', room: 'general', messages: [m(97), m(98)], has_more: false });
    expect(client.getState().rooms[0].messages.map((x) => x.seq)).toEqual([97, 98, 99, 100]);
    expect(client.loadOlder('general')).toBe(false);
  });

  it('counts unread messages in rooms that are not active and remembers what was seen', async () => {
    const { client, ws, prefs } = await signedIn({ rooms: [{ name: 'random', members: 3, last_seq: 40 }] });
    await vi.advanceTimersByTimeAsync(0);
    client.openRoom('rust');
    ws.frame({ op: 'joined', room: 'general', last_seq: 0, members: [] });
    ws.frame({ op: 'history', room: 'general', messages: [], has_more: false });
    client.markSeen('general');
    ws.frame(m(1));
    ws.frame(m(2));
    let s = client.getState();
    expect(s.active).toBe('rust');
    expect(s.rooms.find((r) => r.name === 'general').unread).toBe(2);
    expect(s.totalUnread).toBe(2);
    expect(s.directory).toEqual([{ name: 'random', members: 3, last_seq: 40, unread: 0 }]);
    client.setActive('general');
    client.markSeen('general');
    s = client.getState();
    expect(s.rooms.find((r) => r.name === 'general').unread).toBe(0);
    expect(prefs.seen('u-alice')).toEqual({ general: 2 });
  });

  it('leaves a room and keeps the others', async () => {
    const { client, ws, prefs } = await signedIn();
    client.openRoom('rust');
    client.closeRoom('rust');
    expect(ws.ops('leave')).toEqual([{ op: 'leave', room: 'rust' }]);
    expect(client.getState().active).toBe('general');
    expect(prefs.rooms()).toEqual(['general']);
  });

  it('reconnects when the connection goes silent', async () => {
    const { ws } = await signedIn();
    vi.advanceTimersByTime(20000);
    expect(ws.ops('ping')).toHaveLength(1);
    vi.advanceTimersByTime(40000);
    expect(ws.closed).toBe(true);
    vi.advanceTimersByTime(1000);
    expect(FakeSocket.all.length).toBeGreaterThan(1);
  });
});

describe('ChatClient start-up details', () => {
  it('opens the room named in the address, and makes it active', async () => {
    const ctx = setup();
    ctx.client.initialRoom = () => 'rust';
    await ctx.client.signIn('alice');
    const s = ctx.client.getState();
    expect(s.rooms.map((r) => r.name)).toEqual(['rust']);
    expect(s.active).toBe('rust');
  });

  it('adds the room named in the address to the rooms already open', async () => {
    const ctx = setup();
    ctx.prefs.setRooms(['general']);
    ctx.client.initialRoom = () => 'rust';
    await ctx.client.signIn('alice');
    expect(ctx.client.getState().rooms.map((r) => r.name)).toEqual(['general', 'rust']);
  });

  it('does not mark a room seen before its messages are loaded', async () => {
    const { client, ws } = await signedIn();
    client.markSeen('general');
    ws.frame({ op: 'joined', room: 'general', last_seq: 3, members: [] });
    ws.frame({ op: 'history', room: 'general', messages: [m(1), m(2), m(3)], has_more: false });
    expect(client.getState().rooms[0].seen).toBeNull();
    client.markSeen('general');
    expect(client.getState().rooms[0].seen).toBe(3);
  });
});
