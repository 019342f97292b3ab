import { setTimeout as sleep } from 'node:timers/promises';
import { and, eq, sql } from 'drizzle-orm';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { ledger, ledgerBodies, outbox, pendingFetches, recordHeads, streamCursors } from '../src/db/schema/index.js';
import { pollStream, sweepStream } from '../src/sync/poller.js';
import { dropPendingFromCli, printPendingFetches } from '../src/sync/notifications-command.js';
import { SECRET } from './helpers/app.js';
import { startBridge } from './helpers/bridge.js';
import { startFaultProxy } from './helpers/fault-proxy.js';
import { connectorForConnection } from '../src/crm/connector.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

const database = await createTestDatabase();
const { db } = database;
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

async function outboxVersions() {
  return db
    .select({ crmId: ledger.crmId, version: ledger.version, source: ledger.source })
    .from(outbox)
    .innerJoin(ledger, eq(ledger.eventId, outbox.eventId))
    .where(eq(outbox.connectionId, 'firm'))
    .orderBy(outbox.id);
}

async function headsByCrmId() {
  const heads = await db.select().from(recordHeads).where(eq(recordHeads.connectionId, 'firm'));
  return new Map(heads.map((h) => [h.crmId, h]));
}

const matterIds = (sandbox: { state: { store: { matters: { items: Array<{ id: number }> } } } }) => sandbox.state.store.matters.items.map((m) => m.id);

type Stream = ReturnType<Awaited<ReturnType<typeof startBridge>>['app']['poller']['stream']>;

/** `stream` with its CRM reached through `url` (a fault proxy), retrying as given (by default once, at once). */
function through(bridge: Awaited<ReturnType<typeof startBridge>>, stream: Stream, url: string, http: Record<string, number> = { maxRetries: 1, retryBaseMs: 1, retryMaxMs: 5 }): Stream {
  return { ...stream, connector: connectorForConnection({ connector: stream.connection.connector, baseUrl: url }, { tokens: bridge.app.tokens.get('firm')!, http }) };
}

