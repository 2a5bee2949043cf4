// Runs the real node for the end-to-end tests: a temporary config with a
// free port, the built web client as static_dir, start/stop/restart, and a
// headless Chromium driven by playwright-core.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = path.dirname(fileURLToPath(import.meta.url));
export const frontendDir = path.resolve(here, '..');
export const screenshotDir = path.join(here, 'screenshots');

export const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

function serverBinary() {
  const bin = process.env.SCALABLE_CHAT_BIN
    ? path.resolve(process.cwd(), process.env.SCALABLE_CHAT_BIN)
    : path.resolve(frontendDir, '../target/debug/scalable-chat');
  if (!fs.existsSync(bin)) {
    throw new Error(`server binary not found at ${bin}: build it (cargo build) or set SCALABLE_CHAT_BIN`);
  }
  return bin;
}

/** A TCP port that was free a moment ago. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** One node process with its own data directory, restartable on the same port. */
export class Node {
  constructor() {
    this.proc = null;
    this.port = 0;
    this.dir = '';
    this.log = '';
  }

  get url() {
    return `http://127.0.0.1:${this.port}`;
  }

  async init() {
    const dist = path.join(frontendDir, 'dist');
    if (!fs.existsSync(path.join(dist, 'index.html'))) {
      throw new Error('frontend/dist is missing: run `npm run build` first');
    }
    this.port = await freePort();
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'scalable-chat-e2e-'));
    this.config = path.join(this.dir, 'node.toml');
    this.log = path.join(this.dir, 'node.log');
    const toml = [
      '[node]',
      'id = "e2e"',
      `data_dir = ${JSON.stringify(path.join(this.dir, 'data'))}`,
      '[http]',
      `bind = "127.0.0.1:${this.port}"`,
      `allowed_origins = ["http://127.0.0.1:${this.port}"]`,
      `static_dir = ${JSON.stringify(dist)}`,
      '[auth]',
      'secret = "e2e-secret-that-is-long-enough-0123456789abcdef"',
      // Every browser and bot of the suite signs in from 127.0.0.1: one
      // client address for the per-address limits.
      '[limits]',
      'signin_rate_burst = 1000',
      'address_rate_burst = 10000',
      '',
    ].join('\n');
    fs.writeFileSync(this.config, toml);
    return this;
  }

  async start() {
    const bin = serverBinary();
    const out = fs.openSync(this.log, 'a');
    this.proc = spawn(bin, ['--config', this.config], {
      stdio: ['ignore', out, out],
      env: { ...process.env, RUST_LOG: process.env.RUST_LOG || 'info' },
    });
    fs.closeSync(out);
    const proc = this.proc;
    let exited = null;
    proc.once('exit', (code, signal) => {
      exited = { code, signal };
    });
    const deadline = Date.now() + 20000;
    while (Date.now() < deadline) {
      if (exited) throw new Error(`node exited at start (${JSON.stringify(exited)}):\n${this.tail()}`);
      try {
        const res = await fetch(`${this.url}/healthz`);
        if (res.ok) return this;
      } catch {
        // not listening yet
      }
      await sleep(100);
    }
    throw new Error(`node did not become healthy:\n${this.tail()}`);
  }

  /** Stops the process: 'SIGKILL' (crash) or 'SIGTERM' (drain). */
  async stop(signal = 'SIGTERM') {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const done = new Promise((r) => proc.once('exit', r));
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill('SIGKILL'), 15000);
    await done;
    clearTimeout(timer);
    this.proc = null;
  }

  tail(lines = 40) {
    try {
      return fs.readFileSync(this.log, 'utf8').split('\n').slice(-lines).join('\n');
    } catch {
      return '';
    }
  }

  async cleanup() {
    await this.stop('SIGKILL');
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  // ---- REST helpers ----

  async guest(name) {
    const res = await fetch(`${this.url}/api/v1/auth/guest`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ name }),
    });
    if (!res.ok) throw new Error(`guest sign-in failed: ${res.status} ${await res.text()}`);
    return res.json();
  }

  async post(token, room, text, cid) {
    const res = await fetch(`${this.url}/api/v1/rooms/${room}/messages`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${token}` },
      body: JSON.stringify({ text, cid }),
    });
    if (res.status !== 201 && res.status !== 200) throw new Error(`post failed: ${res.status} ${await res.text()}`);
    return res.json();
  }
}

export async function launchBrowser() {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: run scripts/ensure-chromium`);
  }
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
}

/** A fresh browser context and page; page errors are collected for the test to check. */
export async function newPage(browser, { width = 1280, height = 800, colorScheme = 'light' } = {}) {
  const context = await browser.newContext({ viewport: { width, height }, colorScheme });
  const page = await context.newPage();
  page.setDefaultTimeout(15000);
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(e.message));
  return { context, page };
}

export function screenshotPath(name) {
  fs.mkdirSync(screenshotDir, { recursive: true });
  return path.join(screenshotDir, name);
}

// ---- page helpers ----

export const messageList = (page) => page.getByRole('list', { name: 'Messages', exact: true });
export const messageItems = (page) => messageList(page).getByRole('listitem');
export const messageBox = (page) => page.getByRole('textbox', { name: 'Message', exact: true });

export async function signIn(page, url, name) {
  await page.goto(url);
  await page.getByLabel('Name', { exact: true }).fill(name);
  await page.keyboard.press('Enter');
  await connected(page);
}

export async function connected(page, timeout = 15000) {
  await page.locator('[data-status="connected"]').first().waitFor({ timeout });
}

export async function send(page, text) {
  const box = messageBox(page);
  await box.fill(text);
  await box.press('Enter');
}

/** The texts of the confirmed messages shown, in order. */
export async function shownTexts(page) {
  return messageItems(page).evaluateAll((items) =>
    items.map((li) => li.querySelector('.text')?.textContent ?? ''),
  );
}

/** The seqs of the confirmed messages shown, in order. */
export async function shownSeqs(page) {
  return messageItems(page).evaluateAll((items) =>
    items.map((li) => li.getAttribute('data-seq')).filter((s) => s != null).map(Number),
  );
}

/** Waits until `check()` is truthy, polling. */
export async function until(check, { timeout = 15000, interval = 100, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last) return last;
    await sleep(interval);
  }
  throw new Error(`timed out waiting for ${what}`);
}
