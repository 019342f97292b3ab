import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { tokens } from '../src/db/schema/index.js';
import { openDatabase } from '../src/db/client.js';
import { buildTestApp, connection, SECRET } from './helpers/app.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

const database = await createTestDatabase();
let app: FastifyInstance;

beforeAll(async () => {
  app = await buildTestApp({ database, connections: [connection(), connection({ id: 'beta' })] });
});
afterAll(async () => {
  await app.close();
  await database.close();
});
beforeEach(() => resetDatabase(database));

describe('GET /health', () => {
  it('answers 200 with the database check and each connection', async () => {
    const res = await app.inject('/health');
    expect(res.statusCode).toBe(200);
    const body = res.json();
    expect(body).toMatchObject({ status: 'ok', checks: { db: { status: 'ok' } } });
    expect(body.connections.map((c: { id: string }) => c.id)).toEqual(['acme', 'beta']);
    expect(body.connections[0]).toMatchObject({
      auth: { state: 'none' },
      hooks: { lastReceivedAt: null },
      delivery: { pending: 0, oldestPendingAgeSeconds: null, deadLetters: 0 },
    });
  });

  it('shows when the last hook arrived and how many deliveries are pending', async () => {
    const before = Date.now();
    await app.inject({
      method: 'POST',
      url: '/hooks/acme',
      headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
      payload: { id: 1, updated_at: '2026-11-01T00:00:00Z', display_number: 'x' },
    });
    const acme = (await app.inject('/health')).json().connections[0];
    expect(Date.parse(acme.hooks.lastReceivedAt)).toBeGreaterThanOrEqual(before - 1000);
    expect(acme.delivery.pending).toBe(1);
    expect(acme.delivery.oldestPendingAgeSeconds).toBeGreaterThanOrEqual(0);
  });

  it('does not count a hook it refused (422, nothing recorded) as the last hook received', async () => {
    // The automation's body does not match the configuration (no record at inbound.recordPath).
    const refusing = await buildTestApp({ database, connections: [connection({ inbound: { recordPath: 'data' } })] });
    const post = (payload: unknown) =>
      refusing.inject({ method: 'POST', url: '/hooks/acme', headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' }, payload: JSON.stringify(payload) });
    try {
      for (const payload of [{ id: 1, status: 'Open' }, { data: { status: 'Open' } }]) expect((await post(payload)).statusCode).toBe(422);
      expect((await refusing.inject('/health')).json().connections[0].hooks.lastReceivedAt).toBeNull();

      expect((await post({ data: { id: 1, status: 'Open', updated_at: '2026-11-01T00:00:00Z' } })).statusCode).toBe(202);
      expect((await refusing.inject('/health')).json().connections[0].hooks.lastReceivedAt).toEqual(expect.any(String));
    } finally {
      await refusing.close();
    }
  });

  it('answers 503 when a connection needs re-authorisation', async () => {
    await database.db.insert(tokens).values({ connectionId: 'beta', state: 'needs_reauth' });
    const res = await app.inject('/health');
    expect(res.statusCode).toBe(503);
    expect(res.json().connections[1].auth.state).toBe('needs_reauth');
  });

  it('answers /health/live without touching the database', async () => {
    const res = await app.inject('/health/live');
    expect(res.statusCode).toBe(200);
    expect(res.json()).toEqual({ status: 'ok' });
  });

  it('answers 503 with the error class when the database is unreachable', async () => {
    const broken = openDatabase(process.env.DATABASE_URL ? { url: 'postgres://postgres@127.0.0.1:1/none', max: 1 } : { dataDir: 'memory://' });
    const isolated = await buildTestApp({ database: { ...database, db: broken.db, migrate: async () => {} } });
    await broken.close();
    const res = await isolated.inject('/health');
    expect(res.statusCode).toBe(503);
    const body = res.json();
    expect(body.status).toBe('down');
    expect(body.checks.db.status).toBe('down');
    expect(typeof body.checks.db.error).toBe('string');
    await isolated.close();
  });
});
