// End-to-end: the built web client in real Chromium against the real node.

import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  Node,
  launchBrowser,
  newPage,
  signIn,
  connected,
  send,
  messageList,
  messageItems,
  messageBox,
  shownTexts,
  shownSeqs,
  screenshotPath,
  until,
} from './harness.js';

const T = { timeout: 90000 };

function assertStrictlyIncreasing(seqs, what) {
  for (let i = 1; i < seqs.length; i += 1) {
    assert.ok(seqs[i] > seqs[i - 1], `${what}: seq ${seqs[i]} after ${seqs[i - 1]} (duplicate or out of order)`);
  }
}

function countOf(texts, text) {
  return texts.filter((t) => t === text).length;
}

async function openRoom(page, name) {
  const field = page.getByRole('textbox', { name: 'Room', exact: true });
  if (!(await field.isVisible())) await page.getByRole('button', { name: 'Rooms', exact: true }).click();
  await field.fill(name);
  await field.press('Enter');
  await page.getByRole('heading', { level: 1, name, exact: true }).waitFor();
  await page.locator('[data-status="connected"]').first().waitFor();
  // Joined and its latest page loaded.
  await page.locator('ul[aria-label="Messages"][aria-busy="false"]').waitFor({ state: 'attached' });
}

describe('web client against a real node', () => {
  let node;
  let browser;
  const opened = [];

  async function page(opts) {
    const p = await newPage(browser, opts);
    opened.push(p);
    return p;
  }

  before(async () => {
    node = await (await new Node().init()).start();
    browser = await launchBrowser();
  });

  after(async () => {
    for (const p of opened) {
      assert.deepEqual(p.page.errors, [], 'no uncaught errors in the page');
    }
    await browser?.close();
    if (node) await node.cleanup();
  });

  it('two users chat in real time, with presence, typing and unread counts', T, async () => {
    const a = await page();
    const b = await page();
    await signIn(a.page, node.url, 'alice');
    await signIn(b.page, node.url, 'bob');
    await a.page.getByRole('heading', { level: 1, name: 'general', exact: true }).waitFor();

    // Presence: each sees the other online.
    await b.page.getByRole('complementary', { name: /Online/ }).getByText('alice', { exact: true }).waitFor();
    await a.page.getByRole('complementary', { name: /Online/ }).getByText('bob', { exact: true }).waitFor();

    await send(a.page, 'Hello from alice');
    await a.page.locator('li[data-status="sent"]', { hasText: 'Hello from alice' }).waitFor();
    await messageList(b.page).getByText('Hello from alice').waitFor();

    // Typing indicator, then the message ends it.
    await messageBox(b.page).pressSequentially('Hi alice', { delay: 20 });
    await a.page.getByText('bob is typing…').waitFor();
    // Shift+Enter is a new line, Enter sends.
    await messageBox(b.page).press('Shift+Enter');
    await messageBox(b.page).pressSequentially('second line');
    await messageBox(b.page).press('Enter');
    await messageList(a.page).getByText('second line').waitFor();
    const last = (await shownTexts(a.page)).at(-1);
    assert.equal(last, 'Hi alice\nsecond line');
    await a.page.getByText('bob is typing…').waitFor({ state: 'hidden' });

    // Alice switches room; bob writes in general: an unread badge appears.
    await openRoom(a.page, 'side');
    await send(b.page, 'Are you there?');
    await a.page.getByRole('button', { name: /general.*1 unread/ }).waitFor();
    await a.page.waitForFunction(() => document.title.startsWith('(1)'));

    // Back to general: its state is intact, the badge is gone.
    await a.page.getByRole('button', { name: /^general/ }).click();
    await messageList(a.page).getByText('Are you there?').waitFor();
    const texts = await shownTexts(a.page);
    assert.equal(countOf(texts, 'Hello from alice'), 1);
    assert.equal(countOf(texts, 'Are you there?'), 1);
    await a.page.getByRole('button', { name: /general.*unread/ }).waitFor({ state: 'detached' });

    await a.page.screenshot({ path: screenshotPath('desktop-realtime.png') });
  });

  it('a reload keeps the session, the open rooms and the history', T, async () => {
    const a = opened[0];
    const before = await shownTexts(a.page);
    await a.page.reload();
    await connected(a.page);
    await a.page.getByRole('heading', { level: 1, name: 'general', exact: true }).waitFor();
    await messageList(a.page).getByText('Are you there?').waitFor();
    assert.deepEqual(await shownTexts(a.page), before);
    await a.page.getByRole('button', { name: /^side/ }).waitFor();
    assertStrictlyIncreasing(await shownSeqs(a.page), 'after reload');
  });

  it('recovers every message sent while the node restarted, without duplicates', T, async () => {
    const a = await page();
    const b = await page();
    await signIn(a.page, node.url, 'ana');
    await signIn(b.page, node.url, 'ben');
    await openRoom(a.page, 'restart');
    await openRoom(b.page, 'restart');
    await send(a.page, 'before 1');
    await send(b.page, 'before 2');
    await messageList(a.page).getByText('before 2').waitFor();
    await messageList(b.page).getByText('before 1').waitFor();

    // Ana loses her network; then the node crashes.
    await a.context.setOffline(true);
    await node.stop('SIGKILL');
    await a.page.locator('[data-status="reconnecting"], [data-status="offline"]').first().waitFor();
    await b.page.locator('[data-status="reconnecting"], [data-status="offline"]').first().waitFor();

    // Written while disconnected: waits, then goes out once.
    await send(a.page, 'written offline');
    await a.page.locator('li[data-status="queued"]', { hasText: 'written offline' }).waitFor();

    // The node comes back; Ben reconnects on his own and writes; a bot posts over REST.
    await node.start();
    await connected(b.page, 45000);
    const during = ['during 1', 'during 2', 'during 3'];
    for (const t of during) await send(b.page, t);
    const bot = await node.guest('restbot');
    await node.post(bot.token, 'restart', 'during rest', 'rest-cid-1');
    await node.post(bot.token, 'restart', 'during rest', 'rest-cid-1'); // a retry: no second message
    await b.page.locator('li[data-status="sent"]', { hasText: 'during 3' }).waitFor();
    await messageList(b.page).getByText('during rest').waitFor();

    // Ana was away the whole time.
    assert.equal(await a.page.locator('[data-status="connected"]').count(), 0, 'ana is still disconnected');
    await a.context.setOffline(false);
    await connected(a.page, 45000);

    const expected = ['before 1', 'before 2', 'written offline', ...during, 'during rest'];
    await until(
      async () => {
        const texts = await shownTexts(a.page);
        return expected.every((t) => texts.includes(t));
      },
      { timeout: 20000, what: 'ana to catch up' },
    );
    await a.page.locator('li[data-status="sent"]', { hasText: 'written offline' }).waitFor();
    await messageList(b.page).getByText('written offline').waitFor();

    for (const p of [a.page, b.page]) {
      const texts = await shownTexts(p);
      for (const t of expected) assert.equal(countOf(texts, t), 1, `"${t}" shown once`);
      assertStrictlyIncreasing(await shownSeqs(p), 'after restart');
    }
    // Both see the same conversation in the same order.
    assert.deepEqual(await shownSeqs(a.page), await shownSeqs(b.page));
  });

  it('an over-long message is refused with an error in words', T, async () => {
    const { page: p } = await page();
    await signIn(p, node.url, 'verbose');
    await openRoom(p, 'limits');
    const long = 'x'.repeat(4001);
    await messageBox(p).fill(long);
    await p.getByText('4001 / 4000').waitFor();
    await messageBox(p).press('Enter');
    const failed = p.locator('li[data-status="failed"]');
    await failed.waitFor();
    await failed.getByText(/too long/i).first().waitFor();
    await failed.getByText(/4000/).first().waitFor();
    await p.screenshot({ path: screenshotPath('desktop-too-long.png') });
    // Retry is not offered for this one; Edit puts the text back.
    assert.equal(await failed.getByRole('button', { name: 'Retry' }).count(), 0);
    await failed.getByRole('button', { name: 'Edit' }).click();
    assert.equal((await messageBox(p).inputValue()).length, 4001);
  });

  it('scroll-back loads older pages; jump to latest returns', T, async () => {
    const N = 130;
    const bots = await Promise.all([0, 1, 2, 3].map((i) => node.guest(`bot${i}`)));
    for (let i = 0; i < N; i += 1) {
      const bot = bots[i % bots.length];
      for (let tries = 0; ; tries += 1) {
        try {
          await node.post(bot.token, 'archive', `archived ${i + 1}`, `arch-${i}`);
          break;
        } catch (e) {
          if (tries > 20) throw e;
          await new Promise((r) => setTimeout(r, 250));
        }
      }
    }
    const { page: p } = await page({ width: 1280, height: 700 });
    await signIn(p, node.url, 'reader');
    await openRoom(p, 'archive');
    await messageList(p).getByText(`archived ${N}`, { exact: true }).waitFor();
    const firstPage = (await shownSeqs(p)).length;
    assert.ok(firstPage < N, `loads a page, not everything (${firstPage})`);

    const scroller = p.locator('.scroller');
    await until(
      async () => {
        await scroller.evaluate((el) => el.scrollTo(0, 0));
        return p.getByText('this is the start of the room').isVisible();
      },
      { timeout: 30000, interval: 300, what: 'the start of the room' },
    );
    const seqs = await shownSeqs(p);
    assert.equal(seqs.length, N);
    assertStrictlyIncreasing(seqs, 'scroll-back');
    const texts = await shownTexts(p);
    assert.equal(texts[0], 'archived 1');

    const jump = p.getByRole('button', { name: /Jump to latest/ });
    await jump.waitFor();
    await jump.click();
    await jump.waitFor({ state: 'detached' });
    await messageList(p).getByText(`archived ${N}`, { exact: true }).waitFor();
  });

  it('a refused token signs the user out', T, async () => {
    const { page: p } = await page();
    await p.goto(node.url);
    await p.evaluate(() => {
      localStorage.setItem('scalable-chat.token', JSON.stringify('forged.token.value'));
      localStorage.setItem('scalable-chat.user', JSON.stringify({ id: 'nobody', name: 'nobody' }));
    });
    await p.reload();
    await p.getByLabel('Name', { exact: true }).waitFor();
    await p.getByText(/expired/).waitFor();
    assert.equal(await p.evaluate(() => localStorage.getItem('scalable-chat.token')), null);
  });

  it('works by keyboard and at phone width; screenshots', T, async () => {
    // Some conversation to show.
    const bob = await node.guest('bob');
    const carol = await node.guest('carol');
    const lines = [
      [bob, 'Morning! Did the release go out?'],
      [bob, 'The canary looked healthy at least.'],
      [carol, 'It did, all nodes are green. Latency is down about 30% since the cache change.'],
      [carol, 'Notes are here: https://example.com/releases/2024/notes-for-the-long-release-link-that-wraps-nicely'],
      [bob, 'Great work. I will update the runbook:\n1. drain the node\n2. restart\n3. watch the dashboards'],
    ];
    let i = 0;
    for (const [who, text] of lines) await node.post(who.token, 'design', text, `show-${(i += 1)}`);

    for (const [name, opts] of [
      ['desktop-light.png', { width: 1280, height: 800, colorScheme: 'light' }],
      ['desktop-dark.png', { width: 1280, height: 800, colorScheme: 'dark' }],
      ['phone-light.png', { width: 390, height: 844, colorScheme: 'light' }],
      ['phone-dark.png', { width: 390, height: 844, colorScheme: 'dark' }],
    ]) {
      const { page: p } = await page(opts);
      // Keyboard only: the name field has focus, Enter signs in.
      await p.goto(`${node.url}/#design`);
      await p.getByLabel('Name', { exact: true }).waitFor();
      await p.keyboard.type(`dana${opts.width}${opts.colorScheme}`.slice(0, 32));
      await p.keyboard.press('Enter');
      await connected(p);
      await p.getByRole('heading', { level: 1, name: 'design', exact: true }).waitFor();
      await messageList(p).getByText('watch the dashboards', { exact: false }).waitFor();
      await messageBox(p).focus();
      await p.keyboard.type('Thanks both, looks good to me.');
      await p.keyboard.press('Enter');
      await p.locator('li[data-status="sent"]', { hasText: 'Thanks both' }).waitFor();
      if (opts.width < 700) {
        // The rooms drawer opens from the header and closes with Escape.
        await p.getByRole('button', { name: 'Rooms', exact: true }).click();
        await p.getByRole('textbox', { name: 'Room', exact: true }).waitFor();
        await p.waitForTimeout(300); // the drawer slides in
        await p.screenshot({ path: screenshotPath(name.replace('.png', '-rooms.png')) });
        await p.keyboard.press('Escape');
        await p.getByRole('textbox', { name: 'Room', exact: true }).waitFor({ state: 'hidden' });
      }
      await p.screenshot({ path: screenshotPath(name) });
      const count = await messageItems(p).count();
      assert.ok(count >= lines.length + 1);
    }
  });
});
