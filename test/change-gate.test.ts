import { randomUUID } from 'node:crypto';
import { and, asc, eq, sql } from 'drizzle-orm';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { ledger, ledgerBodies, outbox, outboundWrites, recordHeads } from '../src/db/schema/index.js';
import { passChanges, type ObservedChange } from '../src/sync/change-gate.js';
import { headsByKey } from '../src/db/queries/heads.js';
import { claimDeliveries } from '../src/db/queries/outbox.js';
import { ChangeWriter } from '../src/sync/change-writer.js';
import type { ObjectDefinition } from '../src/config/schema.js';
import { contentHash, observeRecord } from '../src/sync/record.js';
import { openDatabase, rowsOf, type Database } from '../src/db/client.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

const database = await createTestDatabase();
const { db } = database;
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

const definition: ObjectDefinition = {
  idPath: 'id',
  updatedAtPath: 'updated_at',
  fields: { name: 'display_number', status: 'status', practiceArea: 'practice_area.name' },
  volatile: [],
};

function change(raw: Record<string, unknown>, overrides: Partial<ObservedChange> = {}): ObservedChange {
  const observed = observeRecord({ connectionId: 'acme', object: 'matters', definition, raw, source: 'poll', observedAt: new Date() });
  if (!observed) throw new Error('record without id');
  return { ...observed, ...overrides };
}

const matter = (status: string, updatedAt: string, extra: Record<string, unknown> = {}) => ({
  id: 42,
  display_number: '00042-Doe',
  status,
  practice_area: { id: 7, name: 'Personal Injury' },
  updated_at: updatedAt,
  ...extra,
});

const pass = (c: ObservedChange) => db.transaction(async (tx) => (await passChanges(tx, [c]))[0]!);

async function history() {
  return db
    .select({ disposition: ledger.disposition, version: ledger.version, delivered: outbox.id })
    .from(ledger)
    .leftJoin(outbox, eq(outbox.eventId, ledger.eventId))
    .orderBy(asc(ledger.seq));
}

