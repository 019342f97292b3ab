import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { mkdtempSync, readFileSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { eq } from 'drizzle-orm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { ConfigError } from '../../src/config/load.js';
import { loadTokenKey, TokenCipher } from '../../src/crm/crypto.js';
import { createCrmHttpClient } from '../../src/crm/http-client.js';
import { createTokenManager, TokenEndpointError, type TokenManagerOptions } from '../../src/crm/token-manager.js';
import { NeedsReauthError } from '../../src/crm/token-provider.js';
import { tokens } from '../../src/db/schema/index.js';
import { startSandbox, type Sandbox } from '../../src/sandbox/index.js';
import { captureLogs } from '../helpers/app.js';
import { compiled } from '../helpers/cli.js';
import { createTestDatabase, resetDatabase } from '../helpers/database.js';
import {
  apiRequests,
  authorise,
  callApi,
  oauthAuth,
  startTokenProxy,
  TEST_KEY,
  testCipher,
  tokenRequests,
} from '../fixtures/token-helpers.js';

const database = await createTestDatabase();
const cipher = testCipher();
let sb: Sandbox;

beforeAll(async () => {
  sb = await startSandbox({ records: 20 });
});
afterAll(async () => {
  await sb.close();
  await database.close();
});
beforeEach(async () => {
  sb.state.resetSwitches();
  sb.state.setSwitches({ autoApprove: true });
  await resetDatabase(database);
});

type Auth = Parameters<typeof createTokenManager>[1]['auth'];

function manager(options: Partial<TokenManagerOptions> & { auth?: Auth; tokenBaseUrl?: string } = {}) {
  const { auth, tokenBaseUrl, ...rest } = options;
  return createTokenManager(
    database.db,
    { id: 'acme', auth: auth ?? oauthAuth(), baseUrl: tokenBaseUrl ?? sb.url },
    { cipher, backoffBaseMs: 5, backoffMaxMs: 50, ...rest },
  );
}

async function storedRow() {
  const [row] = await database.db.select().from(tokens).where(eq(tokens.connectionId, 'acme'));
  return row;
}

/** The stored token is past its claimed expiry and the sandbox agrees it is dead. */
async function expireStoredToken() {
  sb.state.expireAccessTokens();
  await database.db.update(tokens).set({ expiresAt: new Date(Date.now() - 1_000) }).where(eq(tokens.connectionId, 'acme'));
}

const revokedGrants = () => sb.state.oauth.listGrants().filter((g) => g.revokedAt !== null);

describe('refreshing', () => {
  it('refreshes a token that dies long before its expires_in after the 401, and replays the call', async () => {
    const logs = captureLogs();
    sb.state.setSwitches({ tokenRealLifetimeSeconds: 60 });
    const m = manager({ logger: logs.logger });
    await authorise(m);
    sb.state.setClock({ advanceSeconds: 61 });

    // Through the one CRM HTTP client, as connectors call: it refreshes once on the 401 and replays.
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens: m });
    const dead = await m.getAccessToken();
    const since = sb.state.requestLog.lastSeq;
    const res = await client.request<{ data: unknown[] }>({ url: '/api/v4/matters.json', query: { limit: 1 } });
    expect(res.body.data).toHaveLength(1);
    expect(apiRequests(sb, since).map((r) => [r.status, r.auth.state])).toEqual([
      [401, 'expired'],
      [200, 'valid'],
    ]);
    expect(tokenRequests(sb, since).map((r) => r.auth.grantType)).toEqual(['refresh_token']);

    const fresh = await m.getAccessToken();
    expect(fresh).not.toBe(dead);
    const next = await callApi(sb, m);
    expect(next.statuses).toEqual([200]);
    expect(tokenRequests(sb, since)).toHaveLength(1);
    expect(logs.text()).toContain('access token refreshed');
    for (const token of [dead, fresh]) expect(logs.text()).not.toContain(token);
  });

  it('refreshes before the claimed expiry minus the margin, without waiting for a 401', async () => {
    sb.state.setSwitches({ advertisedExpiresInSeconds: 600 });
    let now = Date.now();
    const m = manager({ now: () => now, auth: oauthAuth({ refreshMarginSeconds: 120 }) });
    await authorise(m);
    const before = await m.getAccessToken();
    now += 479_000; // 121 s before the claimed expiry: still outside the margin
    expect(await m.getAccessToken()).toBe(before);

    const since = sb.state.requestLog.lastSeq;
    now += 2_000; // inside the margin, while the sandbox still honours the old token
    const call = await callApi(sb, m);
    expect(call.statuses).toEqual([200]);
    expect(call.tokens[0]).not.toBe(before);
    expect(tokenRequests(sb, since)).toHaveLength(1);
    expect((await storedRow())?.claimedLifetimeSeconds).toBe(600);
  });

  it('caps the margin at half the claimed lifetime, so short-lived tokens are not refreshed on every call', async () => {
    sb.state.setSwitches({ advertisedExpiresInSeconds: 60 });
    const m = manager({ auth: oauthAuth({ refreshMarginSeconds: 300 }) });
    await authorise(m);
    const since = sb.state.requestLog.lastSeq;
    const first = await m.getAccessToken();
    expect(await m.getAccessToken()).toBe(first);
    expect(tokenRequests(sb, since)).toHaveLength(0);
  });
});

