import { setTimeout as sleep } from 'node:timers/promises';
import { eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { presets } from '../src/crm/presets/index.js';
import { ledgerBodies, outboundWrites } from '../src/db/schema/index.js';
import { authorise, oauthAuth } from './fixtures/token-helpers.js';
import { startBridge } from './helpers/bridge.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';
import { loseFirstCreateAnswer, startFaultProxy } from './helpers/fault-proxy.js';

const API_KEY = 'pipeline-api-key-0123456789';
const OLD_KEY = 'old-pipeline-key-9876543210';
const database = await createTestDatabase();
const { db } = database;
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

const lead = { object: 'matters', externalId: 'lead-1', fields: { description: 'Slip and fall, intake call', status: 'Open', clientId: 100000001 } };

function post(app: FastifyInstance, body: unknown, headers: Record<string, string> = {}, connection = 'firm') {
  return app.inject({
    method: 'POST',
    url: `/v1/connections/${connection}/records`,
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json', ...headers },
    payload: JSON.stringify(body),
  });
}

const status = (app: FastifyInstance, id: string) => app.inject({ url: `/v1/connections/firm/records/${id}`, headers: { authorization: `Bearer ${API_KEY}` } });

async function tickUntilSettled(app: FastifyInstance, id: string) {
  const writer = app.outboundWriters.get('firm')!;
  for (let i = 0; i < 200; i++) {
    await writer.tick(new AbortController().signal);
    const [row] = await db.select({ state: outboundWrites.state }).from(outboundWrites).where(eq(outboundWrites.id, id));
    if (row?.state !== 'pending') return;
    await sleep(2);
  }
  throw new Error(`write ${id} still pending`);
}

const ADMIN_TOKEN = 'operator-admin-token-0123456789';

const presetProperties = String(presets.hubspot!.objects.contacts!.get!.request.query!.properties);

async function withBridge(run: (app: FastifyInstance, sandbox: Awaited<ReturnType<typeof startBridge>>['sandbox']) => Promise<void>, baseUrl?: string, connection: Record<string, unknown> = {}) {
  const bridge = await startBridge({
    database,
    env: { ADMIN_TOKEN },
    sandbox: { autoApprove: true },
    connection: {
      ...(baseUrl ? { baseUrl } : {}),
      outbound: { apiKeys: [API_KEY, OLD_KEY], maxAttempts: 3, backoff: { base: '1ms', max: '5ms' } },
      ...connection,
    },
  });
  try {
    await run(bridge.app, bridge.sandbox);
  } finally {
    await bridge.close();
  }
}

describe('POST /v1/connections/:connection/records', () => {
  it('creates the record in the CRM with the origin marker and shows the CRM id once known', async () => {
    await withBridge(async (app, sandbox) => {
      const res = await post(app, lead, { 'idempotency-key': 'k-create' });
      expect(res.statusCode).toBe(202);
      const { outboundId, status: state } = res.json();
      expect(state).toBe('pending');
      expect((await status(app, outboundId)).json()).toMatchObject({ state: 'pending', crmId: null, attempts: 0 });
      await tickUntilSettled(app, outboundId);
      const shown = (await status(app, outboundId)).json();
      expect(shown).toMatchObject({ state: 'sent', attempts: 1, lastError: null, externalId: 'lead-1', operation: 'create' });
      const created = sandbox.state.renderFull('matters', Number(shown.crmId))!;
      expect(created).toMatchObject({ description: 'Slip and fall, intake call', status: 'Open', client_reference: `crm-bridge:${outboundId}` });
    });
  });

  it('takes a write carrying a NUL (\\u0000) with U+FFFD in its place, and makes it', async () => {
    await withBridge(async (app, sandbox) => {
      const res = await post(app, { ...lead, fields: { ...lead.fields, description: 'Intake\u0000call' } }, { 'idempotency-key': 'k-nul' });
      expect(res.statusCode).toBe(202);
      await tickUntilSettled(app, res.json().outboundId);
      const shown = (await status(app, res.json().outboundId)).json();
      expect(shown).toMatchObject({ state: 'sent' });
      expect(sandbox.state.renderFull('matters', Number(shown.crmId))).toMatchObject({ description: 'Intake\ufffdcall' });
    });
  });

  it("shows a write's state to the pipeline's key and the operator's admin token, and the same 401 to anyone else", async () => {
    await withBridge(async (app) => {
      const { outboundId } = (await post(app, lead, { 'idempotency-key': 'k-lookup' })).json();
      const lookup = (authorization?: string, connection = 'firm') =>
        app.inject({ url: `/v1/connections/${connection}/records/${outboundId}`, headers: authorization ? { authorization } : {} });
      expect((await lookup(`Bearer ${API_KEY}`)).statusCode).toBe(200);
      expect((await lookup(`Bearer ${ADMIN_TOKEN}`)).statusCode).toBe(200);
      const refusals = await Promise.all([lookup(), lookup('Bearer not-the-key-0123456789'), lookup(`Bearer ${ADMIN_TOKEN}`, 'nope')]);
      expect(refusals.map((r) => r.statusCode)).toEqual([401, 401, 401]);
      expect(new Set(refusals.map((r) => r.body)).size).toBe(1);
    });
  });

  it('answers the same key and body with the same write, 409 while it is in flight, 422 for another body, 400 without a key', async () => {
    await withBridge(async (app) => {
      const first = await post(app, lead, { 'idempotency-key': 'k-same' });
      expect(first.statusCode).toBe(202);
      const inFlight = await post(app, lead, { 'idempotency-key': 'k-same' });
      expect(inFlight.statusCode).toBe(409);
      expect(inFlight.json()).toMatchObject({ code: 'IN_FLIGHT' });
      await tickUntilSettled(app, first.json().outboundId);
      const again = await post(app, lead, { 'idempotency-key': 'k-same' });
      expect(again.statusCode).toBe(202);
      expect(again.json().outboundId).toBe(first.json().outboundId);
      const other = await post(app, { ...lead, externalId: 'lead-2' }, { 'idempotency-key': 'k-same' });
      expect(other.statusCode).toBe(422);
      expect(other.headers['content-type']).toMatch(/application\/problem\+json/);
      const missing = await post(app, lead);
      expect(missing.statusCode).toBe(400);
      expect(missing.headers['content-type']).toMatch(/application\/problem\+json/);
      expect(missing.json()).toMatchObject({ code: 'IDEMPOTENCY_KEY_REQUIRED' });
      const [counted] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(outboundWrites);
      expect(counted!.n).toBe(1);
    });
  });

  it('refuses a write with a misspelt key (crm_id for crmId) with a 400 naming it, instead of taking an update for a create of a second record', async () => {
    await withBridge(async (app, sandbox) => {
      const matterId = String(sandbox.state.store.matters.items[0]!.id);
      const before = sandbox.state.store.matters.items.length;
      for (const [key, misspelt] of [['k-snake', 'crm_id'], ['k-case', 'crmID']] as const) {
        const res = await post(app, { object: 'matters', externalId: 'lead-9', [misspelt]: matterId, fields: { description: 'Updated after the call' } }, { 'idempotency-key': key });
        expect(res.statusCode, misspelt).toBe(400);
        expect(res.headers['content-type']).toMatch(/application\/problem\+json/);
        expect(res.json()).toMatchObject({ code: 'VALIDATION_FAILED', detail: expect.stringContaining(`"${misspelt}"`) });
      }
      const [counted] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(outboundWrites);
      expect(counted!.n).toBe(0);
      await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
      expect(sandbox.state.store.matters.items.length).toBe(before);
    });
  });

  it('gives the same 401 for a missing key, a wrong key and an unknown connection, and accepts every configured key', async () => {
    await withBridge(async (app) => {
      const missing = await app.inject({ method: 'POST', url: '/v1/connections/firm/records', headers: { 'content-type': 'application/json', 'idempotency-key': 'k' }, payload: JSON.stringify(lead) });
      const wrong = await post(app, lead, { authorization: 'Bearer not-the-pipeline-key-at-all', 'idempotency-key': 'k' });
      const unknown = await post(app, lead, { 'idempotency-key': 'k' }, 'nobody');
      const bodies = [missing, wrong, unknown].map((r) => [r.statusCode, r.body]);
      expect(bodies.map(([code]) => code)).toEqual([401, 401, 401]);
      expect(new Set(bodies.map(([, body]) => body)).size).toBe(1);
      expect((await post(app, lead, { authorization: `Bearer ${OLD_KEY}`, 'idempotency-key': 'k-old' })).statusCode).toBe(202);
      const [counted] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(outboundWrites);
      expect(counted!.n).toBe(1);
    });
  });

  it('skips a CRM-born record pushed back as it was delivered, and sends nothing to the CRM', async () => {
    await withBridge(async (app, sandbox) => {
      const matterId = sandbox.state.store.matters.items[0]!.id;
      const raw = sandbox.state.renderFull('matters', matterId)!;
      const hook = await app.inject({ method: 'POST', url: '/hooks/firm', headers: { authorization: `Bearer hook-secret-0123456789abcdef`, 'content-type': 'application/json' }, payload: JSON.stringify({ data: raw }) });
      expect(hook.statusCode).toBe(202);
      const [body] = await db.select({ fields: ledgerBodies.fields }).from(ledgerBodies).where(eq(ledgerBodies.eventId, hook.json().eventId));
      const fields = body!.fields!;
      sandbox.state.requestLog.clear();

      const back = await post(app, { object: 'matters', externalId: 'crm-x', crmId: String(matterId), fields }, { 'idempotency-key': 'k-back' });
      expect(back.statusCode).toBe(200);
      expect(back.json()).toMatchObject({ status: 'skipped', reason: 'echo' });
      expect((await post(app, { object: 'matters', externalId: 'crm-x', crmId: String(matterId), fields }, { 'idempotency-key': 'k-back' })).json()).toMatchObject({ status: 'skipped' });
      await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
      expect(sandbox.state.requestLog.list().filter((r) => r.method !== 'GET')).toEqual([]);

      // A real change to the same record is written.
      const changed = await post(app, { object: 'matters', externalId: 'crm-x', crmId: String(matterId), fields: { ...fields, location: 'Suite 200' } }, { 'idempotency-key': 'k-change' });
      expect(changed.statusCode).toBe(202);
      await tickUntilSettled(app, changed.json().outboundId);
      expect(sandbox.state.renderFull('matters', matterId)!.location).toBe('Suite 200');
    });
  });

  it('refuses a write with a field the object does not have (locaton for location) with a 422 naming it, instead of dropping it and reporting the write sent', async () => {
    await withBridge(async (app, sandbox) => {
      const matterId = sandbox.state.store.matters.items[0]!.id;
      const res = await post(app, { object: 'matters', externalId: 'lead-9', crmId: String(matterId), fields: { description: 'Moved offices', locaton: 'Suite 200' } }, { 'idempotency-key': 'k-typo' });
      expect(res.statusCode).toBe(422);
      expect(res.json()).toMatchObject({ code: 'UNKNOWN_FIELD' });
      expect(res.json().detail).toContain('"locaton"');
      const [counted] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(outboundWrites);
      expect(counted!.n).toBe(0);
    });
  });

  it("HubSpot: a staff touch that changes nothing on a contact the bridge created is not delivered, though HubSpot's create answer leaves out properties it wrote", async () => {
    const hubspot = { connector: 'hubspot', inbound: { object: 'contacts' }, poll: { objects: ['contacts'] } };
    await withBridge(
      async (app, sandbox) => {
        const fields = { firstName: 'Grace', lastName: 'Hopper', email: 'grace@example.com', phone: '+1 555 0100', jobTitle: 'Rear Admiral' };
        const res = await post(app, { object: 'contacts', externalId: 'lead-gh', fields }, { 'idempotency-key': 'k-hubspot' });
        const { outboundId } = res.json();
        await tickUntilSettled(app, outboundId);
        const { crmId, state } = (await status(app, outboundId)).json();
        expect(state).toBe('sent');
        // Staff open and save the contact: lastmodifieddate moves, nothing the bridge maps changes.
        sandbox.state.setClock({ advanceSeconds: 5 });
        sandbox.state.updateRecord('contacts', Number(crmId), {});
        const read = await fetch(`${sandbox.url}/crm/v3/objects/contacts/${crmId}?properties=${presetProperties}`, { headers: { authorization: `Bearer ${sandbox.state.issueToken().access_token}` } });
        const record = (await read.json()) as { properties: Record<string, string | null> };
        expect(record.properties).toMatchObject({ phone: '+1 555 0100', jobtitle: 'Rear Admiral' });
        const hook = await app.inject({ method: 'POST', url: '/hooks/firm', headers: { authorization: 'Bearer hook-secret-0123456789abcdef', 'content-type': 'application/json' }, payload: JSON.stringify({ data: record }) });
        expect(hook.json()).toMatchObject({ status: 'unchanged' });
      },
      undefined,
      hubspot,
    );
  });

  it('clears a matter\'s practice area when the pipeline writes practiceAreaId null, sending the relation as null rather than {id: null}', async () => {
    await withBridge(async (app, sandbox) => {
      const matter = sandbox.state.store.matters.items.find((m) => m.practiceAreaId !== null)!;
      const res = await post(app, { object: 'matters', externalId: 'lead-pa', crmId: String(matter.id), fields: { practiceAreaId: null } }, { 'idempotency-key': 'k-no-area' });
      const { outboundId } = res.json();
      await tickUntilSettled(app, outboundId);
      expect((await status(app, outboundId)).json()).toMatchObject({ state: 'sent', lastError: null });
      expect(sandbox.state.renderFull('matters', matter.id)!.practice_area).toBeNull();
    });
  });

  it('shows a permanent CRM refusal on the write and in /health, without retrying it', async () => {
    await withBridge(async (app, sandbox) => {
      // The sandbox refuses a matter without a description (422).
      const res = await post(app, { ...lead, fields: { status: 'Open', clientId: 100000001 } }, { 'idempotency-key': 'k-bad' });
      const { outboundId } = res.json();
      await tickUntilSettled(app, outboundId);
      const shown = (await status(app, outboundId)).json();
      expect(shown).toMatchObject({ state: 'failed', attempts: 1, lastStatus: 422 });
      expect(shown.lastError).toMatch(/422/);
      const health = (await app.inject('/health')).json();
      expect(health.connections[0].outbound).toEqual({ pending: 0, failed: 1 });
      expect(sandbox.state.requestLog.list().filter((r) => r.method === 'POST' && r.path.includes('matters'))).toHaveLength(1);
    });
  });

  it('retries a create the CRM answered with 503 until it succeeds, and creates the record once', async () => {
    let failures = 0;
    const proxy = await startFaultProxy({ fail: (req) => (req.method === 'POST' && req.url!.startsWith('/api/v4/matters.json') && failures++ < 2 ? 503 : undefined) });
    try {
      await withBridge(async (app, sandbox) => {
        proxy.setTarget(sandbox.url);
        const before = sandbox.state.store.matters.items.length;
        const { outboundId } = (await post(app, lead, { 'idempotency-key': 'k-retry' })).json();
        await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
        const afterFirst = (await status(app, outboundId)).json();
        expect(afterFirst).toMatchObject({ state: 'pending', attempts: 1, lastStatus: 503 });
        await tickUntilSettled(app, outboundId);
        expect((await status(app, outboundId)).json()).toMatchObject({ state: 'sent', attempts: 3, lastError: null });
        expect(sandbox.state.store.matters.items.length).toBe(before + 1);
        expect((await app.inject('/health')).json().connections[0].outbound).toEqual({ pending: 0, failed: 0 });
      }, proxy.url);
    } finally {
      await proxy.close();
    }
  });

  it('holds a write while the connection needs re-authorisation, without using up attempts, shows it waiting, and makes it once re-authorised', async () => {
    await withBridge(
      async (app, sandbox) => {
        const tokens = app.tokens.manager('firm')!;
        await authorise(tokens);
        // The grant is revoked and the access token dies: the create's 401 ends in invalid_grant.
        sandbox.state.revokeTokens();
        sandbox.state.expireAccessTokens();
        const before = sandbox.state.store.matters.items.length;
        const { outboundId } = (await post(app, lead, { 'idempotency-key': 'k-reauth' })).json();
        const writer = app.outboundWriters.get('firm')!;
        // Three times maxAttempts: each tick finds the connection still waiting for an operator.
        const more: boolean[] = [];
        for (let i = 0; i < 9; i++) more.push(await writer.tick(new AbortController().signal));

        const waiting = (await status(app, outboundId)).json();
        expect(waiting).toMatchObject({ state: 'pending', attempts: 0, crmId: null });
        expect(waiting.lastError).toMatch(/needs re-authorisation/);
        expect(more).not.toContain(true);
        const health = await app.inject('/health');
        expect(health.statusCode).toBe(503);
        expect(health.json().connections[0]).toMatchObject({ auth: { state: 'needs_reauth' }, outbound: { pending: 1, failed: 0 } });
        expect((await post(app, lead, { 'idempotency-key': 'k-reauth' })).statusCode).toBe(409);
        expect(sandbox.state.store.matters.items.length).toBe(before);

        await authorise(tokens);
        await tickUntilSettled(app, outboundId);
        expect((await status(app, outboundId)).json()).toMatchObject({ state: 'sent', attempts: 1, lastError: null });
        expect(sandbox.state.store.matters.items.length).toBe(before + 1);
        expect((await post(app, lead, { 'idempotency-key': 'k-reauth' })).json()).toEqual({ outboundId, status: 'sent' });
      },
      undefined,
      // One write a tick: a full batch given back must not make the writer claim again at once.
      { auth: oauthAuth(), outbound: { apiKeys: [API_KEY], concurrency: 1, maxAttempts: 3, backoff: { base: '1ms', max: '5ms' } } },
    );
  });

  it('makes a create again after an unanswered attempt when the object has no list call to look for it in', async () => {
    // The clio preset with matters fed by hooks only; the poll lists contacts.
    const hooksOnly = structuredClone(presets.clio!) as { objects: Record<string, Record<string, unknown>> };
    delete hooksOnly.objects.matters!.list;
    const proxy = await startFaultProxy({ answer: loseFirstCreateAnswer('/api/v4/matters.json') });
    try {
      await withBridge(
        async (app, sandbox) => {
          proxy.setTarget(sandbox.url);
          const { outboundId } = (await post(app, lead, { 'idempotency-key': 'k-no-list' })).json();
          await tickUntilSettled(app, outboundId);
          const shown = (await status(app, outboundId)).json();
          expect(shown).toMatchObject({ state: 'sent', attempts: 2, lastError: null });
          // At least once: the lost attempt's record and this one, both stamped with the write's id.
          const made = sandbox.state.store.matters.items.filter((m) => m.clientReference === `crm-bridge:${outboundId}`);
          expect(made.map((m) => String(m.id))).toContain(shown.crmId);
          expect(made).toHaveLength(2);
        },
        proxy.url,
        { connector: hooksOnly, poll: { objects: ['contacts'] } },
      );
    } finally {
      await proxy.close();
    }
  });
});

describe('Clio contacts: email and phone, read at primary_email_address and primary_phone_number, written through email_addresses and phone_numbers', () => {
  const contactLead = { object: 'contacts', externalId: 'lead-c1', fields: { firstName: 'Ada', lastName: 'Lovelace', type: 'Person', email: 'ada@example.com', phone: '+1 555 010 0000' } };

  type SandboxOf = Parameters<Parameters<typeof withBridge>[0]>[1];

  /** The contact as Clio's API shows it, with its nested lists. */
  async function readContact(sandbox: SandboxOf, id: number | string) {
    const fields = 'id,title,primary_email_address,primary_phone_number,email_addresses{name,address,primary},phone_numbers{name,number,primary}';
    const res = await fetch(`${sandbox.url}/api/v4/contacts/${id}.json?fields=${encodeURIComponent(fields)}`, { headers: { authorization: `Bearer ${sandbox.state.issueToken().access_token}` } });
    return ((await res.json()) as { data: Record<string, unknown> }).data;
  }

  /** What the bridge delivered for a CRM-born contact its hook announced. */
  async function deliverContact(app: FastifyInstance, sandbox: SandboxOf, id: number): Promise<Record<string, unknown>> {
    const hook = await app.inject({
      method: 'POST',
      url: '/hooks/firm?object=contacts',
      headers: { authorization: 'Bearer hook-secret-0123456789abcdef', 'content-type': 'application/json' },
      payload: JSON.stringify({ data: sandbox.state.renderFull('contacts', id) }),
    });
    expect(hook.json()).toMatchObject({ status: 'accepted' });
    const [body] = await db.select({ fields: ledgerBodies.fields }).from(ledgerBodies).where(eq(ledgerBodies.eventId, hook.json().eventId));
    return body!.fields!;
  }

  const contactWrites = (sandbox: SandboxOf, method: 'POST' | 'PATCH') =>
    sandbox.state.requestLog.list({ method, pathPrefix: '/api/v4/contacts' }).map((r) => (r.body as { data: Record<string, unknown> }).data);

  it('creates a lead contact with its email and phone, sent as the default Work entries of email_addresses and phone_numbers', async () => {
    await withBridge(async (app, sandbox) => {
      const res = await post(app, contactLead, { 'idempotency-key': 'k-contact' });
      expect(res.statusCode).toBe(202);
      await tickUntilSettled(app, res.json().outboundId);
      const shown = (await status(app, res.json().outboundId)).json();
      expect(shown).toMatchObject({ state: 'sent', lastError: null });

      expect(contactWrites(sandbox, 'POST')).toEqual([
        {
          first_name: 'Ada',
          last_name: 'Lovelace',
          type: 'Person',
          email_addresses: [{ name: 'Work', address: 'ada@example.com', default_email: true }],
          phone_numbers: [{ name: 'Work', number: '+1 555 010 0000', default_number: true }],
        },
      ]);
      expect(await readContact(sandbox, shown.crmId)).toMatchObject({
        primary_email_address: 'ada@example.com',
        primary_phone_number: '+1 555 010 0000',
        email_addresses: [{ name: 'Work', address: 'ada@example.com', primary: true }],
        phone_numbers: [{ name: 'Work', number: '+1 555 010 0000', primary: true }],
      });
    });
  });

  it('refuses email: null on an update with a 422 naming the field, writing nothing, as Clio removes an address only by its entry id', async () => {
    await withBridge(async (app, sandbox) => {
      const contact = sandbox.state.store.contacts.items[0]!;
      const before = await readContact(sandbox, contact.id);
      expect(before.primary_email_address).toEqual(expect.any(String));
      const res = await post(app, { object: 'contacts', externalId: 'lead-c2', crmId: String(contact.id), fields: { title: 'Director', email: null } }, { 'idempotency-key': 'k-clear' });
      expect(res.statusCode).toBe(422);
      expect(res.headers['content-type']).toMatch(/application\/problem\+json/);
      expect(res.json()).toMatchObject({ code: 'FIELD_NOT_CLEARABLE', detail: expect.stringContaining('"email"') });
      const [counted] = await db.select({ n: sql<number>`count(*)`.mapWith(Number) }).from(outboundWrites);
      expect(counted!.n).toBe(0);
      await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
      expect(contactWrites(sandbox, 'PATCH')).toEqual([]);
      expect(await readContact(sandbox, contact.id)).toEqual(before);
    });
  });

  it('takes a null email or phone where there is nothing to clear: on a create, or handed back for a contact delivered without one', async () => {
    await withBridge(async (app, sandbox) => {
      const created = await post(app, { ...contactLead, fields: { ...contactLead.fields, phone: null } }, { 'idempotency-key': 'k-no-phone' });
      expect(created.statusCode).toBe(202);
      await tickUntilSettled(app, created.json().outboundId);
      const { crmId } = (await status(app, created.json().outboundId)).json();
      expect(await readContact(sandbox, crmId)).toMatchObject({ primary_email_address: 'ada@example.com', primary_phone_number: null, phone_numbers: [] });

      const contact = sandbox.state.store.contacts.items[1]!;
      sandbox.state.updateRecord('contacts', contact.id, { phone_numbers: [] });
      const delivered = await deliverContact(app, sandbox, contact.id);
      expect(delivered.phone).toBeNull();
      const update = await post(app, { object: 'contacts', externalId: 'crm-c', crmId: String(contact.id), fields: { ...delivered, title: 'Partner' } }, { 'idempotency-key': 'k-null-back' });
      expect(update.statusCode).toBe(202);
      await tickUntilSettled(app, update.json().outboundId);
      expect(contactWrites(sandbox, 'PATCH')).toEqual([{ first_name: delivered.firstName, last_name: delivered.lastName, type: delivered.type, title: 'Partner' }]);

      // Staff give the contact a phone since: the same request is still answered as it was, not refused.
      sandbox.state.updateRecord('contacts', contact.id, { phone_numbers: [{ name: 'Mobile', number: '+1 555 010 0001', default_number: true }] });
      expect((await deliverContact(app, sandbox, contact.id)).phone).toBe('+1 555 010 0001');
      const again = await post(app, { object: 'contacts', externalId: 'crm-c', crmId: String(contact.id), fields: { ...delivered, title: 'Partner' } }, { 'idempotency-key': 'k-null-back' });
      expect(again.statusCode).toBe(202);
      expect(again.json()).toEqual({ outboundId: update.json().outboundId, status: 'sent' });
    });
  });

  it('leaves an email or phone the contact already shows out of an update, so Clio adds no second entry, and sends a new one', async () => {
    await withBridge(async (app, sandbox) => {
      // A CRM-born contact as delivered, handed back by the pipeline with a new title.
      const contact = sandbox.state.store.contacts.items[2]!;
      const delivered = await deliverContact(app, sandbox, contact.id);
      expect(delivered).toMatchObject({ email: expect.any(String), phone: expect.any(String) });
      const titled = await post(app, { object: 'contacts', externalId: 'crm-c', crmId: String(contact.id), fields: { ...delivered, title: 'Partner' } }, { 'idempotency-key': 'k-title' });
      expect(titled.statusCode).toBe(202);
      await tickUntilSettled(app, titled.json().outboundId);
      expect((await status(app, titled.json().outboundId)).json()).toMatchObject({ state: 'sent' });
      expect(contactWrites(sandbox, 'PATCH')).toEqual([{ first_name: delivered.firstName, last_name: delivered.lastName, type: delivered.type, title: 'Partner' }]);
      // The same request again is the same write, though what it sends was decided by what the bridge knew.
      expect((await post(app, { object: 'contacts', externalId: 'crm-c', crmId: String(contact.id), fields: { ...delivered, title: 'Partner' } }, { 'idempotency-key': 'k-title' })).json()).toEqual({ outboundId: titled.json().outboundId, status: 'sent' });

      // A new address is written, and becomes the primary one.
      sandbox.state.requestLog.clear();
      const moved = await post(app, { object: 'contacts', externalId: 'crm-c', crmId: String(contact.id), fields: { email: 'new.address@example.com', title: 'Partner' } }, { 'idempotency-key': 'k-new-email' });
      await tickUntilSettled(app, moved.json().outboundId);
      expect(contactWrites(sandbox, 'PATCH')).toEqual([{ title: 'Partner', email_addresses: [{ name: 'Work', address: 'new.address@example.com', default_email: true }] }]);
      expect(await readContact(sandbox, contact.id)).toMatchObject({ primary_email_address: 'new.address@example.com', primary_phone_number: delivered.phone });

      // Handing back only what the contact shows leaves nothing to send.
      sandbox.state.requestLog.clear();
      const same = await post(app, { object: 'contacts', externalId: 'crm-c', crmId: String(contact.id), fields: { email: 'new.address@example.com', phone: delivered.phone } }, { 'idempotency-key': 'k-same-email' });
      expect(same.statusCode).toBe(200);
      expect(same.json()).toMatchObject({ status: 'skipped' });
      await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
      expect(contactWrites(sandbox, 'PATCH')).toEqual([]);
    });
  });

  it("leaves a lead's own email out of the pipeline's later update of the contact it created, though the bridge never delivered that contact", async () => {
    await withBridge(async (app, sandbox) => {
      const created = await post(app, contactLead, { 'idempotency-key': 'k-lead' });
      await tickUntilSettled(app, created.json().outboundId);
      const { crmId } = (await status(app, created.json().outboundId)).json();
      const update = await post(app, { object: 'contacts', externalId: 'lead-c1', crmId, fields: { ...contactLead.fields, title: 'Countess' } }, { 'idempotency-key': 'k-lead-title' });
      expect(update.statusCode).toBe(202);
      await tickUntilSettled(app, update.json().outboundId);
      expect(contactWrites(sandbox, 'PATCH')).toEqual([{ first_name: 'Ada', last_name: 'Lovelace', type: 'Person', title: 'Countess' }]);
      expect(await readContact(sandbox, crmId)).toMatchObject({ title: 'Countess', email_addresses: [{ address: 'ada@example.com' }], phone_numbers: [{ number: '+1 555 010 0000' }] });
    });
  });
});

describe('HubSpot contacts: every property is text, cleared by an empty string', () => {
  const hubspot = { connector: 'hubspot', inbound: { object: 'contacts' }, poll: { objects: ['contacts'] } };
  const hookSecret = 'Bearer hook-secret-0123456789abcdef';

  async function readContact(sandbox: Awaited<ReturnType<typeof startBridge>>['sandbox'], id: string | number) {
    const res = await fetch(`${sandbox.url}/crm/v3/objects/contacts/${id}?properties=${presetProperties}`, { headers: { authorization: `Bearer ${sandbox.state.issueToken().access_token}` } });
    return (await res.json()) as { properties: Record<string, string | null> };
  }

  it('clears a property the pipeline writes null, sending the empty string HubSpot clears with (it answers a null 200 and keeps the value)', async () => {
    await withBridge(
      async (app, sandbox) => {
        const contact = sandbox.state.store.contacts.items[0]!;
        expect((await readContact(sandbox, contact.id)).properties.phone).toBeTruthy();
        const res = await post(app, { object: 'contacts', externalId: 'lead-clear', crmId: String(contact.id), fields: { phone: null } }, { 'idempotency-key': 'k-clear' });
        const { outboundId } = res.json();
        await tickUntilSettled(app, outboundId);
        expect((await status(app, outboundId)).json()).toMatchObject({ state: 'sent', lastError: null });
        expect((await readContact(sandbox, contact.id)).properties.phone).toBe('');
      },
      undefined,
      hubspot,
    );
  });

  it('takes the hook of properties the pipeline cleared (with null or ""), which HubSpot reads back as "", for the write\'s echo when it comes before the answer', async () => {
    let hookAnswer: { status?: string } | undefined;
    let contactId = 0;
    const proxy = await startFaultProxy({
      // HubSpot's workflow fires on the change before the PATCH answer reaches the bridge.
      answer: async (req) => {
        if (req.method !== 'PATCH' || hookAnswer !== undefined) return false;
        const record = await readContact(bridgeSandbox!, contactId);
        const hook = await bridgeApp!.inject({ method: 'POST', url: '/hooks/firm', headers: { authorization: hookSecret, 'content-type': 'application/json' }, payload: JSON.stringify({ data: record }) });
        hookAnswer = hook.json();
        return false;
      },
    });
    let bridgeApp: FastifyInstance | undefined;
    let bridgeSandbox: Awaited<ReturnType<typeof startBridge>>['sandbox'] | undefined;
    try {
      await withBridge(
        async (app, sandbox) => {
          bridgeApp = app;
          bridgeSandbox = sandbox;
          proxy.setTarget(sandbox.url);
          contactId = sandbox.state.store.contacts.items[1]!.id;
          const res = await post(app, { object: 'contacts', externalId: 'lead-clear-2', crmId: String(contactId), fields: { jobTitle: '', phone: null } }, { 'idempotency-key': 'k-clear-echo' });
          await tickUntilSettled(app, res.json().outboundId);
          expect((await readContact(sandbox, contactId)).properties).toMatchObject({ phone: '', jobtitle: '' });
          expect(hookAnswer).toMatchObject({ status: 'echo' });
        },
        proxy.url,
        hubspot,
      );
    } finally {
      await proxy.close();
    }
  });

  it('finds the contact a create whose answer was lost made, a phone written as a number being read back as text, instead of creating it twice', async () => {
    let lost = 0;
    const proxy = await startFaultProxy({
      // The first create reaches HubSpot; its answer never reaches the bridge.
      answer: async (req, res) => {
        if (req.method !== 'POST' || req.url !== '/crm/v3/objects/contacts' || lost++ > 0) return false;
        res.destroy();
        return true;
      },
    });
    try {
      await withBridge(
        async (app, sandbox) => {
          proxy.setTarget(sandbox.url);
          sandbox.state.setSwitches({ hubspotSearchPerSecond: null });
          const before = sandbox.state.store.contacts.items.length;
          const fields = { firstName: 'Ada', lastName: 'Lovelace', phone: 5550100 };
          const { outboundId } = (await post(app, { object: 'contacts', externalId: 'lead-num', fields }, { 'idempotency-key': 'k-num' })).json();
          await tickUntilSettled(app, outboundId);
          const shown = (await status(app, outboundId)).json();
          expect(shown).toMatchObject({ state: 'sent', attempts: 2, lastError: null });
          expect(sandbox.state.store.contacts.items.length).toBe(before + 1);
          expect((await readContact(sandbox, shown.crmId)).properties).toMatchObject({ firstname: 'Ada', phone: '5550100' });
        },
        proxy.url,
        hubspot,
      );
    } finally {
      await proxy.close();
    }
  });
});
