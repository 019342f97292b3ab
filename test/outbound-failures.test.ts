import { setTimeout as sleep } from 'node:timers/promises';
import { desc, eq } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { ledger, outbox, outboundWrites } from '../src/db/schema/index.js';
import { pollStream } from '../src/sync/poller.js';
import { authorise, oauthAuth } from './fixtures/token-helpers.js';
import { SECRET } from './helpers/app.js';
import { startBridge } from './helpers/bridge.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';
import { loseFirstCreateAnswer, startFaultProxy, type FaultProxyOptions } from './helpers/fault-proxy.js';

const API_KEY = 'pipeline-api-key-0123456789';
const database = await createTestDatabase();
const { db } = database;
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

const lead = { object: 'matters', externalId: 'lead-1', fields: { description: 'Intake lead', status: 'Open', clientId: 100000001 } };

function post(app: FastifyInstance, body: unknown, key: string) {
  return app.inject({
    method: 'POST',
    url: '/v1/connections/firm/records',
    headers: { authorization: `Bearer ${API_KEY}`, 'content-type': 'application/json', 'idempotency-key': key },
    payload: JSON.stringify(body),
  });
}

const write = async (id: string) => (await db.select().from(outboundWrites).where(eq(outboundWrites.id, id)))[0]!;

async function tickUntilSettled(app: FastifyInstance, id: string) {
  for (let i = 0; i < 200; i++) {
    await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
    if ((await write(id)).state !== 'pending') return;
    await sleep(2);
  }
  throw new Error(`write ${id} still pending`);
}

type Sandbox = Awaited<ReturnType<typeof startBridge>>['sandbox'];

/**
 * The bridge reaching the sandbox CRM through a fault proxy, with no automation rule: no hook
 * brings a create's echo (as when the CRM's automation drops it), so only a look-up can find it.
 */
async function throughProxy(faults: FaultProxyOptions, run: (app: FastifyInstance, sandbox: Sandbox) => Promise<void>, maxAttempts = 5) {
  const proxy = await startFaultProxy(faults);
  try {
    const bridge = await startBridge({
      database,
      sandbox: { autoApprove: true },
      connection: { baseUrl: proxy.url, outbound: { apiKeys: [API_KEY], maxAttempts, backoff: { base: '1ms', max: '5ms' } } },
    });
    try {
      proxy.setTarget(bridge.sandbox.url);
      await run(bridge.app, bridge.sandbox);
    } finally {
      await bridge.close();
    }
  } finally {
    await proxy.close();
  }
}

const isCreate = (req: { method?: string | undefined; url?: string | undefined }) => req.method === 'POST' && req.url!.startsWith('/api/v4/matters.json');
const isListing = (req: { method?: string | undefined; url?: string | undefined }) => req.method === 'GET' && req.url!.startsWith('/api/v4/matters.json');
const madeFor = (sandbox: Sandbox, outboundId: string) => sandbox.state.store.matters.items.filter((m) => m.clientReference === `crm-bridge:${outboundId}`);

/**
 * A proxy answer that loses the first create's answer (the CRM made the record), after which the
 * CRM answers the look-up's listing with `status` (every in-call retry too) `times` times.
 */
function lostCreateThenListing(status: number, times: number) {
  const lose = loseFirstCreateAnswer('/api/v4/matters.json');
  const seen = { createLost: false, listFailures: 0 };
  const faults: FaultProxyOptions = {
    fail: (req) => (seen.createLost && isListing(req) && seen.listFailures++ < times ? status : undefined),
    answer: async (req, res, text) => {
      const lost = await lose(req, res, text);
      if (lost) seen.createLost = true;
      return lost;
    },
  };
  return { faults, seen };
}

