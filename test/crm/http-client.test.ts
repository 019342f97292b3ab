import Fastify from 'fastify';
import type { FastifyInstance } from 'fastify';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { CrmHttpError, createCrmHttpClient } from '../../src/crm/http-client.js';
import { safeLoggedError } from '../../src/privacy.js';
import { startSandbox } from '../../src/sandbox/index.js';
import type { Sandbox } from '../../src/sandbox/index.js';
import { captureLog, sandboxTokens } from './helpers.js';

/** A tiny server for the faults the sandbox cannot stage on demand (a first answer that hangs, a fixed Retry-After). */
async function startLocal(register: (app: FastifyInstance) => void): Promise<{ url: string; app: FastifyInstance }> {
  const app = Fastify({ forceCloseConnections: true });
  register(app);
  await app.listen({ port: 0, host: '127.0.0.1' });
  return { url: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`, app };
}

/** A bare node:http server, for answers Fastify would not send: a Content-Length the body never fills, a body that keeps coming. */
async function startRaw(handle: (req: IncomingMessage, res: ServerResponse) => void): Promise<{ url: string; close(): Promise<void> }> {
  const server = createServer(handle);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** How an answer ended on the server's side: `finished` false means the client dropped it before its last byte was sent. */
function whenClosed(res: ServerResponse): Promise<{ finished: boolean }> {
  return new Promise((resolve) => res.on('close', () => resolve({ finished: res.writableFinished })));
}

/** A listing page of exactly `bytes` bytes of JSON. */
function pageOf(bytes: number): Buffer {
  const head = '{"data":[],"note":"';
  const tail = '"}';
  return Buffer.from(head + 'x'.repeat(bytes - head.length - tail.length) + tail);
}

async function rejection(p: Promise<unknown>): Promise<CrmHttpError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof CrmHttpError) return err;
    throw err;
  }
  throw new Error('expected the call to fail');
}

describe('CRM HTTP client', () => {
  let sb: Sandbox;
  beforeAll(async () => {
    sb = await startSandbox({ records: 40 });
  });
  beforeEach(() => sb.state.resetSwitches());
  afterAll(() => sb.close());

  const sinceNow = () => sb.state.requestLog.lastSeq;
  const apiLog = (since: number) => sb.state.requestLog.list({ since, pathPrefix: '/api/v4' });

  it('retries a call that outlives its timeout and returns the answer of the attempt that came back', async () => {
    let calls = 0;
    const local = await startLocal((app) => {
      app.get('/slow', async () => {
        calls++;
        if (calls === 1) await new Promise((r) => setTimeout(r, 5_000));
        return { ok: calls };
      });
    });
    try {
      const client = createCrmHttpClient({ baseUrl: local.url, timeoutMs: 1_000, maxRetries: 2, retryBaseMs: 10 });
      const res = await client.request<{ ok: number }>({ url: '/slow' });
      expect(res.body).toEqual({ ok: 2 });
      expect(calls).toBe(2);
    } finally {
      await local.app.close();
    }
  });

  it('gives up with CRM_TIMEOUT when every attempt times out', async () => {
    sb.state.setSwitches({ latencyMs: 400 });
    const tokens = sandboxTokens(sb);
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens, timeoutMs: 50, maxRetries: 1, retryBaseMs: 5 });
    const err = await rejection(client.request({ url: '/api/v4/practice_areas.json' }));
    expect(err.code).toBe('CRM_TIMEOUT');
    expect(err.message).toContain('/api/v4/practice_areas.json');
    expect(err.message).toContain('2 attempts');
  });

  it('retries 5xx answers with backoff until one succeeds (seeded 50% error rate)', async () => {
    sb.state.setSwitches({ errorRate: 0.5 });
    const since = sinceNow();
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens: sandboxTokens(sb), maxRetries: 10, retryBaseMs: 1, retryMaxMs: 5 });
    for (let i = 0; i < 12; i++) expect((await client.request({ url: '/api/v4/practice_areas.json' })).status).toBe(200);
    const log = apiLog(since);
    expect(log.filter((e) => e.fault === 'error').length).toBeGreaterThan(0);
    expect(log.filter((e) => e.status === 200)).toHaveLength(12);
  });

  it('stops retrying 5xx after maxRetries with CRM_HTTP_STATUS naming the status', async () => {
    sb.state.setSwitches({ errorRate: 1 });
    const since = sinceNow();
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens: sandboxTokens(sb), maxRetries: 2, retryBaseMs: 1 });
    const err = await rejection(client.request({ url: '/api/v4/matters.json' }));
    expect(err.code).toBe('CRM_HTTP_STATUS');
    expect([500, 503]).toContain(err.status);
    expect(apiLog(since)).toHaveLength(3);
  });

  it('retries connection resets for reads, but never resends a create whose socket was reset', async () => {
    sb.state.setSwitches({ resetRate: 0.4 });
    const since = sinceNow();
    const tokens = sandboxTokens(sb);
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens, maxRetries: 10, retryBaseMs: 1, retryMaxMs: 5 });
    for (let i = 0; i < 10; i++) expect((await client.request({ url: '/api/v4/practice_areas.json' })).status).toBe(200);
    expect(apiLog(since).some((e) => e.fault === 'reset')).toBe(true);

    sb.state.setSwitches({ resetRate: 1 });
    const before = sinceNow();
    const err = await rejection(client.request({ method: 'POST', url: '/api/v4/contacts.json', json: { data: { type: 'Person', first_name: 'Ada' } } }));
    expect(err.code).toBe('CRM_UNREACHABLE');
    expect(apiLog(before)).toHaveLength(1);
  });

  it('on 429 waits the Retry-After seconds before the next request (request log timestamps)', async () => {
    sb.state.setSwitches({ rateLimit: { limit: 2, windowSeconds: 2 } });
    const tokens = sandboxTokens(sb);
    const token = await tokens.getAccessToken();
    // Someone else spent this token's budget: the client learns of the limit from the 429 itself.
    for (let i = 0; i < 2; i++) await fetch(`${sb.url}/api/v4/practice_areas.json`, { headers: { authorization: `Bearer ${token}` } });
    const since = sinceNow();
    const log = captureLog();
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens, log, maxRetries: 3 });
    expect((await client.request({ url: '/api/v4/practice_areas.json' })).status).toBe(200);
    const [limited, retried] = apiLog(since);
    expect(limited?.status).toBe(429);
    expect(retried?.status).toBe(200);
    const waited = log.lines.find((l) => l.msg.includes('429'))?.obj.delayMs as number;
    expect(waited).toBeGreaterThanOrEqual(1_000);
    // Retry-After is whole seconds, so the wait is too; timers may fire up to 1 ms early.
    expect(Date.parse(retried?.at ?? '') - Date.parse(limited?.at ?? '')).toBeGreaterThanOrEqual(waited - 1);
  });

  it('reads Retry-After as milliseconds when the connector says so (HubSpot search)', async () => {
    sb.state.setSwitches({ hubspotSearchPerSecond: 1 });
    const tokens = sandboxTokens(sb);
    const log = captureLog();
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens, log, retryAfterUnit: 'milliseconds', maxRetryAfterMs: 5_000 });
    const since = sinceNow();
    // One search spends this second's budget; the client's search right after meets the 429.
    await fetch(`${sb.url}/crm/v3/objects/contacts/search`, {
      method: 'POST',
      headers: { authorization: `Bearer ${await tokens.getAccessToken()}`, 'content-type': 'application/json' },
      body: JSON.stringify({ limit: 1 }),
    });
    const res = await client.request({ method: 'POST', url: '/crm/v3/objects/contacts/search', json: { limit: 1 }, idempotent: true });
    expect(res.status).toBe(200);
    const entries = sb.state.requestLog.list({ since, pathPrefix: '/crm/v3' });
    const limitedAt = entries.findIndex((e) => e.status === 429);
    expect(limitedAt).toBeGreaterThan(-1);
    const waited = log.lines.find((l) => l.msg.includes('429'))?.obj.delayMs as number;
    // Read as seconds, a Retry-After of a few hundred would have been refused as too long.
    expect(waited).toBeLessThanOrEqual(1_000);
    expect(Date.parse(entries[limitedAt + 1]?.at ?? '') - Date.parse(entries[limitedAt]?.at ?? '')).toBeGreaterThanOrEqual(waited - 1);
  });

  it('paces a long run by X-RateLimit-* so it never meets a 429', async () => {
    sb.state.setSwitches({ rateLimit: { limit: 4, windowSeconds: 1 } });
    const since = sinceNow();
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens: sandboxTokens(sb), maxRetries: 0 });
    for (let i = 0; i < 13; i++) expect((await client.request({ url: '/api/v4/practice_areas.json' })).status).toBe(200);
    const log = apiLog(since);
    expect(log).toHaveLength(13);
    expect(log.filter((e) => e.status === 429)).toEqual([]);
  });

  it('paces by X-RateLimit-Reset on the CRM\'s clock when its clock and ours disagree by minutes', async () => {
    for (const skewMs of [5 * 60_000, -5 * 60_000]) {
      // A CRM whose clock runs five minutes off ours: its Date and its unix-seconds reset agree with each other.
      const window = { start: 0, count: 0 };
      const statuses: number[] = [];
      const local = await startLocal((app) => {
        app.get('/api/v4/practice_areas.json', async (_request, reply) => {
          const now = Date.now() + skewMs;
          if (now >= window.start + 1_000) Object.assign(window, { start: now, count: 0 });
          window.count++;
          reply.header('date', new Date(now).toUTCString());
          reply.header('x-ratelimit-limit', '4').header('x-ratelimit-remaining', String(Math.max(0, 4 - window.count)));
          reply.header('x-ratelimit-reset', String(Math.ceil((window.start + 1_000) / 1_000)));
          const status = window.count > 4 ? 429 : 200;
          statuses.push(status);
          return reply.code(status).header('retry-after', '1').send({ data: [] });
        });
      });
      try {
        const client = createCrmHttpClient({ baseUrl: local.url, maxRetries: 0 });
        const signal = AbortSignal.timeout(15_000);
        for (let i = 0; i < 9; i++) expect((await client.request({ url: '/api/v4/practice_areas.json', signal })).status).toBe(200);
        expect(statuses.filter((s) => s === 429)).toEqual([]);
      } finally {
        await local.app.close();
      }
    }
  });

  it('turns an HTML page where JSON was expected into CRM_NOT_JSON naming the URL and status, secrets stripped', async () => {
    sb.state.setSwitches({ documentedHostBroken: true });
    const tokens = sandboxTokens(sb);
    const client = createCrmHttpClient({ baseUrl: sb.documentedUrl, tokens });
    const err = await rejection(client.request({ url: '/api/v4/matters.json', query: { access_token: 'sekrit-value', limit: 1 } }));
    expect(err.code).toBe('CRM_NOT_JSON');
    expect(err.status).toBe(404);
    expect(err.message).toContain(`${sb.documentedUrl}/api/v4/matters.json`);
    expect(err.message).toContain('HTML page');
    expect(err.message).not.toContain('sekrit-value');
    expect(err.url).toContain('access_token=%5BRedacted%5D');
  });

  it('on 401 refreshes the token once and replays the call; a second 401 fails instead of looping', async () => {
    const tokens = sandboxTokens(sb);
    const log = captureLog();
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens, log });
    await client.request({ url: '/api/v4/practice_areas.json' });
    sb.state.expireAccessTokens();
    const since = sinceNow();
    expect((await client.request({ url: '/api/v4/practice_areas.json' })).status).toBe(200);
    const after = sb.state.requestLog.list({ since });
    expect(after.map((e) => [e.path, e.status])).toEqual([
      ['/api/v4/practice_areas.json', 401],
      ['/oauth/token', 200],
      ['/api/v4/practice_areas.json', 200],
    ]);
    expect(tokens.unauthorizedCalls).toBe(1);

    // A provider whose "fresh" token is refused too: one replay, then a clear error.
    const stuck = { getAccessToken: async () => 'not-a-token', handleUnauthorized: async () => 'still-not-a-token' };
    const err = await rejection(createCrmHttpClient({ baseUrl: sb.url, tokens: stuck, log }).request({ url: '/api/v4/matters.json' }));
    expect(err.code).toBe('CRM_UNAUTHORIZED');
    for (const t of [...tokens.issued, 'not-a-token', 'still-not-a-token']) expect(log.text()).not.toContain(t);
  });

  it("never sends the access token to a host other than the connection's, whatever a CRM's answer links to", async () => {
    const seen: Array<string | undefined> = [];
    const elsewhere = await startLocal((app) => {
      app.all('/*', async (request) => {
        seen.push(request.headers.authorization);
        return { data: [] };
      });
    });
    try {
      const tokens = sandboxTokens(sb);
      const client = createCrmHttpClient({ baseUrl: `${sb.url}/api/v4`, tokens, maxRetries: 0 });
      // A next-page link as a CRM hands it back, pointing to another host (or port: another origin).
      const err = await rejection(client.request({ url: `${elsewhere.url}/api/v4/matters.json?page_token=abc` }));
      expect(err.code).toBe('CRM_OTHER_ORIGIN');
      expect(err.message).toContain(new URL(sb.url).origin);
      expect(seen).toEqual([]);
      // The same host by an absolute link is fine, and a call without the token (a token endpoint) may go anywhere.
      expect((await client.request({ url: `${sb.url}/api/v4/practice_areas.json` })).status).toBe(200);
      expect((await client.request({ url: `${elsewhere.url}/.well-known/openid-configuration`, auth: false })).status).toBe(200);
      expect(seen).toEqual([undefined]);
      for (const t of tokens.issued) expect(err.message).not.toContain(t);
    } finally {
      await elsewhere.app.close();
    }
  });

  it('follows a redirect on its own host with the token, and refuses one to another host without calling it or refreshing the token', async () => {
    const seen: Array<[string, string, string | undefined]> = [];
    const elsewhere = await startLocal((app) => {
      app.all('/*', async (request, reply) => {
        seen.push(['elsewhere', request.url, request.headers.authorization]);
        return reply.code(401).send({ error: 'unauthorized' });
      });
    });
    const crm = await startLocal((app) => {
      app.get('/old/*', async (request, reply) => reply.code(301).header('location', request.url.replace('/old/', '/api/v4/')).send());
      // A base URL on http:// or a legacy host: the CRM sends every call to its new address.
      app.all('/moved/*', async (request, reply) => reply.code(request.method === 'GET' ? 301 : 307).header('location', `${elsewhere.url}${request.url}`).send());
      app.get('/api/v4/*', async (request) => {
        seen.push(['crm', request.url, request.headers.authorization]);
        return { data: [] };
      });
    });
    try {
      let refreshed = 0;
      const tokens = { getAccessToken: async () => 'tok-1', handleUnauthorized: async () => `tok-${2 + refreshed++}` };
      const client = createCrmHttpClient({ baseUrl: crm.url, tokens, maxRetries: 0 });
      expect((await client.request({ url: '/old/matters.json' })).body).toEqual({ data: [] });
      expect(seen).toEqual([['crm', '/api/v4/matters.json', 'Bearer tok-1']]);

      const read = await rejection(client.request({ url: '/moved/matters.json' }));
      expect(read.code).toBe('CRM_OTHER_ORIGIN');
      expect(read.message).toContain(elsewhere.url);
      const write = await rejection(client.request({ method: 'POST', url: '/moved/contacts.json', json: { data: { first_name: 'Ada' } } }));
      expect(write.code).toBe('CRM_OTHER_ORIGIN');
      // Not a token the CRM refused: nothing was refreshed (a static token is not declared dead),
      // and neither the call nor the record in it went to the other host.
      expect(refreshed).toBe(0);
      expect(seen.filter(([host]) => host === 'elsewhere')).toEqual([]);
    } finally {
      await crm.app.close();
      await elsewhere.app.close();
    }
  });

  it('fails at once on a 5xx whose Retry-After is longer than it may wait, instead of sleeping through it', async () => {
    let calls = 0;
    const local = await startLocal((app) => {
      app.get('/maintenance', async (_request, reply) => {
        calls++;
        return reply.code(503).header('retry-after', '3600').send({ error: 'down for maintenance' });
      });
      app.get('/maintenance-until', async (_request, reply) => {
        calls++;
        return reply.code(503).header('retry-after', new Date(Date.now() + 2 * 3_600_000).toUTCString()).send('<html>maintenance</html>');
      });
      app.get('/briefly', async (_request, reply) => (++calls === 3 ? reply.code(503).header('retry-after', '1').send({}) : { ok: true }));
    });
    try {
      const client = createCrmHttpClient({ baseUrl: local.url, maxRetries: 3, retryBaseMs: 1, maxRetryAfterMs: 60_000 });
      for (const path of ['/maintenance', '/maintenance-until']) {
        calls = 0;
        // Not aborted by the 5 s signal: it did not sleep.
        const err = await rejection(client.request({ url: path, signal: AbortSignal.timeout(5_000) }));
        expect(err.code).not.toBe('CRM_ABORTED');
        expect(err.status).toBe(503);
        expect(err.retryAfterMs).toBeGreaterThan(3_500_000);
        expect(calls).toBe(1);
      }
      // One it may wait for is still waited for.
      calls = 2;
      const started = Date.now();
      expect((await client.request({ url: '/briefly' })).body).toEqual({ ok: true });
      expect(Date.now() - started).toBeGreaterThanOrEqual(999);
    } finally {
      await local.app.close();
    }
  });

  it('names a token that cannot go in a header as such, never retries it as a connection reset, and never quotes it', async () => {
    // Pasted from a web page with its quotes, or wrapped onto two lines in a YAML block.
    for (const pasted of ['“pat-na1-sekrit-value”', 'pat-na1-sekrit\nvalue']) {
      const tokens = { getAccessToken: async () => pasted, handleUnauthorized: async () => pasted };
      const log = captureLog();
      const since = sinceNow();
      const client = createCrmHttpClient({ baseUrl: sb.url, tokens, log, maxRetries: 3, retryBaseMs: 1 });
      const err = await rejection(client.request({ url: '/api/v4/practice_areas.json' }));
      expect(err.code).toBe('CRM_INVALID_REQUEST');
      expect(err.message).toMatch(/header/);
      expect(JSON.stringify(safeLoggedError(err))).not.toContain('sekrit');
      expect(log.text()).not.toContain('sekrit');
      expect(log.lines.filter((l) => l.msg.includes('retrying'))).toEqual([]);
      expect(apiLog(since)).toEqual([]);
    }
  });

  it("never sends a token request's secrets to another host a redirect names, and follows one on its own host", async () => {
    const elsewhere: string[] = [];
    const other = await startLocal((app) => {
      app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string' }, (_req, text, done) => done(null, text));
      app.all('/*', async (request) => {
        elsewhere.push(String(request.body));
        return { access_token: 'theirs', expires_in: 3600 };
      });
    });
    const idp = await startLocal((app) => {
      app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'string' }, (_req, text, done) => done(null, text));
      app.post('/oauth/token', async (_request, reply) => reply.code(307).header('location', `${other.url}/oauth/token`).send());
      app.post('/old/oauth/token', async (_request, reply) => reply.code(308).header('location', '/oauth2/token').send());
      app.post('/oauth2/token', async () => ({ access_token: 'ours', expires_in: 3600 }));
    });
    try {
      const client = createCrmHttpClient({ baseUrl: idp.url, maxRetries: 0 });
      const form = { grant_type: 'refresh_token', refresh_token: 'rt-sekrit', client_id: 'c', client_secret: 'cs-sekrit' };
      const err = await rejection(client.request({ method: 'POST', url: '/oauth/token', auth: false, form }));
      expect(err.code).toBe('CRM_OTHER_ORIGIN');
      expect(err.message).not.toContain('sekrit');
      expect(elsewhere).toEqual([]);
      expect((await client.request({ method: 'POST', url: '/old/oauth/token', auth: false, form })).body).toEqual({ access_token: 'ours', expires_in: 3600 });
    } finally {
      await idp.app.close();
      await other.app.close();
    }
  });

  it('sends form bodies without auth for token endpoints and hands back error bodies', async () => {
    const client = createCrmHttpClient({ baseUrl: sb.url, tokens: sandboxTokens(sb) });
    const ok = await client.request<{ access_token: string; expires_in: number }>({
      method: 'POST',
      url: '/oauth/token',
      auth: false,
      form: { grant_type: 'client_credentials', client_id: 'sandbox-client', client_secret: 'sandbox-secret' },
    });
    expect(ok.body.expires_in).toBe(604800);
    const bad = await client.request<{ error: string }>({ method: 'POST', url: '/oauth/token', auth: false, form: { grant_type: 'refresh_token', refresh_token: 'x', client_id: 'sandbox-client', client_secret: 'sandbox-secret' }, acceptStatus: [400] });
    expect(bad).toMatchObject({ status: 400, body: { error: 'invalid_grant' } });
  });

  describe('answers larger than the client reads', () => {
    // The default is 16 MiB; a small limit keeps these tests from writing that much.
    const LIMIT = 64 * 1024;

    it('refuses an answer declaring a Content-Length over the limit without reading its body, and never retries it', async () => {
      let calls = 0;
      let closed: Promise<{ finished: boolean }> | undefined;
      const local = await startRaw((_req, res) => {
        calls++;
        // Headers only: the body promised never comes, so a client waiting for it would wait for its timeout.
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(16 * LIMIT) });
        res.flushHeaders();
        closed = whenClosed(res);
      });
      try {
        const client = createCrmHttpClient({ baseUrl: local.url, maxResponseBytes: LIMIT, maxRetries: 3, retryBaseMs: 1, timeoutMs: 2_000 });
        const err = await rejection(client.request({ url: '/api/v4/matters.json', query: { access_token: 'sekrit-value', limit: 200 } }));
        expect(err.code).toBe('CRM_RESPONSE_TOO_LARGE');
        expect(err.status).toBe(200);
        expect(err.message).toContain(`${local.url}/api/v4/matters.json`);
        expect(err.message).toContain('1 MiB');
        expect(err.message).toContain('64 KiB');
        expect(err.message).not.toContain('sekrit-value');
        // The client let the connection go rather than wait for the body.
        expect(await closed).toEqual({ finished: false });
        expect(calls).toBe(1);
      } finally {
        await local.close();
      }
    });

    it('stops reading an answer with no Content-Length as soon as it passes the limit, drops the connection, and never retries it', async () => {
      // A listing that would run to 64 MiB: a file server, a proxy's dump, a runaway export.
      const total = 64 * 1024 * 1024;
      let calls = 0;
      let sent: Promise<{ finished: boolean; bytes: number }> | undefined;
      const local = await startRaw((_req, res) => {
        calls++;
        const closed = whenClosed(res);
        sent = (async () => {
          res.writeHead(200, { 'content-type': 'application/json' });
          const chunk = `${JSON.stringify({ id: 1, etag: '"0123456789abcdef"', description: 'x'.repeat(200) })},`.repeat(64);
          res.write('{"data":[');
          let bytes = '{"data":['.length;
          while (bytes < total && !res.destroyed) {
            if (!res.write(chunk)) await Promise.race([new Promise((r) => res.once('drain', r)), closed]);
            bytes += Buffer.byteLength(chunk);
          }
          if (!res.destroyed) res.end('{"id":0}]}');
          return { ...(await closed), bytes };
        })();
      });
      try {
        const client = createCrmHttpClient({ baseUrl: local.url, maxResponseBytes: LIMIT, maxRetries: 3, retryBaseMs: 1 });
        const err = await rejection(client.request({ url: '/api/v4/matters.json' }));
        expect(err.code).toBe('CRM_RESPONSE_TOO_LARGE');
        expect(err.message).toContain(`${local.url}/api/v4/matters.json`);
        expect(err.message).toContain('64 KiB');
        const { finished, bytes } = (await sent)!;
        expect(finished).toBe(false);
        expect(bytes).toBeLessThan(total);
        expect(calls).toBe(1);
      } finally {
        await local.close();
      }
    });

    it('reads an answer of exactly the limit, declared or not, and refuses one a byte longer', async () => {
      const local = await startRaw((req, res) => {
        const url = new URL(req.url ?? '/', 'http://localhost');
        const page = pageOf(Number(url.searchParams.get('bytes')));
        if (url.searchParams.get('declared') === 'true') {
          res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(page.length) }).end(page);
          return;
        }
        // Chunked, in pieces, as a streaming CRM sends it.
        res.writeHead(200, { 'content-type': 'application/json' });
        for (let at = 0; at < page.length; at += 4096) res.write(page.subarray(at, at + 4096));
        res.end();
      });
      try {
        const client = createCrmHttpClient({ baseUrl: local.url, maxResponseBytes: LIMIT, maxRetries: 0 });
        for (const declared of [true, false]) {
          const res = await client.request<{ data: unknown[]; note: string }>({ url: '/page', query: { bytes: LIMIT, declared } });
          expect(res.body.data).toEqual([]);
          expect(res.body.note).toHaveLength(LIMIT - '{"data":[],"note":""}'.length);
          const err = await rejection(client.request({ url: '/page', query: { bytes: LIMIT + 1, declared } }));
          expect(err.code).toBe('CRM_RESPONSE_TOO_LARGE');
        }
      } finally {
        await local.close();
      }
    });

    it('skips the body of a call that expects none, whatever its size, and lets the connection go', async () => {
      let closed: Promise<{ finished: boolean }> | undefined;
      const local = await startRaw((_req, res) => {
        res.writeHead(200, { 'content-length': String(16 * LIMIT) });
        res.flushHeaders();
        closed = whenClosed(res);
      });
      try {
        const client = createCrmHttpClient({ baseUrl: local.url, maxResponseBytes: LIMIT, maxRetries: 0 });
        const res = await client.request({ method: 'DELETE', url: '/api/v4/matters/1.json', expect: 'none' });
        expect(res.status).toBe(200);
        expect(res.body).toBeUndefined();
        expect(await closed).toEqual({ finished: false });
      } finally {
        await local.close();
      }
    });
  });
});