describe('single flight', () => {
  it('30 concurrent calls on an expired token make exactly one refresh, and never reuse a rotated refresh token', async () => {
    sb.state.setSwitches({ rotateRefreshTokens: true });
    await authorise(manager());
    await expireStoredToken();

    const since = sb.state.requestLog.lastSeq;
    const m = manager(); // a process starting on the expired row: nothing cached
    const calls = await Promise.all(Array.from({ length: 30 }, () => callApi(sb, m)));
    expect(calls.map((c) => c.status)).toEqual(Array(30).fill(200));
    expect(tokenRequests(sb, since)).toHaveLength(1);
    expect(new Set(calls.map((c) => c.tokens.at(-1))).size).toBe(1);
    expect(revokedGrants()).toEqual([]);

    // The grant still works: the stored (rotated) refresh token refreshes again.
    await expireStoredToken();
    const again = await callApi(sb, manager());
    expect(again.status).toBe(200);
    expect(tokenRequests(sb, since)).toHaveLength(2);
    expect(revokedGrants()).toEqual([]);
  });

  it('two managers on one database (two replicas) refresh once between them, through the lease', async () => {
    sb.state.setSwitches({ rotateRefreshTokens: true });
    // A slow token endpoint keeps the first refresh open while the other replica arrives.
    const proxy = await startTokenProxy(sb.url, { delayMs: 300 });
    try {
      const auth = oauthAuth({ tokenUrl: `${proxy.url}/oauth/token`, authorizeUrl: `${sb.url}/oauth/authorize` });
      await authorise(manager({ auth }));
      await expireStoredToken();
      const since = sb.state.requestLog.lastSeq;
      const received = proxy.received;

      const [a, b] = [manager({ auth, instanceId: 'a' }), manager({ auth, instanceId: 'b' })];
      const calls = await Promise.all(Array.from({ length: 30 }, (_, i) => callApi(sb, i % 2 === 0 ? a : b)));
      expect(calls.map((c) => c.status)).toEqual(Array(30).fill(200));
      expect(proxy.received - received).toBe(1);
      expect(tokenRequests(sb, since)).toHaveLength(1);
      expect(revokedGrants()).toEqual([]);
    } finally {
      await proxy.close();
    }
  });

  it.skipIf(!database.url)(
    '30 concurrent calls across two bridge processes on one Postgres make exactly one refresh (needs DATABASE_URL: PGlite cannot be shared between processes)',
    async () => {
      sb.state.setSwitches({ rotateRefreshTokens: true });
      const proxy = await startTokenProxy(sb.url, { delayMs: 300 });
      try {
        const auth = oauthAuth({ tokenUrl: `${proxy.url}/oauth/token`, authorizeUrl: `${sb.url}/oauth/authorize` });
        await authorise(manager({ auth }));
        await expireStoredToken();
        const since = sb.state.requestLog.lastSeq;

        const child = spawn(process.execPath, [compiled('test/fixtures/token-worker.ts')], {
          env: { ...process.env, DATABASE_URL: database.url, SANDBOX_URL: sb.url, TOKEN_BASE_URL: proxy.url, CONCURRENCY: '15' },
          stdio: ['pipe', 'pipe', 'inherit'],
        });
        const exited = new Promise<number | null>((resolve) => child.on('exit', resolve));
        const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
        expect((await lines.next()).value).toBe('ready');

        child.stdin!.write('go\n');
        const here = manager({ auth, instanceId: 'parent' });
        const [mine, theirs] = await Promise.all([
          Promise.all(Array.from({ length: 15 }, () => callApi(sb, here))),
          lines.next().then((line) => JSON.parse(String(line.value)) as Array<{ statuses?: number[]; tokens?: string[]; error?: string }>),
        ]);
        expect(await exited).toBe(0);

        expect(mine.map((c) => c.status)).toEqual(Array(15).fill(200));
        expect(theirs.map((c) => c.error ?? c.statuses?.at(-1))).toEqual(Array(15).fill(200));
        expect(tokenRequests(sb, since)).toHaveLength(1);
        // Both processes ended on the one refreshed token.
        const digest = (t: string) => createHash('sha256').update(t).digest('hex');
        const used = new Set([...mine.map((c) => digest(c.tokens.at(-1)!)), ...theirs.map((c) => c.tokens!.at(-1))]);
        expect(used.size).toBe(1);
        expect(revokedGrants()).toEqual([]);

        await expireStoredToken();
        expect((await callApi(sb, manager({ auth }))).status).toBe(200);
        expect(revokedGrants()).toEqual([]);
      } finally {
        await proxy.close();
      }
    },
  );
});