describe('a pipeline create whose attempt may have reached the CRM', () => {
  it('makes the lead once when the CRM made it but its gateway answered 502', async () => {
    let first = true;
    const faults: FaultProxyOptions = {
      answer: async (req, res) => {
        if (!isCreate(req) || !first) return false;
        first = false;
        res.writeHead(502, { 'content-type': 'application/json' }).end('{"error":{"message":"bad gateway"}}');
        return true;
      },
    };
    await throughProxy(faults, async (app, sandbox) => {
      const { outboundId } = (await post(app, lead, 'k-502')).json();
      await tickUntilSettled(app, outboundId);
      const made = madeFor(sandbox, outboundId);
      expect(made).toHaveLength(1);
      expect(await write(outboundId)).toMatchObject({ state: 'sent', attempts: 2, crmId: String(made[0]!.id) });
    });
  }, 30_000);

  it('makes the lead once when the CRM answered 201 but the connection broke mid-answer', async () => {
    let first = true;
    const faults: FaultProxyOptions = {
      answer: async (req, res, text) => {
        if (!isCreate(req) || !first) return false;
        first = false;
        res.writeHead(201, { 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(text) + 100) });
        res.write(text.slice(0, 10));
        await sleep(20);
        res.destroy();
        return true;
      },
    };
    await throughProxy(faults, async (app, sandbox) => {
      const { outboundId } = (await post(app, lead, 'k-cut')).json();
      await tickUntilSettled(app, outboundId);
      expect(madeFor(sandbox, outboundId)).toHaveLength(1);
    });
  }, 30_000);

  it('makes the lead once when the bridge was stopped while the CRM was making it, and shows the stopped attempt', async () => {
    let stop: () => void = () => {};
    let first = true;
    const faults: FaultProxyOptions = {
      answer: async (req) => {
        if (!isCreate(req) || !first) return false;
        first = false;
        // The CRM made the record; the bridge shuts down (SIGTERM, a rolling deploy) before the answer reaches it.
        stop();
        await sleep(50);
        return false;
      },
    };
    await throughProxy(faults, async (app, sandbox) => {
      const { outboundId } = (await post(app, lead, 'k-stop')).json();
      const controller = new AbortController();
      stop = () => controller.abort();
      await app.outboundWriters.get('firm')!.tick(controller.signal);
      // The attempt counts and is due again at once, for whichever writer runs next.
      const stopped = await write(outboundId);
      expect(stopped).toMatchObject({ state: 'pending', attempts: 1, lastStatus: null, leaseOwner: null });
      expect(stopped.lastError).toMatch(/stopped during its CRM call/);
      expect(stopped.nextAttemptAt.getTime()).toBeLessThanOrEqual(Date.now());

      await tickUntilSettled(app, outboundId);
      expect(madeFor(sandbox, outboundId)).toHaveLength(1);
    });
  }, 30_000);

  it('makes the lead once when the look-up for a lost create fails once with 503', async () => {
    const { faults, seen } = lostCreateThenListing(503, 5);
    await throughProxy(faults, async (app, sandbox) => {
      const { outboundId } = (await post(app, lead, 'k-search-503')).json();
      await tickUntilSettled(app, outboundId);
      expect(seen.listFailures).toBeGreaterThanOrEqual(5);
      expect(madeFor(sandbox, outboundId)).toHaveLength(1);
    });
  }, 60_000);

  it('makes the lead once when the look-up for a lost create is refused with 429: that says nothing of the record', async () => {
    const { faults, seen } = lostCreateThenListing(429, 5);
    await throughProxy(faults, async (app, sandbox) => {
      const { outboundId } = (await post(app, lead, 'k-search-429')).json();
      await tickUntilSettled(app, outboundId);
      expect(seen.listFailures).toBeGreaterThanOrEqual(5);
      expect(madeFor(sandbox, outboundId)).toHaveLength(1);
    });
  }, 60_000);

  it('does not look before retrying a create the CRM refused with 429: nothing was made', async () => {
    let refused = 0;
    const faults: FaultProxyOptions = { fail: (req) => (isCreate(req) && refused++ < 5 ? 429 : undefined) };
    await throughProxy(faults, async (app, sandbox) => {
      const { outboundId } = (await post(app, lead, 'k-create-429')).json();
      await tickUntilSettled(app, outboundId);
      expect(madeFor(sandbox, outboundId)).toHaveLength(1);
      expect(sandbox.state.requestLog.list({ method: 'GET', pathPrefix: '/api/v4/matters.json' })).toEqual([]);
    });
  }, 60_000);
});

