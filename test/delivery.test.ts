import { createServer, type AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { claimDeliveries, claimStatement } from '../src/db/queries/outbox.js';
import { rowsOf } from '../src/db/client.js';
import { outbox } from '../src/db/schema/index.js';
import type { DeliveryWorker } from '../src/sync/delivery-worker.js';
import { passChanges } from '../src/sync/change-gate.js';
import { printDeadLetters, replayFromCli } from '../src/sync/dead-letters.js';
import { buildTestApp, captureLogs, connection, hookAccepted, SECRET } from './helpers/app.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';
import { startSink, type Sink } from './fixtures/delivery-sink.js';

const ADMIN_TOKEN = 'admin-token-0123456789abcdef';
const PIPELINE_KEY = 'pipeline-api-key-5f1e2d3c4b5a';

const database = await createTestDatabase();
let sink: Sink;
const apps: FastifyInstance[] = [];

beforeEach(async () => {
  await resetDatabase(database);
  sink = await startSink();
});
afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()));
  await sink.close();
});
afterAll(() => database.close());

async function startApp(downstream: Record<string, unknown> = {}, logger?: ReturnType<typeof captureLogs>['logger']) {
  const app = await buildTestApp({
    database,
    env: { ADMIN_TOKEN },
    connections: [
      connection({
        downstream: {
          url: sink.url,
          headers: { Authorization: `Bearer ${PIPELINE_KEY}` },
          timeout: '5s',
          backoff: { base: '1ms', max: '5ms' },
          ...downstream,
        },
      }),
    ],
    ...(logger ? { logger } : {}),
  });
  apps.push(app);
  return { app, worker: app.deliveryWorkers.get('acme')! };
}

const matter = (id: number, version: number, overrides: Record<string, unknown> = {}) => ({
  id,
  display_number: `000${id}-Doe`,
  status: `status-v${version}`,
  practice_area: { id: 7, name: 'Personal Injury' },
  updated_at: new Date(Date.UTC(2026, 10, 20, 10, version)).toISOString(),
  ...overrides,
});

/** Sends a change the way a CRM automation does; returns its event id. */
async function states() {
  return database.db.select({ eventId: outbox.eventId, state: outbox.state, attempts: outbox.attempts, lastStatus: outbox.lastStatus, lastError: outbox.lastError, leaseOwner: outbox.leaseOwner }).from(outbox).orderBy(outbox.id);
}

async function pendingCount(): Promise<number> {
  const rows = await database.db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(outbox).where(eq(outbox.state, 'pending'));
  return rows[0]!.n;
}

/** Ticks until nothing is pending; retries come due after their (tiny) backoff. */
async function drain(worker: DeliveryWorker, maxTicks = 1_000): Promise<void> {
  const signal = new AbortController().signal;
  for (let i = 0; i < maxTicks; i++) {
    await worker.tick(signal);
    if ((await pendingCount()) === 0) return;
    await sleep(5);
  }
  throw new Error(`still ${await pendingCount()} pending after ${maxTicks} ticks`);
}

const tickOnce = (worker: DeliveryWorker) => worker.tick(new AbortController().signal);