describe('losing the grant', () => {
  it('a revoked grant ends in needs_reauth with one log line, and later calls fail fast without the token endpoint', async () => {
    const logs = captureLogs();
    const m = manager({ logger: logs.logger });
    await authorise(m);
    sb.state.revokeTokens();

    const since = sb.state.requestLog.lastSeq;
    const calls = await Promise.allSettled(Array.from({ length: 10 }, () => callApi(sb, m)));
    for (const c of calls) expect(c.status === 'rejected' && c.reason instanceof NeedsReauthError).toBe(true);
    expect(tokenRequests(sb, since)).toHaveLength(1);
    const row = await storedRow();
    expect(row?.state).toBe('needs_reauth');
    expect(row?.lastError).toMatch(/invalid_grant/);
    expect(logs.text().match(/needs re-authorisation/g)).toHaveLength(1);

    const later = sb.state.requestLog.lastSeq;
    await expect(m.getAccessToken()).rejects.toBeInstanceOf(NeedsReauthError);
    await expect(manager().getAccessToken()).rejects.toBeInstanceOf(NeedsReauthError); // another replica
    await expect(m.handleUnauthorized('anything')).rejects.toBeInstanceOf(NeedsReauthError);
    expect(tokenRequests(sb, later)).toHaveLength(0);

    // Re-authorising (the CLI's path) makes the connection usable again.
    await authorise(m);
    expect((await callApi(sb, m)).status).toBe(200);
    expect((await storedRow())?.state).toBe('ok');
  });

  it('a connection never authorised reports needs_reauth without calling the CRM', async () => {
    const since = sb.state.requestLog.lastSeq;
    await expect(manager().getAccessToken()).rejects.toThrow(/not authorised yet/);
    expect(tokenRequests(sb, since)).toHaveLength(0);
  });

  it('static-token mode reports needs_reauth on a 401 instead of looping', async () => {
    const issued = sb.state.issueToken();
    const m = manager({ auth: { type: 'static', token: issued.access_token } });
    expect((await callApi(sb, m)).statuses).toEqual([200]);

    sb.state.revokeTokens(issued.grant_id);
    const since = sb.state.requestLog.lastSeq;
    await expect(callApi(sb, m)).rejects.toBeInstanceOf(NeedsReauthError);
    expect(apiRequests(sb, since)).toHaveLength(1);
    expect(tokenRequests(sb, since)).toHaveLength(0);
    expect((await storedRow())?.state).toBe('needs_reauth');
    await expect(m.getAccessToken()).rejects.toBeInstanceOf(NeedsReauthError);
    // A restart with the same token still knows; a new token is the operator's re-authorisation.
    await expect(manager({ auth: { type: 'static', token: issued.access_token } }).getAccessToken()).rejects.toBeInstanceOf(NeedsReauthError);
    const replaced = manager({ auth: { type: 'static', token: sb.state.issueToken().access_token } });
    expect((await callApi(sb, replaced)).statuses).toEqual([200]);
    expect((await storedRow())?.state).toBe('ok');
    expect(apiRequests(sb, since)).toHaveLength(2);
  });
});