describe('a pipeline create given up on after it may have reached the CRM', () => {
  it('shows failed, then recognises the lead it made as its own when the poll finds it, and shows it sent', async () => {
    const { faults } = lostCreateThenListing(503, 5);
    await throughProxy(
      faults,
      async (app, sandbox) => {
        const { outboundId } = (await post(app, lead, 'k-given-up')).json();
        await tickUntilSettled(app, outboundId);
        expect(await write(outboundId)).toMatchObject({ state: 'failed', crmId: null });
        // The first attempt did make the lead, carrying this write's id in its marker.
        const [made] = madeFor(sandbox, outboundId);
        expect(made).toBeDefined();
        const crmId = String(made!.id);

        // The poll finds it: the bridge's own write, not a new lead for the pipeline.
        expect((await pollStream(app.poller.stream('firm', 'matters'))).status).toBe('ok');
        expect(await db.select({ disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId))).toEqual([{ disposition: 'echo' }]);
        expect(await db.select().from(outbox).where(eq(outbox.crmId, crmId))).toEqual([]);
        expect(await write(outboundId)).toMatchObject({ state: 'sent', crmId, lastError: null });
        const health = (await app.inject('/health')).json();
        expect(health.connections[0].outbound).toEqual({ pending: 0, failed: 0 });
      },
      2,
    );
  }, 60_000);
});

describe('a pipeline write the CRM asks to leave alone for longer than one call waits (Retry-After)', () => {
  const ONE_DAY_MS = 86_400_000;
  /** How long the write was put off: both stamps are the database's now() of one statement. */
  const heldFor = (row: { nextAttemptAt: Date; updatedAt: Date }) => row.nextAttemptAt.getTime() - row.updatedAt.getTime();

  it("waits out a 429's Retry-After of an hour before trying the create again, instead of being refused until it shows failed, and then makes it once", async () => {
    let refused = 0;
    const faults: FaultProxyOptions = { fail: (req) => (isCreate(req) && refused++ < 1 ? { status: 429, headers: { 'retry-after': '3600' } } : undefined) };
    await throughProxy(faults, async (app, sandbox) => {
      const { outboundId } = (await post(app, lead, 'k-429-hour')).json();
      await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
      const held = await write(outboundId);
      expect(held).toMatchObject({ state: 'pending', attempts: 1, lastStatus: 429 });
      expect(heldFor(held)).toBeGreaterThanOrEqual(3_600_000);

      // The hour is up: the write is made, once.
      await db.update(outboundWrites).set({ nextAttemptAt: new Date(0) }).where(eq(outboundWrites.id, outboundId));
      await tickUntilSettled(app, outboundId);
      expect(await write(outboundId)).toMatchObject({ state: 'sent', attempts: 2 });
      expect(madeFor(sandbox, outboundId)).toHaveLength(1);
    });
  }, 60_000);

  it("waits out a 503's Retry-After (a maintenance), but no longer than a day however long the CRM asks", async () => {
    const faults: FaultProxyOptions = { fail: (req) => (isCreate(req) ? { status: 503, headers: { 'retry-after': String(10 * 365 * 86_400) } } : undefined) };
    await throughProxy(faults, async (app) => {
      const { outboundId } = (await post(app, lead, 'k-503-years')).json();
      await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
      const held = await write(outboundId);
      expect(held).toMatchObject({ state: 'pending', attempts: 1, lastStatus: 503 });
      expect(heldFor(held)).toBe(ONE_DAY_MS);
    });
  }, 60_000);
});

