// Delivery under what a pipeline and an operator can do: echo the API key back in a refusal, apply
// a change and answer too late, send an invalid Retry-After, replay a dead letter out of turn.
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { outbox } from '../src/db/schema/index.js';
import type { DeliveryWorker } from '../src/sync/delivery-worker.js';
import { buildTestApp, captureLogs, connection, hookAccepted, SECRET } from './helpers/app.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

const ADMIN_TOKEN = 'admin-token-0123456789abcdef';
const PIPELINE_KEY = 'pipeline-api-key-5f1e2d3c4b5a';

/**
 * An idempotent pipeline that applies a change when it receives it (as a real API commits before
 * it answers), then answers as told, possibly late. `current` is each record's version downstream.
 */
type Answer = { apply: boolean; status: number; body?: string; delayMs?: number; chunks?: string[]; headers?: Record<string, string> };
async function startPipeline(behave: (index: number, body: { id: string; crmId: string; version: string }) => Answer) {
  const appliedKeys = new Set<string>();
  const current = new Map<string, string>();
  const requests: Array<{ key: string; version: string }> = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', async () => {
      const body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
      const index = requests.push({ key: body.id, version: body.version }) - 1;
      const answer = behave(index, body);
      if (answer.apply && !appliedKeys.has(body.id)) {
        appliedKeys.add(body.id);
        current.set(body.crmId, body.version);
      }
      if (answer.delayMs) await sleep(answer.delayMs);
      if (res.destroyed) return;
      res.writeHead(answer.status, { 'content-type': 'application/json', ...answer.headers });
      if (answer.chunks) {
        for (const chunk of answer.chunks) {
          res.write(chunk);
          await sleep(50);
        }
        res.end();
      } else res.end(answer.body ?? '{}');
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}/changes`,
    current,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

const database = await createTestDatabase();
const apps: FastifyInstance[] = [];
const pipelines: Array<{ close(): Promise<void> }> = [];
beforeEach(() => resetDatabase(database));
afterEach(async () => {
  await Promise.all(apps.splice(0).map((a) => a.close()));
  await Promise.all(pipelines.splice(0).map((p) => p.close()));
});
afterAll(() => database.close());

async function startApp(url: string, downstream: Record<string, unknown> = {}, logger?: ReturnType<typeof captureLogs>['logger']) {
  const app = await buildTestApp({
    database,
    env: { ADMIN_TOKEN },
    connections: [
      connection({
        downstream: { url, headers: { Authorization: `Bearer ${PIPELINE_KEY}` }, timeout: '5s', backoff: { base: '1ms', max: '5ms' }, ...downstream },
      }),
    ],
    ...(logger ? { logger } : {}),
  });
  apps.push(app);
  return { app, worker: app.deliveryWorkers.get('acme')! };
}

const matter = (id: number, version: number) => ({
  id,
  display_number: `000${id}-Doe`,
  status: `status-v${version}`,
  updated_at: new Date(Date.UTC(2026, 10, 20, 10, version)).toISOString(),
});

const tickOnce = (worker: DeliveryWorker) => worker.tick(new AbortController().signal);

async function drain(worker: DeliveryWorker): Promise<void> {
  for (let i = 0; i < 500; i++) {
    await tickOnce(worker);
    const pending = await database.db.select({ id: outbox.id }).from(outbox).where(eq(outbox.state, 'pending'));
    if (pending.length === 0) return;
    await sleep(5);
  }
  throw new Error('still pending');
}

describe('secrets in a refused answer', () => {
  it('does not keep the pipeline key when the pipeline echoes the token without its "Bearer " scheme', async () => {
    const logs = captureLogs();
    const pipeline = await startPipeline(() => ({ apply: false, status: 401, body: JSON.stringify({ error: 'invalid api key', received: PIPELINE_KEY }) }));
    pipelines.push(pipeline);
    const { app, worker } = await startApp(pipeline.url, {}, logs.logger);
    await hookAccepted(app, matter(1, 1));
    await tickOnce(worker);

    const [row] = await database.db.select().from(outbox);
    expect(row).toMatchObject({ state: 'dead', lastStatus: 401 });
    const list = await app.inject({ method: 'GET', url: '/v1/dead-letters', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    expect(row!.lastError).not.toContain(PIPELINE_KEY);
    expect(list.body).not.toContain(PIPELINE_KEY);
    expect(logs.text()).not.toContain(PIPELINE_KEY);
  });

  it('does not keep part of the pipeline key when the echoed value straddles the excerpt limit across two body chunks', async () => {
    const secret = `Bearer ${PIPELINE_KEY}`;
    const pipeline = await startPipeline(() => ({ apply: false, status: 400, chunks: ['x'.repeat(280) + secret.slice(0, 25), secret.slice(25) + ' end'] }));
    pipelines.push(pipeline);
    const { app, worker } = await startApp(pipeline.url);
    await hookAccepted(app, matter(2, 1));
    await tickOnce(worker);

    const [row] = await database.db.select().from(outbox);
    expect(row).toMatchObject({ state: 'dead', lastStatus: 400 });
    // Any 8 consecutive characters of the key is a leak.
    expect(row!.lastError).not.toContain(PIPELINE_KEY.slice(0, 8));
  });
});

describe('replay and a later change whose outcome is unknown', () => {
  it('never leaves the pipeline at an older version after a plain replay, when a later change timed out after the pipeline applied it', async () => {
    // v1 is refused (400). v2 is applied, but its answer comes after the bridge's timeout.
    const pipeline = await startPipeline((index) => {
      if (index === 0) return { apply: false, status: 400 };
      if (index === 1) return { apply: true, status: 200, delayMs: 1_000 };
      return { apply: true, status: 200 };
    });
    pipelines.push(pipeline);
    const { app, worker } = await startApp(pipeline.url, { timeout: '200ms', lease: '5s', backoff: { base: '1h', max: '1h' } });

    const v1 = await hookAccepted(app, matter(5, 1));
    await tickOnce(worker);
    const v2 = await hookAccepted(app, matter(5, 2));
    await tickOnce(worker);
    expect(pipeline.current.get('5')).toBe(matter(5, 2).updated_at);
    const rows = await database.db.select({ eventId: outbox.eventId, state: outbox.state, attempts: outbox.attempts, lastError: outbox.lastError }).from(outbox).orderBy(outbox.id);
    expect(rows).toMatchObject([
      { eventId: v1, state: 'dead' },
      { eventId: v2, state: 'pending', attempts: 1, lastError: 'no answer within 200ms' },
    ]);

    // The operator replays v1 without --force: the docs promise the record never goes back in time.
    const replay = await app.inject({ method: 'POST', url: `/v1/dead-letters/${v1}/replay`, headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    // The hour of v2's backoff passes.
    await database.db.update(outbox).set({ nextAttemptAt: sql`now()` }).where(eq(outbox.eventId, v2));
    await drain(worker);

    // v2 went out without a definite answer, so it may be downstream already: the replay is refused, and the pipeline ends at v2.
    expect(replay.statusCode).toBe(409);
    expect(replay.json().detail).toContain(`a later change of the record, ${v2} (version ${matter(5, 2).updated_at}), was sent and got no answer, so the pipeline may have it`);
    expect(pipeline.current.get('5')).toBe(matter(5, 2).updated_at);
  });
});

describe('Retry-After that is not a delay or an HTTP date', () => {
  it('ignores a negative Retry-After (invalid per RFC 9110) instead of dead-lettering the change on its first attempt', async () => {
    // Retry-After: -3600, as a pipeline with a skewed clock computing "reset - now" might send it.
    const pipeline = await startPipeline((index) =>
      index === 0 ? { apply: false, status: 503, body: 'busy', headers: { 'retry-after': '-3600' } } : { apply: true, status: 200 },
    );
    pipelines.push(pipeline);
    const { app, worker } = await startApp(pipeline.url);
    const eventId = await hookAccepted(app, matter(3, 1));
    await tickOnce(worker);
    const [row] = await database.db.select().from(outbox);
    // maxAttempts is 15 and maxAge a day: one 503 is no reason to give up.
    expect(row).toMatchObject({ eventId, state: 'pending', attempts: 1, lastStatus: 503 });
  });
});
