import { Writable } from 'node:stream';
import { sql } from 'drizzle-orm';
import Fastify, { type FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { loggerOptions } from '../src/logger.js';
import { pollStream } from '../src/sync/poller.js';
import { buildTestApp, SECRET } from './helpers/app.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

/**
 * Client data stays out of /health and the logs: a seeded client's name, email and phone never
 * appear there, even when the last poll failed on that very record.
 */

const CLIENT = { name: 'Jane Roe-Whitfield', email: 'jane.whitfield@example.org', phone: '+1 555 0142 7788' };
const SEEDED = [CLIENT.name, CLIENT.email, CLIENT.phone];

let database: Awaited<ReturnType<typeof createTestDatabase>>;
let crm: FastifyInstance;
let crmBase: string;
/** What the local CRM's list call answers next. */
let answer: { status: number; body: unknown };
const apps: FastifyInstance[] = [];

const record = (extra: Record<string, unknown> = {}) => ({ id: 'c-1', ...CLIENT, notes: 'slipped on a wet floor', updated_at: '2026-11-20T10:00:00.000Z', ...extra });

beforeAll(async () => {
  database = await createTestDatabase();
  // A real HTTP server standing in for a CRM whose answers the tests choose.
  crm = Fastify();
  crm.get('/contacts', async (_req, reply) => reply.code(answer.status).send(answer.body));
  crmBase = await crm.listen({ port: 0, host: '127.0.0.1' });
});
afterAll(async () => {
  await crm.close();
  await database.close();
});
afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()));
  await resetDatabase(database);
});

async function startApp(level: 'info' | 'debug') {
  const lines: string[] = [];
  const logger = pino({ ...loggerOptions(level) }, new Writable({ write: (chunk: Buffer, _enc, done) => (lines.push(chunk.toString()), done()) }));
  const logs = { text: () => lines.join('') };
  const app = await buildTestApp({
    database,
    logger,
    connections: [
      {
        id: 'intake',
        connector: {
          baseUrl: crmBase,
          objects: {
            contacts: {
              idPath: 'id',
              updatedAtPath: 'updated_at',
              fields: { name: 'name', email: 'email', phone: 'phone', notes: 'notes' },
              sensitive: ['name', 'email', 'phone', 'notes'],
              list: { request: { path: '/contacts', query: { since: '{{since}}' } }, records: 'data', pagination: { style: 'none' }, order: 'updatedAt' },
            },
          },
        },
        inbound: { secrets: [SECRET], object: 'contacts' },
        poll: { objects: ['contacts'], interval: '1h' },
      },
    ],
  });
  apps.push(app);
  return { app, logs: logs.text };
}

const hook = (app: FastifyInstance, body: unknown) =>
  app.inject({ method: 'POST', url: '/hooks/intake', headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' }, payload: JSON.stringify(body) });

function expectNoClientData(text: string) {
  for (const value of SEEDED) expect(text).not.toContain(value);
  expect(text).not.toContain('wet floor');
}

describe('/health', () => {
  it('shows only the error class and status when the CRM answers with an error body that echoes the record', async () => {
    const { app } = await startApp('info');
    answer = { status: 422, body: { error: 'invalid record', record: record() } };
    const run = await pollStream(app.poller.stream('intake', 'contacts'));
    expect(run.status).toBe('failed');

    const res = await app.inject({ method: 'GET', url: '/health' });
    expect(res.json().connections[0].poll.lastError).toBe('CRM_HTTP_STATUS (HTTP 422)');
    expectNoClientData(res.body);
  });

  it('shows only the error class when the record itself makes the change gate fail', async () => {
    const { app, logs } = await startApp('info');
    // A database rule refuses this record's body: the insert fails with the record among its
    // parameters, as any database error in the gate would.
    await database.db.execute(sql`
      create function refuse_marked_body() returns trigger language plpgsql as $$
      begin
        if new.raw::text like '%refuse me%' then raise exception 'refused by a rule'; end if;
        return new;
      end $$`);
    await database.db.execute(sql`create trigger refuse_marked_body before insert on ledger_bodies for each row execute function refuse_marked_body()`);
    try {
      answer = { status: 200, body: { data: [record({ notes: 'slipped on a wet floor, refuse me' })] } };
      const run = await pollStream(app.poller.stream('intake', 'contacts'));
      expect(run.status).toBe('failed');

      const res = await app.inject({ method: 'GET', url: '/health' });
      expect(res.json().connections[0].poll.lastError).toMatch(/^DB_[0-9A-Z]{5}$|^DB_ERROR$/);
      expectNoClientData(res.body);

      // The same record by hook: a 500 whose logged error carries no parameters either.
      const failed = await hook(app, record({ notes: 'slipped on a wet floor, refuse me' }));
      expect(failed.statusCode).toBe(500);
      expectNoClientData(failed.body);
      expect(logs()).toContain('request failed');
      expectNoClientData(logs());
    } finally {
      await database.db.execute(sql`drop trigger refuse_marked_body on ledger_bodies`);
      await database.db.execute(sql`drop function refuse_marked_body()`);
    }
  });
});

describe('logs', () => {
  it('carry no record content at info level, through hooks and polls', async () => {
    const { app, logs } = await startApp('info');
    expect((await hook(app, record())).statusCode).toBe(202);
    answer = { status: 200, body: { data: [record({ updated_at: '2026-11-20T11:00:00.000Z', notes: 'slipped on a wet floor, twice' })] } };
    expect((await pollStream(app.poller.stream('intake', 'contacts'))).status).toBe('ok');
    expect(logs()).toContain('c-1');
    expectNoClientData(logs());
  });

  it('at debug level show the mapped record with the sensitive fields redacted', async () => {
    const { app, logs } = await startApp('debug');
    expect((await hook(app, record())).statusCode).toBe(202);
    answer = { status: 200, body: { data: [record({ updated_at: '2026-11-20T11:00:00.000Z' })] } };
    expect((await pollStream(app.poller.stream('intake', 'contacts'))).status).toBe('ok');
    const lines = logs()
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { msg: string; fields?: Record<string, unknown> });
    const logged = lines.filter((l) => l.msg === 'hook record' || l.msg === 'polled record');
    expect(logged.map((l) => l.msg).sort()).toEqual(['hook record', 'polled record']);
    for (const l of logged) expect(l.fields).toEqual({ name: '[Redacted]', email: '[Redacted]', phone: '[Redacted]', notes: '[Redacted]' });
    expectNoClientData(logs());
  });
});
