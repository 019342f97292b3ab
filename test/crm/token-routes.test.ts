import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { TokenProvider } from '../../src/crm/token-provider.js';
import { NeedsReauthError } from '../../src/crm/token-provider.js';
import { tokens } from '../../src/db/schema/index.js';
import { startSandbox, type Sandbox } from '../../src/sandbox/index.js';
import { buildTestApp, captureLogs, connection } from '../helpers/app.js';
import { createTestDatabase, resetDatabase } from '../helpers/database.js';
import { callApi, TEST_KEY, testCipher, tokenRequests } from '../fixtures/token-helpers.js';
import { clioConnection } from '../helpers/bridge.js';

const database = await createTestDatabase();
const logs = captureLogs();
let sb: Sandbox;
let app: FastifyInstance;

beforeAll(async () => {
  sb = await startSandbox({ records: 20 });
  app = await buildTestApp({
    database,
    logger: logs.logger,
    env: { TOKEN_ENCRYPTION_KEY: TEST_KEY },
    connections: [
      connection({ auth: { type: 'oauth2', clientId: 'sandbox-client', clientSecret: 'sandbox-secret', tokenUrl: '/oauth/token', authorizeUrl: '/oauth/authorize' }, baseUrl: sb.url }),
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

/** What a browser does: /start, the CRM's (auto-approved) consent, back to /callback with the cookie. */
async function connectThroughBrowser(connectionId = 'acme', through: FastifyInstance = app) {
  const start = await through.inject({ method: 'GET', url: `/oauth/${connectionId}/start` });
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

describe('OAuth routes', () => {
  it('connect through the browser; a revoked grant turns /health 503 until re-authorised through the callback', async () => {
    const provider: TokenProvider = app.tokens.get('acme')!;
    expect(await authStateInHealth()).toEqual({ status: 200, state: 'none' });

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
    const polling = await buildTestApp({ database, startDaemons: true, env: { TOKEN_ENCRYPTION_KEY: TEST_KEY }, connections: [clioConnection(sb, { id: 'acme', auth })] });
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
    const { cookie, callback } = await connectThroughBrowser();
    expect((await app.inject({ method: 'GET', url: callback, headers: { cookie } })).statusCode).toBe(200);
    const replayed = await app.inject({ method: 'GET', url: callback, headers: { cookie } });
    expect(replayed.statusCode).toBe(400);
    expect(replayed.body).toContain('invalid_grant');
  });

  it('has no OAuth routes for connections without the authorization-code grant', async () => {
    expect((await app.inject({ method: 'GET', url: '/oauth/keyed/start' })).statusCode).toBe(404);
    expect((await app.inject({ method: 'GET', url: '/oauth/plain/start' })).statusCode).toBe(404);
    expect((await app.inject({ method: 'GET', url: '/oauth/nope/start' })).statusCode).toBe(404);
    expect(app.tokens.get('plain')).toBeUndefined();
    expect(app.tokens.get('keyed')).toBeDefined();
  });
});