describe('transient token-endpoint failures', () => {
  it('back off and succeed, without needs_reauth', async () => {
    const logs = captureLogs();
    await authorise(manager());
    await expireStoredToken();
    const proxy = await startTokenProxy(sb.url, { failures: 2 });
    try {
      const since = sb.state.requestLog.lastSeq;
      const m = manager({ tokenBaseUrl: proxy.url, logger: logs.logger });
      const calls = await Promise.all(Array.from({ length: 5 }, () => callApi(sb, m)));
      expect(calls.map((c) => c.status)).toEqual(Array(5).fill(200));
      expect(proxy.received).toBe(3);
      expect(tokenRequests(sb, since)).toHaveLength(1);
      const row = await storedRow();
      expect(row?.state).toBe('ok');
      expect(row?.lastError).toBeNull();
      expect(logs.text().match(/failed transiently/g)).toHaveLength(2);
    } finally {
      await proxy.close();
    }
  });

  it('a 429 from the token endpoint is waited out (Retry-After) and is not needs_reauth', async () => {
    await authorise(manager());
    await expireStoredToken();
    const proxy = await startTokenProxy(sb.url, { failures: 2, status: 429 });
    try {
      const since = sb.state.requestLog.lastSeq;
      const call = await callApi(sb, manager({ tokenBaseUrl: proxy.url }));
      expect(call.status).toBe(200);
      expect(proxy.received).toBe(3);
      expect(tokenRequests(sb, since)).toHaveLength(1);
      expect((await storedRow())?.state).toBe('ok');
    } finally {
      await proxy.close();
    }
  });

  it('that persist surface as TokenEndpointError and leave the grant alone', async () => {
    await authorise(manager());
    await expireStoredToken();
    const proxy = await startTokenProxy(sb.url, { failures: 100 });
    try {
      const m = manager({ tokenBaseUrl: proxy.url, attempts: 3 });
      await expect(m.getAccessToken()).rejects.toBeInstanceOf(TokenEndpointError);
      expect(proxy.received).toBe(3);
      const row = await storedRow();
      expect(row?.state).toBe('ok');
      expect(row?.lastError).toMatch(/HTTP 503/);
      // Once the endpoint is back, the same stored grant refreshes.
      expect((await callApi(sb, manager())).status).toBe(200);
    } finally {
      await proxy.close();
    }
  });

  it('an early refresh that fails keeps using the current token until it really expires', async () => {
    sb.state.setSwitches({ advertisedExpiresInSeconds: 600 });
    let now = Date.now();
    const proxy = await startTokenProxy(sb.url, { failures: 100 });
    try {
      const auth = oauthAuth({ refreshMarginSeconds: 120, tokenUrl: `${proxy.url}/oauth/token`, authorizeUrl: `${sb.url}/oauth/authorize` });
      const m = manager({ auth, now: () => now, attempts: 2 });
      await authorise(manager({ auth: oauthAuth() }));
      const current = await m.getAccessToken();
      now += 500_000; // inside the margin, before the claimed expiry
      const call = await callApi(sb, m);
      expect(call.statuses).toEqual([200]);
      expect(call.tokens[0]).toBe(current);
      expect(proxy.received).toBe(2);
      now += 101_000; // past the claimed expiry: no token left to fall back on
      await expect(m.getAccessToken()).rejects.toBeInstanceOf(TokenEndpointError);
      expect((await storedRow())?.state).toBe('ok');
    } finally {
      await proxy.close();
    }
  });

  it('a token endpoint that does not answer at all is transient too', async () => {
    await authorise(manager());
    await expireStoredToken();
    const m = manager({ tokenBaseUrl: 'http://127.0.0.1:9', attempts: 2 });
    await expect(m.getAccessToken()).rejects.toBeInstanceOf(TokenEndpointError);
    expect((await storedRow())?.state).toBe('ok');
  });
});

