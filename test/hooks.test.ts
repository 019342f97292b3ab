import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { count, eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { rowsOf } from '../src/db/client.js';
import { ledger, ledgerBodies, outbox, pendingFetches } from '../src/db/schema/index.js';
import { buildTestApp, captureLogs, connection, OLD_SECRET, SECRET } from './helpers/app.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

const database = await createTestDatabase();
let app: FastifyInstance;

beforeAll(async () => {
  app = await buildTestApp({
    database,
    connections: [
      connection({ inbound: { secrets: [SECRET, OLD_SECRET] } }),
      connection({ id: 'named-header', inbound: { secrets: [SECRET], header: 'X-Bridge-Secret', recordPath: 'data', bodyLimit: 2048 } }),
      // Notified matters are fetched by the poller (never run here: the CRM is nowhere); contacts are not polled.
      {
        id: 'notify',
        connector: 'clio',
        baseUrl: 'http://127.0.0.1:9',
        auth: { type: 'none' },
        inbound: { secrets: [SECRET], payload: 'notification', object: 'matters' },
        poll: { objects: ['matters'] },
      },
    ],
  });
});
afterAll(async () => {
  await app.close();
  await database.close();
});
beforeEach(() => resetDatabase(database));

const matter = (overrides: Record<string, unknown> = {}) => ({
  id: 4211,
  display_number: '00042-Doe',
  status: 'Open',
  description: 'Slip and fall at grocery store',
  practice_area: { id: 7, name: 'Personal Injury' },
  updated_at: '2026-11-20T10:00:00Z',
  ...overrides,
});

function post(body: unknown, options: { connection?: string; headers?: Record<string, string>; query?: string } = {}) {
  return app.inject({
    method: 'POST',
    url: `/hooks/${options.connection ?? 'acme'}${options.query ?? ''}`,
    headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json', ...options.headers },
    payload: typeof body === 'string' ? body : JSON.stringify(body),
  });
}

async function rowCounts() {
  const [l] = await database.db.select({ n: count() }).from(ledger);
  const [o] = await database.db.select({ n: count() }).from(outbox);
  return { ledger: l!.n, outbox: o!.n };
}

describe('POST /hooks/:connection', () => {
  it('answers 202 accepted with an eventId once the ledger and outbox rows are committed', async () => {
    const res = await post(matter());
    expect(res.statusCode).toBe(202);
    const body = res.json();
    expect(body).toEqual({ status: 'accepted', eventId: expect.stringMatching(/^[0-9a-f-]{36}$/) });
    const [row] = await database.db.select().from(ledger).where(eq(ledger.eventId, body.eventId));
    expect(row).toMatchObject({ connectionId: 'acme', object: 'matters', crmId: '4211', source: 'hook', disposition: 'accepted' });
    const [queued] = await database.db.select().from(outbox).where(eq(outbox.eventId, body.eventId));
    expect(queued?.state).toBe('pending');
  });

  it('answers 200 duplicate with the original eventId for the same record and version', async () => {
    const first = (await post(matter())).json();
    const again = await post(matter());
    expect(again.statusCode).toBe(200);
    expect(again.json()).toEqual({ status: 'duplicate', eventId: first.eventId });
    expect(await rowCounts()).toEqual({ ledger: 1, outbox: 1 });
  });

  it('stores a record carrying a NUL (\\u0000) or a lone surrogate with U+FFFD in its place, and knows it again', async () => {
    // Postgres stores neither; an escaped backslash before "u0000" is not a NUL, and a surrogate
    // pair (an emoji) is whole: both stay.
    const body = matter({ description: 'Slip\u0000and fall', location: 'C:\\u0000', client_reference: 'Ref \ud800 \ud83d\ude00', ['key\u0000']: 1 });
    const first = await post(body);
    expect(first.statusCode).toBe(202);
    const [stored] = await database.db.select().from(ledgerBodies).where(eq(ledgerBodies.eventId, first.json().eventId));
    expect(stored!.raw).toMatchObject({ description: 'Slip\ufffdand fall', location: 'C:\\u0000', client_reference: 'Ref \ufffd \ud83d\ude00', ['key\ufffd']: 1 });
    expect(stored!.fields).toMatchObject({ description: 'Slip\ufffdand fall' });
    expect((await post(body)).json()).toEqual({ status: 'duplicate', eventId: first.json().eventId });
  });

  it('treats a versionless record with the head content as a duplicate', async () => {
    const first = (await post({ id: 'c-1', name: 'Jane Roe', etag: 'a' }, { query: '?object=contacts' })).json();
    const again = await post({ name: 'Jane Roe', id: 'c-1', etag: 'b' }, { query: '?object=contacts' });
    expect(again.json()).toEqual({ status: 'duplicate', eventId: first.eventId });
  });

  it('accepts the secret from a named header and the record at a configured path', async () => {
    const res = await post({ data: matter() }, { connection: 'named-header', headers: { authorization: '', 'x-bridge-secret': SECRET } });
    expect(res.statusCode).toBe(202);
  });

  it('accepts every secret listed, so secrets can be rotated without downtime', async () => {
    expect((await post(matter({ id: 1 }), { headers: { authorization: `Bearer ${OLD_SECRET}` } })).statusCode).toBe(202);
    expect((await post(matter({ id: 2 }), { headers: { authorization: `Bearer ${SECRET}` } })).statusCode).toBe(202);
  });

  describe('rejects bad credentials with one and the same 401', () => {
    const cases: Array<[string, Record<string, string>, string?]> = [
      ['a missing secret', { authorization: '' }],
      ['a wrong secret of the same length', { authorization: `Bearer ${SECRET.replace(/.$/, 'x')}` }],
      ['a secret of another length', { authorization: 'Bearer short' }],
      ['a very long secret', { authorization: `Bearer ${'x'.repeat(5000)}` }],
      ['a non-bearer scheme', { authorization: `Basic ${SECRET}` }],
      ['the secret in the wrong header', { authorization: '', 'x-bridge-secret': SECRET }],
      ['an unknown connection', {}, 'nope'],
      ['the right secret for a connection that reads another header', { authorization: `Bearer ${SECRET}` }, 'named-header'],
    ];
    let reference: string | undefined;
    it.each(cases)('%s', async (_name, headers, conn) => {
      const res = await post(matter(), { headers, ...(conn ? { connection: conn } : {}) });
      expect(res.statusCode).toBe(401);
      expect(res.headers['content-type']).toContain('application/problem+json');
      reference ??= res.body;
      expect(res.body).toBe(reference);
      expect(await rowCounts()).toEqual({ ledger: 0, outbox: 0 });
    });
  });

  describe('rejects bad input with problem+json and writes nothing', () => {
    const cases: Array<[string, number, () => ReturnType<typeof post>]> = [
      ['invalid JSON', 400, () => post('{"id": 1,')],
      ['an empty JSON body', 400, () => post('')],
      ['a __proto__ key', 400, () => post('{"id": 5, "__proto__": {"polluted": true}}')],
      ['a constructor.prototype key', 400, () => post('{"id": 5, "constructor": {"prototype": {"polluted": true}}}')],
      ['a record without an id', 422, () => post({ display_number: 'x' })],
      ['an empty id', 422, () => post(matter({ id: '' }))],
      ['an id that is an object', 422, () => post(matter({ id: { nested: 1 } }))],
      ['a JSON array', 422, () => post([matter()])],
      ['a JSON string', 422, () => post('"hello"')],
      ['no record at the record path', 422, () => post(matter(), { connection: 'named-header', headers: { authorization: '', 'x-bridge-secret': SECRET } })],
      ['an unknown object', 422, () => post(matter(), { query: '?object=invoices' })],
      ['a text/plain body', 415, () => post(JSON.stringify(matter()), { headers: { 'content-type': 'text/plain' } })],
      ['a form body', 415, () => post('id=1', { headers: { 'content-type': 'application/x-www-form-urlencoded' } })],
      ['a body over the default 1 MiB limit', 413, () => post(matter({ description: 'x'.repeat(1024 * 1024) }))],
      [
        "a body over the connection's own limit",
        413,
        () => post({ data: matter({ description: 'x'.repeat(4096) }) }, { connection: 'named-header', headers: { authorization: '', 'x-bridge-secret': SECRET } }),
      ],
    ];
    it.each(cases)('%s → %i', async (_name, status, send) => {
      const res = await send();
      expect(res.statusCode).toBe(status);
      expect(res.headers['content-type']).toContain('application/problem+json');
      const problem = res.json();
      expect(problem).toMatchObject({ status, title: expect.any(String), detail: expect.any(String), code: expect.any(String) });
      expect(problem.detail.length).toBeGreaterThan(10);
      expect(res.body).not.toMatch(/at .*\.(ts|js):\d+/);
      expect(await rowCounts()).toEqual({ ledger: 0, outbox: 0 });
      expect(({} as Record<string, unknown>).polluted).toBeUndefined();
    });

    it('says why a prototype-polluting body was refused', async () => {
      expect((await post('{"id": 5, "__proto__": {"x": 1}}')).json().detail).toMatch(/__proto__|constructor/);
    });
  });

  it('stores a notification (id only) durably and counts repeats as duplicates', async () => {
    const first = await post({ id: 99, event: 'updated' }, { connection: 'notify' });
    expect(first.statusCode).toBe(202);
    const again = await post({ id: 99, event: 'updated' }, { connection: 'notify' });
    expect(again.json()).toEqual({ status: 'duplicate', eventId: first.json().eventId });
    const pending = await database.db.select().from(pendingFetches);
    expect(pending).toHaveLength(1);
    expect(await rowCounts()).toEqual({ ledger: 1, outbox: 0 });
  });

  it('refuses a notification of an object whose records nothing would fetch (not polled), and stores nothing', async () => {
    const res = await post({ id: 5 }, { connection: 'notify', query: '?object=contacts' });
    expect(res.statusCode).toBe(422);
    expect(res.headers['content-type']).toMatch(/application\/problem\+json/);
    expect(res.json()).toMatchObject({ code: 'NOTIFICATION_NOT_FETCHED', detail: expect.stringMatching(/"contacts" is not polled/) });
    expect(await database.db.select().from(pendingFetches)).toHaveLength(0);
    expect(await rowCounts()).toEqual({ ledger: 0, outbox: 0 });
  });

  it('turns 50 concurrent identical hooks into one delivery, every answer 2xx', async () => {
    const responses = await Promise.all(Array.from({ length: 50 }, () => post(matter({ id: 777 }))));
    expect(responses.every((r) => r.statusCode === 202 || r.statusCode === 200)).toBe(true);
    expect(responses.filter((r) => r.statusCode === 202)).toHaveLength(1);
    const ids = new Set(responses.map((r) => r.json().eventId));
    expect(ids.size).toBe(1);
    const delivered = await database.db.select().from(ledger).where(eq(ledger.disposition, 'accepted'));
    expect(delivered).toHaveLength(1);
    expect(await rowCounts()).toEqual({ ledger: 1, outbox: 1 });
  });

  // Group commit over real sockets: hooks read in one turn of the event loop share a
  // transaction (their ledger rows one xmin). On PGlite, whose statements run in the event loop,
  // a batch started at once would hold the first hook alone, every time.
  it('commits hooks that arrive together in shared transactions, each answered with its own eventId', async () => {
    const url = await app.listen({ host: '127.0.0.1', port: 0 });
    const hooks = 40;
    // The hooks come from another process, as a CRM's do: a client in this event loop would
    // itself be held up by PGlite's statements and send them one turn at a time.
    const bodies = Array.from({ length: hooks }, (_, i) => JSON.stringify(matter({ id: 9000 + i })));
    const client = `const answers = await Promise.all(${JSON.stringify(bodies)}.map((body) =>
      fetch(${JSON.stringify(`${url}/hooks/acme`)}, { method: 'POST', headers: { authorization: 'Bearer ${SECRET}', 'content-type': 'application/json' }, body })
        .then(async (r) => ({ status: r.status, eventId: (await r.json()).eventId }))));
      process.stdout.write(JSON.stringify(answers));`;
    const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', client]);
    const answers = JSON.parse(stdout) as { status: number; eventId: string }[];
    expect(answers.map((a) => a.status)).toEqual(Array(hooks).fill(202));
    expect(new Set(answers.map((a) => a.eventId)).size).toBe(hooks);
    const [row] = await rowsOf<{ rows: number; transactions: number }>(
      database.db.execute(sql`select count(*)::int as rows, count(distinct xmin::text)::int as transactions from ledger`),
    );
    expect(row!.rows).toBe(hooks);
    expect(row!.transactions).toBeLessThanOrEqual(hooks / 4);
  });

  it('keeps secrets out of the logs', async () => {
    const logs = captureLogs();
    const logged = await buildTestApp({ database, connections: [connection()], logger: logs.logger });
    await logged.inject({ method: 'POST', url: '/hooks/acme', headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' }, payload: matter() });
    await logged.inject({ method: 'POST', url: '/hooks/acme', headers: { authorization: `Bearer ${SECRET}x`, 'content-type': 'application/json' }, payload: matter() });
    await logged.inject({ method: 'POST', url: `/hooks/acme?token=${SECRET}`, headers: { authorization: `Bearer ${SECRET}` }, payload: matter() });
    await logged.close();
    const text = logs.text();
    expect(text).toContain('hook accepted');
    expect(text).not.toContain(SECRET);
  });
});

describe('hook secrets from the environment', () => {
  // A Kubernetes secret made with --from-file, or a .env line with a trailing blank, ends the
  // variable with a newline or a space. HTTP trims header values, so kept as it is, no request
  // could present it: every hook would get 401 while the bridge started as if all were well.
  it.each([
    ['a trailing newline', `${SECRET}\n`],
    ['a trailing space', `${SECRET} `],
    ['a leading space', ` ${SECRET}`],
  ])('takes a secret whose variable has %s without it', async (_name, value) => {
    const app = await buildTestApp({ database, env: { HOOK_SECRET: value }, connections: [connection({ inbound: { secrets: ['${HOOK_SECRET}'] } })] });
    try {
      const res = await app.inject({
        method: 'POST',
        url: '/hooks/acme',
        headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
        payload: { id: 1, updated_at: '2026-11-20T10:00:00Z' },
      });
      expect(res.statusCode).toBe(202);
    } finally {
      await app.close();
    }
  });
});
