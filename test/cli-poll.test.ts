import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFAULT_CLIENT, startSandbox, type Sandbox } from '../src/sandbox/index.js';
import { clioConnection, TEST_TOKEN_KEY } from './helpers/bridge.js';
import { crmBridge } from './helpers/cli.js';
import { createTestDatabase } from './helpers/database.js';
import { startFaultProxy } from './helpers/fault-proxy.js';

let sandbox: Sandbox;
// The CLI runs on the embedded database, or on a fresh Postgres database when DATABASE_URL is set.
const database = process.env.DATABASE_URL ? await createTestDatabase() : undefined;
const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-cli-'));
const config = join(dir, 'connections.json');

beforeAll(async () => {
  sandbox = await startSandbox({ records: 60 });
  writeConfig();
});

afterAll(async () => {
  await sandbox.close();
  await database?.close();
});

/**
 * A connection that only takes hooks (no poll section, so no poller of the server's runs its
 * streams; the operator polls it from cron), with a static token.
 */
function hooksOnly(id: string, token: string, baseUrl = sandbox.url) {
  const { poll: _, ...connection } = clioConnection(sandbox, { id, auth: { type: 'static', token }, baseUrl });
  return connection;
}

/** `firm`, and `inbox` with the token given (by default one the CRM never issued); `relay` as `inbox`, its CRM behind a proxy. */
function writeConfig(options: { token?: string; relay?: string } = {}) {
  const token = options.token ?? 'a-token-the-crm-never-issued';
  const relay = options.relay ? [hooksOnly('relay', token, options.relay)] : [];
  writeFileSync(config, JSON.stringify({ connections: [clioConnection(sandbox, { poll: { pageSize: 10 } }), hooksOnly('inbox', token), ...relay] }));
}

/** An access token the sandbox CRM issued, as an operator would paste into `auth.token`. */
async function issuedToken(): Promise<string> {
  const res = await fetch(`${sandbox.url}/oauth/token`, {
    method: 'POST',
    headers: { 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ grant_type: 'client_credentials', client_id: DEFAULT_CLIENT.clientId, client_secret: DEFAULT_CLIENT.clientSecret }),
  });
  return ((await res.json()) as { access_token: string }).access_token;
}

