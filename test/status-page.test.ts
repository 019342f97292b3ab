import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium, type BrowserContext } from 'playwright-core';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase, type Database } from '../src/db/client.js';
import { fetchPendingNotifications, pollStream } from '../src/sync/poller.js';
import { clioConnection, startBridge, TEST_TOKEN_KEY } from './helpers/bridge.js';
import { buildTestApp, SECRET } from './helpers/app.js';
import { createTestDatabase } from './helpers/database.js';

const CHROMIUM = '/usr/bin/chromium';
const ADMIN = 'admin-token-0123456789abcdef';
const haveChromium = existsSync(CHROMIUM);
// In CI Chromium is installed (.ci/run), so a missing binary there is a failure, not a skip.
const skipBrowser = !haveChromium && !process.env.CI;

describe('status page access', () => {
  let database: Database;
  beforeAll(async () => {
    database = await createTestDatabase();
  });
  afterAll(() => database.close());

  it('answers 401 with a Basic challenge and the same body without, or with a wrong, credential; the page and /docs open with the admin token', async () => {
    const app = await buildTestApp({ database, env: { ADMIN_TOKEN: ADMIN } });
    const basic = (password: string) => `Basic ${Buffer.from(`ops:${password}`).toString('base64')}`;
    try {
      const refusals = [undefined, 'Bearer wrong-token-0123456789', basic('wrong'), basic(''), 'Basic !!!', `Bearer ${SECRET}`];
      const bodies = new Set<string>();
      for (const url of ['/', '/docs', '/docs/json']) {
        for (const authorization of refusals) {
          const res = await app.inject({ url, headers: authorization ? { authorization } : {} });
          expect(res.statusCode, `${url} with ${authorization}`).toBe(401);
          expect(res.headers['www-authenticate']).toMatch(/^Basic realm="crm-bridge"/);
          bodies.add(res.body);
        }
      }
      expect(bodies.size).toBe(1);

      const page = await app.inject({ url: '/', headers: { authorization: basic(ADMIN) } });
      expect(page.statusCode).toBe(200);
      expect(page.headers['content-type']).toMatch(/^text\/html/);
      expect(page.headers['cache-control']).toBe('no-store');
      expect((await app.inject({ url: '/', headers: { authorization: `Bearer ${ADMIN}` } })).statusCode).toBe(200);
      expect((await app.inject({ url: '/docs/json', headers: { authorization: basic(ADMIN) } })).statusCode).toBe(200);
    } finally {
      await app.close();
    }
  });

  it('refuses everyone when ADMIN_TOKEN is not set', async () => {
    const app = await buildTestApp({ database });
    try {
      const res = await app.inject({ url: '/', headers: { authorization: `Basic ${Buffer.from('ops:').toString('base64')}` } });
      expect(res.statusCode).toBe(401);
    } finally {
      await app.close();
    }
  });

  it('says the database is down, as /health does, instead of answering 500 when the operator needs it most', async () => {
    const broken = openDatabase(process.env.DATABASE_URL ? { url: 'postgres://postgres@127.0.0.1:1/none', max: 1 } : { dataDir: 'memory://' });
    const app = await buildTestApp({ database: { ...database, db: broken.db, migrate: async () => {} }, env: { ADMIN_TOKEN: ADMIN } });
    await broken.close();
    try {
      expect((await app.inject('/health')).json().status).toBe('down');
      const page = await app.inject({ url: '/', headers: { authorization: `Bearer ${ADMIN}` } });
      expect(page.statusCode).toBe(200);
      expect(page.body).toContain('<span class="badge bad">down</span>');
      expect(page.body).toMatch(/<h2>acme<\/h2><p><span class="badge bad">database down<\/span>/);
      expect(page.body).toContain('The database is down: the latest changes cannot be read.');
    } finally {
      await app.close();
    }
  });

  it('shows ids, sources and dispositions but none of a record’s names, descriptions or phone numbers, and escapes what it shows', async () => {
    const app = await buildTestApp({ database, env: { ADMIN_TOKEN: ADMIN } });
    try {
      const hook = await app.inject({
        method: 'POST',
        url: '/hooks/acme?object=contacts',
        headers: { authorization: `Bearer ${SECRET}` },
        payload: { id: '<b>c-1</b>', updated_at: '2024-05-01T10:00:00Z', name: 'Jane Q. Private', phone: '+1 555 0100', email: 'jane@example.com' },
      });
      expect(hook.statusCode).toBe(202);
      const page = await app.inject({ url: '/', headers: { authorization: `Bearer ${ADMIN}` } });
      expect(page.body).toContain('&lt;b&gt;c-1&lt;/b&gt;');
      expect(page.body).not.toContain('<b>c-1</b>');
      for (const secret of ['Jane', 'Private', '555 0100', 'jane@example.com']) expect(page.body).not.toContain(secret);
    } finally {
      await app.close();
    }
  });
});