describe('a pipeline update the CRM made but answered with more than the bridge reads', () => {
  it("sends it once, shows it sent, and takes the poll's sighting of the record as its echo", async () => {
    let patches = 0;
    const faults: FaultProxyOptions = {
      // The sandbox has made the update; the answer declares 17 MiB, past the 16 MiB read.
      answer: async (req, res) => {
        if (req.method !== 'PATCH') return false;
        patches++;
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': String(17 * 1024 * 1024) });
        res.flushHeaders();
        await sleep(20);
        res.destroy();
        return true;
      },
    };
    await throughProxy(faults, async (app, sandbox) => {
      const crmId = String(sandbox.state.store.matters.items[0]!.id);
      const { outboundId } = (await post(app, { object: 'matters', externalId: 'lead-7', crmId, fields: { description: 'Updated at intake' } }, 'k-too-large')).json();
      await tickUntilSettled(app, outboundId);
      expect(patches).toBe(1);
      expect(await write(outboundId)).toMatchObject({ state: 'sent', attempts: 1, crmId });
      expect(sandbox.state.store.matters.items[0]!.description).toBe('Updated at intake');

      expect((await pollStream(app.poller.stream('firm', 'matters'))).status).toBe('ok');
      const [last] = await db.select({ disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId)).orderBy(desc(ledger.seq)).limit(1);
      expect(last).toEqual({ disposition: 'echo' });
      expect(patches).toBe(1);
    });
  }, 60_000);
});

