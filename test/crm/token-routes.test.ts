import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { TokenProvider } from '../../src/crm/token-provider.js';
import { NeedsReauthError } from '../../src/crm/token-provider.js';
import { TokenCipher } from '../../src/crm/crypto.js';
import { leases, tokens } from '../../src/db/schema/index.js';
import { startSandbox, type Sandbox } from '../../src/sandbox/index.js';
import { formatStatus } from '../../src/status-command.js';
import { buildTestApp, captureLogs, connection } from '../helpers/app.js';
import { createTestDatabase, resetDatabase } from '../helpers/database.js';
import { callApi, TEST_KEY, testCipher, tokenRequests } from '../fixtures/token-helpers.js';
import { clioConnection } from '../helpers/bridge.js';

const ADMIN_TOKEN = 'admin-token-0123456789abcdef';
const asAdmin = { authorization: `Bearer ${ADMIN_TOKEN}` };
const oauth2Auth = { type: 'oauth2', clientId: 'sandbox-client', clientSecret: 'sandbox-secret', tokenUrl: '/oauth/token', authorizeUrl: '/oauth/authorize' };
const database = await createTestDatabase();
const logs = captureLogs();
let sb: Sandbox;
let app: FastifyInstance;

beforeAll(async () => {
  sb = await startSandbox({ records: 20 });
  app = await buildTestApp({
    database,
    logger: logs.logger,
    env: { TOKEN_ENCRYPTION_KEY: TEST_KEY, ADMIN_TOKEN },
    connections: [
      connection({ auth: oauth2Auth, baseUrl: sb.url }),
      connection({ id: 'keyed', auth: { type: 'static', token: 'a-static-token-value' }, baseUrl: sb.url }),
      connection({ id: 'plain' }),
    ],
  });
});
afterAll(async () => {
  await app.close();
  await sb.close();
  await database.close();
});
beforeEach(async () => {
  sb.state.resetSwitches();
  sb.state.setSwitches({ autoApprove: true });
  await resetDatabase(database);
});

/** What an operator's browser does: /start logged in, the CRM's (auto-approved) consent, back to /callback with the cookie. */
async function connectThroughBrowser(connectionId = 'acme', through: FastifyInstance = app) {
  const start = await through.inject({ method: 'GET', url: `/oauth/${connectionId}/start`, headers: asAdmin });
  expect(start.statusCode).toBe(302);
  const cookie = String(start.headers['set-cookie']).split(';')[0]!;
  const consent = await fetch(String(start.headers.location), { redirect: 'manual' });
  expect(consent.status).toBe(302);
  const back = new URL(consent.headers.get('location')!);
  return { cookie, callback: `${back.pathname}${back.search}`, back };
}

async function authStateInHealth() {
  const res = await app.inject({ method: 'GET', url: '/health' });
  const acme = (res.json() as { connections: Array<{ id: string; auth: { state: string } }> }).connections.find((c) => c.id === 'acme');
  return { status: res.statusCode, state: acme?.auth.state };
}

/** A code the CRM really issues, for whatever state the asker chose: what anyone can get by consenting with their own account. */
async function codeFromConsent(state: string, redirectUri: string) {
  const consent = await fetch(app.tokens.manager('acme')!.authorizationUrl({ state, redirectUri }), { redirect: 'manual' });
  return new URL(consent.headers.get('location')!).searchParams.get('code')!;
}

function problemOf(res: { statusCode: number; headers: Record<string, unknown>; body: string }) {
  const type = String(res.headers['content-type']).split(';')[0];
  return { status: res.statusCode, type, code: type === 'application/problem+json' ? (JSON.parse(res.body) as { code?: string }).code : undefined };
}