describe('client_credentials', () => {
  it('fetches a token once and shares it through the database', async () => {
    const auth: Auth = { ...oauthAuth(), type: 'client_credentials' } as Auth;
    const since = sb.state.requestLog.lastSeq;
    expect((await callApi(sb, manager({ auth }))).status).toBe(200);
    expect((await callApi(sb, manager({ auth }))).status).toBe(200);
    expect(tokenRequests(sb, since).map((r) => r.auth.grantType)).toEqual(['client_credentials']);
  });

  it('rejected client credentials end in needs_reauth without a retry storm', async () => {
    const auth = { ...oauthAuth({ clientSecret: 'wrong' }), type: 'client_credentials' } as Auth;
    const m = manager({ auth });
    const since = sb.state.requestLog.lastSeq;
    await expect(Promise.all(Array.from({ length: 5 }, () => m.getAccessToken()))).rejects.toBeInstanceOf(NeedsReauthError);
    await expect(m.getAccessToken()).rejects.toBeInstanceOf(NeedsReauthError);
    expect(tokenRequests(sb, since)).toHaveLength(1);
    expect((await storedRow())?.state).toBe('needs_reauth');
  });
});

describe('tokens at rest', () => {
  it('are stored encrypted, bound to their connection and column', async () => {
    const m = manager();
    await authorise(m);
    const token = await m.getAccessToken();
    const row = await storedRow();
    expect(row?.accessTokenEnc).toBeTruthy();
    expect(row?.accessTokenEnc).not.toContain(token);
    expect(JSON.stringify(row)).not.toContain(token);
    expect(cipher.decrypt(row!.accessTokenEnc!, 'crm-bridge/token/acme/access')).toBe(token);
    expect(() => cipher.decrypt(row!.accessTokenEnc!, 'crm-bridge/token/other/access')).toThrow(/cannot be decrypted/);
    expect(() => cipher.decrypt(row!.refreshTokenEnc!, 'crm-bridge/token/acme/access')).toThrow(/cannot be decrypted/);
    expect(() => new TokenCipher(Buffer.alloc(32, 1)).decrypt(row!.accessTokenEnc!, 'crm-bridge/token/acme/access')).toThrow(/TOKEN_ENCRYPTION_KEY/);
  });

  it('use TOKEN_ENCRYPTION_KEY; the embedded database keeps a generated key in DATA_DIR (0600); Postgres without a key is a config error', () => {
    const dataDir = mkdtempSync(join(tmpdir(), 'crm-bridge-key-'));
    const generated = loadTokenKey({ key: undefined, driver: 'pglite', dataDir });
    const path = join(dataDir, 'token-encryption.key');
    expect(statSync(path).mode & 0o777).toBe(0o600);
    expect(Buffer.from(readFileSync(path, 'utf8').trim(), 'base64').equals(generated)).toBe(true);
    expect(loadTokenKey({ key: undefined, driver: 'pglite', dataDir }).equals(generated)).toBe(true);
    expect(loadTokenKey({ key: TEST_KEY, driver: 'postgres', dataDir }).equals(Buffer.from(TEST_KEY, 'base64'))).toBe(true);
    expect(() => loadTokenKey({ key: undefined, driver: 'postgres', dataDir })).toThrow(ConfigError);
    expect(() => loadTokenKey({ key: undefined, driver: 'postgres', dataDir })).toThrow(/TOKEN_ENCRYPTION_KEY: required with DATABASE_URL/);
  });
});

