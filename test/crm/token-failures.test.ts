// The token manager under what a token endpoint and an operator's key can do to it: a changed
// encryption key, a proxy's page instead of an OAuth answer, an expires_in the database cannot
// store, a long Retry-After, an early refresh that keeps failing.
import { createServer, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { eq } from 'drizzle-orm';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { TokenCipher } from '../../src/crm/crypto.js';
import { createTokenManager, type TokenManagerOptions } from '../../src/crm/token-manager.js';
import { NeedsReauthError } from '../../src/crm/token-provider.js';
import { tokens } from '../../src/db/schema/index.js';
import { startSandbox, type Sandbox } from '../../src/sandbox/index.js';
import { createTestDatabase, resetDatabase } from '../helpers/database.js';
import { authorise, callApi, oauthAuth, startTokenProxy, testCipher } from '../fixtures/token-helpers.js';

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

async function expireStoredToken() {
  sb.state.expireAccessTokens();
  await database.db.update(tokens).set({ expiresAt: new Date(Date.now() - 1_000) }).where(eq(tokens.connectionId, 'acme'));
}

const revokedGrants = () => sb.state.oauth.listGrants().filter((g) => g.revokedAt !== null);
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
      expect({ call, next, revoked: revokedGrants().map((g) => g.revokedReason) }).toEqual({ call: 200, next: 200, revoked: [] });
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