describe('delivery to the intake pipeline', () => {
  it('applies each change once and in per-record order when the sink fails 20 times with 5xx before recovering', async () => {
    const logs = captureLogs();
    const { app, worker } = await startApp({ maxAttempts: 40, concurrency: 4 }, logs.logger);
    sink.behave((_r, index) => (index < 20 ? { status: index % 2 ? 502 : 503, body: '{"error":"pipeline down"}' } : { status: 200 }));

    const sent: Record<string, string[]> = { '1': [], '2': [], '3': [] };
    for (let version = 1; version <= 4; version++) {
      for (const id of [1, 2, 3]) {
        if (id === 3 && version > 2) continue;
        sent[String(id)]!.push(await hookAccepted(app, matter(id, version)));
      }
    }
    const eventIds = Object.values(sent).flat();

    await drain(worker);

    expect(sink.requests.filter((r) => r.status! >= 500)).toHaveLength(20);
    // Applied once each, and no key was even answered 2xx twice.
    expect(sink.applied.map((b) => b.id).sort()).toEqual([...eventIds].sort());
    expect(sink.requests.filter((r) => r.status === 200)).toHaveLength(eventIds.length);
    // Order: per record, every request (failed ones included) carries a version no older than the one before.
    for (const [crmId, ids] of Object.entries(sent)) {
      expect(sink.applied.filter((b) => b.crmId === crmId).map((b) => b.id)).toEqual(ids);
      const versionsSeen = sink.requests.filter((r) => r.body.crmId === crmId).map((r) => r.body.version!);
      expect(versionsSeen).toEqual([...versionsSeen].sort());
    }
    const rows = await states();
    expect(rows.every((r) => r.state === 'delivered' && r.leaseOwner === null)).toBe(true);
    expect(rows.reduce((n, r) => n + r.attempts, 0)).toBe(sink.requests.length);
    expect(logs.text()).toMatch(/delivered matters\/1 to acme \(attempt \d+\)/);
    expect(logs.text()).not.toContain(PIPELINE_KEY);
  });

  // A secret mounted from a file (a Kubernetes secret, `$(cat key)` keeps no newline but env_file
  // and secretKeyRef do) ends in a newline; undici refuses such a header value outright.
  it('sends a header whose ${VAR} secret was read with a trailing newline, instead of failing every delivery with "invalid authorization header"', async () => {
    const app = await buildTestApp({
      database,
      env: { INTAKE_API_KEY: `${PIPELINE_KEY}\n` },
      connections: [connection({ downstream: { url: sink.url, headers: { Authorization: 'Bearer ${INTAKE_API_KEY}' }, backoff: { base: '1ms', max: '5ms' }, maxAttempts: 2 } })],
    });
    apps.push(app);
    await hookAccepted(app, matter(43, 1));
    await drain(app.deliveryWorkers.get('acme')!);
    expect(await states()).toEqual([expect.objectContaining({ state: 'delivered', lastError: null })]);
    expect(sink.requests.map((r) => r.headers.authorization)).toEqual([`Bearer ${PIPELINE_KEY}`]);
  });

  it('posts the body DESIGN.md describes with the Idempotency-Key and the configured headers', async () => {
    const { app, worker } = await startApp();
    const eventId = await hookAccepted(app, matter(42, 1));
    await drain(worker);
    const [request] = sink.requests;
    expect(request!.headers['idempotency-key']).toBe(eventId);
    expect(request!.headers.authorization).toBe(`Bearer ${PIPELINE_KEY}`);
    expect(request!.headers['content-type']).toBe('application/json');
    expect(request!.body).toEqual({
      id: eventId,
      connection: 'acme',
      object: 'matters',
      crmId: '42',
      change: 'upsert',
      version: matter(42, 1).updated_at,
      origin: 'crm',
      source: 'hook',
      observedAt: expect.stringMatching(/^\d{4}-\d\d-\d\dT/),
      record: matter(42, 1),
      fields: { name: '00042-Doe', status: 'status-v1', practiceArea: 'Personal Injury', description: null },
    });
  });

  it('dead-letters a 400 at once, keeps the status and an excerpt without secrets, and replay through the API delivers it', async () => {
    const logs = captureLogs();
    const { app, worker } = await startApp({}, logs.logger);
    sink.behave(() => ({ status: 400, body: JSON.stringify({ error: 'practiceArea is not a known value', youSent: `Bearer ${PIPELINE_KEY}` }) }));
    const eventId = await hookAccepted(app, matter(7, 1));

    await tickOnce(worker);
    const [dead] = await states();
    expect(dead).toMatchObject({ state: 'dead', attempts: 1, lastStatus: 400 });
    expect(dead!.lastError).toContain('practiceArea is not a known value');
    expect(dead!.lastError).not.toContain(PIPELINE_KEY);
    expect(logs.text()).toMatch(/dead letter matters\/7 for acme/);
    expect(logs.text()).not.toContain(PIPELINE_KEY);
    expect(await tickOnce(worker)).toBe(false);
    expect(sink.requests).toHaveLength(1);

    const list = await app.inject({ method: 'GET', url: '/v1/dead-letters?connection=acme', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    expect(list.statusCode).toBe(200);
    expect(list.json()).toEqual({
      items: [expect.objectContaining({ eventId, connection: 'acme', object: 'matters', crmId: '7', attempts: 1, lastStatus: 400 })],
      nextBefore: null,
    });

    sink.behave(() => ({ status: 200 }));
    const replay = await app.inject({ method: 'POST', url: `/v1/dead-letters/${eventId}/replay`, headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    expect(replay.statusCode).toBe(202);
    expect(replay.json()).toEqual({ status: 'queued', eventId });
    await drain(worker);

    expect(sink.requests.map((r) => [r.key, r.status])).toEqual([
      [eventId, 400],
      [eventId, 200],
    ]);
    expect((await states())[0]).toMatchObject({ state: 'delivered', attempts: 1 });
    const again = await app.inject({ method: 'POST', url: `/v1/dead-letters/${eventId}/replay`, headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    expect(again.statusCode).toBe(409);
  });

  it("replays a dead letter asked for as operators type it: curl -X POST -H 'Content-Type: application/json' with no body", async () => {
    const { app, worker } = await startApp();
    sink.behave(() => ({ status: 400, body: '{"error":"unknown status"}' }));
    const eventId = await hookAccepted(app, matter(11, 1));
    await tickOnce(worker);
    expect((await states())[0]).toMatchObject({ state: 'dead' });

    sink.behave(() => ({ status: 200 }));
    const replay = await app.inject({
      method: 'POST',
      url: `/v1/dead-letters/${eventId}/replay`,
      headers: { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json', 'content-length': '0' },
      payload: '',
    });
    expect(replay.json()).toEqual({ status: 'queued', eventId });
    expect(replay.statusCode).toBe(202);
    await drain(worker);
    expect(sink.requests.map((r) => [r.key, r.status])).toEqual([
      [eventId, 400],
      [eventId, 200],
    ]);
  });

  it('dead-letters a redirect without following it, so the pipeline key never goes where it points', async () => {
    const elsewhere = await startSink();
    try {
      const { app, worker } = await startApp();
      sink.behave(() => ({ status: 307, headers: { location: elsewhere.url } }));
      await hookAccepted(app, matter(8, 1));

      await tickOnce(worker);
      expect((await states())[0]).toMatchObject({ state: 'dead', attempts: 1, lastStatus: 307 });
      expect(sink.requests).toHaveLength(1);
      expect(elsewhere.requests).toHaveLength(0);
    } finally {
      await elsewhere.close();
    }
  });

  it('keeps only the start of a long error answer, then delivers the row', async () => {
    const { app, worker } = await startApp();
    sink.behave((_r, index) => (index === 0 ? { status: 503, body: `busy ${'x'.repeat(4 * 1024 * 1024)}` } : { status: 200 }));
    await hookAccepted(app, matter(9, 1));

    await tickOnce(worker);
    const [retrying] = await states();
    expect(retrying).toMatchObject({ state: 'pending', attempts: 1, lastStatus: 503 });
    expect(retrying!.lastError).toMatch(/^HTTP 503: busy x+$/);
    expect(retrying!.lastError!.length).toBeLessThanOrEqual('HTTP 503: '.length + 300);

    await drain(worker);
    expect((await states())[0]).toMatchObject({ state: 'delivered', attempts: 2 });
    expect(sink.requests.map((r) => r.status)).toEqual([503, 200]);
  });

  it('lists and replays dead letters through the CLI functions', async () => {
    const { app, worker } = await startApp();
    sink.behave(() => ({ status: 422, body: '{"error":"missing email"}' }));
    const first = await hookAccepted(app, matter(1, 1));
    const second = await hookAccepted(app, matter(2, 1));
    await tickOnce(worker);

    let out = '';
    expect(await printDeadLetters(database.db, { limit: 10 }, (t) => (out += t))).toBe(2);
    expect(out).toContain(first);
    expect(out).toContain(second);
    expect(out).toContain('missing email');

    sink.behave(() => ({ status: 204 }));
    out = '';
    expect(await replayFromCli(database.db, first, (t) => (out += t))).toBe(0);
    expect(out).toContain('queued matters/1');
    await drain(worker);
    expect(sink.applied.map((b) => b.id)).toEqual([first]);
    expect(await replayFromCli(database.db, first, () => {})).toBe(1);
    expect(await replayFromCli(database.db, 'not-an-id', () => {})).toBe(1);
    expect((await states()).map((r) => r.state)).toEqual(['delivered', 'dead']);
  });

  it("lists a dead letter whose error answer carries terminal escape sequences with them shown, not obeyed by the operator's terminal", async () => {
    const { app, worker } = await startApp();
    // A pipeline (or a proxy in front of it) answering with ANSI codes: clear the screen, retitle the window.
    sink.behave(() => ({ status: 422, body: '\u001b[2J\u001b]0;all clear\u0007bad\rrecord' }));
    await hookAccepted(app, matter(3, 1));
    await tickOnce(worker);
    let out = '';
    expect(await printDeadLetters(database.db, { limit: 10 }, (t) => (out += t))).toBe(1);
    expect(out).toContain('\\u{1b}[2J\\u{1b}]0;all clear\\u{7}bad record');
    expect(out).not.toMatch(/[\u0000-\u0009\u000b-\u001f\u007f]/);
  });

  it('refuses to replay a dead letter once a later change of its record was delivered, naming it, and replays it when forced', async () => {
    const { app, worker } = await startApp();
    sink.behave((_r, index) => (index === 0 ? { status: 400 } : { status: 200 }));
    const older = await hookAccepted(app, matter(5, 1));
    await tickOnce(worker);
    const newer = await hookAccepted(app, matter(5, 2));
    await drain(worker);
    expect((await states()).map((r) => r.state)).toEqual(['dead', 'delivered']);

    const replay = (query = '') => app.inject({ method: 'POST', url: `/v1/dead-letters/${older}/replay${query}`, headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    const refused = await replay();
    expect(refused.statusCode).toBe(409);
    expect(refused.headers['content-type']).toMatch(/application\/problem\+json/);
    expect(refused.json()).toMatchObject({ status: 409, code: 'NEWER_CHANGE_DELIVERED' });
    expect(refused.json().detail).toContain(newer);
    expect(refused.json().detail).toMatch(/already delivered.*back in time.*force=true/);
    let out = '';
    expect(await replayFromCli(database.db, older, (t) => (out += t))).toBe(1);
    expect(out).toMatch(new RegExp(`not replayed: .*${newer}.*--force`));
    expect((await states()).map((r) => r.state)).toEqual(['dead', 'delivered']);

    // Forced, as asked: the older version goes out after the newer one.
    expect((await replay('?force=true')).statusCode).toBe(202);
    await drain(worker);
    expect(sink.applied.map((b) => b.id)).toEqual([newer, older]);
    expect((await states()).map((r) => r.state)).toEqual(['delivered', 'delivered']);
  });

  it('refuses a replay while a later change of the record is being delivered, and replays ahead of one still waiting, through the CLI with --force too', async () => {
    const { app, worker } = await startApp();
    sink.behave((_r, index) => (index === 0 ? { status: 400 } : 'hold'));
    const older = await hookAccepted(app, matter(6, 1));
    await tickOnce(worker);
    const newer = await hookAccepted(app, matter(6, 2));
    const inFlight = tickOnce(worker);
    await sink.until(() => sink.heldCount === 1, 'the newer change in flight');
    let out = '';
    expect(await replayFromCli(database.db, older, (t) => (out += t))).toBe(1);
    expect(out).toMatch(new RegExp(`${newer}.*is being delivered now`));

    // The pipeline fails it (503): it waits for its retry, and the replay goes first.
    sink.release({ status: 503 });
    await inFlight;
    sink.behave(() => ({ status: 200 }));
    expect(await replayFromCli(database.db, older, () => {})).toBe(0);
    await drain(worker);
    expect(sink.applied.map((b) => b.id)).toEqual([older, newer]);

    // Forced through the CLI once the newer one was delivered.
    const third = await hookAccepted(app, matter(7, 1));
    sink.behave(() => ({ status: 400 }));
    await tickOnce(worker);
    sink.behave(() => ({ status: 200 }));
    const fourth = await hookAccepted(app, matter(7, 2));
    await drain(worker);
    out = '';
    expect(await replayFromCli(database.db, third, (t) => (out += t), { force: true })).toBe(0);
    expect(out).toContain(`forced: a later change of the record, ${fourth}`);
    await drain(worker);
    expect(sink.applied.map((b) => b.id).slice(2)).toEqual([fourth, third]);
  });

  it('answers the dead-letter API with one 401 problem for a missing or wrong admin token, and pages the list', async () => {
    const { app, worker } = await startApp();
    sink.behave(() => ({ status: 400 }));
    for (const id of [1, 2, 3]) await hookAccepted(app, matter(id, 1));
    await tickOnce(worker);

    const missing = await app.inject({ method: 'GET', url: '/v1/dead-letters' });
    const wrong = await app.inject({ method: 'GET', url: '/v1/dead-letters', headers: { authorization: `Bearer ${ADMIN_TOKEN}x` } });
    const replay = await app.inject({ method: 'POST', url: '/v1/dead-letters/00000000-0000-0000-0000-000000000000/replay' });
    for (const res of [missing, wrong, replay]) {
      expect(res.statusCode).toBe(401);
      expect(res.headers['content-type']).toContain('application/problem+json');
    }
    expect(wrong.body).toBe(missing.body);

    const auth = { authorization: `Bearer ${ADMIN_TOKEN}` };
    const page1 = (await app.inject({ method: 'GET', url: '/v1/dead-letters?limit=2', headers: auth })).json();
    expect(page1.items.map((d: { crmId: string }) => d.crmId)).toEqual(['3', '2']);
    const page2 = (await app.inject({ method: 'GET', url: `/v1/dead-letters?limit=2&before=${page1.nextBefore}`, headers: auth })).json();
    expect(page2).toEqual({ items: [expect.objectContaining({ crmId: '1' })], nextBefore: null });
    const unknown = await app.inject({ method: 'POST', url: '/v1/dead-letters/00000000-0000-0000-0000-000000000000/replay', headers: auth });
    expect(unknown.statusCode).toBe(404);
  });

  it('answers a paging cursor past any outbox id with a 400 problem naming it, not a 500', async () => {
    const { app } = await startApp();
    const auth = { authorization: `Bearer ${ADMIN_TOKEN}` };
    // 2^63 and beyond do not fit the outbox's bigint id; 2^53 and beyond do not survive JSON as a number.
    for (const before of ['9223372036854775808', '99999999999999999999', '1e300']) {
      const res = await app.inject({ method: 'GET', url: `/v1/dead-letters?before=${before}`, headers: auth });
      expect(res.statusCode, `before=${before}`).toBe(400);
      expect(res.headers['content-type']).toContain('application/problem+json');
      expect(res.json()).toMatchObject({ code: 'VALIDATION_FAILED', detail: expect.stringContaining('before') });
    }
    const largest = await app.inject({ method: 'GET', url: `/v1/dead-letters?before=${Number.MAX_SAFE_INTEGER}`, headers: auth });
    expect(largest.statusCode).toBe(200);
  });

  it('answers 401 on the dead-letter API when ADMIN_TOKEN is not set', async () => {
    const app = await buildTestApp({ database });
    apps.push(app);
    const res = await app.inject({ method: 'GET', url: '/v1/dead-letters', headers: { authorization: 'Bearer ' } });
    expect(res.statusCode).toBe(401);
  });

  it('sends nothing before a 429 Retry-After (delay-seconds) has passed', async () => {
    const { app, worker } = await startApp();
    sink.behave((_r, index) => (index === 0 ? { status: 429, headers: { 'retry-after': '1' } } : { status: 200 }));
    const eventId = await hookAccepted(app, matter(9, 1));
    await drain(worker);
    const [limited, next] = sink.requests;
    expect(limited!.status).toBe(429);
    expect(next!.key).toBe(eventId);
    expect(next!.receivedAt - limited!.answeredAt!).toBeGreaterThanOrEqual(1_000);
  });

  it('sends nothing before a 503 Retry-After given as an HTTP date', async () => {
    const { app, worker } = await startApp();
    let retryAt = 0;
    sink.behave((_r, index) => {
      if (index > 0) return { status: 200 };
      retryAt = Math.ceil((Date.now() + 1_500) / 1000) * 1000;
      return { status: 503, headers: { 'retry-after': new Date(retryAt).toUTCString() } };
    });
    await hookAccepted(app, matter(10, 1));
    await drain(worker);
    expect(sink.requests).toHaveLength(2);
    expect(sink.requests[1]!.receivedAt).toBeGreaterThanOrEqual(retryAt);
  });

  it('dead-letters a retryable failure once maxAttempts is used up, and not before', async () => {
    const { app, worker } = await startApp({ maxAttempts: 3 });
    sink.behave(() => ({ status: 500, body: 'boom' }));
    await hookAccepted(app, matter(11, 1));
    await drain(worker);
    expect(sink.requests).toHaveLength(3);
    const [row] = await states();
    expect(row).toMatchObject({ state: 'dead', attempts: 3, lastStatus: 500 });
    expect(row!.lastError).toBe('gave up after 3 attempts: HTTP 500: boom');
  });

  it('retries a network failure (nothing listening) and a timeout, then delivers', async () => {
    const closed = createServer();
    await new Promise<void>((resolve) => closed.listen(0, '127.0.0.1', resolve));
    const { port } = closed.address() as AddressInfo;
    await new Promise((resolve) => closed.close(resolve));
    const { app, worker } = await startApp({ url: `http://127.0.0.1:${port}/closed`, maxAttempts: 2 });
    await hookAccepted(app, matter(12, 1));
    await drain(worker);
    const [row] = await states();
    expect(row).toMatchObject({ state: 'dead', attempts: 2, lastStatus: null });
    expect(row!.lastError).toMatch(/network error: ECONNREFUSED/);

    const slow = await startApp({ timeout: '200ms', lease: '5s' });
    sink.behave((_r, index) => (index === 0 ? 'hold' : { status: 200 }));
    const eventId = await hookAccepted(slow.app, matter(13, 1));
    await drain(slow.worker);
    sink.release();
    expect(sink.requests.map((r) => r.key)).toEqual([eventId, eventId]);
    expect(sink.applied.map((b) => b.id)).toEqual([eventId]);
  });

  it("retries a 409 answered to a change's later attempt (its key still in process there, as the Idempotency-Key convention answers), and dead-letters a 409 on the first", async () => {
    // The first attempt is still running in the pipeline when the bridge's timeout ends it; the
    // retry, under the same key, is answered 409 until the first has finished.
    const slow = await startApp({ timeout: '200ms', lease: '5s' });
    sink.behave((_r, index) => (index === 0 ? 'hold' : index === 1 ? { status: 409, body: '{"error":"a request with this Idempotency-Key is in progress"}' } : { status: 200 }));
    const eventId = await hookAccepted(slow.app, matter(14, 1));
    await drain(slow.worker);
    sink.release();
    // The first is never answered: the bridge gave up on it (its timeout) before the sink did.
    expect(sink.requests.map((r) => [r.key, r.status])).toEqual([
      [eventId, undefined],
      [eventId, 409],
      [eventId, 200],
    ]);
    expect((await states()).find((r) => r.eventId === eventId)).toMatchObject({ state: 'delivered', attempts: 3 });

    // A 409 to a change never sent before is the pipeline refusing it, as any other 4xx.
    sink.behave(() => ({ status: 409, body: '{"error":"the lead conflicts with an existing one"}' }));
    const refused = await hookAccepted(slow.app, matter(15, 1));
    await drain(slow.worker);
    expect((await states()).find((r) => r.eventId === refused)).toMatchObject({ state: 'dead', attempts: 1, lastStatus: 409 });
  });

  it('delivers a hook at once instead of at the next tick: a hook it could not lease to the worker wakes it', async () => {
    // An hour between ticks: only the wake-up can deliver within the test.
    const { app, worker } = await startApp({ pollInterval: '1h' });
    sink.behave(() => ({ status: 202 }));
    worker.start();
    // Let the first, empty tick pass, so the worker is in its hour-long pause.
    await new Promise((resolve) => setTimeout(resolve, 200));
    // Every lease it can offer is promised elsewhere, so the hook's row is written unleased.
    const held = worker.offerLeases(10_000)!;
    const eventId = await hookAccepted(app, matter(41, 1));
    await sink.until(() => sink.requests.some((r) => r.key === eventId), 'the hook to be delivered without waiting an hour');
    expect(await states()).toMatchObject([{ eventId, attempts: 1 }]);
    worker.takeLeased(held, []);
    await worker.stop();
  });

  it('never lets two workers on one database claim the same row while its lease holds', async () => {
    const a = await startApp({ concurrency: 3 });
    const b = await startApp({ concurrency: 3 });
    expect(a.worker.owner).not.toBe(b.worker.owner);
    sink.behave(() => 'hold');
    const eventIds: string[] = [];
    for (const id of [1, 2, 3, 4, 5, 6]) eventIds.push(await hookAccepted(a.app, matter(id, 1)));

    // A claims the whole batch (several rows per slot) and has three in flight.
    const first = tickOnce(a.worker);
    await sink.until(() => sink.heldCount === 3, 'worker A to send its first three');

    // Every row is leased to A: B, a third claimer and A itself get nothing more.
    expect(await tickOnce(b.worker)).toBe(false);
    expect(await claimDeliveries(database.db, { connectionId: 'acme', owner: 'third', limit: 10, leaseMs: 60_000 })).toEqual([]);
    const leases = await states();
    expect(new Set(leases.map((r) => r.leaseOwner))).toEqual(new Set([a.worker.owner]));
    expect(sink.heldCount).toBe(3);

    sink.behave(() => ({ status: 202 }));
    sink.release();
    await first;
    expect(await tickOnce(a.worker)).toBe(false);
    expect(await tickOnce(b.worker)).toBe(false);
    expect(sink.requests.map((r) => r.key).sort()).toEqual([...eventIds].sort());
    expect((await states()).every((r) => r.state === 'delivered')).toBe(true);
  });

  it('holds a newer version of a record while an older one waits for its retry, even for another worker', async () => {
    const a = await startApp({ backoff: { base: '1h', max: '1h' } });
    const b = await startApp();
    sink.behave((_r, index) => (index === 0 ? { status: 503 } : { status: 200 }));
    const v1 = await hookAccepted(a.app, matter(5, 1));
    await tickOnce(a.worker);
    const v2 = await hookAccepted(a.app, matter(5, 2));
    const other = await hookAccepted(a.app, matter(6, 1));

    await tickOnce(b.worker);
    expect(sink.requests.map((r) => r.key)).toEqual([v1, other]);
    expect((await states()).map((r) => [r.eventId, r.state])).toEqual([
      [v1, 'pending'],
      [v2, 'pending'],
      [other, 'delivered'],
    ]);
  });

  it('gives an in-flight row back untried when the worker is stopped, so another replica can take it at once', async () => {
    const { app, worker } = await startApp();
    sink.behave(() => 'hold');
    await hookAccepted(app, matter(3, 1));
    worker.start();
    await sink.until(() => sink.heldCount === 1, 'the worker to send');
    await worker.stop();
    expect((await states())[0]).toMatchObject({ state: 'pending', attempts: 0, leaseOwner: null });
  });

  it('gives every claimed row back untried when stopped mid-batch: the one in flight and those queued behind it', async () => {
    const { app, worker } = await startApp({ concurrency: 1 });
    sink.behave(() => 'hold');
    for (const id of [1, 2, 3, 4, 5]) await hookAccepted(app, matter(id, 1));
    worker.start();
    await sink.until(() => sink.heldCount === 1, 'the worker to send its first row');
    await worker.stop();
    expect(sink.requests).toHaveLength(1);
    expect((await states()).every((r) => r.state === 'pending' && r.attempts === 0 && r.leaseOwner === null)).toBe(true);
  });

  it('sends a change that arrives while a tick is sending without waiting for that tick to end', async () => {
    const { app, worker } = await startApp({ pollInterval: '1h' });
    sink.behave((_r, index) => (index === 0 ? 'hold' : { status: 202 }));
    worker.start();
    const first = await hookAccepted(app, matter(1, 1));
    await sink.until(() => sink.heldCount === 1, 'the first change to be sent');
    // The first request is still unanswered, so the tick that sent it has not ended.
    const second = await hookAccepted(app, matter(2, 1));
    await sink.until(() => sink.applied.some((b) => b.id === second), 'the second change to be delivered beside the first');
    expect(sink.heldCount).toBe(1);
    sink.release({ status: 202 });
    for (let i = 0; i < 200 && (await pendingCount()) > 0; i++) await sleep(10);
    await worker.stop();
    expect(sink.applied.map((b) => b.id)).toEqual([second, first]);
    expect((await states()).every((r) => r.state === 'delivered')).toBe(true);
  });

  it('keeps a delivered row pending and leased when marking it delivered fails, and sends it again with the same key once the lease runs out', async () => {
    const { app, worker } = await startApp({ timeout: '300ms', lease: '1s' });
    const eventId = await hookAccepted(app, matter(7, 1));
    // The database refuses the mark, as it would if it went away between the answer and the mark.
    await database.db.execute(sql.raw(`create function refuse_delivered() returns trigger language plpgsql as $$ begin raise exception 'mark refused'; end $$`));
    await database.db.execute(sql.raw(`create trigger refuse_delivered before update on outbox for each row when (new.state = 'delivered') execute function refuse_delivered()`));
    try {
      await expect(tickOnce(worker)).rejects.toThrow();
    } finally {
      await database.db.execute(sql.raw('drop trigger refuse_delivered on outbox'));
      await database.db.execute(sql.raw('drop function refuse_delivered()'));
    }
    expect(sink.applied.map((b) => b.id)).toEqual([eventId]);
    expect((await states())[0]).toMatchObject({ state: 'pending', attempts: 1, leaseOwner: worker.owner });

    // Its lease still holds: nobody sends it again yet.
    expect(await tickOnce(worker)).toBe(false);
    expect(sink.requests).toHaveLength(1);

    await drain(worker);
    expect(sink.requests.map((r) => r.key)).toEqual([eventId, eventId]);
    expect(sink.applied.map((b) => b.id)).toEqual([eventId]);
    expect((await states())[0]).toMatchObject({ state: 'delivered', attempts: 2, leaseOwner: null });
  });

  it('reports pending, the oldest pending age and dead letters in /health, and 503 degraded once the backlog is older than degradedAfter', async () => {
    const { app, worker } = await startApp({ degradedAfter: '60s' });
    sink.behave(() => ({ status: 400 }));
    await hookAccepted(app, matter(1, 1));
    await tickOnce(worker);
    await hookAccepted(app, matter(2, 1));

    const fresh = await app.inject({ method: 'GET', url: '/health' });
    expect(fresh.statusCode).toBe(200);
    const delivery = fresh.json().connections[0].delivery;
    expect(delivery).toMatchObject({ pending: 1, deadLetters: 1, degraded: false });
    expect(delivery.oldestPendingAgeSeconds).toBeLessThan(60);

    await database.db.update(outbox).set({ queuedAt: sql`now() - interval '5 minutes'` }).where(eq(outbox.state, 'pending'));
    const stale = await app.inject({ method: 'GET', url: '/health' });
    expect(stale.statusCode).toBe(503);
    expect(stale.json().status).toBe('degraded');
    expect(stale.json().connections[0].delivery).toMatchObject({ pending: 1, deadLetters: 1, degraded: true });
    expect(stale.json().connections[0].delivery.oldestPendingAgeSeconds).toBeGreaterThanOrEqual(300);

    sink.behave(() => ({ status: 200 }));
    await drain(worker);
    const drained = await app.inject({ method: 'GET', url: '/health' });
    expect(drained.statusCode).toBe(200);
    expect(drained.json().connections[0].delivery).toEqual({ pending: 0, oldestPendingAgeSeconds: null, deadLetters: 1, degraded: false });
  });
});

describe('a hook handed to the delivery worker as it commits', () => {
  /** Whether each outbox row is still the tuple its change's transaction wrote (no claim updated it since). */
  const untouchedSinceInsert = async () =>
    (await rowsOf<{ same: boolean }>(database.db.execute(sql`select o.xmin::text = l.xmin::text as same from outbox o join ledger l using (event_id) order by o.id`))).map((r) => r.same);

  it('is sent under the lease its own transaction wrote, with no claim between the commit and the POST', async () => {
    // An hour between ticks, and the first tick over: nothing but the hand-over can send it.
    const { app, worker } = await startApp({ pollInterval: '1h' });
    sink.behave(() => 'hold');
    worker.start();
    await sleep(200);
    const eventId = await hookAccepted(app, matter(1, 1));
    await sink.until(() => sink.heldCount === 1, 'the hook to be sent');
    expect(sink.requests.map((r) => r.key)).toEqual([eventId]);
    expect(await states()).toMatchObject([{ eventId, state: 'pending', attempts: 1, leaseOwner: worker.owner }]);
    expect(await untouchedSinceInsert()).toEqual([true]);

    sink.release({ status: 202 });
    for (let i = 0; i < 200 && (await pendingCount()) > 0; i++) await sleep(10);
    expect(await states()).toMatchObject([{ eventId, state: 'delivered', attempts: 1, leaseOwner: null, lastStatus: 202 }]);
    await worker.stop();
  });

  it('sends a retry byte for byte as the first attempt, which the hand-over built without reading the row', async () => {
    const { app, worker } = await startApp({ pollInterval: '50ms' });
    sink.behave((_r, index) => (index === 0 ? { status: 503 } : { status: 202 }));
    worker.start();
    await sleep(200);
    const eventId = await hookAccepted(app, matter(7, 1, { notes: 'a "quoted" ünïcode note', nested: { z: 1, a: [1.5, null, 1e3] } }));
    await sink.until(() => sink.applied.length === 1, 'the retry to be delivered');
    await worker.stop();
    expect(sink.requests.map((r) => [r.key, r.status])).toEqual([
      [eventId, 503],
      [eventId, 202],
    ]);
    expect(sink.requests[1]!.text).toBe(sink.requests[0]!.text);
    expect(sink.requests[0]!.body).toMatchObject({ id: eventId, crmId: '7', record: { notes: 'a "quoted" ünïcode note', nested: { z: 1, a: [1.5, null, 1000] } } });
  });

  it('leaves a newer version of a record unleased while an older one waits for its retry, and sends it after', async () => {
    const { app, worker } = await startApp({ pollInterval: '100ms', backoff: { base: '600ms', max: '600ms' } });
    sink.behave((_r, index) => (index === 0 ? { status: 503 } : { status: 202 }));
    worker.start();
    await sleep(200);
    const v1 = await hookAccepted(app, matter(5, 1));
    await sink.until(() => sink.requests.length === 1, 'the first version to be tried');
    for (let i = 0; i < 200 && (await states())[0]?.leaseOwner !== null; i++) await sleep(10);
    const v2 = await hookAccepted(app, matter(5, 2));
    const rows = await states();
    expect(rows.map((r) => [r.eventId, r.state, r.attempts, r.leaseOwner])).toEqual([
      [v1, 'pending', 1, null],
      [v2, 'pending', 0, null],
    ]);
    // v2's hook woke the worker, and it claims every 100 ms, but not v2 before v1: nothing is
    // sent until v1's retry comes due, 600 ms after its failure.
    await sleep(200);
    expect(sink.requests.map((r) => r.key)).toEqual([v1]);
    await sink.until(() => sink.applied.length === 2, 'both versions, in order');
    await worker.stop();
    expect(sink.applied.map((b) => b.id)).toEqual([v1, v2]);
  });

  it('gives rows back untried when they are handed over after the worker stopped', async () => {
    const { worker } = await startApp({ pollInterval: '1h' });
    worker.start();
    const offer = worker.offerLeases(5)!;
    expect(offer).toMatchObject({ owner: worker.owner, max: 5 });
    const raw = matter(9, 1);
    const outcomes = await database.db.transaction((tx) =>
      passChanges(
        tx,
        [{ connectionId: 'acme', object: 'matters', crmId: '9', source: 'hook', change: 'upsert', version: raw.updated_at, raw, fields: { status: raw.status }, contentHash: 'h9', observedAt: new Date() }],
        { leases: new Map([['acme', offer]]) },
      ),
    );
    expect(await states()).toMatchObject([{ attempts: 1, leaseOwner: worker.owner }]);
    await worker.stop();
    expect(worker.offerLeases(5)).toBeUndefined();
    worker.takeLeased(offer, [outcomes[0]!.leased!]);
    for (let i = 0; i < 200 && (await states())[0]!.leaseOwner !== null; i++) await sleep(10);
    expect(await states()).toMatchObject([{ state: 'pending', attempts: 0, leaseOwner: null }]);
    expect(sink.requests).toEqual([]);
  });

  it('offers no more leases than one claim holds, counting rows promised to transactions still in flight', async () => {
    const { worker } = await startApp({ concurrency: 2 });
    expect(worker.offerLeases(1)).toBeUndefined();
    worker.start();
    const first = worker.offerLeases(50)!;
    const second = worker.offerLeases(50)!;
    expect([first.max, second.max, worker.offerLeases(50)]).toEqual([50, 14, undefined]);
    worker.takeLeased(first, []);
    expect(worker.offerLeases(100)!.max).toBe(50);
    await worker.stop();
  });
});

describe('the claim', () => {
  /** The claim's plan under `mode`: PREPAREd as the driver would, then EXPLAIN EXECUTE with the same values. */
  const planOf = (mode: 'force_generic_plan' | 'force_custom_plan') =>
    database.db.transaction(async (tx) => {
      const { sql: text, params } = claimStatement(tx, { connectionId: 'acme', owner: 'planner', limit: 64, leaseMs: 60_000 }).toSQL();
      const literal = (p: unknown) => (typeof p === 'number' ? String(p) : `'${String(p).replaceAll("'", "''")}'`);
      await tx.execute(sql.raw(`set local plan_cache_mode = ${mode}`));
      await tx.execute(sql.raw(`prepare claim_plan as ${text}`));
      const rows = await rowsOf<{ 'QUERY PLAN': string }>(tx.execute(sql.raw(`explain execute claim_plan(${params.map(literal).join(', ')})`)));
      await tx.execute(sql.raw('deallocate claim_plan'));
      return rows.map((r) => r['QUERY PLAN']).join('\n');
    });

  // Delivered rows stay until retention prunes them. Through the primary key in id order, each
  // claim stepped over all of them: 19 ms at 40,000, growing with the retention window.
  it('reads pending rows only, never every delivered row before them, with generic and custom plans', async () => {
    await database.db.execute(sql`
      insert into ledger (event_id, connection_id, object, crm_id, source, disposition, change, observed_at)
      select gen_random_uuid(), 'acme', 'matters', g::text, 'poll', 'accepted', 'upsert', now() from generate_series(1, 20000) g`);
    await database.db.execute(sql`insert into outbox (event_id, connection_id, object, crm_id) select event_id, connection_id, object, crm_id from ledger order by seq`);
    // Statistics taken while all 20,000 were pending, as when a backlog built up; then a claim
    // with them, and one with statistics taken once most had been delivered.
    await database.db.execute(sql`analyze outbox, ledger`);
    await database.db.execute(sql`update outbox set state = 'delivered' where id <= 16000`);
    for (const stats of ['all pending', 'mostly delivered'] as const) {
      if (stats === 'mostly delivered') await database.db.execute(sql`analyze outbox, ledger`);
      for (const mode of ['force_generic_plan', 'force_custom_plan'] as const) {
        const plan = await planOf(mode);
        // The line that reads the claimable rows: the index that holds pending rows only, never
        // the primary key's id order.
        const scan = plan.split('\n').find((line) => / on outbox +\(/.test(line));
        expect(scan, `${stats}, ${mode}`).toMatch(/Index Scan using outbox_pending_idx on outbox +\(/);
        // The claimed rows are updated through the primary key, and their ledger rows and bodies
        // read through theirs: nothing reads the whole outbox or ledger.
        expect(plan, `${stats}, ${mode}`).toMatch(/(Index Scan using outbox_pkey on outbox outbox_1|Bitmap Index Scan on outbox_pkey)/);
        expect(plan, `${stats}, ${mode}`).toMatch(/Index Scan using ledger_event_id_key on ledger/);
        expect(plan, `${stats}, ${mode}`).toMatch(/Index Scan using ledger_bodies_pkey on ledger_bodies/);
        expect(plan, `${stats}, ${mode}`).not.toMatch(/Seq Scan|Hash/);
      }
    }
    // And it still claims the oldest pending rows first.
    const claimed = await claimDeliveries(database.db, { connectionId: 'acme', owner: 'w', limit: 64, leaseMs: 60_000 });
    expect(claimed.map((r) => r.id)).toEqual(Array.from({ length: 64 }, (_, i) => 16001 + i));
  });
});