describe('OAuth routes', () => {
  it('connect through the browser; a revoked grant turns /health 503 until re-authorised through the callback', async () => {
    const provider: TokenProvider = app.tokens.get('acme')!;
    expect(await authStateInHealth()).toEqual({ status: 503, state: 'needs_reauth' });

    const first = await connectThroughBrowser();
    expect(first.back.searchParams.get('code')).toBeTruthy();
    const done = await app.inject({ method: 'GET', url: first.callback, headers: { cookie: first.cookie } });
    expect(done.statusCode).toBe(200);
    expect(done.body).toContain('Connected');
    expect((await callApi(sb, provider)).status).toBe(200);
    expect(await authStateInHealth()).toEqual({ status: 200, state: 'ok' });

    sb.state.revokeTokens();
    await expect(callApi(sb, provider)).rejects.toBeInstanceOf(NeedsReauthError);
    expect(await authStateInHealth()).toEqual({ status: 503, state: 'needs_reauth' });
    expect(logs.text().match(/acme needs re-authorisation/g)).toHaveLength(1);

    const since = sb.state.requestLog.lastSeq;
    await expect(provider.getAccessToken()).rejects.toBeInstanceOf(NeedsReauthError);
    expect(tokenRequests(sb, since)).toHaveLength(0);

    const again = await connectThroughBrowser();
    expect((await app.inject({ method: 'GET', url: again.callback, headers: { cookie: again.cookie } })).statusCode).toBe(200);
    const call = await callApi(sb, provider);
    expect(call.status).toBe(200);
    expect(await authStateInHealth()).toEqual({ status: 200, state: 'ok' });

    // No token reaches the logs: neither those used nor the stored refresh token.
    const [row] = await database.db.select().from(tokens).where(eq(tokens.connectionId, 'acme'));
    const refresh = testCipher().decrypt(row!.refreshTokenEnc!, 'crm-bridge/token/acme/refresh');
    const text = logs.text();
    expect(text).toContain('connection authorised');
    for (const secret of [...call.tokens, refresh, first.back.searchParams.get('code')!]) expect(text).not.toContain(secret);
  });

  it('polls as soon as the browser authorisation is done, not at the next interval', async () => {
    const auth = { type: 'oauth2', clientId: 'sandbox-client', clientSecret: 'sandbox-secret', tokenUrl: '/oauth/token', authorizeUrl: '/oauth/authorize' };
    const polling = await buildTestApp({ database, startDaemons: true, env: { TOKEN_ENCRYPTION_KEY: TEST_KEY, ADMIN_TOKEN }, connections: [clioConnection(sb, { id: 'acme', auth })] });
    const stream = async () => {
      const res = await polling.inject({ method: 'GET', url: '/health' });
      const acme = (res.json() as { connections: Array<{ id: string; poll: { streams: Array<{ lastSuccessAt: string | null; lastError: string | null }> } }> }).connections[0]!;
      return acme.poll.streams[0]!;
    };
    const until = async (done: (s: Awaited<ReturnType<typeof stream>>) => boolean) => {
      for (let i = 0; i < 200; i++) {
        const s = await stream();
        if (done(s)) return s;
        await new Promise((r) => setTimeout(r, 25));
      }
      throw new Error(`not reached: ${JSON.stringify(await stream())}`);
    };
    try {
      // The daemons' first run, at start, found no token; the next is an hour away.
      await until((s) => s.lastError?.startsWith('NEEDS_REAUTH') ?? false);
      const { cookie, callback } = await connectThroughBrowser('acme', polling);
      expect((await polling.inject({ method: 'GET', url: callback, headers: { cookie } })).statusCode).toBe(200);
      const polled = await until((s) => s.lastSuccessAt !== null);
      expect(polled.lastError).toBeNull();
    } finally {
      await polling.close();
    }
  });

  it('refuses a callback without the browser cookie, with a tampered state, or carrying the CRM\'s error, and stores nothing', async () => {
    const { cookie, callback, back } = await connectThroughBrowser();
    const noCookie = await app.inject({ method: 'GET', url: callback });
    expect(noCookie.statusCode).toBe(400);
    expect(noCookie.body).toContain('started in this browser');

    const tampered = new URL(back);
    tampered.searchParams.set('state', `${back.searchParams.get('state')}x`);
    expect((await app.inject({ method: 'GET', url: `${tampered.pathname}${tampered.search}`, headers: { cookie } })).statusCode).toBe(400);

    const denied = new URL(back);
    denied.searchParams.delete('code');
    denied.searchParams.set('error', 'access_denied');
    const refused = await app.inject({ method: 'GET', url: `${denied.pathname}${denied.search}`, headers: { cookie } });
    expect(refused.statusCode).toBe(400);
    expect(refused.body).toContain('access_denied');

    const otherConnection = await app.inject({ method: 'GET', url: callback.replace('/oauth/acme/', '/oauth/keyed/'), headers: { cookie } });
    expect(otherConnection.statusCode).toBe(404);

    expect(await database.db.select().from(tokens)).toEqual([]);
  });

  it('reports a code the CRM refuses as a failed authorisation', async () => {
    const { cookie, back } = await connectThroughBrowser();
    back.searchParams.set('code', `${back.searchParams.get('code')}x`);
    const refused = await app.inject({ method: 'GET', url: `${back.pathname}${back.search}`, headers: { cookie } });
    expect(refused.statusCode).toBe(400);
    expect(refused.body).toContain('invalid_grant');
  });

  it('has no OAuth routes for connections without the authorization-code grant', async () => {
    expect((await app.inject({ method: 'GET', url: '/oauth/keyed/start', headers: asAdmin })).statusCode).toBe(404);
    expect((await app.inject({ method: 'GET', url: '/oauth/plain/start', headers: asAdmin })).statusCode).toBe(404);
    expect((await app.inject({ method: 'GET', url: '/oauth/nope/start', headers: asAdmin })).statusCode).toBe(404);
    expect(app.tokens.get('plain')).toBeUndefined();
    expect(app.tokens.get('keyed')).toBeDefined();
  });
});