/** Starts `crm-bridge <args>` on the embedded database in a fresh DATA_DIR (or DATABASE_URL). */
function start(args: string[], dataDir = dir) {
  const child = spawn(process.execPath, crmBridge(...args), {
    env: { ...process.env, CRM_BRIDGE_CONFIG: config, DATA_DIR: dataDir, TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY, DATABASE_URL: database?.url ?? '' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d));
  child.stderr.on('data', (d: Buffer) => (out += d));
  const exited = new Promise<{ code: number | null; out: string }>((resolve) => child.on('exit', (code) => resolve({ code, out })));
  return { child, exited, out: () => out };
}

/** Runs `crm-bridge <args>` to its end. */
function cli(args: string[], dataDir = dir): Promise<{ code: number | null; out: string }> {
  return start(args, dataDir).exited;
}

describe('crm-bridge poll and sweep', () => {
  it('polls once with a progress line and a summary, then finds nothing new the second time', async () => {
    const first = await cli(['poll', 'firm', '--once']);
    expect(first.code).toBe(0);
    expect(first.out).toMatch(/poll firm\/matters: 3 page\(s\), 30 record\(s\), 30 new/);
    expect(first.out).toMatch(/firm\/matters: poll done: 30 accepted/);
    const second = await cli(['poll', 'firm', '--once']);
    expect(second.code).toBe(0);
    expect(second.out).toMatch(/poll done: (\d+ duplicate|no changes)/);
  });

  it('keeps polling on the interval without --once, and stops at once on Ctrl-C, not after the interval', async () => {
    const follow = start(['poll', 'firm']);
    for (let i = 0; i < 600 && !/poll done/.test(follow.out()); i++) await new Promise((r) => setTimeout(r, 50));
    expect(follow.out()).toMatch(/firm\/matters: poll done/);
    // The next pass is an hour away (the connection's interval).
    follow.child.kill('SIGINT');
    expect((await follow.exited).code).toBe(0);
  });

  it('sweeps and reports deletes', async () => {
    sandbox.state.deleteRecord('matters', sandbox.state.store.matters.items[0]!.id);
    const swept = await cli(['sweep', 'firm']);
    expect(swept.code).toBe(0);
    expect(swept.out).toMatch(/sweep done: .*1 deleted/);
  });

  it('holds a mass delete and makes it with --allow-deletes; status says so meanwhile', async () => {
    // 12 of the 29 matters at once: more than the 10 a sweep deletes by itself on a stream this small.
    for (const m of sandbox.state.store.matters.items.slice(0, 12)) sandbox.state.deleteRecord('matters', m.id);
    const held = await cli(['sweep', 'firm', '--object', 'matters']);
    expect(held.code).toBe(0);
    expect(held.out).toMatch(/sweep done: .*0 deleted/);
    expect(held.out).toContain('12 of 29 records vanished at once');
    expect(held.out).toContain('crm-bridge sweep firm --object matters --allow-deletes');
    const status = await cli(['status']);
    expect(status.code).toBe(1);
    expect(status.out).toContain('12 delete(s) held by the sweep');

    const allowed = await cli(['sweep', 'firm', '--object', 'matters', '--allow-deletes']);
    expect(allowed.code).toBe(0);
    expect(allowed.out).toMatch(/sweep done: .*12 deleted/);
    expect(allowed.out).not.toContain('vanished');
  });

  it('gives each stream back when a run ends: after a run the CRM refused, the next poll --once and sweep go ahead instead of finding the stream busy', async () => {
    writeConfig();
    const refused = await cli(['poll', 'inbox', '--once']);
    expect(refused.code).toBe(1);
    expect(refused.out).toMatch(/^inbox\/matters: poll failed: NEEDS_REAUTH/m);
    expect(refused.out).toMatch(/^inbox\/contacts: poll failed: NEEDS_REAUTH/m);

    // The operator replaces the token and polls again at once.
    writeConfig({ token: await issuedToken() });
    const polled = await cli(['poll', 'inbox', '--once']);
    expect(polled.out).not.toMatch(/not run|lease/);
    expect(polled.code).toBe(0);
    expect(polled.out).toMatch(/^inbox\/matters: poll done: \d+ accepted/m);
    expect(polled.out).toMatch(/^inbox\/contacts: poll done: \d+ accepted/m);

    const swept = await cli(['sweep', 'inbox']);
    expect(swept.out).not.toMatch(/not run|lease/);
    expect(swept.code).toBe(0);
    expect(swept.out).toMatch(/^inbox\/matters: sweep done/m);
    expect(swept.out).toMatch(/^inbox\/contacts: sweep done/m);
  });

  it('exits 75 and says nothing was read when another process holds the stream (one killed mid-run), and says so in --help', async () => {
    // The CRM holds the listing's answer until the first run is killed: it dies holding the lease.
    let listing!: () => void;
    const listed = new Promise<void>((resolve) => (listing = resolve));
    const proxy = await startFaultProxy({
      target: sandbox.url,
      answer: async (req) => {
        if (!req.url!.startsWith('/api/v4/contacts.json')) return false;
        listing();
        await new Promise(() => {});
        return true;
      },
    });
    try {
      writeConfig({ token: await issuedToken(), relay: proxy.url });
      const killed = start(['poll', 'relay', '--once', '--object', 'contacts']);
      expect(await Promise.race([listed.then(() => 'listing'), killed.exited.then(() => 'exited')])).toBe('listing');
      killed.child.kill('SIGKILL');
      await killed.exited;

      const busy = await cli(['poll', 'relay', '--once', '--object', 'contacts']);
      expect(busy.code).toBe(75);
      expect(busy.out).toMatch(/^relay\/contacts: poll not run: another process .* holds its lease; nothing was read \(exit status 75\)/m);
    } finally {
      await proxy.close();
    }
    const help = await cli(['poll', '--help']);
    expect(help.out).toMatch(/^ {2}75 {2}another process .* was running a stream, so\s+nothing was read for it/m);
  });

  it('gives the stream back when Ctrl-C stops a sweep or SIGTERM a poll mid-listing: the next run goes ahead at once, not 75', async () => {
    // The CRM holds each stopped run's listing until the bridge hangs up; later listings are answered.
    // (relay/matters: the test before left relay/contacts leased to the process it killed.)
    const held: (() => void)[] = [];
    let hold = true;
    const listed: (() => void)[] = [];
    const proxy = await startFaultProxy({
      target: sandbox.url,
      answer: async (req, res) => {
        if (!hold || !req.url!.startsWith('/api/v4/matters.json')) return false;
        listed.shift()?.();
        await new Promise<void>((resolve) => {
          held.push(resolve);
          res.once('close', () => resolve());
        });
        return true;
      },
    });
    try {
      writeConfig({ token: await issuedToken(), relay: proxy.url });
      for (const [args, signal] of [
        [['sweep', 'relay', '--object', 'matters'], 'SIGINT'],
        [['poll', 'relay', '--object', 'matters'], 'SIGTERM'],
      ] as const) {
        hold = true;
        const listing = new Promise<void>((resolve) => listed.push(resolve));
        const stopped = start([...args]);
        expect(await Promise.race([listing.then(() => 'listing'), stopped.exited.then(() => 'exited')]), stopped.out()).toBe('listing');
        stopped.child.kill(signal);
        const { code, out } = await stopped.exited;
        expect(code, out).toBe(1);
        expect(out).toMatch(new RegExp(`^relay/matters: ${args[0]} failed: ABORTED`, 'm'));

        hold = false;
        const next = await cli(['poll', 'relay', '--once', '--object', 'matters']);
        expect(next.out).not.toMatch(/not run|lease/);
        expect(next.code).toBe(0);
      }
    } finally {
      for (const release of held) release();
      await proxy.close();
    }
  });

  it('answers an unknown connection with one line and exit status 2', async () => {
    const res = await cli(['poll', 'nope', '--once']);
    expect(res.code).toBe(2);
    expect(res.out.trim().split('\n')).toHaveLength(1);
    expect(res.out).toMatch(/no connection "nope"/);
  });

  it('shows usage and exits 2 on a bad argument', async () => {
    const res = await cli(['poll']);
    expect(res.code).toBe(2);
    expect(res.out).toMatch(/missing required argument 'connection'/);
    expect(res.out).toMatch(/Usage: crm-bridge poll/);
  });
});
