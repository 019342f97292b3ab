// The change gate where the CRM's payloads vary for one record: one version written in several
// formats, a payload without the etag the object dedups on, the CRM's deleted event, and a
// notification that comes while the record is being fetched.
import { and, count, eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import type { ObjectDefinition } from '../src/config/schema.js';
import { connectorForConnection } from '../src/crm/connector.js';
import { ledger, ledgerBodies, outbox, pendingFetches, recordHeads } from '../src/db/schema/index.js';
import { passChanges, type ObservedChange } from '../src/sync/change-gate.js';
import { fetchPendingNotifications, pollStream } from '../src/sync/poller.js';
import { observeRecord } from '../src/sync/record.js';
import { buildTestApp, connection, SECRET } from './helpers/app.js';
import { startBridge } from './helpers/bridge.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';
import { startFaultProxy } from './helpers/fault-proxy.js';

const database = await createTestDatabase();
const { db } = database;
let app: FastifyInstance;
beforeAll(async () => {
  app = await buildTestApp({ database, connections: [connection(), connection({ id: 'touchy', deliverUnchanged: true })] });
});
afterAll(async () => {
  await app.close();
  await database.close();
});
beforeEach(() => resetDatabase(database));

const counts = async () => ({
  ledger: (await db.select({ n: count() }).from(ledger))[0]!.n,
  outbox: (await db.select({ n: count() }).from(outbox))[0]!.n,
});

describe('one version of one record, its timestamp written in different formats', () => {
  // The API's UTC form, an automation's local-offset form, and epoch milliseconds (HubSpot's
  // workflow webhooks send datetimes that way, its API as ISO text).
  const SAME_INSTANT = ['2026-11-20T10:00:00Z', '2026-11-20T05:00:00-05:00', 1795168800000];
  const matter = (updatedAt: unknown) => ({ id: 4211, display_number: '00042-Doe', status: 'Open', updated_at: updatedAt });
  const post = (conn: string, body: unknown) =>
    app.inject({ method: 'POST', url: `/hooks/${conn}`, headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' }, payload: JSON.stringify(body) });

  it('is a duplicate (rule 1), not a new ledger row per format', async () => {
    const first = await post('acme', matter(SAME_INSTANT[0]));
    expect(first.statusCode).toBe(202);
    for (const at of SAME_INSTANT.slice(1)) expect((await post('acme', matter(at))).json()).toEqual({ status: 'duplicate', eventId: first.json().eventId });
    expect(await counts()).toEqual({ ledger: 1, outbox: 1 });
  });

  it('is delivered once when the connection delivers unchanged versions (deliverUnchanged)', async () => {
    const answers = [];
    for (const at of SAME_INSTANT) answers.push((await post('touchy', matter(at))).statusCode);
    expect(answers).toEqual([202, 200, 200]);
    expect((await counts()).outbox).toBe(1);
  });

  it("orders a timestamp whose offset is hours alone (Postgres's `+00`, ISO 8601's `+01`): an older version after a newer is stale, alone or in one batch", async () => {
    const edit = (id: number, status: string, updatedAt: string) => ({ id, display_number: '00042-Doe', status, updated_at: updatedAt });
    expect((await post('acme', edit(1, 'Closed', '2026-11-20 11:00:00+00'))).statusCode).toBe(202);
    expect((await post('acme', edit(1, 'Open', '2026-11-20 10:00:00+00'))).json()).toMatchObject({ status: 'stale' });
    // 10:30+01 is 09:30Z: older than the head (11:00Z) although a later hour as text.
    expect((await post('acme', edit(1, 'Pending', '2026-11-20T10:30:00+01'))).json()).toMatchObject({ status: 'stale' });
    // Two hooks of one record arriving together share a batch: the later-arriving older one is stale.
    const [newer, older] = await Promise.all([post('acme', edit(2, 'Closed', '2026-11-20T11:00:00+01')), post('acme', edit(2, 'Open', '2026-11-20 09:00:00+00'))]);
    expect([newer.statusCode, older.json().status]).toEqual([202, 'stale']);
    // The same instant in another offset form is the same version.
    expect((await post('acme', edit(2, 'Closed', '2026-11-20T10:00:00Z'))).json()).toEqual({ status: 'duplicate', eventId: newer.json().eventId });
    expect(await counts()).toEqual({ ledger: 5, outbox: 2 });
  });
});

describe('ordering when a payload carries updated_at but not the etag', () => {
  // As the clio preset: dedup on the etag, order by updated_at.
  const definition: ObjectDefinition = { idPath: 'id', updatedAtPath: 'updated_at', versionPath: 'etag', fields: { status: 'status' }, volatile: ['etag'] };
  const observe = (raw: Record<string, unknown>, source: ObservedChange['source']) =>
    observeRecord({ connectionId: 'acme', object: 'matters', definition, raw, source, observedAt: new Date() })!;
  const pass = (c: ObservedChange) => db.transaction(async (tx) => (await passChanges(tx, [c]))[0]!);

  it('keeps the head ordered, so a late older version is stale', async () => {
    expect((await pass(observe({ id: 42, etag: '"a"', status: 'Open', updated_at: '2026-11-20T10:00:00Z' }, 'poll'))).disposition).toBe('accepted');
    // An automation that posts the record without its etag: version null, updated_at 12:00.
    expect((await pass(observe({ id: 42, status: 'Closed', updated_at: '2026-11-20T12:00:00Z' }, 'hook'))).disposition).toBe('accepted');
    // A poll page read at 11:00 commits late: older than the head, so never delivered.
    expect(await pass(observe({ id: 42, etag: '"b"', status: 'Pending', updated_at: '2026-11-20T11:00:00Z' }, 'poll'))).toMatchObject({ disposition: 'stale', delivered: false });
  });

  it('does the same when the change without an etag is the record\'s first', async () => {
    expect((await pass(observe({ id: 43, status: 'Closed', updated_at: '2026-11-20T12:00:00Z' }, 'hook'))).disposition).toBe('accepted');
    expect(await pass(observe({ id: 43, etag: '"b"', status: 'Pending', updated_at: '2026-11-20T11:00:00Z' }, 'poll'))).toMatchObject({ disposition: 'stale', delivered: false });
  });
});

describe("the CRM automation's deleted event", () => {
  const deleteWhen = { path: 'meta.event', equals: ['deleted'] };
  const hookRows = (id: number) =>
    db
      .select({ change: ledger.change, source: ledger.source, disposition: ledger.disposition, queued: outbox.id })
      .from(ledger)
      .leftJoin(outbox, eq(outbox.eventId, ledger.eventId))
      .where(and(eq(ledger.crmId, String(id)), eq(ledger.source, 'hook')));

  it('goes downstream as a delete with inbound.deleteWhen, not answered as a duplicate of the last version', async () => {
    // The sandbox's automation sends the record in `data` and the event in `meta.event`, as a Clio webhook does.
    const bridge = await startBridge({ database, automation: { events: ['updated', 'deleted'] }, connection: { inbound: { deleteWhen } } });
    try {
      expect((await pollStream(bridge.app.poller.stream('firm', 'matters'))).status).toBe('ok');
      const id = bridge.sandbox.state.store.matters.items[0]!.id;
      bridge.sandbox.state.deleteRecord('matters', id);
      await bridge.sandbox.state.automationIdle();
      expect(await hookRows(id)).toEqual([{ change: 'delete', source: 'hook', disposition: 'accepted', queued: expect.any(Number) }]);
      const [head] = await db.select().from(recordHeads).where(eq(recordHeads.crmId, String(id)));
      expect(head).toMatchObject({ deleted: true });
      // The same event again is a duplicate; the sweep later finds nothing more to delete.
      const again = await bridge.app.inject({
        method: 'POST',
        url: '/hooks/firm',
        headers: { authorization: `Bearer ${SECRET}` },
        payload: { data: { id, updated_at: '2026-11-20T10:00:00Z' }, meta: { event: 'deleted' } },
      });
      expect(again.json()).toMatchObject({ status: 'duplicate' });
    } finally {
      await bridge.close();
    }
  });

  it('is a delete in notification mode too, without fetching a record that is gone', async () => {
    const bridge = await startBridge({ database, connection: { inbound: { payload: 'notification', deleteWhen } } });
    try {
      expect((await pollStream(bridge.app.poller.stream('firm', 'matters'))).status).toBe('ok');
      const id = bridge.sandbox.state.store.matters.items[1]!.id;
      const res = await bridge.app.inject({ method: 'POST', url: '/hooks/firm', headers: { authorization: `Bearer ${SECRET}` }, payload: { data: { id }, meta: { event: 'deleted' } } });
      expect(res.statusCode).toBe(202);
      expect(await hookRows(id)).toEqual([{ change: 'delete', source: 'hook', disposition: 'accepted', queued: expect.any(Number) }]);
    } finally {
      await bridge.close();
    }
  });
});

describe('notification-mode hooks', () => {
  it('keeps a notification that arrives while the record is being fetched: the newer version is fetched too', async () => {
    const bridge = await startBridge({ database, connection: { inbound: { payload: 'notification' } } });
    const id = bridge.sandbox.state.store.matters.items[0]!.id;
    const notify = () => bridge.app.inject({ method: 'POST', url: '/hooks/firm?object=matters', headers: { authorization: `Bearer ${SECRET}` }, payload: { data: { id } } });
    let second: { statusCode: number } | undefined;
    // The CRM answers the fetch with v1; before that answer reaches the bridge, the record is
    // edited again (v2) and the automation sends a second notification for it.
    const proxy = await startFaultProxy({
      target: bridge.sandbox.url,
      answer: async (req) => {
        if (second === undefined && req.method === 'GET' && req.url!.startsWith(`/api/v4/matters/${id}.json`)) {
          bridge.sandbox.state.updateRecord('matters', id, { description: 'v2: client signed the retainer' });
          second = await notify();
        }
        return false;
      },
    });
    try {
      const base = bridge.app.poller.stream('firm', 'matters');
      expect((await pollStream(base)).status).toBe('ok');
      const stream = { ...base, connector: connectorForConnection({ connector: base.connection.connector, baseUrl: proxy.url }, { tokens: bridge.app.tokens.get('firm')!, http: { maxRetries: 0 } }) };
      bridge.sandbox.state.updateRecord('matters', id, { description: 'v1: client called' });
      expect((await notify()).statusCode).toBe(202);
      await fetchPendingNotifications(stream);
      expect(second?.statusCode).toBe(200);
      // The second notification still waits, and its fetch brings v2.
      expect(await db.select().from(pendingFetches)).toHaveLength(1);
      await fetchPendingNotifications(stream);
      const delivered = await db
        .select({ fields: ledgerBodies.fields })
        .from(outbox)
        .innerJoin(ledger, eq(ledger.eventId, outbox.eventId))
        .innerJoin(ledgerBodies, eq(ledgerBodies.eventId, outbox.eventId))
        .where(and(eq(ledger.crmId, String(id)), eq(ledger.source, 'notification')));
      expect(delivered.map((d) => JSON.stringify(d.fields)).some((f) => f.includes('v2:'))).toBe(true);
      expect(await db.select().from(pendingFetches)).toHaveLength(0);
    } finally {
      await proxy.close();
      await bridge.close();
    }
  });
});