describe('who may replace a connection\'s grant', () => {
  it('starts an OAuth flow only with the admin credential: none or a wrong one gets 401 with the Basic challenge and no redirect to the CRM', async () => {
    const wrong = 'wrong-admin-token-0123456789';
    for (const headers of [{}, { authorization: `Bearer ${wrong}` }, { authorization: `Basic ${Buffer.from(`admin:${wrong}`).toString('base64')}` }]) {
      const res = await app.inject({ method: 'GET', url: '/oauth/acme/start', headers });
      expect(problemOf(res)).toEqual({ status: 401, type: 'application/problem+json', code: 'UNAUTHORIZED' });
      expect(res.headers['www-authenticate']).toMatch(/^Basic realm=/);
      expect(res.headers.location).toBeUndefined();
      expect(res.headers['set-cookie']).toBeUndefined();
    }
    // Bearer for scripts, a Basic login (any user name) for the browser an operator opens it in.
    for (const headers of [asAdmin, { authorization: `Basic ${Buffer.from(`ops:${ADMIN_TOKEN}`).toString('base64')}` }]) {
      const res = await app.inject({ method: 'GET', url: '/oauth/acme/start', headers });
      expect(res.statusCode).toBe(302);
      expect(String(res.headers.location).startsWith(`${sb.url}/oauth/authorize?`)).toBe(true);
    }

    // With ADMIN_TOKEN unset the route is closed to everyone, as the other operator routes are.
    const closed = await buildTestApp({ database, env: { TOKEN_ENCRYPTION_KEY: TEST_KEY }, connections: [connection({ auth: oauth2Auth, baseUrl: sb.url })] });
    try {
      expect((await closed.inject({ method: 'GET', url: '/oauth/acme/start' })).statusCode).toBe(401);
      expect((await closed.inject({ method: 'GET', url: '/oauth/acme/start', headers: asAdmin })).statusCode).toBe(401);
    } finally {
      await closed.close();
    }
    expect(logs.text()).not.toContain(ADMIN_TOKEN);
    expect(logs.text()).not.toContain(wrong);
  });

  it('completes only a flow an authenticated start began: a state it did not issue, a missing or another browser\'s cookie, or a used state gets 400 problem+json and stores nothing', async () => {
    const redirectUri = 'http://localhost:80/oauth/acme/callback';
    const callbackUrl = (code: string, state: string) => `/oauth/acme/callback?${new URLSearchParams({ code, state })}`;
    const bodies: string[] = [];
    const refused = async (url: string, cookie?: string) => {
      const res = await app.inject({ method: 'GET', url, headers: cookie === undefined ? {} : { cookie } });
      bodies.push(res.body);
      return problemOf(res);
    };
    const since = sb.state.requestLog.lastSeq;

    // Someone consents with their own CRM account under a state of their choosing: never issued by /start.
    const theirCode = await codeFromConsent('their-state', redirectUri);
    expect(await refused(callbackUrl(theirCode, 'their-state'), 'crm_bridge_oauth_acme=their-state')).toEqual({ status: 400, type: 'application/problem+json', code: 'OAUTH_STATE_INVALID' });
    // A well-formed state signed with any other key.
    const forged = new TokenCipher(Buffer.alloc(32, 9)).sign(JSON.stringify({ c: 'acme', n: 'their-nonce', e: Date.now() + 60_000, r: redirectUri }));
    expect(await refused(callbackUrl(theirCode, forged), 'crm_bridge_oauth_acme=their-nonce')).toMatchObject({ status: 400, code: 'OAUTH_STATE_INVALID' });

    // The operator's flow: its state, seen in a URL, is no use without the cookie of that browser.
    const operator = await connectThroughBrowser();
    const operatorState = operator.back.searchParams.get('state')!;
    const other = await connectThroughBrowser();
    expect(await refused(callbackUrl(theirCode, operatorState))).toMatchObject({ status: 400, code: 'OAUTH_STATE_NOT_THIS_BROWSER' });
    expect(await refused(callbackUrl(theirCode, operatorState), other.cookie)).toMatchObject({ status: 400, code: 'OAUTH_STATE_NOT_THIS_BROWSER' });
    expect(tokenRequests(sb, since)).toHaveLength(0);
    expect(await database.db.select().from(tokens)).toEqual([]);

    // States used by earlier callbacks and expired since are dropped by the next callback; other leases are not.
    const expired = new Date(Date.now() - 60_000);
    await database.db.insert(leases).values([
      { name: 'oauth-state:used-last-month', owner: 'callback', expiresAt: expired },
      { name: 'poll:acme:matters', owner: 'replica-1', expiresAt: expired },
    ]);

    // The operator completes it; the same state and cookie, with the same code or a fresh one, are refused before the CRM.
    expect((await app.inject({ method: 'GET', url: operator.callback, headers: { cookie: operator.cookie } })).statusCode).toBe(200);
    const kept = (await database.db.select().from(leases)).map((l) => l.name).sort();
    expect(kept).toEqual([`oauth-state:${JSON.parse(testCipher().verify(operatorState)!).n}`, 'poll:acme:matters']);
    const [granted] = await database.db.select().from(tokens);
    const afterGrant = sb.state.requestLog.lastSeq;
    const freshCode = await codeFromConsent(operatorState, redirectUri);
    expect(await refused(callbackUrl(freshCode, operatorState), operator.cookie)).toMatchObject({ status: 400, code: 'OAUTH_STATE_USED' });
    expect(await refused(operator.callback, operator.cookie)).toMatchObject({ status: 400, code: 'OAUTH_STATE_USED' });
    expect(tokenRequests(sb, afterGrant)).toHaveLength(0);
    expect(await database.db.select().from(tokens)).toEqual([granted]);

    // Neither bodies nor logs carry a code or a state.
    const shown = [...bodies, logs.text()].join('\n');
    for (const secret of [theirCode, freshCode, operator.back.searchParams.get('code')!, operatorState, forged]) expect(shown).not.toContain(secret);
  });
});

