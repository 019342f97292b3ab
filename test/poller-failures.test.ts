// Poll runs where a CRM's paging, timestamps or one bad record could make them miss a change:
// HubSpot's offset paging under edits, Clio's whole-second timestamps, a notified record the CRM
// cannot give.
import { setTimeout as sleep } from 'node:timers/promises';
import { and, eq } from 'drizzle-orm';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { ledger, outbox, recordHeads } from '../src/db/schema/index.js';
import { SECRET } from './helpers/app.js';
import { pollStream } from '../src/sync/poller.js';
import { connectorForConnection } from '../src/crm/connector.js';
import { startBridge } from './helpers/bridge.js';
import { startFaultProxy } from './helpers/fault-proxy.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

const database = await createTestDatabase();
const { db } = database;
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

const hubspotConnection = { connector: 'hubspot', inbound: { object: 'contacts' }, poll: { objects: ['contacts'], pageSize: 10 } };

async function headIds(object: string) {
  const heads = await db.select().from(recordHeads).where(eq(recordHeads.object, object));
  return new Set(heads.map((h) => h.crmId));
}

describe('poll runs under what the CRMs do', () => {
  it('HubSpot: a contact edited while the search is paged does not make the poll skip another contact', async () => {
    const bridge = await startBridge({ database, connection: hubspotConnection, sandbox: { switches: { hubspotSearchPerSecond: null } } });
    let searches = 0;
    let edited: string | undefined;
    const proxy = await startFaultProxy({
      target: bridge.sandbox.url,
      // After the first page was answered, and before the second is asked for, someone edits a
      // contact the first page held: it moves to the end of the (lastmodifieddate, id) order.
      answer: async (req, _res, text) => {
        if (req.method !== 'POST' || !req.url!.startsWith('/crm/v3/objects/contacts/search')) return false;
        if (++searches === 1) {
          edited = (JSON.parse(text) as { results: Array<{ id: string }> }).results[0]!.id;
          bridge.sandbox.state.updateRecord('contacts', Number(edited), { title: 'Edited during the listing' });
        }
        return false;
      },
    });
    try {
      const stream = bridge.app.poller.stream('firm', 'contacts');
      const viaProxy = { ...stream, connector: connectorForConnection({ connector: stream.connection.connector, baseUrl: proxy.url }, { tokens: bridge.app.tokens.get('firm')!, http: { minIntervalMs: 0 } }) };
      const run = await pollStream(viaProxy);
      expect(run.status).toBe('ok');
      expect(edited).toBeDefined();
      // A later run, as the schedule would make it, does not find it either.
      expect((await pollStream(viaProxy)).status).toBe('ok');
      const all = bridge.sandbox.state.store.contacts.items.map((c) => String(c.id));
      const heads = await headIds('contacts');
      expect(all.filter((id) => !heads.has(id))).toEqual([]);
    } finally {
      await proxy.close();
      await bridge.close();
    }
  });

  it('HubSpot, steady state: an edit during a run of a few pages does not lose another change older than the lookback', async () => {
    const bridge = await startBridge({ database, connection: hubspotConnection, sandbox: { switches: { hubspotSearchPerSecond: null } } });
    let searching = false;
    let searches = 0;
    const proxy = await startFaultProxy({
      target: bridge.sandbox.url,
      answer: async (req, _res, text) => {
        if (!searching || req.method !== 'POST' || !req.url!.startsWith('/crm/v3/objects/contacts/search')) return false;
        if (++searches === 1) {
          const first = (JSON.parse(text) as { results: Array<{ id: string }> }).results[0]!.id;
          bridge.sandbox.state.updateRecord('contacts', Number(first), { title: 'Edited again during the listing' });
        }
        return false;
      },
    });
    try {
      const stream = bridge.app.poller.stream('firm', 'contacts');
      const viaProxy = { ...stream, connector: connectorForConnection({ connector: stream.connection.connector, baseUrl: proxy.url }, { tokens: bridge.app.tokens.get('firm')!, http: { minIntervalMs: 0 } }) };
      expect((await pollStream(viaProxy)).status).toBe('ok'); // the backfill
      // 30 edits over ten minutes of the CRM's time (a busy morning between two runs).
      const ids = bridge.sandbox.state.store.contacts.items.map((c) => c.id);
      const edits: Array<{ id: string; version: string }> = [];
      for (let i = 0; i < 30; i++) {
        bridge.sandbox.state.setClock({ advanceSeconds: 20 });
        const c = bridge.sandbox.state.updateRecord('contacts', ids[(i * 7) % ids.length]!, { title: `edit ${i}` });
        edits.push({ id: String(c.id), version: new Date(c.updatedAt).toISOString() });
      }
      searching = true;
      expect((await pollStream(viaProxy)).status).toBe('ok');
      expect((await pollStream(viaProxy)).status).toBe('ok');
      const heads = new Map((await db.select().from(recordHeads).where(eq(recordHeads.object, 'contacts'))).map((h) => [h.crmId, h.version]));
      const last = new Map(edits.map((e) => [e.id, e.version]));
      const missed = [...last].filter(([id, version]) => heads.get(id) !== version && bridge.sandbox.state.store.contacts.get(Number(id))!.updatedAt === Date.parse(version));
      expect(missed).toEqual([]);
    } finally {
      await proxy.close();
      await bridge.close();
    }
  });

  it('Clio, timestamps in whole seconds: an edit to a matter the listing already passed is covered by the cursor alone (lookback 0)', async () => {
    // No lookback, as the suite's own resume test: the cursor (newest updated_at minus the
    // listing's duration) must reach back before any edit made while the listing ran.
    const bridge = await startBridge({ database, sandbox: { switches: { oneSecondTimestamps: true } }, connection: { poll: { pageSize: 10, lookback: '0s' } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      const ids = bridge.sandbox.state.store.matters.items.map((m) => m.id);
      expect((await pollStream(stream)).status).toBe('ok');
      // A busy hour: every matter changed since, so the next run lists five pages.
      for (const id of ids) bridge.sandbox.state.updateRecord('matters', id, { location: 'Room 1' });
      // Start the run 0.7 s into a second, so it lasts well under a second but spans a boundary.
      await sleep(1700 - (Date.now() % 1000));
      let etag = '';
      const run = await pollStream(stream, {
        onPage: async (r) => {
          if (r.pages !== 1) return;
          bridge.sandbox.state.updateRecord('matters', ids[0]!, { description: 'edited after the listing passed it' }); // stamped X.000
          etag = String(bridge.sandbox.state.renderFull('matters', ids[0]!)!.etag);
          await sleep(1010 - (Date.now() % 1000));
          bridge.sandbox.state.updateRecord('matters', ids[45]!, { description: 'edited ahead of the listing' }); // stamped X+1.000
        },
      });
      expect(run.status).toBe('ok');
      expect((await pollStream(stream)).status).toBe('ok');
      const [head] = await db.select().from(recordHeads).where(eq(recordHeads.crmId, String(ids[0])));
      expect(head!.version).toBe(etag);
    } finally {
      await bridge.close();
    }
  });

  it('a notified record whose fetch keeps failing with a 5xx does not stop the listing: a change whose hook was dropped is still polled', async () => {
    const bridge = await startBridge({ database, connection: { inbound: { payload: 'notification' } }, automation: { dropRate: 1 } });
    const broken = 1; // the CRM answers 500 for this one record, every time
    const proxy = await startFaultProxy({ target: bridge.sandbox.url, fail: (req) => (req.url?.startsWith(`/api/v4/matters/${broken}.json`) ? 500 : undefined) });
    try {
      const base = bridge.app.poller.stream('firm', 'matters');
      const stream = { ...base, connector: connectorForConnection({ connector: base.connection.connector, baseUrl: proxy.url }, { tokens: bridge.app.tokens.get('firm')!, http: { maxRetries: 1, retryBaseMs: 1, retryMaxMs: 5 } }) };
      expect((await pollStream(stream)).status).toBe('ok');
      const edited = bridge.sandbox.state.store.matters.items[3]!.id;
      const notify = await bridge.app.inject({ method: 'POST', url: '/hooks/firm?object=matters', headers: { authorization: `Bearer ${SECRET}` }, payload: { data: { id: broken } } });
      expect(notify.statusCode).toBe(202);
      bridge.sandbox.state.updateRecord('matters', edited, { description: 'Edited, the hook dropped' });
      const etag = String(bridge.sandbox.state.renderFull('matters', edited)!.etag);
      for (let run = 0; run < 3; run++) {
        // The run still fails, and says why, once its listing is done.
        expect(await pollStream(stream)).toMatchObject({ status: 'failed', error: expect.stringMatching(/CRM_HTTP_STATUS \(HTTP 500\)/) });
      }
      const versions = (await db.select().from(ledger).where(eq(ledger.crmId, String(edited)))).map((r) => r.version);
      expect(versions).toContain(etag);
    } finally {
      await proxy.close();
      await bridge.close();
    }
  });
});

describe('a Clio matter deleted while a poll page that still shows it is on its way', () => {
  it('stays deleted downstream: the page read before the delete does not bring the matter back', async () => {
    // The edit's hook was dropped; the delete's hook arrives, carrying the matter as it last was.
    const deleteWhen = { path: 'meta.event', equals: ['deleted'] };
    const bridge = await startBridge({ database, automation: { dropRate: 1 }, connection: { inbound: { deleteWhen }, poll: { pageSize: 10 } } });
    const gone = bridge.sandbox.state.store.matters.items[0]!.id;
    let deletedMeanwhile = false;
    // The CRM answered the page listing the matter's last edit; before the poller has it, the
    // matter is deleted and the automation's deleted hook is taken and committed.
    const proxy = await startFaultProxy({
      target: bridge.sandbox.url,
      answer: async (req, res, text) => {
        if (deletedMeanwhile || !req.url?.startsWith('/api/v4/matters.json') || !text.includes(`"id":${gone},`)) return false;
        deletedMeanwhile = true;
        const last = bridge.sandbox.state.renderFull('matters', gone);
        bridge.sandbox.state.deleteRecord('matters', gone);
        const hook = await fetch(`${bridge.base}/hooks/firm?object=matters`, {
          method: 'POST',
          headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
          body: JSON.stringify({ data: last, meta: { event: 'deleted' } }),
        });
        expect(hook.status).toBe(202);
        res.writeHead(200, { 'content-type': 'application/json' }).end(text);
        return true;
      },
    });
    try {
      const base = bridge.app.poller.stream('firm', 'matters');
      expect((await pollStream(base)).status).toBe('ok');
      bridge.sandbox.state.updateRecord('matters', gone, { description: 'Closing letter sent' });
      const stream = { ...base, connector: connectorForConnection({ connector: base.connection.connector, baseUrl: proxy.url }, { tokens: bridge.app.tokens.get('firm')! }) };
      expect((await pollStream(stream)).status).toBe('ok');
      expect(deletedMeanwhile).toBe(true);

      const [head] = await db.select().from(recordHeads).where(eq(recordHeads.crmId, String(gone)));
      expect(head).toMatchObject({ deleted: true });
      const delivered = await db
        .select({ change: ledger.change, source: ledger.source })
        .from(outbox)
        .innerJoin(ledger, eq(ledger.eventId, outbox.eventId))
        .where(eq(outbox.crmId, String(gone)))
        .orderBy(outbox.id);
      // The backfill's version, then the delete: nothing after it.
      expect(delivered).toEqual([
        { change: 'upsert', source: 'poll' },
        { change: 'delete', source: 'hook' },
      ]);
      const polled = await db.select({ disposition: ledger.disposition }).from(ledger).where(and(eq(ledger.crmId, String(gone)), eq(ledger.source, 'poll')));
      expect(polled.map((r) => r.disposition)).toEqual(['accepted', 'stale']);
    } finally {
      await proxy.close();
      await bridge.close();
    }
  });
});