describe("a pipeline update of a Clio contact's email whose attempt may have reached the CRM", () => {
  const newEmail = 'moved.address@example.com';
  const isContactPatch = (req: { method?: string | undefined; url?: string | undefined }, id: number) => req.method === 'PATCH' && req.url!.startsWith(`/api/v4/contacts/${id}.json`);
  const isContactRead = (req: { method?: string | undefined; url?: string | undefined }, id: number) => req.method === 'GET' && req.url!.startsWith(`/api/v4/contacts/${id}.json`);

  /** The contact as Clio's API shows it (asked of the sandbox itself, past the proxy), with its nested list of addresses. */
  async function readContact(sandbox: Sandbox, id: number) {
    const fields = 'id,title,primary_email_address,email_addresses{name,address,primary}';
    const res = await fetch(`${sandbox.url}/api/v4/contacts/${id}.json?fields=${encodeURIComponent(fields)}`, { headers: { authorization: `Bearer ${sandbox.state.issueToken().access_token}` } });
    return ((await res.json()) as { data: { title: string | null; primary_email_address: string | null; email_addresses: { name: string; address: string }[] } }).data;
  }

  const contactPatches = (sandbox: Sandbox, id: number) =>
    sandbox.state.requestLog.list({ method: 'PATCH', pathPrefix: `/api/v4/contacts/${id}.json` }).map((r) => (r.body as { data: Record<string, unknown> }).data);

  /**
   * The entries for `address` Clio holds after the updates the sandbox received: Clio adds one
   * for every `email_addresses` item sent without an id. (The sandbox keeps one address per
   * contact, so its record cannot show a second entry; what it was sent can.)
   */
  const entriesFor = (sandbox: Sandbox, id: number, address: string) =>
    contactPatches(sandbox, id).flatMap((data) => ((data.email_addresses ?? []) as Record<string, unknown>[]).filter((e) => e.id === undefined && e.address === address));

  /** The hook Clio's automation would send with the contact as it now stands: the write's echo, which the pipeline must not be delivered. */
  async function expectEchoNotDelivered(app: FastifyInstance, sandbox: Sandbox, id: number) {
    const hook = await app.inject({
      method: 'POST',
      url: '/hooks/firm?object=contacts',
      headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
      payload: JSON.stringify({ data: sandbox.state.renderFull('contacts', id) }),
    });
    expect(hook.json().status).not.toBe('accepted');
    const dispositions = await db.select({ disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, String(id)));
    expect(dispositions.map((d) => d.disposition)).not.toContain('accepted');
    expect(await db.select().from(outbox).where(eq(outbox.crmId, String(id)))).toEqual([]);
  }

  /** The proxy lets the contact's first PATCH reach the sandbox, which makes it, and answers the bridge 502. */
  function madeThen502(contactId: () => number): { answer: NonNullable<FaultProxyOptions['answer']>; patches: () => number } {
    let patches = 0;
    return {
      patches: () => patches,
      answer: async (req, res) => {
        if (!isContactPatch(req, contactId()) || patches++ > 0) return false;
        res.writeHead(502, { 'content-type': 'application/json' }).end('{"error":{"message":"bad gateway"}}');
        return true;
      },
    };
  }

  /** Ticks the writer until the write satisfies `done`. */
  async function tickUntil(app: FastifyInstance, id: string, done: (row: Awaited<ReturnType<typeof write>>) => boolean) {
    for (let i = 0; i < 200; i++) {
      await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
      if (done(await write(id))) return;
      await sleep(2);
    }
    throw new Error(`write ${id} never got there`);
  }

  it('gives the contact the new address once when Clio made the update but its gateway answered 502, resending only the plain field', async () => {
    let id = 0;
    // The sandbox has made the update (added the Work entry); the bridge hears a 502.
    const broken = madeThen502(() => id);
    await throughProxy({ answer: broken.answer }, async (app, sandbox) => {
      id = sandbox.state.store.contacts.items[0]!.id;
      const { outboundId } = (await post(app, { object: 'contacts', externalId: 'lead-c1', crmId: String(id), fields: { email: newEmail, title: 'Partner' } }, 'k-email-502')).json();
      await tickUntilSettled(app, outboundId);
      expect(entriesFor(sandbox, id, newEmail)).toEqual([{ name: 'Work', address: newEmail, default_email: true }]);
      const contact = await readContact(sandbox, id);
      expect(contact.email_addresses.filter((e) => e.address === newEmail)).toEqual([{ name: 'Work', address: newEmail, primary: true }]);
      expect(contact).toMatchObject({ primary_email_address: newEmail, title: 'Partner' });
      expect(broken.patches()).toBe(2);
      expect(contactPatches(sandbox, id)).toEqual([{ title: 'Partner', email_addresses: [{ name: 'Work', address: newEmail, default_email: true }] }, { title: 'Partner' }]);
      expect(await write(outboundId)).toMatchObject({ state: 'sent', attempts: 2, crmId: String(id) });
      await expectEchoNotDelivered(app, sandbox, id);
    });
  }, 60_000);

  it('sends nothing again when the update was only the email and the contact shows it: the write is sent, its record the echo', async () => {
    let broken = 0;
    let id = 0;
    const faults: FaultProxyOptions = {
      answer: async (req, res) => {
        if (!isContactPatch(req, id) || broken++ > 0) return false;
        res.destroy();
        return true;
      },
    };
    await throughProxy(faults, async (app, sandbox) => {
      id = sandbox.state.store.contacts.items[0]!.id;
      const { outboundId } = (await post(app, { object: 'contacts', externalId: 'lead-c1', crmId: String(id), fields: { email: newEmail } }, 'k-email-only')).json();
      await tickUntilSettled(app, outboundId);

      expect(entriesFor(sandbox, id, newEmail)).toHaveLength(1);
      expect(contactPatches(sandbox, id)).toHaveLength(1);
      expect((await readContact(sandbox, id)).email_addresses.filter((e) => e.address === newEmail)).toHaveLength(1);
      expect(await write(outboundId)).toMatchObject({ state: 'sent', attempts: 2, crmId: String(id) });
      expect(await db.select({ source: ledger.source }).from(ledger).where(eq(ledger.crmId, String(id)))).toEqual([{ source: 'outbound' }]);
      await expectEchoNotDelivered(app, sandbox, id);
    });
  }, 60_000);

  it('sends the email again when the first update was answered 503 without reaching Clio, and the contact has it once', async () => {
    let refused = 0;
    let id = 0;
    const faults: FaultProxyOptions = { fail: (req) => (isContactPatch(req, id) && refused++ === 0 ? 503 : undefined) };
    await throughProxy(faults, async (app, sandbox) => {
      id = sandbox.state.store.contacts.items[0]!.id;
      const { outboundId } = (await post(app, { object: 'contacts', externalId: 'lead-c1', crmId: String(id), fields: { email: newEmail, title: 'Partner' } }, 'k-email-503')).json();
      await tickUntilSettled(app, outboundId);

      expect(entriesFor(sandbox, id, newEmail)).toHaveLength(1);
      const reads = sandbox.state.requestLog.list({ method: 'GET', pathPrefix: `/api/v4/contacts/${id}.json` });
      const contact = await readContact(sandbox, id);
      expect(contact.email_addresses.filter((e) => e.address === newEmail)).toHaveLength(1);
      expect(contact.primary_email_address).toBe(newEmail);
      // The retry read the contact, found no new address, and sent it.
      expect(reads).toHaveLength(1);
      expect(contactPatches(sandbox, id)).toEqual([{ title: 'Partner', email_addresses: [{ name: 'Work', address: newEmail, default_email: true }] }]);
      expect(await write(outboundId)).toMatchObject({ state: 'sent', attempts: 2 });
    });
  }, 60_000);

  it('retries later, without sending, when reading the contact before the retry fails with 503, and gives it the new address once', async () => {
    let readFailures = 0;
    let id = 0;
    const broken = madeThen502(() => id);
    const faults: FaultProxyOptions = {
      // Every in-call retry of the read too: the attempt fails.
      fail: (req) => (broken.patches() > 0 && isContactRead(req, id) && readFailures++ < 5 ? 503 : undefined),
      answer: broken.answer,
    };
    await throughProxy(faults, async (app, sandbox) => {
      id = sandbox.state.store.contacts.items[0]!.id;
      const { outboundId } = (await post(app, { object: 'contacts', externalId: 'lead-c1', crmId: String(id), fields: { email: newEmail, title: 'Partner' } }, 'k-email-read-503')).json();
      await tickUntil(app, outboundId, (row) => row.attempts >= 2);
      const looked = await write(outboundId);
      expect(looked).toMatchObject({ state: 'pending', attempts: 2, lastStatus: null });
      expect(looked.lastError).toMatch(/looking at the record an earlier attempt may have updated/);
      expect(readFailures).toBeGreaterThanOrEqual(5);
      expect(contactPatches(sandbox, id)).toHaveLength(1);

      await tickUntilSettled(app, outboundId);
      expect(entriesFor(sandbox, id, newEmail)).toHaveLength(1);
      expect(await write(outboundId)).toMatchObject({ state: 'sent', attempts: 3 });
      expect(contactPatches(sandbox, id)).toEqual([{ title: 'Partner', email_addresses: [{ name: 'Work', address: newEmail, default_email: true }] }, { title: 'Partner' }]);
      expect((await readContact(sandbox, id)).email_addresses.filter((e) => e.address === newEmail)).toHaveLength(1);
    });
  }, 60_000);
});

