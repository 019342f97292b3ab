import { setTimeout as sleep } from 'node:timers/promises';
import { eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { ledger, outbox, outboundWrites } from '../src/db/schema/index.js';
import { presets } from '../src/crm/presets/index.js';
import { pollStream } from '../src/sync/poller.js';
import { observeRecord } from '../src/sync/record.js';
import { claimOutboundWrites, markOutboundSent } from '../src/db/queries/outbound.js';
import { SECRET } from './helpers/app.js';
import { startBridge } from './helpers/bridge.js';
import { loseFirstCreateAnswer, startFaultProxy } from './helpers/fault-proxy.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';
import { startPipelineStub, type PipelineStub } from './fixtures/pipeline-stub.js';

const API_KEY = 'pipeline-api-key-0123456789';
const database = await createTestDatabase();
const { db } = database;
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

const FIRST_CONTACT = 100000001;

/** The bridge with outbound writes and delivery to the stub pipeline, hooks on every CRM write. */
async function startTwoWay(options: { writeBack: boolean; baseUrl?: string; connector?: unknown; poll?: Record<string, unknown> }) {
  let base = '';
  const stub = await startPipelineStub({ bridge: () => base, connection: 'firm', apiKey: API_KEY, writeBack: options.writeBack });
  const bridge = await startBridge({
    database,
    automation: { delayMs: 0 },
    connection: {
      ...(options.baseUrl ? { baseUrl: options.baseUrl } : {}),
      ...(options.connector ? { connector: options.connector } : {}),
      ...(options.poll ? { poll: options.poll } : {}),
      downstream: { url: stub.url, backoff: { base: '1ms', max: '5ms' } },
      outbound: { apiKeys: [API_KEY], backoff: { base: '1ms', max: '5ms' } },
    },
  });
  base = bridge.base;
  return { bridge, stub, close: async () => (await bridge.close(), await stub.close()) };
}

type Sandbox = Awaited<ReturnType<typeof startTwoWay>>['bridge']['sandbox'];

/**
 * The bridge behind a proxy that lets the first `method` call on matters reach the CRM, waits for
 * its echo, lets staff act on the record, then drops the connection instead of answering: the
 * bridge never sees the CRM's answer.
 */
async function startWithLostAnswer(method: 'POST' | 'PATCH', staff: (state: Sandbox['state'], id: number) => void) {
  let sandbox: Sandbox | undefined;
  let lost = 0;
  const proxy = await startFaultProxy({
    answer: async (req, res, text) => {
      if (req.method !== method || !req.url!.startsWith('/api/v4/matters') || lost++ > 0) return false;
      await sandbox!.state.automationIdle();
      staff(sandbox!.state, (JSON.parse(text) as { data: { id: number } }).data.id);
      await sandbox!.state.automationIdle();
      res.destroy();
      return true;
    },
  });
  const twoWay = await startTwoWay({ writeBack: false, baseUrl: proxy.url });
  sandbox = twoWay.bridge.sandbox;
  proxy.setTarget(sandbox.url);
  return { ...twoWay, close: async () => (await twoWay.close(), await proxy.close()) };
}

/** What a writer does before it dies: claims the one pending write for `owner` and makes its CRM create call, with the marker. */
/**
 * A proxy in front of the sandbox that holds each create's answer on `path` until the
 * automation's hooks have been answered by the bridge (so the gate has committed its decision
 * on the new record), noting whether that record's echo was in the ledger before the answer.
 * `follow` points it at the bridge's sandbox once the bridge is up.
 */
async function holdCreateAnswers(path: string) {
  let idle: () => Promise<void> = async () => {};
  const held: Array<{ crmId: string; echoBeforeAnswer: boolean }> = [];
  const proxy = await startFaultProxy({
    answer: async (req, _res, text) => {
      if (req.method !== 'POST' || !req.url!.startsWith(path)) return;
      await idle();
      const crmId = String((JSON.parse(text) as { data: { id: number } }).data.id);
      const rows = await db.select({ disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId));
      held.push({ crmId, echoBeforeAnswer: rows.some((r) => r.disposition === 'echo') });
    },
  });
  const follow = (sandbox: Sandbox) => {
    proxy.setTarget(sandbox.url);
    idle = () => sandbox.state.automationIdle();
  };
  return { proxy, held, follow };
}

async function claimAndCreate(app: FastifyInstance, outboundId: unknown, owner: string, leaseMs: number) {
  const [row] = await claimOutboundWrites(db, { connectionId: 'firm', owner, limit: 1, leaseMs });
  expect(row?.id).toBe(outboundId);
  const connector = app.crm.connector('firm');
  const raw = await connector.createRecord('matters', connector.toRecord('matters', row!.fields ?? {}), { writeId: row!.id });
  return { row: row!, raw };
}

async function count(table: typeof outbox | typeof outboundWrites, where?: ReturnType<typeof eq>) {
  const [row] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(table).where(where);
  return row!.n;
}

/** Ticks a daemon until the table has nothing pending (retries come due after tiny backoffs). */
async function drain(worker: { tick(signal: AbortSignal): Promise<unknown> }, table: typeof outbox | typeof outboundWrites) {
  const signal = new AbortController().signal;
  for (let i = 0; i < 2_000; i++) {
    await worker.tick(signal);
    if ((await count(table, eq(table.state, 'pending'))) === 0) return;
    await sleep(2);
  }
  throw new Error('still pending after 2,000 ticks');
}

const drainWriter = (app: FastifyInstance) => drain(app.outboundWriters.get('firm')!, outboundWrites);
const drainDelivery = (app: FastifyInstance) => drain(app.deliveryWorkers.get('firm')!, outbox);

/** One round of two-way traffic: writes to the CRM, its hooks, a poll, deliveries and the pipeline's write-backs. */
async function round(app: FastifyInstance, stub: PipelineStub, sandbox: { state: { automationIdle(): Promise<void> } }) {
  await drainWriter(app);
  await sandbox.state.automationIdle();
  expect((await pollStream(app.poller.stream('firm', 'matters'))).status).toBe('ok');
  await drainDelivery(app);
  await stub.settled();
  await drainWriter(app);
  await sandbox.state.automationIdle();
}

const lead = (i: number) => ({ object: 'matters', externalId: `lead-${i}`, fields: { description: `Intake lead ${i}`, status: 'Open', clientId: FIRST_CONTACT + (i % 40) } });

describe('the loop guard against the sandbox CRM', () => {
  it('leaves the CRM record count and the delivered count flat after the first of 20 rounds of two-way traffic, and creates each new lead once', async () => {
    const { bridge, stub, close } = await startTwoWay({ writeBack: true });
    try {
      const { app, sandbox } = bridge;
      const perRound: Array<{ crm: number; delivered: number }> = [];
      for (let r = 1; r <= 20; r++) {
        if (r === 1) {
          for (let i = 0; i < 100; i++) expect((await stub.write(`new-lead-${i}`, lead(i))).status).toBe(202);
        }
        await round(app, stub, sandbox);
        const crm = sandbox.state.store.matters.items.length;
        const delivered = await count(outbox);
        perRound.push({ crm, delivered });
        console.log(`round ${r}: CRM matters ${crm}, delivered ${delivered}`);
      }
      expect(perRound.slice(1).every((c) => c.crm === perRound[0]!.crm && c.delivered === perRound[0]!.delivered)).toBe(true);
      // The backfill was delivered and handed back unchanged: every write-back was skipped.
      expect(stub.delivered.length).toBe(perRound[0]!.delivered);
      expect(stub.writeBacks.length).toBe(stub.delivered.length);
      expect(stub.writeBacks.every((w) => w.status === 200 && w.body.status === 'skipped' && w.body.reason === 'echo')).toBe(true);
      // Each new lead exists exactly once in the CRM and its echo was never delivered.
      const descriptions = sandbox.state.store.matters.items.map((m) => m.description);
      for (let i = 0; i < 100; i++) expect(descriptions.filter((d) => d === `Intake lead ${i}`)).toHaveLength(1);
      const leadIds = new Set((await db.select({ crmId: outboundWrites.crmId }).from(outboundWrites).where(eq(outboundWrites.state, 'sent'))).map((w) => w.crmId));
      expect(leadIds.size).toBe(100);
      expect(stub.delivered.filter((d) => leadIds.has(d.crmId))).toEqual([]);
      // The automation announced every lead by hook; the ledger never took one as a real change.
      const fired = sandbox.state.automation.entries().filter((e) => e.event === 'created' && e.status === 'fired' && leadIds.has(String(e.recordId)));
      expect(fired).toHaveLength(100);
      const leadRows = await db.select({ crmId: ledger.crmId, disposition: ledger.disposition }).from(ledger).where(eq(ledger.connectionId, 'firm'));
      expect(leadRows.filter((r) => leadIds.has(r.crmId) && r.disposition !== 'echo')).toEqual([]);
    } finally {
      await close();
    }
  }, 120_000);

  it('recognises the echo that arrives by hook before the CRM has answered the create', async () => {
    const { proxy, held: heldCreates, follow } = await holdCreateAnswers('/api/v4/matters.json');
    const { bridge, stub, close } = await startTwoWay({ writeBack: false, baseUrl: proxy.url });
    follow(bridge.sandbox);
    try {
      const { app } = bridge;
      const accepted = await stub.write('lead-fast-echo', lead(1));
      expect(accepted.status).toBe(202);
      await drainWriter(app);

      expect(heldCreates).toHaveLength(1);
      const [{ crmId, echoBeforeAnswer }] = heldCreates as [(typeof heldCreates)[0]];
      expect(echoBeforeAnswer).toBe(true);
      const rows = await db.select({ source: ledger.source, disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId));
      // The hook's echo, and nothing else: the returned record was the same version, a duplicate.
      expect(rows).toEqual([{ source: 'hook', disposition: 'echo' }]);
      expect(await count(outbox)).toBe(0);
      const status = await app.inject({ url: `/v1/connections/firm/records/${accepted.body.outboundId}`, headers: { authorization: `Bearer ${API_KEY}` } });
      expect(status.json()).toMatchObject({ state: 'sent', crmId, attempts: 1, lastError: null });
      // A poll afterwards sees the same version: nothing new.
      await pollStream(app.poller.stream('firm', 'matters'));
      await drainDelivery(app);
      expect(stub.delivered.filter((d) => d.crmId === crmId)).toEqual([]);
    } finally {
      await close();
      await proxy.close();
    }
  }, 60_000);

  it('does not make a lead twice when the CRM made it but its answer was lost, and delivers a staff edit made meanwhile once', async () => {
    const { bridge, stub, close } = await startWithLostAnswer('POST', (state, id) => state.updateRecord('matters', id, { location: 'Room 9' }));
    const { app, sandbox } = bridge;
    try {
      const accepted = await stub.write('lead-lost-answer', lead(3));
      await drainWriter(app);
      await round(app, stub, sandbox);

      const creates = sandbox.state.requestLog.list({ method: 'POST', pathPrefix: '/api/v4/matters.json' });
      expect(creates).toHaveLength(1);
      const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, String(accepted.body.outboundId)));
      expect(write).toMatchObject({ state: 'sent', attempts: 2 });
      const crmId = write!.crmId!;
      // The record as read on the retry is the staff's version, not this write's answer.
      expect(write!.crmVersion).not.toBe(String(sandbox.state.renderFull('matters', Number(crmId))!.etag));
      const deliveries = stub.delivered.filter((d) => d.crmId === crmId);
      expect(deliveries).toHaveLength(1);
      expect(deliveries[0]).toMatchObject({ fields: { location: 'Room 9' } });
    } finally {
      await close();
    }
  }, 60_000);

  it('does not make a lead again when the CRM made it, its answer was lost and staff deleted the record before the retry', async () => {
    // The create's echo teaches the bridge the record's id before staff delete the record.
    const { bridge, stub, close } = await startWithLostAnswer('POST', (state, id) => state.deleteRecord('matters', id));
    const { app, sandbox } = bridge;
    try {
      const accepted = await stub.write('lead-deleted-before-retry', lead(6));
      await drainWriter(app);
      await round(app, stub, sandbox);

      // One create: the deleted record is not made again.
      expect(sandbox.state.requestLog.list({ method: 'POST', pathPrefix: '/api/v4/matters.json' })).toHaveLength(1);
      expect(sandbox.state.store.matters.items.filter((m) => m.description === 'Intake lead 6')).toEqual([]);
      const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, String(accepted.body.outboundId)));
      expect(write).toMatchObject({ state: 'sent', attempts: 2 });
      // The create's echo was recognised and never delivered.
      expect(stub.delivered.filter((d) => d.crmId === write!.crmId)).toEqual([]);
      expect(await db.select({ disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, write!.crmId!))).toEqual([{ disposition: 'echo' }]);
    } finally {
      await close();
    }
  }, 60_000);

  it("does not send an update again once its echo has come, though its answer was lost: the staff's later edit stands", async () => {
    const { bridge, stub, close } = await startWithLostAnswer('PATCH', (state, id) => state.updateRecord('matters', id, { description: 'Edited by staff' }));
    const { app, sandbox } = bridge;
    try {
      await round(app, stub, sandbox);
      const crmId = String(sandbox.state.store.matters.items[5]!.id);
      const deliveredBefore = stub.delivered.length;
      const accepted = await stub.write('update-answer-lost', { object: 'matters', externalId: 'update-answer-lost', crmId, fields: { description: 'Updated by intake' } });
      expect(accepted.status).toBe(202);
      await drainWriter(app);
      await round(app, stub, sandbox);

      expect(sandbox.state.requestLog.list({ method: 'PATCH' })).toHaveLength(1);
      expect(sandbox.state.renderFull('matters', Number(crmId))).toMatchObject({ description: 'Edited by staff' });
      const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, String(accepted.body.outboundId)));
      expect(write).toMatchObject({ state: 'sent', attempts: 2 });
      // The update's echo is not delivered; the staff's edit is, once.
      expect(stub.delivered.slice(deliveredBefore).map((d) => [d.crmId, d.fields.description])).toEqual([[crmId, 'Edited by staff']]);
    } finally {
      await close();
    }
  }, 60_000);

  it('does not make a lead twice when its writer was killed mid-create and the hook was dropped', async () => {
    const { bridge, stub, close } = await startTwoWay({ writeBack: false });
    try {
      const { app, sandbox } = bridge;
      for (const rule of sandbox.state.automation.rules) rule.dropRate = 1;
      const accepted = await stub.write('lead-writer-killed', lead(7));
      // What a writer does up to its SIGKILL: claim (a short lease), make the CRM call, nothing more.
      await claimAndCreate(app, accepted.body.outboundId, 'writer-that-is-killed', 1);
      await sleep(10);

      // Another writer takes the write over once the lease has run out: it finds the record.
      await drainWriter(app);
      expect(sandbox.state.requestLog.list({ method: 'POST', pathPrefix: '/api/v4/matters.json' })).toHaveLength(1);
      const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, String(accepted.body.outboundId)));
      expect(write).toMatchObject({ state: 'sent', attempts: 2 });
      expect(sandbox.state.renderFull('matters', Number(write!.crmId))).toMatchObject({ description: 'Intake lead 7' });
      await round(app, stub, sandbox);
      expect(stub.delivered.filter((d) => d.crmId === write!.crmId)).toEqual([]);
    } finally {
      await close();
    }
  }, 60_000);

  // The Clio preset stamps a marker; without one the record is found by the fields written.
  const withoutMarker = (() => {
    const clio = structuredClone(presets.clio!) as { objects: Record<string, Record<string, unknown>> };
    delete clio.objects.matters!.originMarker;
    return clio;
  })();
  for (const [label, connector] of [['with the origin marker', undefined], ['without an origin marker', withoutMarker]] as const) {
    it(`does not make a lead twice when the create's answer was lost and its hook dropped, ${label}`, async () => {
      // The proxy lets the first create reach the CRM and drops the connection instead of
      // answering; the automation drops every hook. The retry must find what the CRM made.
      const proxy = await startFaultProxy({ answer: loseFirstCreateAnswer('/api/v4/matters.json') });
      const { bridge, stub, close } = await startTwoWay({ writeBack: false, baseUrl: proxy.url, ...(connector ? { connector } : {}) });
      const { app, sandbox } = bridge;
      proxy.setTarget(sandbox.url);
      for (const rule of sandbox.state.automation.rules) rule.dropRate = 1;
      try {
        const accepted = await stub.write(`lead-lost-${connector ? 'unmarked' : 'marked'}`, lead(5));
        expect(accepted.status).toBe(202);
        await drainWriter(app);
        const creates = sandbox.state.requestLog.list({ method: 'POST', pathPrefix: '/api/v4/matters.json' });
        expect(creates).toHaveLength(1);
        const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, String(accepted.body.outboundId)));
        expect(write).toMatchObject({ state: 'sent', attempts: 2 });
        const crmId = write!.crmId!;
        expect(sandbox.state.renderFull('matters', Number(crmId))).toMatchObject({ description: 'Intake lead 5' });

        // The poll is the first sighting of the record: the write's echo, not a lead for the pipeline.
        await round(app, stub, sandbox);
        const rows = await db.select({ source: ledger.source, disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId));
        expect(rows).toEqual([{ source: 'poll', disposition: 'echo' }]);
        expect(stub.delivered.filter((d) => d.crmId === crmId)).toEqual([]);
        expect(sandbox.state.requestLog.list({ method: 'POST', pathPrefix: '/api/v4/matters.json' })).toHaveLength(1);
      } finally {
        await close();
        await proxy.close();
      }
    }, 60_000);
  }

  it('recognises the echo when the writer died between recording the CRM answer and passing it through the gate', async () => {
    const { bridge, stub, close } = await startTwoWay({ writeBack: false });
    try {
      const { app, sandbox } = bridge;
      // The automation drops this create's hook: only the poll will see the new record.
      for (const rule of sandbox.state.automation.rules) rule.dropRate = 1;
      const accepted = await stub.write('lead-writer-died', lead(4));
      // What the writer does up to its crash: claim, make the CRM call with the marker, record the answer.
      const { row, raw } = await claimAndCreate(app, accepted.body.outboundId, 'writer-that-dies', 60_000);
      const answer = observeRecord({ connectionId: 'firm', object: 'matters', definition: app.connections.get('firm')!.connector.objects.matters!, raw, source: 'outbound', observedAt: new Date() })!;
      expect(await markOutboundSent(db, { id: row.id, owner: 'writer-that-dies', crmId: answer.crmId, crmVersion: answer.version, contentHash: answer.contentHash! })).toBe(true);
      await sandbox.state.automationIdle();

      // The poll finds the record the bridge wrote: an echo, not a change for the pipeline.
      expect((await pollStream(app.poller.stream('firm', 'matters'))).status).toBe('ok');
      const rows = await db.select({ source: ledger.source, disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, answer.crmId));
      expect(rows).toEqual([{ source: 'poll', disposition: 'echo' }]);
      await drainDelivery(app);
      expect(stub.delivered.filter((d) => d.crmId === answer.crmId)).toEqual([]);
    } finally {
      await close();
    }
  }, 60_000);

  it("updates a matter without touching the firm's client_reference, and recognises the update's echo before the CRM has answered", async () => {
    // The update's answer is held until the automation's hook for it has been answered, as in
    // the create case above; Clio's marker field is the firm's own on records it did not create.
    let idle: () => Promise<void> = async () => {};
    const echoBeforeAnswer: boolean[] = [];
    const proxy = await startFaultProxy({
      answer: async (req, _res, text) => {
        if (req.method !== 'PATCH') return;
        await idle();
        const crmId = String((JSON.parse(text) as { data: { id: number } }).data.id);
        const rows = await db.select({ disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId));
        echoBeforeAnswer.push(rows.some((r) => r.disposition === 'echo'));
      },
    });
    const { bridge, stub, close } = await startTwoWay({ writeBack: false, baseUrl: proxy.url });
    proxy.setTarget(bridge.sandbox.url);
    idle = () => bridge.sandbox.state.automationIdle();
    try {
      const { app, sandbox } = bridge;
      // A CRM-born matter the firm keeps its own reference in, and a bridge-created one.
      const firmsMatter = sandbox.state.store.matters.items[3]!.id;
      sandbox.state.updateRecord('matters', firmsMatter, { client_reference: 'SMITH-0042' });
      const created = await stub.write('lead-to-update', lead(3));
      await round(app, stub, sandbox);
      const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, String(created.body.outboundId)));
      const leadId = Number(write!.crmId);
      const deliveredBefore = stub.delivered.length;

      for (const [key, crmId] of [['update-firms-matter', firmsMatter], ['update-lead', leadId]] as const) {
        const accepted = await stub.write(key, { object: 'matters', externalId: key, crmId: String(crmId), fields: { description: `Updated by intake ${key}` } });
        expect(accepted.status).toBe(202);
        await drainWriter(app);
      }
      expect(echoBeforeAnswer).toEqual([true, true]);
      expect(sandbox.state.renderFull('matters', firmsMatter)).toMatchObject({ client_reference: 'SMITH-0042', description: 'Updated by intake update-firms-matter' });
      expect(sandbox.state.renderFull('matters', leadId)).toMatchObject({ client_reference: `crm-bridge:${write!.id}`, description: 'Updated by intake update-lead' });
      await round(app, stub, sandbox);
      expect(stub.delivered.slice(deliveredBefore)).toEqual([]);
    } finally {
      await close();
      await proxy.close();
    }
  }, 60_000);

  it('delivers a human edit of a bridge-created lead once, though the record still carries the origin marker', async () => {
    const { bridge, stub, close } = await startTwoWay({ writeBack: false });
    try {
      const { app, sandbox } = bridge;
      const accepted = await stub.write('lead-edited-later', lead(2));
      await round(app, stub, sandbox);
      const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, String(accepted.body.outboundId)));
      const crmId = write!.crmId!;
      expect(stub.delivered.filter((d) => d.crmId === crmId)).toEqual([]);

      // Staff change a field the pipeline never wrote: the written fields and the marker stay.
      sandbox.state.updateRecord('matters', Number(crmId), { location: 'Room 4' });
      expect(String(sandbox.state.renderFull('matters', Number(crmId))!.client_reference)).toBe(`crm-bridge:${write!.id}`);
      await round(app, stub, sandbox);
      await round(app, stub, sandbox);

      const deliveries = stub.delivered.filter((d) => d.crmId === crmId);
      expect(deliveries).toHaveLength(1);
      expect(deliveries[0]).toMatchObject({ origin: 'crm', fields: { location: 'Room 4', description: 'Intake lead 2' } });
    } finally {
      await close();
    }
  }, 60_000);
  describe('Clio contacts, whose email and phone are written through email_addresses and phone_numbers', () => {
    const contactLead = { object: 'contacts', externalId: 'lead-contact', fields: { firstName: 'Ada', lastName: 'Lovelace', type: 'Person', email: 'ada@example.com', phone: '+1 555 010 0000' } };

    /** The two-way bridge polling contacts, with the automation firing a hook on every contact write. */
    async function startContacts(baseUrl?: string) {
      const twoWay = await startTwoWay({ writeBack: false, poll: { objects: ['contacts'], interval: '1h', lookback: '2m', pageSize: 50, lease: '10s' }, ...(baseUrl ? { baseUrl } : {}) });
      const { sandbox, base } = twoWay.bridge;
      sandbox.state.addAutomationRule({ object: 'contacts', events: ['created', 'updated', 'deleted'], url: `${base}/hooks/firm?object=contacts`, auth: { type: 'bearer', value: SECRET }, payload: 'record' });
      return twoWay;
    }

    async function contactRound(app: FastifyInstance, sandbox: Sandbox) {
      await drainWriter(app);
      await sandbox.state.automationIdle();
      expect((await pollStream(app.poller.stream('firm', 'contacts'))).status).toBe('ok');
      await drainDelivery(app);
    }

    it("recognises a created lead contact's echo by hook before the CRM has answered, showing the email and phone written, and delivers nothing", async () => {
      const { proxy, held, follow } = await holdCreateAnswers('/api/v4/contacts.json');
      const { bridge, stub, close } = await startContacts(proxy.url);
      follow(bridge.sandbox);
      try {
        const { app, sandbox } = bridge;
        expect((await stub.write('lead-contact', contactLead)).status).toBe(202);
        await contactRound(app, sandbox);

        expect(held).toHaveLength(1);
        const [{ crmId, echoBeforeAnswer }] = held as [(typeof held)[0]];
        expect(sandbox.state.renderFull('contacts', Number(crmId))).toMatchObject({ primary_email_address: 'ada@example.com', primary_phone_number: '+1 555 010 0000' });
        expect(echoBeforeAnswer).toBe(true);
        expect(await db.select({ source: ledger.source, disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId))).toEqual([{ source: 'hook', disposition: 'echo' }]);
        expect(stub.delivered.filter((d) => d.crmId === crmId)).toEqual([]);
        expect(await count(outbox, eq(outbox.crmId, crmId))).toBe(0);
      } finally {
        await close();
        await proxy.close();
      }
    }, 60_000);

    it('takes back a delivered contact with a new title without sending its email or phone again, and does not deliver the echo of that update', async () => {
      const { bridge, stub, close } = await startContacts();
      const { app, sandbox } = bridge;
      try {
        await contactRound(app, sandbox);
        const change = stub.delivered.find((d) => d.object === 'contacts' && typeof d.fields.email === 'string' && typeof d.fields.phone === 'string')!;
        const deliveredBefore = stub.delivered.length;
        sandbox.state.requestLog.clear();
        const accepted = await stub.write('contact-title', { object: 'contacts', externalId: `crm-${change.crmId}`, crmId: change.crmId, fields: { ...change.fields, title: 'Managing Partner' } });
        expect(accepted.status).toBe(202);
        await contactRound(app, sandbox);

        const patches = sandbox.state.requestLog.list({ method: 'PATCH', pathPrefix: '/api/v4/contacts' }).map((r) => (r.body as { data: Record<string, unknown> }).data);
        expect(patches).toEqual([{ first_name: change.fields.firstName, last_name: change.fields.lastName, type: change.fields.type, title: 'Managing Partner' }]);
        expect(sandbox.state.renderFull('contacts', Number(change.crmId))).toMatchObject({ title: 'Managing Partner', primary_email_address: change.fields.email, primary_phone_number: change.fields.phone });
        expect(stub.delivered.slice(deliveredBefore)).toEqual([]);
        expect((await db.select({ disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, change.crmId))).map((r) => r.disposition)).toEqual(['accepted', 'echo']);
      } finally {
        await close();
      }
    }, 60_000);

    it("does not make a lead contact twice when the create's answer was lost and its hook dropped: the poll's sighting, email and phone included, is the echo", async () => {
      const proxy = await startFaultProxy({ answer: loseFirstCreateAnswer('/api/v4/contacts.json') });
      const { bridge, stub, close } = await startContacts(proxy.url);
      const { app, sandbox } = bridge;
      proxy.setTarget(sandbox.url);
      for (const rule of sandbox.state.automation.rules) rule.dropRate = 1;
      try {
        const accepted = await stub.write('lead-contact-lost', contactLead);
        expect(accepted.status).toBe(202);
        await contactRound(app, sandbox);

        expect(sandbox.state.requestLog.list({ method: 'POST', pathPrefix: '/api/v4/contacts.json' })).toHaveLength(1);
        const [write] = await db.select().from(outboundWrites).where(eq(outboundWrites.id, String(accepted.body.outboundId)));
        expect(write).toMatchObject({ state: 'sent', attempts: 2 });
        const crmId = write!.crmId!;
        expect(sandbox.state.renderFull('contacts', Number(crmId))).toMatchObject({ primary_email_address: 'ada@example.com', primary_phone_number: '+1 555 010 0000' });
        expect(await db.select({ source: ledger.source, disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId))).toEqual([{ source: 'poll', disposition: 'echo' }]);
        expect(stub.delivered.filter((d) => d.crmId === crmId)).toEqual([]);
      } finally {
        await close();
        await proxy.close();
      }
    }, 60_000);
  });
});