describe('a connection never authorised', () => {
  it('an OAuth2 connection no one has authorised needs authorisation: /health 503 with needs_reauth and reason never_authorised, the status page and crm-bridge status say so', async () => {
    const res = await app.inject({ method: 'GET', url: '/health' });
    expect(res.statusCode).toBe(503);
    const body = res.json() as { connections: Array<{ id: string; auth: unknown }> };
    expect(Object.fromEntries(body.connections.map((c) => [c.id, c.auth]))).toEqual({
      acme: { type: 'oauth2', state: 'needs_reauth', expiresAt: null, reason: 'never_authorised' },
      keyed: { type: 'static', state: 'none', expiresAt: null },
      plain: { type: 'none', state: 'none', expiresAt: null },
    });
    const page = await app.inject({ method: 'GET', url: '/', headers: asAdmin });
    expect(page.body).toMatch(/acme <span class="badge bad">not authorised yet<\/span>/);
    expect(page.body).toContain('Authorise: run <code>crm-bridge auth acme</code> or open <code>/oauth/acme/start</code>');
    expect(formatStatus(res.json(), new Date())).toMatch(/^acme +needs_reauth .*run `crm-bridge auth acme` or open `\/oauth\/acme\/start`/m);

    const { cookie, callback } = await connectThroughBrowser();
    expect((await app.inject({ method: 'GET', url: callback, headers: { cookie } })).statusCode).toBe(200);
    const after = (await app.inject({ method: 'GET', url: '/health' })).json() as { connections: Array<{ id: string; auth: unknown }> };
    expect(after.connections.find((c) => c.id === 'acme')!.auth).toEqual({ type: 'oauth2', state: 'ok', expiresAt: expect.any(String) });
  });

  it('a connection whose auth needs no consent (client credentials, a static key) is not flagged before its first token', async () => {
    const noConsent = await buildTestApp({
      database,
      env: { TOKEN_ENCRYPTION_KEY: TEST_KEY },
      connections: [
        connection({ id: 'keyed', auth: { type: 'static', token: 'a-static-token-value' }, baseUrl: sb.url }),
        connection({ id: 'machine', auth: { type: 'client_credentials', clientId: 'sandbox-client', clientSecret: 'sandbox-secret', tokenUrl: '/oauth/token' }, baseUrl: sb.url }),
      ],
    });
    try {
      const res = await noConsent.inject({ method: 'GET', url: '/health' });
      expect(res.statusCode).toBe(200);
      expect((res.json() as { connections: Array<{ auth: unknown }> }).connections.map((c) => c.auth)).toEqual([
        { type: 'static', state: 'none', expiresAt: null },
        { type: 'client_credentials', state: 'none', expiresAt: null },
      ]);
    } finally {
      await noConsent.close();
    }
  });
});