describe('a staff edit while a pipeline write waits', () => {
  it("delivers a staff edit made while the pipeline's update waits for re-authorisation, though the record already shows the update's fields", async () => {
    const bridge = await startBridge({
      database,
      sandbox: { autoApprove: true },
      automation: { delayMs: 0 },
      connection: { auth: oauthAuth(), outbound: { apiKeys: [API_KEY], concurrency: 1, maxAttempts: 3, backoff: { base: '1ms', max: '5ms' } } },
    });
    try {
      const { app, sandbox } = bridge;
      await authorise(app.tokens.manager('firm')!);
      // The pipeline's lead, made by the bridge; its echo is recognised.
      const created = (await post(app, lead, 'k-create')).json();
      await tickUntilSettled(app, created.outboundId);
      await sandbox.state.automationIdle();
      const crmId = (await write(created.outboundId)).crmId!;

      // The connection needs re-authorisation: the pipeline's next update of its lead (its whole record again) waits.
      sandbox.state.revokeTokens();
      sandbox.state.expireAccessTokens();
      const update = await post(app, { ...lead, crmId }, 'k-update');
      expect(update.statusCode).toBe(202);
      await app.outboundWriters.get('firm')!.tick(new AbortController().signal);
      expect(await write(update.json().outboundId)).toMatchObject({ state: 'pending', attempts: 0 });

      // Meanwhile staff edit the lead in the CRM; hooks are still taken while auth is down.
      sandbox.state.updateRecord('matters', Number(crmId), { location: 'Room 4' });
      await sandbox.state.automationIdle();

      // The bridge has written nothing since the create: the staff edit is a real change for the pipeline.
      const rows = await db.select({ source: ledger.source, disposition: ledger.disposition }).from(ledger).where(eq(ledger.crmId, crmId));
      expect(rows).toContainEqual({ source: 'hook', disposition: 'accepted' });
      expect(await db.select().from(outbox).where(eq(outbox.crmId, crmId))).toHaveLength(1);
    } finally {
      await bridge.close();
    }
  }, 60_000);
});
