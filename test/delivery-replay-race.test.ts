// A dead letter replayed while a hook's newer change of the same record is being committed and
// handed to the worker: the replay and the hand-over must not reorder the record downstream.
import { setTimeout as sleep } from 'node:timers/promises';
import { eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { replayDeadLetter } from '../src/db/queries/outbox.js';
import { outbox } from '../src/db/schema/index.js';
import { passChanges } from '../src/sync/change-gate.js';
import { buildTestApp, connection, SECRET } from './helpers/app.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';
import { startSink, type Sink } from './fixtures/delivery-sink.js';

/** Two transactions at once: Postgres only (PGlite has one connection). */
const onPostgres = Boolean(process.env.DATABASE_URL);
const database = onPostgres ? await createTestDatabase() : undefined;
let sink: Sink;
let app: FastifyInstance | undefined;

beforeEach(async () => {
  if (database) await resetDatabase(database);
  sink = await startSink();
});
afterEach(async () => {
  await app?.close();
  app = undefined;
  await sink.close();
});
afterAll(() => database?.close());

const matter = (version: number) => ({ id: 5, display_number: '0005-Doe', status: `v${version}`, updated_at: new Date(Date.UTC(2026, 10, 20, 10, version)).toISOString() });

describe('replay racing a hook handed over to the worker', () => {
  it.skipIf(!onPostgres)('never sends v2 before a replayed v1 that was not forced', async () => {
    app = await buildTestApp({
      database: database!,
      env: { ADMIN_TOKEN: 'admin-token-0123456789abcdef' },
      connections: [connection({ downstream: { url: sink.url, pollInterval: '1h', backoff: { base: '1ms', max: '5ms' } } })],
    });
    const worker = app.deliveryWorkers.get('acme')!;
    sink.behave((_r, index) => (index === 0 ? { status: 400 } : { status: 200 }));
    worker.start();
    await sleep(200);

    // v1 is refused: a dead letter.
    const res = await app.inject({ method: 'POST', url: '/hooks/acme', headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' }, payload: JSON.stringify(matter(1)) });
    const v1 = res.json().eventId as string;
    for (let i = 0; i < 200 && (await database!.db.select().from(outbox))[0]?.state !== 'dead'; i++) await sleep(10);

    // v2 arrives by hook, as ChangeWriter.commit writes it: leased to this worker in its own
    // transaction. The operator's replay of v1 runs while that transaction has not committed yet.
    const offer = worker.offerLeases(1)!;
    const raw = matter(2);
    let replaying: ReturnType<typeof replayDeadLetter> | undefined;
    const outcomes = await database!.db.transaction(async (tx) => {
      const out = await passChanges(
        tx,
        [{ connectionId: 'acme', object: 'matters', crmId: '5', source: 'hook', change: 'upsert', version: raw.updated_at, raw, fields: { status: raw.status }, contentHash: 'h2', observedAt: new Date() }],
        { leases: new Map([['acme', offer]]) },
      );
      replaying = replayDeadLetter(database!.db, v1);
      // Long enough for the replay to finish, unless it waits for this transaction.
      await Promise.race([replaying, sleep(300)]);
      return out;
    });
    const replay = await replaying!;
    const v2 = outcomes[0]!.eventId;
    worker.takeLeased(offer, outcomes[0]!.leased ? [outcomes[0]!.leased] : []);
    worker.wake();

    for (let i = 0; i < 300 && (await database!.db.select().from(outbox).where(eq(outbox.state, 'pending'))).length > 0; i++) await sleep(20);
    await worker.stop();

    // Either the replay was refused, or v1 went first; never v1 after v2 without --force.
    if (replay.status === 'replayed') expect(sink.applied.map((b) => b.id)).toEqual([v1, v2]);
    else expect(replay.status).toBe('newer_change');
  });
});
