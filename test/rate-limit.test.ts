import type { FastifyInstance } from 'fastify';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { buildTestApp, connection, SECRET } from './helpers/app.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

let database: Awaited<ReturnType<typeof createTestDatabase>>;
let app: FastifyInstance;

beforeAll(async () => {
  database = await createTestDatabase();
});
afterAll(() => database.close());
afterEach(async () => {
  await app.close();
  await resetDatabase(database);
});

const ADMIN_TOKEN = 'admin-token-0123456789abcdef';

async function start(env: Record<string, string> = {}) {
  app = await buildTestApp({ database, env: { ADMIN_TOKEN, AUTH_FAILURE_LIMIT: '5', AUTH_FAILURE_WINDOW: '1m', ...env }, connections: [connection()] });
}

const hook = (secret: string, id: number, remoteAddress = '203.0.113.7', headers: Record<string, string> = {}) =>
  app.inject({
    method: 'POST',
    url: '/hooks/acme',
    remoteAddress,
    headers: { authorization: `Bearer ${secret}`, 'content-type': 'application/json', ...headers },
    payload: JSON.stringify({ id, display_number: `M-${id}`, updated_at: '2026-11-20T10:00:00Z' }),
  });

describe('failed authentications', () => {
  it('answer exactly AUTH_FAILURE_LIMIT failures from one address, then 429, on hooks and operator routes alike, while other addresses are untouched', async () => {
    await start();
    // The limit is 5: four failed hooks and a failed admin call are answered 401, and that is all.
    for (let i = 0; i < 4; i++) expect((await hook('wrong-secret-0123456789', i)).statusCode).toBe(401);
    const admin = await app.inject({ method: 'GET', url: '/v1/dead-letters', remoteAddress: '203.0.113.7', headers: { authorization: 'Bearer wrong' } });
    expect(admin.statusCode).toBe(401);

    const refused = await hook('wrong-secret-0123456789', 99);
    expect(refused.statusCode).toBe(429);
    expect(refused.headers['retry-after']).toBeDefined();
    expect((await app.inject({ method: 'GET', url: '/v1/dead-letters', remoteAddress: '203.0.113.7', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })).statusCode).toBe(429);
    // The probes stay reachable, and another address is not affected.
    expect((await app.inject({ method: 'GET', url: '/health/live', remoteAddress: '203.0.113.7' })).statusCode).toBe(200);
    expect((await hook(SECRET, 1, '198.51.100.20')).statusCode).toBe(202);
  });

  it('never refuse a hook with a valid secret, even from an address over the limit (a retired secret still firing from the CRM)', async () => {
    await start();
    for (let i = 0; i < 5; i++) expect((await hook('retired-secret-0123456789', i)).statusCode).toBe(401);
    expect((await hook('retired-secret-0123456789', 50)).statusCode).toBe(429);
    const good = await hook(SECRET, 51);
    expect(good.statusCode).toBe(202);
    // Still counted and refused for the wrong one, and operator routes still check the count first.
    expect((await hook('retired-secret-0123456789', 52)).statusCode).toBe(429);
    expect((await app.inject({ method: 'GET', url: '/v1/dead-letters', remoteAddress: '203.0.113.7', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })).statusCode).toBe(429);
  });

  it('key on the address the proxy forwarded only when TRUST_PROXY names that proxy', async () => {
    const fromBalancer = (secret: string, id: number, client: string) => hook(secret, id, '10.0.0.2', { 'x-forwarded-for': client });
    await start({ TRUST_PROXY: '10.0.0.0/8' });
    // The limit is 5: five failures are answered, the sixth attempt is refused.
    for (let i = 0; i < 5; i++) expect((await fromBalancer('wrong-secret-0123456789', i, '203.0.113.7')).statusCode).toBe(401);
    expect((await fromBalancer('wrong-secret-0123456789', 5, '203.0.113.7')).statusCode).toBe(429);
    // Another caller behind the same balancer is its own address.
    expect((await fromBalancer('wrong-secret-0123456789', 7, '198.51.100.20')).statusCode).toBe(401);
    await app.close();

    // Unset, X-Forwarded-For is ignored: every caller is the balancer, and no caller can pick an address.
    await start();
    for (let i = 0; i < 5; i++) expect((await fromBalancer('wrong-secret-0123456789', i, `203.0.113.${i}`)).statusCode).toBe(401);
    expect((await fromBalancer('wrong-secret-0123456789', 5, '198.51.100.20')).statusCode).toBe(429);
  });

  it('answer only AUTH_FAILURE_LIMIT failures of a burst sent all at once, the rest 429, on hooks and operator routes alike', async () => {
    await start();
    const hooks = await Promise.all(Array.from({ length: 40 }, (_, i) => hook('wrong-secret-0123456789', i)));
    expect(hooks.map((a) => a.statusCode).sort()).toEqual([...Array(5).fill(401), ...Array(35).fill(429)]);
    const admin = await Promise.all(
      Array.from({ length: 40 }, () => app.inject({ method: 'GET', url: '/v1/dead-letters', remoteAddress: '198.51.100.20', headers: { authorization: 'Bearer wrong' } })),
    );
    expect(admin.map((a) => a.statusCode).sort()).toEqual([...Array(5).fill(401), ...Array(35).fill(429)]);
    // A failure answered 429 says so as the check's 429 does, without the status page's login challenge.
    const page = await Promise.all(Array.from({ length: 8 }, () => app.inject({ method: 'GET', url: '/', remoteAddress: '192.0.2.9', headers: { authorization: 'Bearer wrong' } })));
    expect(page.map((a) => a.statusCode).sort()).toEqual([...Array(5).fill(401), ...Array(3).fill(429)]);
    expect(page.find((a) => a.statusCode === 401)!.headers['www-authenticate']).toMatch(/^Basic /);
    const refused = page.find((a) => a.statusCode === 429)!;
    expect(refused.json()).toMatchObject({ status: 429, code: 'RATE_LIMITED' });
    expect(refused.headers['retry-after']).toBeDefined();
    expect(refused.headers['www-authenticate']).toBeUndefined();
  });

  it('never slow a burst of 500 correctly authenticated hooks from one address', async () => {
    await start();
    const answers = await Promise.all(Array.from({ length: 500 }, (_, i) => hook(SECRET, i + 1)));
    expect(answers.filter((a) => a.statusCode === 429)).toHaveLength(0);
    expect(answers.every((a) => a.statusCode === 202)).toBe(true);
  });

  it('with AUTH_FAILURE_LIMIT=1, answer one failure and refuse the next attempt, even with the right token', async () => {
    await start({ AUTH_FAILURE_LIMIT: '1' });
    const admin = (token: string) => app.inject({ method: 'GET', url: '/v1/dead-letters', remoteAddress: '203.0.113.7', headers: { authorization: `Bearer ${token}` } });
    expect((await admin(ADMIN_TOKEN)).statusCode).toBe(200);
    expect((await admin('wrong')).statusCode).toBe(401);
    const refused = await admin(ADMIN_TOKEN);
    expect(refused.statusCode).toBe(429);
    expect(refused.json()).toMatchObject({ status: 429, code: 'RATE_LIMITED' });
  });

  it('are not limited when AUTH_FAILURE_LIMIT is 0', async () => {
    await start({ AUTH_FAILURE_LIMIT: '0' });
    for (let i = 0; i < 10; i++) expect((await hook('wrong-secret-0123456789', i)).statusCode).toBe(401);
  });
});