describe('the change gate', () => {
  it('delivers A → B → A as three changes: dedup is against the head, not history', async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    await pass(change(matter('Pending', '2026-11-01T11:00:00Z')));
    const third = await pass(change(matter('Open', '2026-11-01T12:00:00Z')));
    expect(third.disposition).toBe('accepted');
    const rows = await history();
    expect(rows.map((r) => r.disposition)).toEqual(['accepted', 'accepted', 'accepted']);
    expect(rows.every((r) => r.delivered !== null)).toBe(true);
  });

  it('records an older version after a newer one as stale and does not deliver it', async () => {
    await pass(change(matter('Pending', '2026-11-01T11:00:00Z')));
    const old = await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    expect(old).toMatchObject({ disposition: 'stale', delivered: false });
    const [head] = await db.select().from(recordHeads);
    expect(head?.version).toBe('2026-11-01T11:00:00Z');
    expect((await history()).map((r) => [r.disposition, r.delivered !== null])).toEqual([
      ['accepted', true],
      ['stale', false],
    ]);
  });

  it('orders versions by time, not by text, across offsets', async () => {
    await pass(change(matter('Pending', '2026-11-01T10:00:00-08:00')));
    // 17:00Z is earlier than 10:00-08:00 (18:00Z) although it sorts later as text.
    expect((await pass(change(matter('Open', '2026-11-01T17:00:00Z')))).disposition).toBe('stale');
  });

  it('records a newer version with unchanged mapped content as unchanged, and can be told to deliver it', async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z', { unmapped_counter: 1 })));
    const touched = await pass(change(matter('Open', '2026-11-01T10:05:00Z', { unmapped_counter: 2 })));
    expect(touched).toMatchObject({ disposition: 'unchanged', delivered: false });
    const configured = await pass(change(matter('Open', '2026-11-01T10:06:00Z'), { deliverUnchanged: true }));
    expect(configured).toMatchObject({ disposition: 'accepted', delivered: true });
  });

  it('hashes canonical JSON: reordered keys and whitespace are the same content', async () => {
    const a = JSON.parse('{"id": 42, "status": "Open", "display_number": "00042-Doe", "practice_area": {"name": "PI", "id": 7}}');
    const b = JSON.parse('{ "practice_area":{"id":7,"name":"PI"},"display_number":"00042-Doe","status":"Open","id":42 }');
    const { updatedAtPath: _ignored, ...noVersion } = definition;
    const first = observeRecord({ connectionId: 'acme', object: 'matters', definition: noVersion, raw: a, source: 'hook', observedAt: new Date() })!;
    const second = observeRecord({ connectionId: 'acme', object: 'matters', definition: noVersion, raw: b, source: 'hook', observedAt: new Date() })!;
    expect(first.contentHash).toBe(second.contentHash);
    const accepted = await pass(first);
    expect(await pass(second)).toEqual({ disposition: 'duplicate', eventId: accepted.eventId, delivered: false });
  });

  it('records the echo of a write the bridge made to that record and does not deliver it', async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    const echoed = change(matter('Closed', '2026-11-01T10:10:00Z'));
    await db.insert(outboundWrites).values({
      id: randomUUID(),
      connectionId: 'acme',
      object: 'matters',
      idempotencyKey: 'k-1',
      requestHash: 'r',
      attempts: 1,
      crmId: '42',
      contentHash: echoed.contentHash!,
      state: 'sent',
    });
    expect(await pass(echoed)).toMatchObject({ disposition: 'echo', delivered: false });
    const [head] = await db.select().from(recordHeads);
    expect(head).toMatchObject({ origin: 'pipeline', version: '2026-11-01T10:10:00Z' });
    // A later human edit of that record is a real change again.
    expect(await pass(change(matter('Open', '2026-11-01T11:00:00Z')))).toMatchObject({ disposition: 'accepted', delivered: true });
  });

  it("records the CRM's answer to a write as an echo even when no live stamp is left to match it", async () => {
    // An earlier attempt's echo settled the stamp; a retried write's answer is still the
    // bridge's own version and is never delivered.
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    expect(await pass(change(matter('Closed', '2026-11-01T10:10:00Z'), { source: 'outbound' }))).toMatchObject({ disposition: 'echo', delivered: false });
    expect(await pass(change({ ...matter('Open', '2026-11-01T10:00:00Z'), id: 43 }, { source: 'outbound' }))).toMatchObject({ disposition: 'echo', delivered: false });
    expect((await history()).map((r) => [r.disposition, r.delivered !== null])).toEqual([
      ['accepted', true],
      ['echo', false],
      ['echo', false],
    ]);
    expect((await db.select({ origin: recordHeads.origin }).from(recordHeads).orderBy(asc(recordHeads.crmId))).map((h) => h.origin)).toEqual(['pipeline', 'pipeline']);
  });

  /** A create of status Open given up on after its attempts (a 503 each); `settled` when nothing reached the CRM. */
  const givenUpCreate = (id: string, key: string, contentHash: string, settled: boolean) =>
    db.insert(outboundWrites).values({
      id,
      connectionId: 'acme',
      object: 'matters',
      idempotencyKey: key,
      requestHash: 'r',
      contentHash,
      echoMatch: { fields: { status: 'Open' }, foldCase: [] },
      state: 'failed',
      attempts: 2,
      lastError: 'gave up after 2 attempts: 503',
      ...(settled ? { settledAt: new Date() } : {}),
    });

  it('recognises an echo that arrives before the bridge learned the CRM id, and learns it', async () => {
    const created = change({ ...matter('Open', '2026-11-01T10:00:00Z'), id: 9001 });
    const stampId = randomUUID();
    await db.insert(outboundWrites).values({
      id: stampId,
      connectionId: 'acme',
      object: 'matters',
      idempotencyKey: 'k-2',
      requestHash: 'r',
      attempts: 1,
      externalId: 'lead-7',
      contentHash: created.contentHash!,
    });
    expect(await pass(created)).toMatchObject({ disposition: 'echo', delivered: false });
    const [stamp] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, stampId));
    expect(stamp?.crmId).toBe('9001');
  });

  it('records a change whose origin marker names an unsettled write showing what it wrote as an echo, once', async () => {
    const stampId = randomUUID();
    await db.insert(outboundWrites).values({
      id: stampId,
      connectionId: 'acme',
      object: 'matters',
      idempotencyKey: 'k-3',
      requestHash: 'r',
      attempts: 1,
      contentHash: 'not-the-read-back-hash',
      echoMatch: { fields: { status: 'open' }, foldCase: ['status'] },
    });
    expect(await pass(change(matter('Open', '2026-11-01T10:00:00Z'), { originMarker: stampId }))).toMatchObject({ disposition: 'echo' });
    // The marker stays on the record; a later edit that keeps the written fields is still a real change.
    expect(await pass(change(matter('Open', '2026-11-01T11:00:00Z', { display_number: '00042-Roe' }), { originMarker: stampId }))).toMatchObject({
      disposition: 'accepted',
      delivered: true,
    });
  });

  it("delivers a change showing a queued write's fields until a CRM call for that write may have started", async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    const stampId = randomUUID();
    const edited = change(matter('Closed', '2026-11-01T10:10:00Z'));
    // Queued (or given back to wait for re-authorisation): the bridge has written nothing yet.
    await db.insert(outboundWrites).values({ id: stampId, connectionId: 'acme', object: 'matters', idempotencyKey: 'k-4', requestHash: 'r', crmId: '42', operation: 'update', contentHash: edited.contentHash! });
    expect(await pass(edited)).toMatchObject({ disposition: 'accepted', delivered: true });
    // Claimed: the call may have reached the CRM, so what shows its fields is its echo.
    await db.update(outboundWrites).set({ attempts: 1 }).where(eq(outboundWrites.id, stampId));
    expect(await pass(change(matter('Pending', '2026-11-01T10:20:00Z')))).toMatchObject({ disposition: 'accepted' });
    expect(await pass(change(matter('Closed', '2026-11-01T10:30:00Z')))).toMatchObject({ disposition: 'echo', delivered: false });
  });

  it('takes only a record whose marker names a create given up on as its echo, and the write then shows sent', async () => {
    const record = (id: number) => change({ ...matter('Open', '2026-11-01T10:00:00Z'), id });
    const failed = (id: string, key: string, settled: boolean) => givenUpCreate(id, key, record(0).contentHash!, settled);
    const givenUp = randomUUID();
    const refused = randomUUID();
    await failed(givenUp, 'k-5', false);
    // Refused outright (a 4xx): nothing reached the CRM, so no record is its echo, even one naming it.
    await failed(refused, 'k-6', true);
    expect(await pass(change({ ...matter('Open', '2026-11-01T10:00:00Z'), id: 43 }, { originMarker: refused }))).toMatchObject({ disposition: 'accepted' });
    // In one batch: a human's record showing the same fields is a real change; the record naming the write is its echo.
    const outcomes = await db.transaction((tx) => passChanges(tx, [record(41), { ...record(44), originMarker: givenUp }]));
    expect(outcomes.map((o) => [o.disposition, o.delivered])).toEqual([
      ['accepted', true],
      ['echo', false],
    ]);
    const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, givenUp));
    expect(write).toMatchObject({ state: 'sent', crmId: '44', lastError: null, lastStatus: null });
    expect(write!.settledAt).not.toBeNull();
  });

  it("reads a marker as the write id it names whatever its case, and one that is no write id (someone's text in the field) as no write's", async () => {
    const record = (id: number, originMarker: string) => ({ ...change({ ...matter('Open', '2026-11-01T10:00:00Z'), id }), originMarker });
    const givenUp = randomUUID();
    await givenUpCreate(givenUp, 'k-7', record(0, '').contentHash!, false);
    const outcomes = await db.transaction((tx) => passChanges(tx, [record(45, 'see file 2019/44'), record(46, "'); drop table ledger; --"), record(47, givenUp.toUpperCase())]));
    expect(outcomes.map((o) => [o.disposition, o.delivered])).toEqual([
      ['accepted', true],
      ['accepted', true],
      ['echo', false],
    ]);
    expect((await db.select().from(outboundWrites).where(eq(outboundWrites.id, givenUp)))[0]).toMatchObject({ state: 'sent', crmId: '47' });
  });

  it('delivers a delete once, and a repeated delete is a duplicate', async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    const del: ObservedChange = { ...change(matter('Open', '2026-11-01T10:00:00Z')), change: 'delete', version: null, fields: null, contentHash: null, raw: null, source: 'sweep' };
    expect(await pass(del)).toMatchObject({ disposition: 'accepted', delivered: true });
    expect(await pass(del)).toMatchObject({ disposition: 'duplicate' });
    // The version it had before the delete does not resurrect it.
    expect(await pass(change(matter('Open', '2026-11-01T10:00:00Z')))).toMatchObject({ disposition: 'stale' });
  });

  it('keeps the ledger append-only: UPDATE and DELETE are refused by the database', async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    await expect(db.update(ledger).set({ disposition: 'stale' })).rejects.toThrow();
    await expect(db.delete(ledger)).rejects.toThrow();
  });

  it('stores the raw record and mapped fields beside the ledger row', async () => {
    const accepted = await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    const [body] = await db.select().from(ledgerBodies).where(eq(ledgerBodies.eventId, accepted.eventId));
    expect(body?.fields).toEqual({ name: '00042-Doe', status: 'Open', practiceArea: 'Personal Injury' });
    expect((body?.raw as { practice_area: unknown }).practice_area).toEqual({ id: 7, name: 'Personal Injury' });
  });

  // The ledger, its bodies and the outbox are unique on the event id: ids made in order keep
  // those indexes growing at one end instead of touching a random page per change.
  it('makes event ids in time order, so later changes sort after earlier ones', async () => {
    const made: string[] = [];
    for (let id = 1; id <= 20; id++) made.push((await pass(change({ ...matter('Open', '2026-11-01T10:00:00Z'), id }))).eventId);
    const rows = await db.select({ eventId: ledger.eventId }).from(ledger).orderBy(asc(ledger.seq));
    expect(rows.map((r) => r.eventId)).toEqual(made);
    expect([...made].sort()).toEqual(made);
    expect(made.every((id) => id[14] === '7')).toBe(true);
  });

  it('gives one delivery for the same change racing through many batches and paths', async () => {
    const writer = new ChangeWriter(db, { maxBatch: 8, concurrency: 4 });
    const same = matter('Open', '2026-11-01T10:00:00Z');
    const results = await Promise.all(
      Array.from({ length: 40 }, (_, i) => writer.submit(change(same, { source: i % 2 ? 'hook' : 'poll' }))),
    );
    expect(results.filter((r) => r.delivered)).toHaveLength(1);
    expect(new Set(results.map((r) => r.eventId)).size).toBe(1);
    const [counted] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(outbox);
    expect(counted?.n).toBe(1);
  });

  it('commits a batch of changes and notifications in one transaction, each answered once with its own outcome', async () => {
    const writer = new ChangeWriter(db, { maxBatch: 64, concurrency: 1 });
    // Submitted in one turn of the event loop, the four share one batch.
    const outcomes = await Promise.all([
      writer.submit(change(matter('Open', '2026-11-01T10:00:00Z'))),
      writer.submit(change({ ...matter('Open', '2026-11-01T10:00:00Z'), id: 43 })),
      writer.submitNotification({ connectionId: 'acme', object: 'matters', crmId: '44', observedAt: new Date(), raw: { id: 44 } }),
      writer.submit(change({ ...matter('Open', '2026-11-01T10:00:00Z'), id: 45 })),
    ]);
    // Had the gate's write gone out with the COMMIT in the mixed batch, the notification's
    // statements would have been refused and the batch retried one by one: 43 and 45, already
    // committed, would come back as duplicates.
    expect(outcomes.map((o) => o.disposition)).toEqual(['accepted', 'accepted', 'notified', 'accepted']);
    const [counted] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(ledger);
    expect(counted?.n).toBe(4);
  });

  it('keeps arrival order for one record inside a batch and answers each caller with its own outcome', async () => {
    const writer = new ChangeWriter(db, { maxBatch: 64, concurrency: 1 });
    const outcomes = await Promise.all([
      writer.submit(change(matter('Open', '2026-11-01T10:00:00Z'))),
      writer.submit(change({ ...matter('Open', '2026-11-01T10:00:00Z'), id: 43 })),
      writer.submit(change(matter('Pending', '2026-11-01T11:00:00Z'))),
      writer.submit(change(matter('Open', '2026-11-01T10:00:00Z'))),
    ]);
    expect(outcomes.map((o) => o.disposition)).toEqual(['accepted', 'accepted', 'accepted', 'stale']);
  });

  it('keys everything by connection: the same record id in two connections is two records', async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    const other = await pass(change(matter('Open', '2026-11-01T10:00:00Z'), { connectionId: 'other-firm' }));
    expect(other.disposition).toBe('accepted');
    const heads = await db.select().from(recordHeads).where(and(eq(recordHeads.crmId, '42')));
    expect(heads).toHaveLength(2);
  });

  it('keeps two connections apart within one batch: the same record id is read, locked and written as two records', async () => {
    const both = (status: string, at: string) => [change(matter(status, at)), change(matter(status, at), { connectionId: 'other-firm' })];
    const batch = (changes: ObservedChange[]) => db.transaction((tx) => passChanges(tx, changes));
    expect((await batch(both('Open', '2026-11-01T10:00:00Z'))).map((o) => o.disposition)).toEqual(['accepted', 'accepted']);
    // Read back (unlocked) for both connections: each is a duplicate of its own head.
    expect((await batch(both('Open', '2026-11-01T10:00:00Z'))).map((o) => o.disposition)).toEqual(['duplicate', 'duplicate']);
    // Locked and changed for both.
    expect((await batch(both('Closed', '2026-11-02T10:00:00Z'))).map((o) => o.disposition)).toEqual(['accepted', 'accepted']);
    const heads = await db.select().from(recordHeads).where(eq(recordHeads.crmId, '42')).orderBy(asc(recordHeads.connectionId));
    expect(heads.map((h) => [h.connectionId, h.version])).toEqual([
      ['acme', '2026-11-02T10:00:00Z'],
      ['other-firm', '2026-11-02T10:00:00Z'],
    ]);
  });

  it('hashes content independent of key order', () => {
    expect(contentHash({ a: 1, b: { c: [1, { d: 2, e: 3 }] } })).toBe(contentHash({ b: { c: [1, { e: 3, d: 2 }] }, a: 1 }));
  });
});

