import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance, InjectOptions } from 'fastify';
import { afterAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { buildApp } from '../src/app.js';
import { loadConfig } from '../src/config/load.js';
import { DEFAULT_CLIENT, startSandbox } from '../src/sandbox/index.js';
import { matchesAnySecret, sha256 } from '../src/security.js';
import { pollStream } from '../src/sync/poller.js';
import { captureLogs, OLD_SECRET, SECRET } from './helpers/app.js';
import { TEST_TOKEN_KEY } from './helpers/bridge.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

// Node's own comparison, observed (not replaced): every call is recorded and then performed.
const compared = vi.hoisted(() => ({ calls: [] as Array<[number, number]> }));
vi.mock('node:crypto', async (importOriginal) => {
  const actual = await importOriginal<typeof import('node:crypto')>();
  const timingSafeEqual = (a: NodeJS.ArrayBufferView, b: NodeJS.ArrayBufferView) => {
    compared.calls.push([a.byteLength, b.byteLength]);
    return actual.timingSafeEqual(a, b);
  };
  return { ...actual, default: { ...actual, timingSafeEqual }, timingSafeEqual };
});

const database = await createTestDatabase();
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

const PIPELINE_KEY = 'pipeline-key-0123456789abcdef';
const NEW_PIPELINE_KEY = 'pipeline-key-rotated-fedcba9876543210';
const ADMIN_TOKEN = 'admin-token-0123456789abcdef';
const METRICS_TOKEN = 'metrics-token-0123456789abcdef';

/** Candidates of every length and kind, none of them right. */
function wrongCandidates(): Array<string | undefined> {
  const out: Array<string | undefined> = [undefined, '', ' ', SECRET.slice(0, -1), `${SECRET}x`, SECRET.toUpperCase(), SECRET.slice(1), 'é'.repeat(40), '\u0000'.repeat(28)];
  for (let length = 1; length <= 300; length += 7) out.push('x'.repeat(length));
  out.push('y'.repeat(10_000), 'z'.repeat(1_000_000));
  return out;
}

describe('matchesAnySecret', () => {
  it('compares the presented secret with every accepted secret as 32-byte digests, whatever its length, and never throws', () => {
    const accepted = [[SECRET], [SECRET, OLD_SECRET], [OLD_SECRET, SECRET, PIPELINE_KEY]].map((list) => list.map(sha256));
    for (const hashes of accepted) {
      for (const candidate of wrongCandidates()) {
        compared.calls = [];
        let result: boolean | undefined;
        expect(() => (result = matchesAnySecret(candidate, hashes)), `candidate of length ${candidate?.length}`).not.toThrow();
        expect(result).toBe(false);
        expect(compared.calls, `candidate of length ${candidate?.length} against ${hashes.length} secrets`).toEqual(hashes.map(() => [32, 32]));
      }
      // The right secret, wherever it is in the list, takes the same number of comparisons.
      for (const secret of [SECRET, OLD_SECRET, PIPELINE_KEY]) {
        compared.calls = [];
        const expected = hashes.some((h) => h.equals(sha256(secret)));
        expect(matchesAnySecret(secret, hashes)).toBe(expected);
        expect(compared.calls).toEqual(hashes.map(() => [32, 32]));
      }
    }
  });

  it('does the same work for an unknown connection (no accepted secrets) and refuses even the empty digest', () => {
    for (const candidate of [undefined, '', SECRET, 'crm-bridge: no such connection']) {
      compared.calls = [];
      expect(matchesAnySecret(candidate, undefined)).toBe(false);
      expect(compared.calls).toEqual([[32, 32]]);
    }
    compared.calls = [];
    expect(matchesAnySecret(undefined, [sha256('')])).toBe(false);
    expect(compared.calls).toEqual([[32, 32]]);
  });
});

/** Builds the app from a connections file on disk, as `crm-bridge serve` does at start. */
async function buildFromFile(file: object, env: Record<string, string>, logger?: ReturnType<typeof captureLogs>['logger']): Promise<FastifyInstance> {
  const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-security-'));
  const path = join(dir, 'connections.yaml');
  writeFileSync(path, JSON.stringify(file));
  const config = loadConfig({ LOG_LEVEL: 'silent', DATA_DIR: dir, TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY, AUTH_FAILURE_LIMIT: '0', ...env, CRM_BRIDGE_CONFIG: path });
  return buildApp({ config, database, ...(logger ? { loggerInstance: logger } : { loggerInstance: captureLogs().logger }) });
}

const hooksConnection = (secrets: string[], apiKeys: string[]) => ({
  connections: [
    {
      id: 'firm',
      connector: { objects: { matters: { idPath: 'id', updatedAtPath: 'updated_at', fields: { description: 'description' }, create: { request: { method: 'POST', path: '/m' } } } } },
      baseUrl: 'http://127.0.0.1:9',
      inbound: { secrets: secrets.map((_, i) => `\${HOOK_SECRET_${i}}`) },
      outbound: { apiKeys: apiKeys.map((_, i) => `\${API_KEY_${i}}`) },
    },
  ],
});
const secretEnv = (secrets: string[], apiKeys: string[]) => ({
  ...Object.fromEntries(secrets.map((s, i) => [`HOOK_SECRET_${i}`, s])),
  ...Object.fromEntries(apiKeys.map((k, i) => [`API_KEY_${i}`, k])),
});

describe('secret rotation through the connections file', () => {
  it('stops accepting an old hook secret and an old pipeline key once a restart reads a file without them', async () => {
    const hook = (app: FastifyInstance, secret: string, id: number) =>
      app.inject({ method: 'POST', url: '/hooks/firm', headers: { authorization: `Bearer ${secret}` }, payload: { id, updated_at: '2026-11-20T10:00:00Z', description: `d${id}` } });
    const write = (app: FastifyInstance, key: string, n: number) =>
      app.inject({ method: 'POST', url: '/v1/connections/firm/records', headers: { authorization: `Bearer ${key}`, 'idempotency-key': `k-${n}` }, payload: { object: 'matters', externalId: `e-${n}`, fields: { description: `lead ${n}` } } });

    // While rotating: both secrets and both keys are listed.
    const rotating = await buildFromFile(hooksConnection([SECRET, OLD_SECRET], [PIPELINE_KEY, NEW_PIPELINE_KEY]), secretEnv([SECRET, OLD_SECRET], [PIPELINE_KEY, NEW_PIPELINE_KEY]));
    expect((await hook(rotating, OLD_SECRET, 1)).statusCode).toBe(202);
    expect((await hook(rotating, SECRET, 2)).statusCode).toBe(202);
    expect((await write(rotating, PIPELINE_KEY, 1)).statusCode).toBe(202);
    expect((await write(rotating, NEW_PIPELINE_KEY, 2)).statusCode).toBe(202);
    await rotating.close();

    // After the operator removed the old ones and restarted.
    const rotated = await buildFromFile(hooksConnection([SECRET], [NEW_PIPELINE_KEY]), secretEnv([SECRET], [NEW_PIPELINE_KEY]));
    try {
      const refusedHook = await hook(rotated, OLD_SECRET, 3);
      expect(refusedHook.statusCode).toBe(401);
      expect(refusedHook.json()).toMatchObject({ status: 401, code: 'UNAUTHORIZED' });
      expect((await hook(rotated, SECRET, 4)).statusCode).toBe(202);
      expect((await write(rotated, PIPELINE_KEY, 3)).statusCode).toBe(401);
      expect((await write(rotated, NEW_PIPELINE_KEY, 4)).statusCode).toBe(202);
      // The old secret's refusal is the same body as any other wrong secret's.
      const wrong = await hook(rotated, 'never-a-secret-0123456789abcdef', 5);
      expect(refusedHook.body).toBe(wrong.body);
    } finally {
      await rotated.close();
    }
  });
});

describe('secrets and tokens stay out of logs, metrics and error bodies', () => {
  it('censors sensitive keys in any case, two levels down and in arrays, in log lines and child bindings, without touching the logged object', () => {
    const logs = captureLogs();
    const logged = {
      token: 'tok-top',
      connection: { id: 'firm', clientSecret: 'sec-nested', auth: { Refresh_Token: 'tok-deep' } },
      headers: { 'x-hook-secret': 'hdr-secret' },
      attempts: [{ ACCESS_TOKEN: 'tok-array' }],
      crmId: '42',
    };
    const before = JSON.stringify(logged);
    logs.logger.child({ apiKey: 'key-binding', connection: 'firm' }).info(logged, 'hello');
    const line = JSON.parse(logs.text()) as Record<string, any>;
    expect(JSON.stringify(logged)).toBe(before);
    for (const value of ['tok-top', 'sec-nested', 'tok-deep', 'hdr-secret', 'tok-array', 'key-binding']) expect(logs.text()).not.toContain(value);
    expect(line).toMatchObject({
      token: '[Redacted]',
      connection: { id: 'firm', clientSecret: '[Redacted]', auth: { Refresh_Token: '[Redacted]' } },
      headers: '[Redacted]',
      attempts: [{ ACCESS_TOKEN: '[Redacted]' }],
      crmId: '42',
      apiKey: '[Redacted]',
      msg: 'hello',
    });
  });

  it('never shows a hook secret, API key, admin or metrics token, client secret, OAuth code or token, or a presented wrong secret', async () => {
    const sandbox = await startSandbox({ records: 20, autoApprove: true, switches: { rotateRefreshTokens: true } });
    const logs = captureLogs();
    const presentedWrong = ['wrong-presented-secret-aaaaaaaaaaaa', 'wrong-presented-secret-bbbbbbbbbbbb'];
    const app = await buildFromFile(
      {
        connections: [
          {
            id: 'firm',
            connector: 'clio',
            baseUrl: sandbox.url,
            auth: { type: 'oauth2', clientId: DEFAULT_CLIENT.clientId, clientSecret: '${CLIENT_SECRET}', tokenUrl: '/oauth/token', authorizeUrl: '/oauth/authorize' },
            inbound: { secrets: ['${HOOK_SECRET_0}', '${HOOK_SECRET_1}'], recordPath: 'data', object: 'matters' },
            outbound: { apiKeys: ['${API_KEY_0}'] },
            poll: { objects: ['matters'], interval: '1h', pageSize: 10 },
          },
        ],
      },
      { ...secretEnv([SECRET, OLD_SECRET], [PIPELINE_KEY]), CLIENT_SECRET: DEFAULT_CLIENT.clientSecret, ADMIN_TOKEN, METRICS_TOKEN, LOG_LEVEL: 'debug' },
      logs.logger,
    );
    const bodies: string[] = [];
    const send = async (options: InjectOptions) => {
      const res = await app.inject(options);
      bodies.push(`${JSON.stringify(res.headers)}\n${res.body}`);
      return res;
    };
    try {
      // Authorise through the bridge's browser flow, keeping the code to look for afterwards.
      const start = await send({ url: '/oauth/firm/start', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
      const cookie = String(start.headers['set-cookie']).split(';')[0]!;
      const consent = await fetch(String(start.headers.location), { redirect: 'manual' });
      const callbackUrl = new URL(consent.headers.get('location')!);
      const code = callbackUrl.searchParams.get('code')!;
      expect((await send({ url: `${callbackUrl.pathname}${callbackUrl.search}`, headers: { cookie } })).statusCode).toBe(200);

      // Use the tokens: a poll, a forced refresh (401 from an expired token), another poll.
      const first = await pollStream(app.poller.stream('firm', 'matters'));
      expect(first.status, first.error ?? '').toBe('ok');
      sandbox.state.expireAccessTokens();
      const second = await pollStream(app.poller.stream('firm', 'matters'));
      expect(second.status, second.error ?? '').toBe('ok');
      const accessToken = await app.tokens.manager('firm')!.getAccessToken();
      expect(accessToken.length).toBeGreaterThan(8);
      // A replayed callback: refused (its state is used), and the answer must not echo the code.
      await send({ url: `${callbackUrl.pathname}${callbackUrl.search}`, headers: { cookie } });

      // Good and bad traffic on every authenticated route.
      const record = { data: { id: 200000001, updated_at: '2026-11-20T10:00:00Z', etag: 'x1', description: 'd' } };
      await send({ method: 'POST', url: '/hooks/firm', headers: { authorization: `Bearer ${SECRET}` }, payload: record });
      await send({ method: 'POST', url: '/hooks/firm', headers: { authorization: `Bearer ${OLD_SECRET}` }, payload: { data: { ...record.data, etag: 'x2' } } });
      for (const wrong of presentedWrong) {
        await send({ method: 'POST', url: '/hooks/firm', headers: { authorization: `Bearer ${wrong}` }, payload: record });
        await send({ method: 'POST', url: `/hooks/firm?token=${wrong}&secret=${wrong}`, headers: { authorization: `Bearer ${wrong}` }, payload: record });
        await send({ method: 'POST', url: '/v1/connections/firm/records', headers: { authorization: `Bearer ${wrong}`, 'idempotency-key': 'k' }, payload: {} });
        await send({ url: '/v1/dead-letters', headers: { authorization: `Bearer ${wrong}` } });
        await send({ url: '/', headers: { authorization: `Basic ${Buffer.from(`admin:${wrong}`).toString('base64')}` } });
        await send({ url: '/metrics', headers: { authorization: `Bearer ${wrong}` } });
        await send({ url: `/oauth/firm/callback?code=${wrong}&state=${wrong}` });
      }
      await send({ method: 'POST', url: '/v1/connections/firm/records', headers: { authorization: `Bearer ${PIPELINE_KEY}`, 'idempotency-key': 'k-1' }, payload: { object: 'matters', externalId: 'e-1', fields: { description: 'lead' } } });
      await send({ method: 'POST', url: '/hooks/firm', headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' }, payload: `{"data": {"id": 1, "x": "${SECRET}"` });
      await send({ url: '/v1/dead-letters', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
      await send({ url: '/', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
      await send({ url: '/health' });
      const metrics = await send({ url: '/metrics', headers: { authorization: `Bearer ${METRICS_TOKEN}` } });
      expect(metrics.statusCode).toBe(200);

      // Everything secret the bridge holds or was shown.
      const secrets: Record<string, string> = {
        'hook secret': SECRET,
        'second hook secret': OLD_SECRET,
        'pipeline key': PIPELINE_KEY,
        'admin token': ADMIN_TOKEN,
        'metrics token': METRICS_TOKEN,
        'OAuth client secret': DEFAULT_CLIENT.clientSecret,
        'token encryption key': TEST_TOKEN_KEY,
        'authorization code': code,
        'access token': accessToken,
        ...Object.fromEntries(presentedWrong.map((w, i) => [`presented wrong secret ${i}`, w])),
      };
      const places = { logs: logs.text(), metrics: metrics.body, 'response bodies and headers': bodies.join('\n') };
      expect(places.logs.length).toBeGreaterThan(1_000);
      const leaks: string[] = [];
      for (const [where, text] of Object.entries(places)) {
        for (const [what, value] of Object.entries(secrets)) {
          if (text.includes(value)) leaks.push(`${what} in ${where}`);
        }
      }
      expect(leaks).toEqual([]);
      // Error bodies carry no stack and no internals.
      for (const body of bodies) expect(body).not.toMatch(/\n\s+at |node_modules|\.ts:\d+/);
    } finally {
      await app.close();
      await sandbox.close();
    }
  }, 60_000);
});