describe('the reconciling poller against the sandbox CRM', () => {
  it('catches exactly the changes whose hooks the automation dropped, and delivers every change once', async () => {
    const bridge = await startBridge({ database, sandbox: { seed: 7 }, automation: { dropRate: 0.3 } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      expect((await pollStream(stream)).status).toBe('ok'); // the backfill sets the cursor
      const backfilled = (await outboxVersions()).length;

      const ids = matterIds(bridge.sandbox);
      const edits: Array<{ id: string; etag: string; fired: boolean }> = [];
      let seen = bridge.sandbox.state.automation.entries().length;
      for (let i = 0; i < 500; i++) {
        const id = ids[(i * 7919) % ids.length]!;
        bridge.sandbox.state.updateRecord('matters', id, { description: `Intake note ${i}` });
        const etag = String(bridge.sandbox.state.renderFull('matters', id)!.etag);
        const entry = bridge.sandbox.state.automation.entries().slice(seen).find((e) => e.status !== 'duplicate');
        seen = bridge.sandbox.state.automation.entries().length;
        edits.push({ id: String(id), etag, fired: entry?.status === 'fired' });
        // Hooks arrive in order, so every fired one is a new change rather than a stale one.
        await bridge.sandbox.state.automationIdle();
      }
      const dropped = edits.filter((e) => !e.fired).length;
      expect(dropped).toBeGreaterThan(100);

      const run = await pollStream(stream);
      expect(run.status).toBe('ok');

      const lastEdit = new Map(edits.map((e) => [e.id, e]));
      const missedFinal = [...lastEdit.values()].filter((e) => !e.fired);
      expect(run.caught).toBe(missedFinal.length);

      const delivered = (await outboxVersions()).slice(backfilled);
      const keys = delivered.map((d) => `${d.crmId}@${d.version}`);
      expect(new Set(keys).size).toBe(keys.length); // no change delivered twice
      const expected = new Set([...edits.filter((e) => e.fired), ...missedFinal].map((e) => `${e.id}@${e.etag}`));
      expect([...keys].filter((k) => !expected.has(k))).toEqual([]);
      expect([...expected].filter((k) => !keys.includes(k))).toEqual([]);

      const health = (await bridge.app.inject('/health')).json();
      expect(health.connections[0].caughtByPoll).toBe(missedFinal.length);
      expect(health.connections[0].poll).toMatchObject({ stale: false, lastError: null });
    } finally {
      await bridge.close();
    }
  });

  it('delivers all 1,000 records of a bulk import stamped with one timestamp, once, with pages of 50', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 50 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      await pollStream(stream);
      const before = (await outboxVersions()).length;
      const imported = bridge.sandbox.state.bulkImport({ object: 'matters', count: 1000 });
      const run = await pollStream(stream);
      expect(run.status).toBe('ok');
      expect(run.pages).toBeGreaterThanOrEqual(20);
      const delivered = (await outboxVersions()).slice(before);
      const importedIds = new Set(Array.from({ length: 1000 }, (_, i) => String(imported.firstId! + i)));
      expect(delivered.filter((d) => importedIds.has(d.crmId))).toHaveLength(1000);
      expect(new Set(delivered.map((d) => d.crmId)).size).toBe(delivered.length);
      // A second run reads the overlap again and writes nothing.
      await pollStream(stream);
      expect((await outboxVersions()).length).toBe(before + delivered.length);
    } finally {
      await bridge.close();
    }
  });

  describe.each([
    [90, true],
    [90, false],
    [-90, true],
    [-90, false],
  ])('with the CRM clock skewed %i s and updated_since inclusive=%s', (skew, inclusive) => {
    it('misses nothing', async () => {
      const bridge = await startBridge({ database, sandbox: { switches: { clockSkewSeconds: skew, updatedSinceInclusive: inclusive } } });
      try {
        const stream = bridge.app.poller.stream('firm', 'matters');
        const ids = matterIds(bridge.sandbox);
        await pollStream(stream);
        for (let round = 0; round < 4; round++) {
          for (let i = 0; i < 10; i++) bridge.sandbox.state.updateRecord('matters', ids[(round * 10 + i) % ids.length]!, { description: `round ${round} edit ${i}` });
          expect((await pollStream(stream)).status).toBe('ok');
        }
        const heads = await headsByCrmId();
        for (const id of ids) expect(heads.get(String(id))?.version).toBe(String(bridge.sandbox.state.renderFull('matters', id)!.etag));
      } finally {
        await bridge.close();
      }
    });
  });

  it('paces a rate-limited CRM whose clock runs 5 minutes ahead by its own reset, read against its Date, and meets no 429', async () => {
    const bridge = await startBridge({
      database,
      sandbox: { switches: { clockSkewSeconds: 300, rateLimit: { limit: 3, windowSeconds: 1 } } },
      connection: { poll: { pageSize: 5 } },
    });
    try {
      const since = bridge.sandbox.state.requestLog.lastSeq;
      // A guard, not a measure: read as our clock, each window's reset is 5 minutes away.
      const run = await pollStream(bridge.app.poller.stream('firm', 'matters'), { signal: AbortSignal.timeout(30_000) });
      expect(run.status).toBe('ok');
      expect(run.pages).toBeGreaterThan(3);
      expect(bridge.sandbox.state.requestLog.list({ since }).filter((r) => r.status === 429)).toEqual([]);
    } finally {
      await bridge.close();
    }
  }, 60_000);

  it('gets past a CRM record carrying a NUL (\\u0000): stored with U+FFFD, and the pages after it too', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    try {
      const id = matterIds(bridge.sandbox)[4]!;
      bridge.sandbox.state.updateRecord('matters', id, { description: 'Pasted from a PDF\u0000' });
      const run = await pollStream(bridge.app.poller.stream('firm', 'matters'));
      expect(run.status).toBe('ok');
      expect((await outboxVersions()).length).toBe(matterIds(bridge.sandbox).length);
      const [row] = await db
        .select({ raw: ledgerBodies.raw })
        .from(ledger)
        .innerJoin(ledgerBodies, eq(ledgerBodies.eventId, ledger.eventId))
        .where(eq(ledger.crmId, String(id)));
      expect(row!.raw).toMatchObject({ description: 'Pasted from a PDF\ufffd' });
    } finally {
      await bridge.close();
    }
  });

  it('loses nothing when a run is stopped after k of n pages, and the restart writes each change once', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      const controller = new AbortController();
      const stopped = await pollStream(stream, {
        signal: controller.signal,
        onPage: (r) => {
          if (r.pages === 3) controller.abort();
        },
      });
      expect(stopped.status).toBe('failed');
      expect(stopped.pages).toBe(3);
      expect((await outboxVersions()).length).toBe(30);

      const resumed = await pollStream(stream);
      expect(resumed.status).toBe('ok');
      const delivered = await outboxVersions();
      const ids = matterIds(bridge.sandbox).map(String);
      expect(delivered.map((d) => d.crmId).sort()).toEqual([...ids].sort());
    } finally {
      await bridge.close();
    }
  });

  it('goes on with a stopped id-ordered listing from its next page, and the cursor it ends with still covers an edit made meanwhile to a record already passed', async () => {
    // No lookback: the cursor alone must reach back far enough.
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10, lookback: '0s' } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      const ids = matterIds(bridge.sandbox);
      expect(ids.length).toBe(50);
      const controller = new AbortController();
      const stopped = await pollStream(stream, { signal: controller.signal, onPage: (r) => void (r.pages === 3 && controller.abort()) });
      expect(stopped.status).toBe('failed');
      const [saved] = await db.select().from(streamCursors).where(eq(streamCursors.object, 'matters'));
      expect(saved!.cursorRank).toBeNull();
      expect(String(saved!.resume?.next)).toContain('page_token=');

      // Meanwhile, a record the stopped run had already read changes, and later one it had not:
      // the resumed run's newest record is then newer than the first edit by more than the
      // resumed run lasts, so only a listing measured from its first start covers that edit.
      const passed = String(ids[0]);
      bridge.sandbox.state.updateRecord('matters', ids[0]!, { description: 'Edited while the backfill was stopped' });
      const edited = String(bridge.sandbox.state.renderFull('matters', ids[0]!)!.etag);
      await new Promise((r) => setTimeout(r, 300));
      bridge.sandbox.state.updateRecord('matters', ids[45]!, { description: 'Edited later, ahead of the listing' });

      const since = bridge.sandbox.state.requestLog.lastSeq;
      const resumed = await pollStream(stream);
      expect(resumed.status).toBe('ok');
      const lists = bridge.sandbox.state.requestLog.list({ since, pathPrefix: '/api/v4/matters' });
      // Pages 4 and 5 only, from the saved link: nothing from the start of the listing. (The
      // stopped run's own fetch of page 4, cut off by the stop, may land in the log here too.)
      const tokens = lists.map((l) => l.query.page_token);
      expect(tokens.every((t) => t !== undefined)).toBe(true);
      expect(new Set(tokens).size).toBe(2);
      expect(resumed.pages).toBe(2);
      const [done] = await db.select().from(streamCursors).where(eq(streamCursors.object, 'matters'));
      expect(done!.resume).toBeNull();
      expect(done!.cursorRank).not.toBeNull();
      expect((await outboxVersions()).map((d) => d.crmId).sort()).toEqual(ids.map(String).sort());

      // The next run's window reaches back before the listing began: the edit is caught.
      expect((await pollStream(stream)).status).toBe('ok');
      expect((await outboxVersions()).filter((d) => d.crmId === passed).map((d) => d.version)).toContain(edited);
    } finally {
      await bridge.close();
    }
  });

  it('lists from the start when the CRM refuses the saved page link', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      const controller = new AbortController();
      await pollStream(stream, { signal: controller.signal, onPage: (r) => void (r.pages === 2 && controller.abort()) });
      const [saved] = await db.select().from(streamCursors).where(eq(streamCursors.object, 'matters'));
      const expired = String(saved!.resume!.next).replace(/page_token=[^&]+/, 'page_token=expired');
      await db.update(streamCursors).set({ resume: { ...saved!.resume!, next: expired } }).where(eq(streamCursors.object, 'matters'));

      const run = await pollStream(stream);
      expect(run.status).toBe('ok');
      expect(run.pages).toBe(5);
      const [done] = await db.select().from(streamCursors).where(eq(streamCursors.object, 'matters'));
      expect(done!.resume).toBeNull();
      expect(done!.lastError).toBeNull();
      expect((await outboxVersions()).map((d) => d.crmId).sort()).toEqual(matterIds(bridge.sandbox).map(String).sort());
    } finally {
      await bridge.close();
    }
  });

  it('refreshes a token that dies early in the middle of a run and completes it', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      const run = await pollStream(stream, {
        onPage: (r) => {
          if (r.pages === 2) bridge.sandbox.state.expireAccessTokens();
        },
      });
      expect(run.status).toBe('ok');
      expect((await outboxVersions()).length).toBe(matterIds(bridge.sandbox).length);
      const unauthorized = bridge.sandbox.state.requestLog.list({}).filter((e) => e.status === 401);
      expect(unauthorized.length).toBeGreaterThanOrEqual(1);
    } finally {
      await bridge.close();
    }
  });

  it('completes through injected 5xx and a rate limit, never sending into a window a 429 closed', async () => {
    const bridge = await startBridge({ database, sandbox: { seed: 11 }, connection: { poll: { pageSize: 5 } } });
    try {
      bridge.sandbox.state.setSwitches({ errorRate: 0.3, rateLimit: { limit: 4, windowSeconds: 1 } });
      const stream = bridge.app.poller.stream('firm', 'matters');
      const run = await pollStream(stream);
      expect(run.status).toBe('ok');
      expect((await outboxVersions()).length).toBe(matterIds(bridge.sandbox).length);
      const log = bridge.sandbox.state.requestLog.list({}).filter((e) => e.path.startsWith('/api/'));
      expect(log.some((e) => e.status >= 500)).toBe(true);
      // A request sent before Retry-After had passed would meet the same full window: another 429.
      for (const [i, entry] of log.entries()) {
        if (entry.status === 429) expect(log[i + 1]?.status).not.toBe(429);
      }
    } finally {
      await bridge.close();
    }
  });

  it('turns records deleted in the CRM into delete changes after a sweep, and a sweep that fails part-way deletes nothing', async () => {
    // 500 matters: the id listing takes three pages of 200.
    const bridge = await startBridge({ database, sandbox: { records: 1000 }, connection: { poll: { pageSize: 200 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      await pollStream(stream);
      const ids = matterIds(bridge.sandbox);
      for (const id of ids.slice(0, 3)) bridge.sandbox.state.deleteRecord('matters', id);

      // The listing breaks off at page 3 and stays broken: nothing may be deleted.
      let listPages = 0;
      const proxy = await startFaultProxy({ target: bridge.sandbox.url, fail: (req) => {
        if (!req.url?.startsWith('/api/v4/matters.json')) return undefined;
        return ++listPages >= 3 ? 503 : undefined;
      } });
      try {
        const viaProxy = through(bridge, stream, proxy.url);
        const failing = await sweepStream(viaProxy);
        expect(failing.status).toBe('failed');
        expect(failing.pages).toBe(2);
      } finally {
        await proxy.close();
      }
      expect(await db.select().from(ledger).where(eq(ledger.change, 'delete'))).toHaveLength(0);

      const swept = await sweepStream(stream);
      expect(swept).toMatchObject({ status: 'ok', deleted: 3 });
      const deletes = await db.select().from(ledger).innerJoin(outbox, eq(outbox.eventId, ledger.eventId)).where(eq(ledger.change, 'delete'));
      expect(deletes.map((d) => d.ledger.crmId).sort()).toEqual(ids.slice(0, 3).map(String).sort());
      expect(deletes.every((d) => d.ledger.source === 'sweep')).toBe(true);
      // A second sweep finds nothing new.
      expect(await sweepStream(stream)).toMatchObject({ status: 'ok', deleted: 0 });
    } finally {
      await bridge.close();
    }
  });

  it('never takes a record for deleted when its head appeared or changed while the listing ran', async () => {
    // 500 matters: the id listing takes three pages of 200.
    // The automation fires no hook by itself: the test sends each when it is due.
    const bridge = await startBridge({ database, sandbox: { records: 1000 }, automation: { dropRate: 1 }, connection: { poll: { pageSize: 200 } } });
    const hook = (record: unknown) =>
      fetch(`${bridge.base}/hooks/firm?object=matters`, {
        method: 'POST',
        headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
        body: JSON.stringify({ data: record }),
      }).then((r) => r.status);
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      await pollStream(stream);
      // Deleted in the CRM before the sweep; an edit made just before the delete reaches the
      // bridge late, by its hook, while the listing runs.
      const gone = matterIds(bridge.sandbox)[0]!;
      bridge.sandbox.state.updateRecord('matters', gone, { description: 'Closing letter sent' });
      const lastEdit = bridge.sandbox.state.renderFull('matters', gone);
      bridge.sandbox.state.deleteRecord('matters', gone);
      let created = 0;
      const swept = await sweepStream(stream, {
        onPage: async (report) => {
          if (report.pages !== 3) return;
          // The last page is in: a matter created now, and hooked, is one the listing never saw.
          const client = { id: bridge.sandbox.state.store.contacts.items[0]!.id };
          created = bridge.sandbox.state.createRecord('matters', { description: 'Intake call: slip and fall', status: 'open', client }).id;
          expect(await hook(bridge.sandbox.state.renderFull('matters', created))).toBe(202);
          expect(await hook(lastEdit)).toBe(202);
        },
      });
      expect(swept).toMatchObject({ status: 'ok', deleted: 0 });
      const deleted = async () => (await db.select().from(ledger).where(eq(ledger.change, 'delete'))).map((r) => r.crmId);
      expect(await deleted()).toEqual([]);
      expect((await headsByCrmId()).get(String(created))).toMatchObject({ deleted: false });

      // The next sweep vouches for both: the new matter lives, the deleted one is deleted.
      expect(await sweepStream(stream)).toMatchObject({ status: 'ok', deleted: 1 });
      expect(await deleted()).toEqual([String(gone)]);
    } finally {
      await bridge.close();
    }
  });

  it("dates a sweep from when its listing began: a record deleted while it ran is not vouched for, and the next sweep finds it", async () => {
    const bridge = await startBridge({ database, sandbox: { records: 1000 }, connection: { poll: { pageSize: 200 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      await pollStream(stream);
      const first = Math.min(...matterIds(bridge.sandbox));
      const began = Date.now();
      let deletedAt = 0;
      // Deleted once the listing has passed it: this sweep cannot see it go.
      const swept = await sweepStream(stream, {
        onPage: (report) => {
          if (report.pages !== 1) return;
          deletedAt = Date.now();
          bridge.sandbox.state.deleteRecord('matters', first);
        },
      });
      expect(swept).toMatchObject({ status: 'ok', deleted: 0 });
      expect(deletedAt).toBeGreaterThan(began);
      const [cursor] = await db.select().from(streamCursors).where(eq(streamCursors.object, 'matters'));
      // lastSweepAt says every delete made before it was found: so not later than the delete.
      expect(cursor!.lastSweepAt!.getTime()).toBeGreaterThanOrEqual(began);
      expect(cursor!.lastSweepAt!.getTime()).toBeLessThan(deletedAt);

      expect(await sweepStream(stream)).toMatchObject({ status: 'ok', deleted: 1 });
      const [after] = await db.select().from(streamCursors).where(eq(streamCursors.object, 'matters'));
      expect(after!.lastSweepAt!.getTime()).toBeGreaterThan(deletedAt);
    } finally {
      await bridge.close();
    }
  });

  it('holds a mass delete for an operator: more records vanished at once than poll.sweepDeleteLimit allows are not deleted until --allow-deletes', async () => {
    // 500 matters; the default limit lets a sweep delete 50 of them by itself.
    const bridge = await startBridge({ database, sandbox: { records: 1000 }, connection: { poll: { pageSize: 200 } }, env: { ADMIN_TOKEN: 'operator-token-0123456789abcdef' } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      await pollStream(stream);
      const ids = matterIds(bridge.sandbox);
      expect(ids).toHaveLength(500);
      for (const id of ids.slice(0, 60)) bridge.sandbox.state.deleteRecord('matters', id);

      const swept = await sweepStream(stream);
      expect(swept).toMatchObject({ status: 'ok', deleted: 0, held: { reason: 'over_limit', deletes: 60, records: 500 } });
      expect(await db.select().from(ledger).where(eq(ledger.change, 'delete'))).toHaveLength(0);
      const held = await bridge.app.inject('/health');
      expect(held.statusCode).toBe(503);
      expect(held.json().connections[0].poll).toMatchObject({ heldDeletes: 60, stale: false, streams: [{ object: 'matters', sweepHeld: { reason: 'over_limit', deletes: 60, records: 500 } }] });
      const heldGauge = async () => /^crm_bridge_sweep_held_deletes\{connection="firm",object="matters"\} (\d+)$/m.exec((await bridge.app.inject('/metrics')).body)?.[1];
      expect(await heldGauge()).toBe('60');
      // The status page names what to run.
      const page = await bridge.app.inject({ url: '/', headers: { authorization: 'Bearer operator-token-0123456789abcdef' } });
      expect(page.body).toContain('60 of 500 records vanished at once');
      expect(page.body).toContain('crm-bridge sweep firm --object matters --allow-deletes');

      // The operator checked the CRM: the matters really are gone.
      const allowed = await sweepStream(stream, { allowDeletes: true });
      expect(allowed).toMatchObject({ status: 'ok', deleted: 60 });
      expect(allowed.held).toBeUndefined();
      const deleted = await db.select().from(ledger).innerJoin(outbox, eq(outbox.eventId, ledger.eventId)).where(eq(ledger.change, 'delete'));
      expect(deleted.map((d) => d.ledger.crmId).sort()).toEqual(ids.slice(0, 60).map(String).sort());
      const after = (await bridge.app.inject('/health')).json();
      expect(after.connections[0].poll).toMatchObject({ heldDeletes: 0, streams: [{ sweepHeld: null }] });
      expect(await heldGauge()).toBe('0');
    } finally {
      await bridge.close();
    }
  });

  it('checks vanished records by id before deleting them: a listing that leaves out live records deletes only what the CRM confirms gone', async () => {
    const bridge = await startBridge({ database, sandbox: { records: 1000 }, connection: { poll: { pageSize: 200 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      await pollStream(stream);
      const ids = matterIds(bridge.sandbox);
      const gone = ids.slice(0, 3);
      for (const id of gone) bridge.sandbox.state.deleteRecord('matters', id);
      // The CRM's listing leaves out 15 matters that are still there (a token that sees less, say).
      const hidden = new Set(ids.slice(100, 115));
      const requests: string[] = [];
      const proxy = await startFaultProxy({
        target: bridge.sandbox.url,
        answer: async (req, res, text) => {
          requests.push(req.url!);
          if (!req.url?.startsWith('/api/v4/matters.json')) return false;
          const body = JSON.parse(text) as { data: Array<{ id: number }> };
          body.data = body.data.filter((m) => !hidden.has(m.id));
          res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(body));
          return true;
        },
      });
      try {
        const viaProxy = through(bridge, stream, proxy.url);
        const swept = await sweepStream(viaProxy);
        // 18 vanished; 10 of them were fetched by id, and at least 7 of those were still there.
        expect(swept).toMatchObject({ status: 'ok', held: { reason: 'listing_incomplete', deletes: 8 } });
        expect(requests.filter((u) => /^\/api\/v4\/matters\/\d+\.json/.test(u))).toHaveLength(10);
        const deleted = (await db.select().from(ledger).where(eq(ledger.change, 'delete'))).map((r) => Number(r.crmId));
        expect(deleted).toHaveLength(swept.deleted);
        expect(deleted.every((id) => gone.includes(id))).toBe(true);
        expect((await bridge.app.inject('/health')).json().connections[0].poll.streams[0].sweepHeld).toMatchObject({ reason: 'listing_incomplete', deletes: 8 });
      } finally {
        await proxy.close();
      }
      // Listed whole again: the rest of the deletes are confirmed and made, the hold is lifted,
      // and no matter the CRM still has was ever deleted.
      const whole = await sweepStream(stream);
      expect(whole.status).toBe('ok');
      expect(whole.held).toBeUndefined();
      const deleted = (await db.select().from(ledger).where(eq(ledger.change, 'delete'))).map((r) => Number(r.crmId));
      expect(deleted.sort()).toEqual([...gone].sort());
      const heads = await headsByCrmId();
      expect([...hidden].every((id) => heads.get(String(id))?.deleted === false)).toBe(true);
      expect((await bridge.app.inject('/health')).json().connections[0].poll.heldDeletes).toBe(0);
    } finally {
      await bridge.close();
    }
  });

  it('deletes nothing when the CRM cannot confirm: a vanished record it refuses to show is kept, and one it cannot answer for fails the sweep', async () => {
    const bridge = await startBridge({ database, sandbox: { records: 1000 }, connection: { poll: { pageSize: 200 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      await pollStream(stream);
      const [refused, down] = matterIds(bridge.sandbox);
      bridge.sandbox.state.deleteRecord('matters', refused!);
      let status = 403;
      const proxy = await startFaultProxy({ target: bridge.sandbox.url, fail: (req) => (req.url?.startsWith(`/api/v4/matters/${refused}.json`) ? status : undefined) });
      try {
        const viaProxy = through(bridge, stream, proxy.url);
        // A 403: the record is there, this token may not see it. Not a delete.
        expect(await sweepStream(viaProxy)).toMatchObject({ status: 'ok', deleted: 0 });
        expect((await headsByCrmId()).get(String(refused))).toMatchObject({ deleted: false });
        // The CRM down when asked: the sweep fails and deletes nothing.
        status = 503;
        bridge.sandbox.state.deleteRecord('matters', down!);
        const failed = await sweepStream(viaProxy);
        expect(failed).toMatchObject({ status: 'failed', deleted: 0 });
        expect(failed.error).toMatch(/CRM_HTTP_STATUS/);
        expect(await db.select().from(ledger).where(eq(ledger.change, 'delete'))).toHaveLength(0);
      } finally {
        await proxy.close();
      }
      expect(await sweepStream(stream)).toMatchObject({ status: 'ok', deleted: 2 });
    } finally {
      await bridge.close();
    }
  });

  it('fetches the records of notification hooks, and keeps them waiting while the grant is revoked', async () => {
    const bridge = await startBridge({
      database,
      connection: {
        auth: { type: 'oauth2', clientId: 'sandbox-client', clientSecret: 'sandbox-secret', tokenUrl: '/oauth/token', authorizeUrl: '/oauth/authorize' },
        inbound: { payload: 'notification' },
      },
      sandbox: { autoApprove: true },
      automation: { payload: 'notification' },
      env: { ADMIN_TOKEN: 'operator-token-0123456789abcdef' },
    });
    const admin = { authorization: 'Bearer operator-token-0123456789abcdef' };
    try {
      // Authorise through the browser flow, as an operator would.
      const start = await bridge.app.inject({ url: '/oauth/firm/start', headers: admin });
      const cookie = String(start.headers['set-cookie']).split(';')[0]!;
      const consent = await fetch(String(start.headers.location), { redirect: 'manual' });
      const back = new URL(consent.headers.get('location')!);
      expect((await bridge.app.inject({ url: `${back.pathname}${back.search}`, headers: { cookie } })).statusCode).toBe(200);

      const stream = bridge.app.poller.stream('firm', 'matters');
      expect((await pollStream(stream)).status).toBe('ok');
      const id = matterIds(bridge.sandbox)[0]!;

      bridge.sandbox.state.revokeTokens();
      bridge.sandbox.state.updateRecord('matters', id, { description: 'Client called about the settlement offer' });
      await bridge.sandbox.state.automationIdle();
      expect(await db.select().from(pendingFetches)).toHaveLength(1);

      const blocked = await pollStream(stream);
      expect(blocked).toMatchObject({ status: 'failed', needsReauth: true });
      expect(await db.select().from(pendingFetches)).toHaveLength(1);
      const health = await bridge.app.inject('/health');
      expect(health.statusCode).toBe(503);
      // Hooks are still taken and stored while the connection waits.
      const hook = await fetch(`${bridge.base}/hooks/firm?object=matters`, {
        method: 'POST',
        headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
        body: JSON.stringify({ data: { id: matterIds(bridge.sandbox)[1] } }),
      });
      expect(hook.status).toBe(202);

      // Re-authorise; the notifications are fetched and the cursor resumes.
      const again = await bridge.app.inject({ url: '/oauth/firm/start', headers: admin });
      const cookie2 = String(again.headers['set-cookie']).split(';')[0]!;
      const consent2 = await fetch(String(again.headers.location), { redirect: 'manual' });
      const back2 = new URL(consent2.headers.get('location')!);
      expect((await bridge.app.inject({ url: `${back2.pathname}${back2.search}`, headers: { cookie: cookie2 } })).statusCode).toBe(200);

      expect((await pollStream(stream)).status).toBe('ok');
      expect(await db.select().from(pendingFetches)).toHaveLength(0);
      const fetched = await db
        .select()
        .from(ledger)
        .where(and(eq(ledger.source, 'notification'), eq(ledger.crmId, String(id))));
      expect(fetched.map((r) => r.disposition)).toEqual(['accepted']);
      expect((await bridge.app.inject('/health')).statusCode).toBe(200);
    } finally {
      await bridge.close();
    }
  });

  it('goes on past a notified record the CRM refuses (403): the others are fetched and the listing runs, and the refused one keeps its error and waits', async () => {
    const bridge = await startBridge({ database, connection: { inbound: { payload: 'notification' } }, automation: { dropRate: 1 } });
    const refused = 1;
    const proxy = await startFaultProxy({ target: bridge.sandbox.url, fail: (req) => (req.url?.startsWith(`/api/v4/matters/${refused}.json`) ? 403 : undefined) });
    try {
      const base = bridge.app.poller.stream('firm', 'matters');
      const stream = through(bridge, base, proxy.url, { maxRetries: 0 });
      expect((await pollStream(stream)).status).toBe('ok');
      const [notified, edited] = matterIds(bridge.sandbox);
      const notify = (id: number) =>
        bridge.app.inject({ method: 'POST', url: '/hooks/firm?object=matters', headers: { authorization: `Bearer ${SECRET}` }, payload: { data: { id } } }).then((r) => r.statusCode);
      bridge.sandbox.state.updateRecord('matters', notified!, { description: 'Notified, and fetched' });
      // This notification is refused, and is fetched first (pending fetches go in id order); the edit's hook was dropped.
      expect(String(refused) < String(notified)).toBe(true);
      expect(await notify(refused)).toBe(202);
      expect(await notify(notified!)).toBe(202);
      bridge.sandbox.state.updateRecord('matters', edited!, { description: 'Edited, the hook dropped' });

      for (let run = 0; run < 2; run++) expect((await pollStream(stream)).status).toBe('ok');
      const sources = async (id: number) => (await db.select().from(ledger).where(eq(ledger.crmId, String(id)))).map((r) => `${r.source} ${r.disposition}`);
      expect(await sources(notified!)).toContain('notification accepted');
      expect(await sources(edited!)).toContain('poll accepted');
      const waiting = await db.select().from(pendingFetches);
      expect(waiting.map((w) => [w.crmId, w.lastError])).toEqual([[String(refused), expect.stringMatching(/403/)]]);
      // The operator sees it waiting, refused; the stream itself is healthy.
      const health = await bridge.app.inject('/health');
      expect(health.json().connections[0].poll.streams[0]).toMatchObject({ lastError: null, stale: false, notifications: { waiting: 1, failing: 1 } });

      // crm-bridge notifications lists it; the operator gives up on it, and runs stop asking for it.
      let out = '';
      expect(await printPendingFetches(db, { connectionId: 'firm', limit: 50 }, (t) => (out += t))).toBe(1);
      expect(out).toMatch(new RegExp(`^firm +matters/${refused} +\\S+ +CRM_HTTP_STATUS \\(HTTP 403\\)$`, 'm'));
      out = '';
      expect(await dropPendingFromCli(db, 'firm', [`matters/${refused}`, 'matters/999999', 'matters'], (t) => (out += t))).toBe(1);
      expect(out).toContain(`firm: dropped matters/${refused} (notified `);
      expect(out).toContain('firm: no notified record matters/999999 waiting to be fetched');
      expect(out).toContain('"matters" is not <object>/<id>');
      const asked = () => bridge.sandbox.state.requestLog.list({ pathPrefix: `/api/v4/matters/${refused}.json` }).length;
      const before = asked();
      expect((await pollStream(stream)).status).toBe('ok');
      expect(asked()).toBe(before);
      expect((await bridge.app.inject('/health')).json().connections[0].poll.streams[0].notifications).toEqual({ waiting: 0, failing: 0 });
      // The notification itself stays in the ledger.
      expect(await sources(refused)).toEqual(['hook notified']);
    } finally {
      await proxy.close();
      await bridge.close();
    }
  });

  it('fetches a notified record at once, without a listing, not in the next poll run an hour away', async () => {
    const bridge = await startBridge({ database, connection: { inbound: { payload: 'notification' } }, automation: { payload: 'notification' } });
    const daemon = bridge.app.poller.daemons[0]!;
    const lists = () => bridge.sandbox.state.requestLog.list({ pathPrefix: '/api/v4/matters.json' }).length;
    const until = async (check: () => Promise<boolean>) => {
      for (let i = 0; i < 200 && !(await check()); i++) await sleep(50);
      expect(await check()).toBe(true);
    };
    try {
      daemon.start(); // its first run lists now; the next is due in an hour
      await until(async () => (await db.select().from(streamCursors)).some((c) => c.lastSuccessAt !== null));
      const listed = lists();
      const id = matterIds(bridge.sandbox)[3]!;
      bridge.sandbox.state.updateRecord('matters', id, { description: 'Client emailed the signed retainer' });
      await bridge.sandbox.state.automationIdle();

      await until(async () => (await db.select().from(ledger).where(and(eq(ledger.crmId, String(id)), eq(ledger.source, 'notification')))).length === 1);
      expect(await db.select().from(pendingFetches)).toHaveLength(0);
      expect(lists()).toBe(listed);
    } finally {
      await daemon.stop();
      await bridge.close();
    }
  });

  it("counts a first run from the beginning as the stream's sweep, so the first sweep waits a sweep interval", async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 50, sweepInterval: '1h' } } });
    try {
      const daemon = bridge.app.poller.daemons[0]!;
      await daemon.tick(new AbortController().signal);
      const firstPages = bridge.sandbox.state.requestLog.list({ pathPrefix: '/api/v4/matters.json' }).filter((e) => e.query.page_token === undefined);
      expect(firstPages).toHaveLength(1); // the poll's listing, and no sweep right after it
      const [cursor] = await db.select().from(streamCursors);
      expect(cursor?.lastSweepAt).toBeInstanceOf(Date);
    } finally {
      await bridge.close();
    }
  });

  it('marks a stream stale in /health, and answers 503, once no run has succeeded for staleAfter', async () => {
    const bridge = await startBridge({ database, connection: { poll: { staleAfter: '300ms' } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      expect((await pollStream(stream)).status).toBe('ok');
      const fresh = await bridge.app.inject('/health');
      expect(fresh.statusCode).toBe(200);
      expect(fresh.json().connections[0].poll).toMatchObject({ stale: false, staleAfterSeconds: 0 });

      // The CRM stops answering: runs fail, the last success ages past staleAfter.
      bridge.sandbox.state.setSwitches({ errorRate: 1 });
      const failed = await pollStream({ ...stream, connector: connectorForConnection(stream.connection, { tokens: bridge.app.tokens.get('firm')!, http: { maxRetries: 0 } }) });
      expect(failed.status).toBe('failed');
      await new Promise((resolve) => setTimeout(resolve, 400));
      const stale = await bridge.app.inject('/health');
      expect(stale.statusCode).toBe(503);
      const poll = stale.json().connections[0].poll;
      expect(poll).toMatchObject({ stale: true, lastError: expect.stringMatching(/CRM_HTTP_STATUS|5\d\d/) });
      expect(poll.streams[0]).toMatchObject({ object: 'matters', stale: true });

      bridge.sandbox.state.setSwitches({ errorRate: 0 });
      expect((await pollStream(stream)).status).toBe('ok');
      expect((await bridge.app.inject('/health')).statusCode).toBe(200);
    } finally {
      await bridge.close();
    }
  });

  it('lets one replica poll a stream at a time: a poller that lost its lease writes nothing', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10, lease: '1m' } } });
    try {
      const mine = bridge.app.poller.stream('firm', 'matters');
      const theirs = { ...mine, owner: 'other-replica' };
      let second: Awaited<ReturnType<typeof pollStream>> | undefined;
      const first = await pollStream(mine, {
        onPage: async (r) => {
          if (r.pages === 1) second = await pollStream(theirs);
        },
      });
      expect(second?.status).toBe('busy');
      expect(first.status).toBe('ok');

      // The other replica takes the stream over (as after an expiry); the old holder stops writing.
      await db.execute(sql`update leases set owner = 'other-replica' where name = 'poll:firm:matters'`);
      const lost = await pollStream(mine);
      expect(lost.status).toBe('busy');
      await db.execute(sql`update leases set expires_at = now() - interval '1 second'`);
      const before = (await outboxVersions()).length;
      const stolen = await pollStream(mine, {
        onPage: async () => {
          await db.execute(sql`update leases set owner = 'other-replica'`);
        },
      });
      expect(stolen).toMatchObject({ status: 'failed', error: expect.stringMatching(/LEASE_LOST/) });
      expect((await outboxVersions()).length).toBe(before);
    } finally {
      await bridge.close();
    }
  });
});

describe('the poller fetching a page ahead and answering held records before the gate', () => {
  /** The bridge's stream with its connector pointed through a fault proxy in front of the sandbox. */
  async function throughProxy(bridge: Awaited<ReturnType<typeof startBridge>>, options: Parameters<typeof startFaultProxy>[0]) {
    const proxy = await startFaultProxy({ target: bridge.sandbox.url, ...options });
    const stream = bridge.app.poller.stream('firm', 'matters');
    return { proxy, stream: through(bridge, stream, proxy.url) };
  }
  const isListing = (url: string | undefined) => url?.startsWith('/api/v4/matters.json') ?? false;
  const cursorOf = async () => (await db.select().from(streamCursors).where(and(eq(streamCursors.connectionId, 'firm'), eq(streamCursors.object, 'matters'))))[0];

  it('keeps the pages committed before a fetch that failed while the page before it committed, moves no cursor, and the re-run delivers the rest once', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    let listed = 0;
    const { proxy, stream } = await throughProxy(bridge, { fail: (req) => (isListing(req.url) && ++listed >= 3 ? 503 : undefined) });
    try {
      const failed = await pollStream(stream);
      expect(failed).toMatchObject({ status: 'failed', pages: 2, error: expect.stringMatching(/CRM_HTTP_STATUS/) });
      expect((await outboxVersions()).length).toBe(20);
      // Clio pages by id: the cursor only moves when a whole run completes.
      expect((await cursorOf())?.cursorRank).toBeNull();

      expect((await pollStream(bridge.app.poller.stream('firm', 'matters'))).status).toBe('ok');
      const delivered = (await outboxVersions()).map((d) => d.crmId);
      expect(delivered.sort()).toEqual(matterIds(bridge.sandbox).map(String).sort());
    } finally {
      await proxy.close();
      await bridge.close();
    }
  });

  it('returns at once when stopped while the next page is in flight, and writes nothing more', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    let listed = 0;
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const { proxy, stream } = await throughProxy(bridge, {
      answer: async (req) => {
        // The second page's answer is held until the run has returned.
        if (isListing(req.url) && ++listed === 2) await held;
      },
    });
    try {
      const controller = new AbortController();
      const stopped = await pollStream(stream, { signal: controller.signal, onPage: () => controller.abort() });
      expect(stopped).toMatchObject({ status: 'failed', pages: 1, error: 'ABORTED' });
      expect((await outboxVersions()).length).toBe(10);
      expect((await cursorOf())?.cursorRank).toBeNull();
    } finally {
      release();
      await proxy.close();
      await bridge.close();
    }
  });

  it('writes nothing when the lease is lost while the next page is in flight, and does not wait for that page', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    let listed = 0;
    let release!: () => void;
    const held = new Promise<void>((resolve) => (release = resolve));
    const { proxy, stream } = await throughProxy(bridge, {
      answer: async (req) => {
        if (!isListing(req.url)) return;
        // Another replica takes the stream over before the first page commits; the second page's
        // answer never comes while the run lasts.
        if (++listed === 1) await db.execute(sql`update leases set owner = 'other-replica' where name = 'poll:firm:matters'`);
        else await held;
      },
    });
    try {
      const lost = await pollStream(stream);
      expect(lost).toMatchObject({ status: 'failed', pages: 0, error: expect.stringMatching(/LEASE_LOST/) });
      expect(await db.select().from(ledger)).toHaveLength(0);
      expect((await cursorOf())?.cursorRank).toBeNull();
    } finally {
      release();
      await proxy.close();
      await bridge.close();
    }
  });

  // Two page transactions at once need two connections: PGlite runs one page at a time.
  it.skipIf(!process.env.DATABASE_URL)('commits pages in order: a page whose transaction fails takes the one written beside it down too', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    const firstId = String(matterIds(bridge.sandbox)[0]);
    let listed = 0;
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let blocker: Promise<unknown> | undefined;
    let blockerError: Error | undefined;
    let holding!: () => void;
    const held = new Promise<void>((resolve) => (holding = resolve));
    const { proxy, stream } = await throughProxy(bridge, {
      answer: async (req) => {
        if (!isListing(req.url) || ++listed !== 1) return;
        // Another session writes the head of the first page's first record and holds it
        // uncommitted: the first page's gate waits on it, the second page's does not.
        blocker = db
          .transaction(async (tx) => {
            await tx.execute(sql`insert into record_heads (connection_id, object, crm_id, last_event_id) values ('firm', 'matters', ${firstId}, gen_random_uuid())`);
            holding();
            await released;
            throw new Error('rolled back');
          })
          .catch((err: Error) => {
            if (err.message !== 'rolled back') blockerError = err;
            holding();
          });
        await held;
      },
    });
    try {
      const run = pollStream(stream);
      // Once the third page is asked for, the second page's transaction has begun; give it time
      // to do its gate work, then fail the first page's (cancel its waiting statement).
      for (let i = 0; i < 400 && listed < 3; i++) await new Promise((r) => setTimeout(r, 10));
      await new Promise((r) => setTimeout(r, 300));
      // The first page's wait for the blocker's row, not the second page's for the first page.
      await db.execute(sql`select pg_cancel_backend(pid) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock' and wait_event <> 'advisory'`);
      const failed = await run;
      release();
      await blocker;
      expect(blockerError).toBeUndefined();
      expect(listed).toBeGreaterThanOrEqual(2);
      expect(failed).toMatchObject({ status: 'failed', pages: 0 });
      // The second page's records were written, then rolled back with the first page's failure.
      expect(await db.select().from(ledger)).toHaveLength(0);
      expect((await cursorOf())?.resume ?? null).toBeNull();
    } finally {
      release();
      await proxy.close();
      await bridge.close();
    }
  });

  it.skipIf(!process.env.DATABASE_URL)('waits for the page before where Postgres sees it: a transaction between two pages in flight ends in a deadlock error, not a hang', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 10 } } });
    const stream = bridge.app.poller.stream('firm', 'matters');
    let third: Promise<string> | undefined;
    try {
      expect((await pollStream(stream)).status).toBe('ok');
      // Twenty edits: the next run's first page holds the first ten, its second page the next ten.
      const ids = matterIds(bridge.sandbox).slice(0, 20);
      for (const id of ids) bridge.sandbox.state.updateRecord('matters', id, { description: 'edited since' });
      const [first, eleventh] = [String(ids[0]), String(ids[10])];
      const lockHead = (tx: Pick<typeof db, 'execute'>, crmId: string, mode = sql``) =>
        tx.execute(sql`select crm_id from record_heads where connection_id = 'firm' and object = 'matters' and crm_id = ${crmId} for update ${mode}`);

      // A third transaction (another replica's hook batch) holds the first page's first record,
      // and once the second page holds its records, asks for the eleventh: the first page waits
      // for it, it waits for the second page, and the second page waits for the first.
      let holding!: () => void;
      const held = new Promise<void>((resolve) => (holding = resolve));
      let askNow!: () => void;
      const ask = new Promise<void>((resolve) => (askNow = resolve));
      third = db
        .transaction(async (tx) => {
          await lockHead(tx, first);
          holding();
          await ask;
          await lockHead(tx, eleventh);
        })
        .then(
          () => 'committed',
          (err: { code?: string; cause?: { code?: string } }) => err.cause?.code ?? err.code ?? String(err),
        );
      await held;
      const run = pollStream(stream);
      for (let i = 0; i < 2_000; i++) {
        // The second page holds the eleventh record once it cannot be locked without waiting.
        const taken = await db
          .transaction((tx) => lockHead(tx, eleventh, sql`nowait`))
          .then(
            () => false,
            (err: { cause?: { code?: string } }) => err.cause?.code === '55P03',
          );
        if (taken) break;
        await sleep(10);
      }
      askNow();

      const settled = await Promise.race([run.then((r) => r.status), sleep(20_000).then(() => 'stuck')]);
      expect(settled).not.toBe('stuck');
      // Postgres ended one of the three (whichever found the cycle); the third either committed
      // after it or was the one ended.
      expect(['committed', '40P01']).toContain(await third);
      // Nothing is lost whichever it was: the next run writes what this one did not.
      expect((await pollStream(stream)).status).toBe('ok');
      const heads = await headsByCrmId();
      for (const id of ids) expect(heads.get(String(id))?.version).toBe(String(bridge.sandbox.state.renderFull('matters', id)!.etag));
      const delivered = await outboxVersions();
      for (const id of ids) expect(delivered.filter((d) => d.crmId === String(id))).toHaveLength(2);
    } finally {
      // A hang (the cycle unseen) is broken so the bridge can close: every waiting lock is cancelled.
      await db.execute(sql`select pg_cancel_backend(pid) from pg_stat_activity where datname = current_database() and pid <> pg_backend_pid() and wait_event_type = 'Lock'`);
      await third;
      await bridge.close();
    }
  });

  it('answers records the heads already hold as duplicates and passes the rest through the gate, as the gate would decide them', async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 20 } } });
    try {
      const stream = bridge.app.poller.stream('firm', 'matters');
      expect((await pollStream(stream)).status).toBe('ok');
      const ids = matterIds(bridge.sandbox);
      for (const id of ids.slice(0, 3)) bridge.sandbox.state.updateRecord('matters', id, { description: 'edited since' });
      // A head deleted at the version the CRM still lists: the gate records that version as stale.
      await db.update(recordHeads).set({ deleted: true }).where(and(eq(recordHeads.connectionId, 'firm'), eq(recordHeads.crmId, String(ids[3]))));
      const ledgerBefore = (await db.select().from(ledger)).length;

      const again = await pollStream(stream, { cursorKey: 'matters:again' });
      expect(again.status).toBe('ok');
      expect(again.counts).toEqual({ duplicate: ids.length - 4, accepted: 3, stale: 1 });
      expect((await db.select().from(ledger)).length).toBe(ledgerBefore + 4);
    } finally {
      await bridge.close();
    }
  });
});