describe('the change gate with opaque versions (etags) and a separate updated_at', () => {
  const etagDefinition: ObjectDefinition = { ...definition, versionPath: 'etag' };
  const observe = (raw: Record<string, unknown>) =>
    observeRecord({ connectionId: 'acme', object: 'matters', definition: etagDefinition, raw, source: 'poll', observedAt: new Date() })!;

  it('dedups on the etag and orders by updated_at, even when one second holds two edits', async () => {
    const first = await pass(observe({ ...matter('Open', '2026-11-01T10:00:00Z'), etag: '"a"' }));
    expect(first.disposition).toBe('accepted');
    // A second edit inside the same second: same updated_at, new etag, new content.
    expect((await pass(observe({ ...matter('Pending', '2026-11-01T10:00:00Z'), etag: '"b"' }))).disposition).toBe('accepted');
    expect((await pass(observe({ ...matter('Pending', '2026-11-01T10:00:00Z'), etag: '"b"' }))).disposition).toBe('duplicate');
    // An etag from before, read late: older updated_at, so stale.
    expect((await pass(observe({ ...matter('Closed', '2026-11-01T09:59:00Z'), etag: '"z"' }))).disposition).toBe('stale');
  });
});

describe('the change gate for changes already seen', () => {
  it('answers a re-read of an unchanged record without writing', async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    const before = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(ledger);
    const again = await db.transaction((tx) => passChanges(tx, [change(matter('Open', '2026-11-01T10:00:00Z'))]));
    expect(again.map((o) => o.disposition)).toEqual(['duplicate']);
    const after = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(ledger);
    expect(after[0]!.n).toBe(before[0]!.n);
  });

  it.skipIf(!process.env.DATABASE_URL)('does not wait for a head another transaction holds when the change is a duplicate', async () => {
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    let locked!: () => void;
    const isLocked = new Promise<void>((resolve) => (locked = resolve));
    const holder = db.transaction(async (tx) => {
      await tx.execute(sql`select 1 from record_heads where crm_id = '42' for update`);
      locked();
      await held;
    });
    await isLocked;
    const duplicate = db.transaction((tx) => passChanges(tx, [change(matter('Open', '2026-11-01T10:00:00Z'))]));
    const outcome = await Promise.race([duplicate, new Promise<'blocked'>((resolve) => setTimeout(() => resolve('blocked'), 5_000))]);
    release();
    await holder;
    expect(outcome).not.toBe('blocked');
    expect((outcome as Awaited<typeof duplicate>)[0]!.disposition).toBe('duplicate');
  });
});