// What a token endpoint and an operator's key can do: a changed encryption key, a proxy's page
// instead of an OAuth answer, an expires_in the database cannot store, a long Retry-After, an
// early refresh that keeps failing.
const ccAuth = () => ({ ...oauthAuth(), type: 'client_credentials' }) as Auth;
/** The key an operator rotated to, or the one regenerated after DATA_DIR/token-encryption.key was lost. */
const otherCipher = () => new TokenCipher(Buffer.alloc(32, 9));

describe('a changed TOKEN_ENCRYPTION_KEY', () => {
  it('static token: the configured token is still used (the stored copy is only a record)', async () => {
    const token = sb.state.issueToken().access_token;
    const auth = { type: 'static', token } as Auth;
    expect((await callApi(sb, manager({ auth }))).status).toBe(200);
    // Restart with another key: the token in the configuration is all the bridge needs.
    const restarted = manager({ auth, cipher: otherCipher() });
    expect((await callApi(sb, restarted)).status).toBe(200);
    // Nor does replacing the token (the documented fix for a static token) help.
    const replaced = { type: 'static', token: sb.state.issueToken().access_token } as Auth;
    expect((await callApi(sb, manager({ auth: replaced, cipher: otherCipher() }))).status).toBe(200);
  });

  it('client_credentials: a new token is fetched instead of failing forever', async () => {
    expect((await callApi(sb, manager({ auth: ccAuth() }))).status).toBe(200);
    const restarted = manager({ auth: ccAuth(), cipher: otherCipher() });
    expect((await callApi(sb, restarted)).status).toBe(200);
  });

  it('oauth2: the undecryptable grant is reported as needs_reauth (so /health says 503 and polling pauses)', async () => {
    await authorise(manager());
    const restarted = manager({ cipher: otherCipher() });
    await expect(restarted.getAccessToken()).rejects.toBeInstanceOf(NeedsReauthError);
    expect((await storedRow())?.state).toBe('needs_reauth');
  });
});

describe('client_credentials and a transient non-OAuth answer from the token endpoint', () => {
  for (const status of [200, 408]) {
    it(`an HTML page with HTTP ${status} (maintenance page, gateway timeout) is not needs_reauth, and the next call recovers`, async () => {
      const proxy = await startTokenProxy(sb.url, { failures: 1, status });
      try {
        const m = manager({ auth: ccAuth(), tokenBaseUrl: proxy.url });
        const first = await m.getAccessToken().then(
          () => 'ok',
          (err: Error) => err.name,
        );
        expect(first).not.toBe('NeedsReauthError');
        // The endpoint is back: the same process gets a token.
        expect((await callApi(sb, m)).status).toBe(200);
        expect((await storedRow())?.state).toBe('ok');
      } finally {
        await proxy.close();
      }
    });
  }
});

