import { setTimeout as sleep } from 'node:timers/promises';
import { eq, inArray, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { rowsOf } from '../src/db/client.js';
import { acquireLease, releaseLease } from '../src/db/queries/leases.js';
import { ledger, ledgerBodies, outbox, outboundWrites, recordHeads } from '../src/db/schema/index.js';
import { forgetFromCli, forgetRecord } from '../src/sync/forget.js';
import { pruneExpiredBodies, RETENTION_LEASE } from '../src/sync/retention.js';
import { startSink, type Sink } from './fixtures/delivery-sink.js';
import { buildTestApp, connection, SECRET } from './helpers/app.js';
import { startBridge } from './helpers/bridge.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

const DAY = 86_400_000;
let database: Awaited<ReturnType<typeof createTestDatabase>>;
let sink: Sink;
let app: FastifyInstance;

// The pipeline refuses matter 2 for good (a dead letter) and is unavailable for matter 3 (a
// pending retry an hour away); everything else is delivered.
beforeAll(async () => {
  database = await createTestDatabase();
  sink = await startSink((req) => (req.body.crmId === '2' ? { status: 400 } : req.body.crmId === '3' ? { status: 503 } : { status: 200 }));
});
afterAll(async () => {
  await sink.close();
  await database.close();
});
beforeEach(async () => {
  await resetDatabase(database);
  app = await buildTestApp({
    database,
    connections: [connection({ downstream: { url: sink.url, timeout: '5s', backoff: { base: '1h', max: '2h' }, concurrency: 16 } })],
  });
});
afterEach(() => app.close());

const matter = (id: number, version: number) => ({
  id,
  display_number: `000${id}-Doe`,
  status: `status-v${version}`,
  practice_area: { id: 7, name: 'Personal Injury' },
  description: `Jane Roe was hurt, version ${version}`,
  updated_at: new Date(Date.UTC(2026, 10, 20, 10, version)).toISOString(),
});

async function hook(record: Record<string, unknown>) {
  const res = await app.inject({
    method: 'POST',
    url: '/hooks/acme',
    headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
    payload: JSON.stringify(record),
  });
  return res.json() as { status: string; eventId: string };
}

/** A record's changes go one at a time (v2 waits for v1), so a few ticks. */
async function deliverAll() {
  for (let i = 0; i < 3; i++) await app.deliveryWorkers.get('acme')!.tick(new AbortController().signal);
}

async function bodiesOf(eventIds: string[]) {
  const rows = await database.db.select({ eventId: ledgerBodies.eventId }).from(ledgerBodies).where(inArray(ledgerBodies.eventId, eventIds));
  return new Set(rows.map((r) => r.eventId));
}

const PIPELINE_KEY = 'pipeline-api-key-0123456789';
/** The sandbox CRM with the pipeline's writes enabled (the writer is ticked by the tests). */
const startWritingBridge = () => startBridge({ database, sandbox: { records: 10 }, connection: { outbound: { apiKeys: [PIPELINE_KEY], maxAttempts: 3, backoff: { base: '1ms', max: '5ms' } } } });
const LEAD = 'Jane Roe slipped at Acme Mart';

/** The pipeline asks for a write (a create, or an update of `crmId`); the outbound id. */
async function pipelineWrite(bridge: { app: FastifyInstance }, key: string, crmId?: string) {
  const res = await bridge.app.inject({
    method: 'POST',
    url: '/v1/connections/firm/records',
    headers: { authorization: `Bearer ${PIPELINE_KEY}`, 'content-type': 'application/json', 'idempotency-key': key },
    payload: JSON.stringify({ object: 'matters', externalId: `lead-${key}`, ...(crmId ? { crmId } : {}), fields: { description: LEAD, status: 'Open', clientId: 100000001 } }),
  });
  expect(res.statusCode).toBe(202);
  return (res.json() as { outboundId: string }).outboundId;
}

/** Ticks the writer until the write is made (and settled by its returned record). */
async function makeWrite(bridge: { app: FastifyInstance }, id: string) {
  const writer = bridge.app.outboundWriters.get('firm')!;
  for (let i = 0; i < 100; i++) {
    await writer.tick(new AbortController().signal);
    if ((await writeRow(id)).state !== 'pending') break;
    await sleep(5);
  }
  return writeRow(id);
}

async function writeRow(id: string) {
  const [row] = await database.db.select().from(outboundWrites).where(eq(outboundWrites.id, id));
  return row!;
}

/** The whole stored row as text: whatever column it sits in, the lead's words must be gone. */
async function storedWrite(id: string) {
  const [stored] = await rowsOf<{ row: string }>(database.db.execute(sql`select row_to_json(w)::text as row from outbound_writes w where id = ${id}`));
  return stored!.row;
}

const prune = (daysLater: number, batchSize?: number) =>
  pruneExpiredBodies({ db: database.db, retentionDays: 30, owner: 'test', now: new Date(Date.now() + daysLater * DAY), ...(batchSize ? { batchSize } : {}) });

describe('retention', () => {
  it('prunes a delivered change older than the retention age, keeps its ledger row, and still recognises a replay of it as a duplicate', async () => {
    const first = await hook(matter(1, 1));
    await deliverAll();

    expect((await prune(29)).pruned).toBe(0);
    expect(await bodiesOf([first.eventId])).toEqual(new Set([first.eventId]));

    const report = await prune(31);
    expect(report).toMatchObject({ status: 'ok', pruned: 1 });
    expect(await bodiesOf([first.eventId])).toEqual(new Set());
    const [row] = await database.db.select().from(ledger).where(eq(ledger.eventId, first.eventId));
    expect(row).toMatchObject({ crmId: '1', source: 'hook', disposition: 'accepted', version: matter(1, 1).updated_at });
    expect(row!.contentHash).toMatch(/^[0-9a-f]{64}$/);

    const replay = await hook(matter(1, 1));
    expect(replay).toMatchObject({ status: 'duplicate', eventId: first.eventId });

    // Still ordered too: v2, then v1 again, is recorded stale and not delivered.
    expect((await hook(matter(1, 2))).status).toBe('accepted');
    const back = await hook(matter(1, 1));
    expect(back.status).toBe('stale');
    expect(await database.db.select().from(outbox).where(eq(outbox.eventId, back.eventId))).toEqual([]);
  });

  it('never prunes the body of a pending or a dead delivery', async () => {
    const delivered = await hook(matter(1, 1));
    const dead = await hook(matter(2, 1));
    const pending = await hook(matter(3, 1));
    await deliverAll();
    const states = await database.db.select({ eventId: outbox.eventId, state: outbox.state }).from(outbox);
    expect(Object.fromEntries(states.map((s) => [s.eventId, s.state]))).toEqual({ [delivered.eventId]: 'delivered', [dead.eventId]: 'dead', [pending.eventId]: 'pending' });

    expect((await prune(365)).pruned).toBe(1);
    expect(await bodiesOf([delivered.eventId, dead.eventId, pending.eventId])).toEqual(new Set([dead.eventId, pending.eventId]));
  });

  it('prunes in batches until nothing is left', async () => {
    for (let id = 10; id < 15; id++) await hook(matter(id, 1));
    await deliverAll();
    const report = await prune(31, 2);
    expect(report).toMatchObject({ status: 'ok', pruned: 5, batches: 3 });
  });

  it('clears what a settled pipeline write kept of the lead (fields and the values its echo is matched by) once older than the retention age; a write not yet made keeps its fields', async () => {
    const bridge = await startWritingBridge();
    try {
      const sent = await makeWrite(bridge, await pipelineWrite(bridge, 'k-sent'));
      expect(sent).toMatchObject({ state: 'sent', settledAt: expect.any(Date) });
      const queued = await pipelineWrite(bridge, 'k-queued');

      expect(await prune(29)).toMatchObject({ outboundWrites: 0 });
      expect(await storedWrite(sent.id)).toContain(LEAD);

      const report = await prune(31);
      expect(report).toMatchObject({ status: 'ok', outboundWrites: 1 });
      expect(report.pruned).toBeGreaterThan(0); // the ledger body of the write's own change
      expect(await storedWrite(sent.id)).not.toContain(LEAD);
      expect(await writeRow(sent.id)).toMatchObject({ state: 'sent', fields: null, echoMatch: null, crmId: sent.crmId });
      // Still to be made: the writer needs its fields, and then the gate its echo_match.
      expect(await writeRow(queued)).toMatchObject({ state: 'pending', fields: { description: LEAD }, echoMatch: expect.anything() });
    } finally {
      await bridge.close();
    }
  }, 60_000);

  it('leaves the prune to the replica holding the lease', async () => {
    await hook(matter(1, 1));
    await deliverAll();
    expect(await acquireLease(database.db, RETENTION_LEASE, 'other-replica', 60_000)).toBe(true);
    expect(await prune(31)).toMatchObject({ status: 'busy', pruned: 0 });
    await releaseLease(database.db, RETENTION_LEASE, 'other-replica');
    expect(await prune(31)).toMatchObject({ status: 'ok', pruned: 1 });
  });
});

describe('crm-bridge forget', () => {
  it('erases every stored body of the record, says what it removed, and the gate keeps working for it', async () => {
    const v1 = await hook(matter(1, 1));
    const v2 = await hook(matter(1, 2));
    const other = await hook(matter(4, 1));
    await deliverAll();

    const lines: string[] = [];
    const code = await forgetFromCli(database.db, { connectionId: 'acme', crmId: '1' }, (t) => lines.push(t));
    expect(code).toBe(0);
    const printed = lines.join('');
    expect(printed).toContain('erased 2 stored body(ies) of acme/matters/1');
    expect(printed).toContain(v1.eventId);
    expect(printed).toContain(v2.eventId);
    expect(await bodiesOf([v1.eventId, v2.eventId, other.eventId])).toEqual(new Set([other.eventId]));

    const [head] = await database.db.select().from(recordHeads).where(eq(recordHeads.crmId, '1'));
    expect(head).toMatchObject({ lastEventId: v2.eventId, version: matter(1, 2).updated_at });
    expect(await hook(matter(1, 2))).toMatchObject({ status: 'duplicate', eventId: v2.eventId });
    expect((await hook(matter(1, 1))).status).toBe('stale');
    expect((await hook(matter(1, 3))).status).toBe('accepted');
  });

  it('refuses while a change of the record is undelivered; --force dead-letters it as ERASED instead of sending it', async () => {
    const pending = await hook(matter(3, 1));
    await deliverAll();

    const refused = await forgetRecord(database.db, { connectionId: 'acme', crmId: '3' });
    expect(refused).toMatchObject({ status: 'pending', pending: [pending.eventId] });
    expect(await bodiesOf([pending.eventId])).toEqual(new Set([pending.eventId]));

    const forced = await forgetRecord(database.db, { connectionId: 'acme', crmId: '3', force: true });
    expect(forced).toMatchObject({ status: 'erased', eventIds: [pending.eventId], deadLettered: [pending.eventId] });
    expect(await bodiesOf([pending.eventId])).toEqual(new Set());
    const [row] = await database.db.select().from(outbox).where(eq(outbox.eventId, pending.eventId));
    expect(row).toMatchObject({ state: 'dead', lastError: 'ERASED' });
  });

  it('erases what a pipeline write put into the record: its fields and the values its echo was matched by', async () => {
    const bridge = await startWritingBridge();
    try {
      const sent = await makeWrite(bridge, await pipelineWrite(bridge, 'k-1'));
      expect(sent).toMatchObject({ state: 'sent', settledAt: expect.any(Date) });

      const out: string[] = [];
      expect(await forgetFromCli(database.db, { connectionId: 'firm', crmId: sent.crmId! }, (t) => out.push(t))).toBe(0);
      expect(out.join('')).toContain('1 outbound write(s) cleared of their fields and of the values their echo was matched by');
      expect(await storedWrite(sent.id)).not.toContain(LEAD);
      expect(await writeRow(sent.id)).toMatchObject({ state: 'sent', fields: null, echoMatch: null });
    } finally {
      await bridge.close();
    }
  }, 60_000);

  it('refuses while a pipeline write to the record is not finished; --force fails it as ERASED, never made, and erases what it held', async () => {
    const bridge = await startWritingBridge();
    try {
      const created = await makeWrite(bridge, await pipelineWrite(bridge, 'k-create'));
      const crmId = created.crmId!;
      // An update the writer has not made yet: its fields are still to go into the CRM, its echo still to come.
      const update = await pipelineWrite(bridge, 'k-update', crmId);

      const out: string[] = [];
      expect(await forgetFromCli(database.db, { connectionId: 'firm', crmId }, (t) => out.push(t))).toBe(1);
      expect(out.join('')).toContain(`refused: 1 pipeline write(s) to firm/matters/${crmId} are not finished`);
      expect(out.join('')).toContain(update);
      expect(await storedWrite(update)).toContain(LEAD);
      expect(await storedWrite(created.id)).toContain(LEAD);

      const forced = await forgetRecord(database.db, { connectionId: 'firm', crmId, force: true });
      expect(forced).toMatchObject({ status: 'erased', erasedWrites: [update], clearedOutboundWrites: 2 });
      expect(await writeRow(update)).toMatchObject({ state: 'failed', lastError: 'ERASED', settledAt: expect.any(Date), fields: null, echoMatch: null });
      expect(await storedWrite(update)).not.toContain(LEAD);
      expect(await storedWrite(created.id)).not.toContain(LEAD);

      // Never made: the writer has nothing left to claim.
      const writer = bridge.app.outboundWriters.get('firm')!;
      await writer.tick(new AbortController().signal);
      expect(await writeRow(update)).toMatchObject({ state: 'failed', attempts: 0 });
    } finally {
      await bridge.close();
    }
  }, 60_000);

  it('asks for --object when the id exists under several objects, and says when there is nothing to erase', async () => {
    await hook(matter(5, 1));
    await app.inject({
      method: 'POST',
      url: '/hooks/acme?object=contacts',
      headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
      payload: JSON.stringify({ id: 5, name: 'Jane Roe', updated_at: '2026-11-20T10:00:00Z' }),
    });
    await deliverAll();
    expect(await forgetRecord(database.db, { connectionId: 'acme', crmId: '5' })).toEqual({ status: 'ambiguous', objects: ['contacts', 'matters'] });
    expect(await forgetRecord(database.db, { connectionId: 'acme', crmId: '5', object: 'contacts' })).toMatchObject({ status: 'erased', object: 'contacts' });
    expect(await forgetRecord(database.db, { connectionId: 'acme', crmId: '999' })).toEqual({ status: 'not_found' });
  });
});