describe('the change gate writing outbox rows leased to a worker', () => {
  const other = (id: number, status: string, updatedAt: string) => change({ ...matter(status, updatedAt), id, display_number: `000${id}-Roe` });
  const leaseRows = () =>
    db.select({ eventId: outbox.eventId, crmId: outbox.crmId, attempts: outbox.attempts, leaseOwner: outbox.leaseOwner, leased: sql<boolean>`${outbox.leaseExpiresAt} > now()` }).from(outbox).orderBy(outbox.id);

  it('leases the first row of each record up to the offer, written in the same transaction, with the content a claim reads', async () => {
    const offer = { owner: 'worker-a', ms: 60_000, max: 2 };
    const outcomes = await db.transaction((tx) =>
      passChanges(
        tx,
        [change(matter('Open', '2026-11-01T10:00:00Z')), change(matter('Pending', '2026-11-01T11:00:00Z')), other(43, 'Open', '2026-11-01T10:00:00Z'), other(44, 'Open', '2026-11-01T10:00:00Z')],
        { leases: new Map([['acme', offer]]) },
      ),
    );
    expect(outcomes.map((o) => o.disposition)).toEqual(['accepted', 'accepted', 'accepted', 'accepted']);
    // 42's second version waits for its first; 44 is past the offer's two.
    expect(outcomes.map((o) => o.leased !== undefined)).toEqual([true, false, true, false]);
    expect(await leaseRows()).toEqual([
      { eventId: outcomes[0]!.eventId, crmId: '42', attempts: 1, leaseOwner: 'worker-a', leased: true },
      { eventId: outcomes[1]!.eventId, crmId: '42', attempts: 0, leaseOwner: null, leased: null },
      { eventId: outcomes[2]!.eventId, crmId: '43', attempts: 1, leaseOwner: 'worker-a', leased: true },
      { eventId: outcomes[3]!.eventId, crmId: '44', attempts: 0, leaseOwner: null, leased: null },
    ]);
    // The lease went in with the row: one tuple version, written by the change's transaction.
    const [versions] = await rowsOf<{ same: boolean }>(db.execute(sql`select bool_and(o.xmin::text = l.xmin::text) as same from outbox o join ledger l using (event_id)`));
    expect(versions!.same).toBe(true);

    // A lease of 0 ms is over at once: a claim then reads what the gate handed back, attempt aside.
    await resetDatabase(database);
    const [handed] = await db.transaction((tx) => passChanges(tx, [change(matter('Open', '2026-11-01T10:00:00Z', { notes: 'a "quoted" ünïcode note', nested: { b: 1, a: [1.50, null] } }))], { leases: new Map([['acme', { ...offer, ms: 0 }]]) }));
    const [claimed] = await claimDeliveries(db, { connectionId: 'acme', owner: 'worker-b', limit: 10, leaseMs: 60_000 });
    expect(claimed).toEqual({ ...handed!.leased!, attempts: 2 });
  });

  it('leases no row of a record that already has one pending: per-record order holds', async () => {
    const offer = { owner: 'worker-a', ms: 60_000, max: 10 };
    await pass(change(matter('Open', '2026-11-01T10:00:00Z')));
    const [second] = await db.transaction((tx) => passChanges(tx, [change(matter('Pending', '2026-11-01T11:00:00Z'))], { leases: new Map([['acme', offer]]) }));
    expect(second!.disposition).toBe('accepted');
    expect(second!.leased).toBeUndefined();
    expect((await leaseRows()).map((r) => r.leaseOwner)).toEqual([null, null]);

    // Once the first is delivered, the next version is leased.
    await db.update(outbox).set({ state: 'delivered' });
    const [third] = await db.transaction((tx) => passChanges(tx, [change(matter('Closed', '2026-11-01T12:00:00Z'))], { leases: new Map([['acme', offer]]) }));
    expect(third!.leased?.eventId).toBe(third!.eventId);
  });

  it('leases nothing for a connection without an offer, and nothing when the transaction rolls back', async () => {
    const failed = db.transaction(async (tx) => {
      await passChanges(tx, [change(matter('Open', '2026-11-01T10:00:00Z'))], { leases: new Map([['acme', { owner: 'worker-a', ms: 60_000, max: 1 }]]) });
      throw new Error('rolled back');
    });
    await expect(failed).rejects.toThrow('rolled back');
    expect(await leaseRows()).toEqual([]);
    const [plain] = await db.transaction((tx) => passChanges(tx, [change(matter('Open', '2026-11-01T10:00:00Z'))], { leases: new Map([['other', { owner: 'worker-a', ms: 60_000, max: 1 }]]) }));
    expect(plain!.leased).toBeUndefined();
    expect((await leaseRows()).map((r) => [r.attempts, r.leaseOwner])).toEqual([[0, null]]);
  });
});