describe('an expires_in the database cannot store', () => {
  it('a fractional expires_in on a rotating refresh loses the rotated refresh token, and the next refresh gets the grant revoked', async () => {
    sb.state.setSwitches({ rotateRefreshTokens: true });
    await authorise(manager());
    await expireStoredToken();
    // A CRM whose token endpoint computes expires_in as (exp - now) / 1000 without rounding.
    const proxy = await startRewritingProxy(sb.url, (json) => ({ ...json, expires_in: 3599.5 }));
    try {
      const call = await callApi(sb, manager({ tokenBaseUrl: proxy.url })).then(
        (c) => c.status,
        (err: Error) => err.message.slice(0, 40),
      );
      // Whatever happened, the grant must survive: the next refresh must not send a rotated-away token.
      await expireStoredToken();
      const next = await callApi(sb, manager()).then(
        (c) => c.status,
        (err: Error) => err.message,
      );
      expect({ call, next, revoked: revokedGrants().map((g) => g.revokedReason).filter((r) => /reused/.test(r ?? '')) }).toEqual({ call: 200, next: 200, revoked: [] });
    } finally {
      await proxy.close();
    }
  });
});

describe('an early refresh that fails transiently', () => {
  it('is not retried in full on every call while the current token is still valid', async () => {
    sb.state.setSwitches({ advertisedExpiresInSeconds: 600 });
    let now = Date.now();
    const proxy = await startTokenProxy(sb.url, { failures: 1_000 });
    try {
      const auth = oauthAuth({ refreshMarginSeconds: 120, tokenUrl: `${proxy.url}/oauth/token`, authorizeUrl: `${sb.url}/oauth/authorize` });
      await authorise(manager({ auth: oauthAuth() }));
      const m = manager({ auth, now: () => now, attempts: 3 });
      await m.getAccessToken();
      now += 500_000; // inside the margin, 100 s before the claimed expiry
      for (let i = 0; i < 10; i++) expect((await callApi(sb, m)).statuses).toEqual([200]);
      // Ten API calls in a row, each paying a whole refresh round (attempts × backoff) first.
      expect(proxy.received).toBeLessThanOrEqual(3);
    } finally {
      await proxy.close();
    }
  });
});

describe('a 429 from the token endpoint with a long Retry-After', () => {
  it('is not asked again before Retry-After has passed', async () => {
    await authorise(manager());
    await expireStoredToken();
    let received = 0;
    // Clio: 429 with Retry-After in seconds; here a minute, longer than the request timeout (15 s).
    const server = createServer((req, res) => {
      received++;
      req.resume();
      res.writeHead(429, { 'retry-after': '60', 'content-type': 'application/json' }).end('{"error":"rate_limited"}');
    });
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    try {
      const m = manager({ tokenBaseUrl: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, attempts: 5 });
      const settled = m.getAccessToken().then(
        () => 'ok',
        (err: Error) => err.name,
      );
      // Either waiting the minute out or giving up at once is fine; asking again within 2 s is not.
      await Promise.race([settled, new Promise((resolve) => setTimeout(resolve, 2_000))]);
      expect(received).toBe(1);
    } finally {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  });
});

/** A token endpoint in front of the sandbox's that rewrites successful JSON answers. */
async function startRewritingProxy(target: string, rewrite: (json: Record<string, unknown>) => Record<string, unknown>) {
  const server: Server = createServer((req, res) => {
    void (async () => {
      const body = await readBody(req);
      const upstream = await fetch(`${target}${req.url ?? '/'}`, {
        method: 'POST',
        headers: { 'content-type': req.headers['content-type'] ?? 'application/x-www-form-urlencoded' },
        body,
      });
      const text = await upstream.text();
      const out = upstream.ok ? JSON.stringify(rewrite(JSON.parse(text) as Record<string, unknown>)) : text;
      res.writeHead(upstream.status, { 'content-type': 'application/json' }).end(out);
    })().catch((err: unknown) => res.destroy(err as Error));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

async function readBody(req: IncomingMessage): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const chunk of req) chunks.push(chunk as Buffer);
  return Buffer.concat(chunks).toString('utf8');
}