describe('status page automation miss rate', () => {
  let database: Database;
  beforeAll(async () => {
    database = await createTestDatabase();
  });
  afterAll(() => database.close());

  it('counts notification hooks (the recommended Clio set-up) as announced: 9 announced and 1 caught by the poll is "automation missed 10.0%"', async () => {
    const bridge = await startBridge({ database, env: { ADMIN_TOKEN: ADMIN }, connection: { inbound: { payload: 'notification' } } });
    try {
      const { app, sandbox } = bridge;
      const stream = app.poller.stream('firm', 'matters');
      expect((await pollStream(stream)).status).toBe('ok'); // the first run reads everything, none of it "missed"
      const items = sandbox.state.store.matters.items;
      // The automation announces nine edits...
      for (const item of items.slice(0, 9)) {
        sandbox.state.updateRecord('matters', item.id, { description: 'Called back' });
        const res = await app.inject({ method: 'POST', url: '/hooks/firm?object=matters', headers: { authorization: `Bearer ${SECRET}` }, payload: { data: { id: item.id } } });
        expect(res.statusCode).toBe(202);
      }
      await fetchPendingNotifications(stream);
      // ...and misses one, which the next poll catches.
      sandbox.state.updateRecord('matters', items[20]!.id, { description: 'Edited, no hook fired' });
      expect((await pollStream(stream)).caught).toBe(1);

      const page = await app.inject({ url: '/', headers: { authorization: `Bearer ${ADMIN}` } });
      expect(page.statusCode).toBe(200);
      expect(/automation missed ([\d.]+)%/.exec(page.body)?.[1]).toBe('10.0');
    } finally {
      await bridge.close();
    }
  }, 60_000);
});

describe.skipIf(skipBrowser)('status page in headless Chromium', () => {
  let database: Database;
  let bridge: Awaited<ReturnType<typeof startBridge>>;
  let browser: BrowserContext;
  const profile = mkdtempSync(join(tmpdir(), 'crm-bridge-chromium-'));

  beforeAll(async () => {
    if (!haveChromium) throw new Error(`Chromium is not installed at ${CHROMIUM}: apt-get install -y chromium (the status page test needs a real browser)`);
    database = await createTestDatabase();
    bridge = await startBridge({ database, automation: { dropRate: 0 }, sandbox: { records: 40 } });
    // A fresh profile directory per run: nothing cached or remembered from another run.
    browser = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      httpCredentials: { username: 'ops', password: ADMIN },
      viewport: { width: 1180, height: 900 },
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
  }, 60_000);
  afterAll(async () => {
    await browser?.close();
    await bridge?.close();
    await database?.close();
    rmSync(profile, { recursive: true, force: true });
  });

  it('shows an operator the connection, its auth, counts, the activity chart and the latest events, and saves a screenshot', async () => {
    const { app, sandbox } = bridge;
    // A poll (the first run reads all 40 records) and a few hooks from the sandbox's automation.
    await app.poller.daemons[0]!.tick(new AbortController().signal);
    for (const item of sandbox.state.store.matters.items.slice(0, 3)) {
      sandbox.state.updateRecord('matters', item.id, { description: 'Called back about the hearing' });
    }
    await sandbox.state.automationIdle();
    await expect.poll(async () => (await app.inject({ url: '/health' })).json().connections[0].hooks.lastReceivedAt, { timeout: 10_000 }).not.toBeNull();

    // startBridge's app has no ADMIN_TOKEN; the page is served by a second replica of the same
    // connection on the same database, as an operator would reach any replica.
    const viewer = await buildTestApp({
      database,
      connections: [clioConnection(sandbox)],
      env: { ADMIN_TOKEN: ADMIN, TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY },
    });
    const base = await viewer.listen({ port: 0, host: '127.0.0.1' });
    try {
      const page = await browser.newPage();
      page.setDefaultTimeout(10_000);
      const response = await page.goto(base + '/');
      expect(response?.status()).toBe(200);

      await expect(page.title()).resolves.toBe('crm-bridge status');
      const card = page.getByRole('region', { name: 'connection firm' });
      await expect(card.getByRole('heading', { name: /firm/ }).textContent()).resolves.toMatch(/authorised/);
      await expect(card.locator('[data-fact="last-poll"]').textContent()).resolves.toMatch(/\d+s ago/);
      await expect(card.locator('[data-fact="last-hook"]').textContent()).resolves.toMatch(/\d+s ago/);
      await expect(card.locator('[data-fact="pending"]').textContent()).resolves.toMatch(/^\d+/);
      await expect(card.locator('[data-fact="dead"]').textContent()).resolves.toBe('0');
      await expect(card.locator('[data-fact="caught-by-poll"]').textContent()).resolves.toMatch(/^\d+/);

      const chart = card.getByRole('img', { name: /Changes per minute by source/ });
      expect(await chart.isVisible()).toBe(true);
      expect(await chart.locator('rect.bar[data-source="poll"]').count()).toBeGreaterThan(0);
      expect(await chart.locator('rect.bar[data-source="hook"]').count()).toBeGreaterThan(0);

      const rows = page.locator('table.events tbody tr');
      expect(await rows.count()).toBeGreaterThan(3);
      const events = await page.locator('table.events').innerText();
      expect(events).toMatch(/matters/);
      expect(events).toMatch(/\bhook\b/);
      expect(events).toMatch(/\bpoll\b/);
      expect(events).toMatch(/accepted/);
      // What the staff typed never reaches the page.
      expect(await page.content()).not.toContain('Called back about the hearing');

      mkdirSync('docs', { recursive: true });
      await page.screenshot({ path: 'docs/status-page.png', fullPage: false });
    } finally {
      // The browser keeps its connections alive (and the page reloads itself): close it first,
      // or the server would wait for them.
      await browser.close();
      await viewer.close();
    }
  }, 60_000);
});