describe('looking up record heads by key', () => {
  const plan = (mode: 'force_generic_plan' | 'force_custom_plan', lookup: 'read' | 'lock') =>
    db.transaction(async (tx) => {
      await tx.execute(sql.raw(`set local plan_cache_mode = ${mode}`));
      const keys = ['1', '2', '3'].map((crm_id) => ({ connection_id: 'acme', object: 'matters', crm_id }));
      const rows = await rowsOf<{ 'QUERY PLAN': string }>(tx.execute(sql`explain ${headsByKey(sql.raw('h.crm_id, h.version, h.last_event_id'), keys, lookup)}`));
      return rows.map((r) => r['QUERY PLAN']).join('\n');
    });

  // A JSON key list is guessed at 100 rows: joined to the heads, it was planned as a scan of every
  // head from a few thousand heads on, and a generic plan made on an empty table kept doing so.
  it('goes through the primary key, never a scan of every head, on an empty table and a full one, with generic and custom plans', async () => {
    for (const size of [0, 3_000]) {
      if (size > 0) {
        await db.execute(sql`insert into record_heads (connection_id, object, crm_id, last_event_id)
          select 'acme', 'matters', g::text, gen_random_uuid() from generate_series(1, ${size}) g`);
        await db.execute(sql`analyze record_heads`);
      }
      for (const mode of ['force_generic_plan', 'force_custom_plan'] as const) {
        for (const lookup of ['read', 'lock'] as const) {
          const text = await plan(mode, lookup);
          expect(text, `${size} heads, ${mode}, ${lookup}`).toContain('Index Scan using record_heads_pkey');
          expect(text, `${size} heads, ${mode}, ${lookup}`).not.toContain('Seq Scan on record_heads');
        }
      }
    }
  });
});

describe.skipIf(!process.env.DATABASE_URL)('the change gate on Postgres', () => {
  /** The gate's statements this transaction's connection holds prepared, after passing one change. */
  const preparedGateStatements = (target: Database) =>
    target.db.transaction(async (tx) => {
      await passChanges(tx, [change(matter('Open', '2026-11-01T10:00:00Z'))]);
      const rows = await rowsOf<{ statement: string }>(tx.execute(sql`select statement from pg_prepared_statements`));
      return rows.filter((r) => r.statement.includes('with claimed as')).length;
    });
  it('runs through named statements, one round trip each, and not when DATABASE_URL says prepare=false', async () => {
    expect(await preparedGateStatements(database)).toBe(1);

    const url = new URL(database.url!);
    url.searchParams.set('prepare', 'false');
    const unprepared = openDatabase({ url: url.toString(), max: 1 });
    try {
      await resetDatabase(database);
      expect(await preparedGateStatements(unprepared)).toBe(0);
      // The gate still works without them.
      expect(await unprepared.db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(ledger)).toEqual([{ n: 1 }]);
    } finally {
      await unprepared.close();
    }
  });
});
