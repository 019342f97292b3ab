import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { loadConfig } from '../../src/config/load.js';
import { connectorDefinitionSchema } from '../../src/config/schema.js';
import { createConnector } from '../../src/crm/connector.js';
import type { Connector, ListPage } from '../../src/crm/connector.js';
import { presets } from '../../src/crm/presets/index.js';
import { startSandbox } from '../../src/sandbox/index.js';
import type { Sandbox } from '../../src/sandbox/index.js';
import { sandboxTokens } from './helpers.js';
import { startFaultProxy } from '../helpers/fault-proxy.js';
import { ConnectorError } from '../../src/crm/connector.js';

async function collect(pages: AsyncIterable<ListPage>): Promise<ListPage[]> {
  const out: ListPage[] = [];
  for await (const p of pages) out.push(p);
  return out;
}

const EPOCH = new Date(0);

describe('clio preset against the sandbox', () => {
  let sb: Sandbox;
  let clio: Connector;
  beforeAll(async () => {
    sb = await startSandbox({ records: 900 });
    clio = createConnector({ definition: connectorDefinitionSchema.parse(presets.clio), baseUrl: sb.url, tokens: sandboxTokens(sb), http: { retryBaseMs: 1 } });
  });
  beforeEach(() => sb.state.resetSwitches());
  afterAll(() => sb.close());

  it('loads from a connections file as `connector: clio` with a baseUrl override', () => {
    const config = loadConfig(
      { LOG_LEVEL: 'silent' },
      { connections: [{ id: 'firm', connector: 'clio', baseUrl: 'https://eu.app.clio.com', inbound: { secrets: ['0123456789abcdef0123'] } }] },
    );
    const conn = config.connections[0];
    expect(conn?.baseUrl).toBe('https://eu.app.clio.com');
    expect(conn?.connector.regionalHosts).toContain('https://au.app.clio.com');
    expect(Object.keys(conn?.connector.objects ?? {})).toEqual(['matters', 'contacts']);
  });

  it('lists every matter by following meta.paging.next in id order, with fields selected and practice_area nested', async () => {
    const since = sb.state.requestLog.lastSeq;
    const pages = await collect(clio.listChanges({ object: 'matters', since: EPOCH }));
    const ids = pages.flatMap((p) => p.records.map((r) => clio.mapRecord('matters', r).id));
    expect(ids).toEqual(sb.state.store.matters.items.map((m) => String(m.id)));
    expect(pages.length).toBeGreaterThan(2);
    expect(pages.every((p) => p.order === 'id')).toBe(true);
    expect(pages.at(-1)?.last).toBe(true);
    const first = sb.state.requestLog.list({ since, pathPrefix: '/api/v4/matters' })[0];
    expect(first?.query).toMatchObject({ order: 'id(asc)', limit: '200', updated_since: '1970-01-01T00:00:00.000Z' });
    expect(String(first?.query.fields)).toContain('practice_area{id,name}');
    const withArea = pages.flatMap((p) => p.records).find((r) => (r as { practice_area: unknown }).practice_area !== null);
    const mapped = clio.mapRecord('matters', withArea);
    expect(typeof mapped.fields.practiceArea).toBe('string');
    expect(mapped.fields.status).toMatch(/^(Open|Pending|Closed)$/);
    expect(mapped.version).toBe((withArea as { etag: string }).etag);
  });

  it('asks only for what changed since the given time', async () => {
    const target = sb.state.store.matters.items[5];
    const before = new Date(Date.now() - 1);
    sb.state.updateRecord('matters', target?.id ?? 0, { description: 'Changed for the poll' });
    const records = (await collect(clio.listChanges({ object: 'matters', since: before }))).flatMap((p) => p.records);
    expect(records.map((r) => clio.mapRecord('matters', r).fields.description)).toContain('Changed for the poll');
    expect(records.length).toBeLessThan(sb.state.store.matters.size);
  });

  it('stops a listing whose next-page link repeats one it already followed, instead of paging forever', async () => {
    // A cache in front of the CRM that answers every page link with the page it first saw there.
    const proxy = await startFaultProxy({
      target: sb.url,
      answer: async (req, res, text) => {
        if (!req.url!.includes('page_token')) return false;
        const body = JSON.parse(text) as { meta: { paging: { next?: string } } };
        body.meta.paging.next = `${proxy.url}${req.url}`;
        res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify(body));
        return true;
      },
    });
    try {
      const viaProxy = createConnector({ definition: connectorDefinitionSchema.parse(presets.clio), baseUrl: proxy.url, tokens: sandboxTokens(sb), http: { retryBaseMs: 1 } });
      const pages: ListPage[] = [];
      let error: unknown;
      try {
        for await (const page of viaProxy.listChanges({ object: 'matters', since: EPOCH })) if (pages.push(page) > 20) break;
      } catch (err) {
        error = err;
      }
      expect(error).toBeInstanceOf(ConnectorError);
      expect((error as ConnectorError).code).toBe('CONNECTOR_BAD_RESPONSE');
      expect((error as Error).message).toContain('repeats');
      expect(pages).toHaveLength(1);
    } finally {
      await proxy.close();
    }
  });

  it('lists all ids and versions for the sweep, matching the CRM', async () => {
    const seen: string[] = [];
    for await (const page of clio.listAll({ object: 'contacts' })) seen.push(...page.map((r) => r.id));
    const truth = (await (await fetch(`${sb.url}/_sandbox/records/contacts/ids`)).json()) as { ids: number[] };
    expect(seen).toEqual(truth.ids.map(String));
  });

  it('gets a record by id, and null for one that was hard-deleted', async () => {
    const id = String(sb.state.store.contacts.items[3]?.id);
    const rec = await clio.getRecord('contacts', id);
    expect(clio.mapRecord('contacts', rec).id).toBe(id);
    const gone = sb.state.store.contacts.items[4]?.id ?? 0;
    sb.state.deleteRecord('contacts', gone);
    expect(await clio.getRecord('contacts', String(gone))).toBeNull();
  });

  it('creates and updates matters in the data envelope, lowercasing status and stamping the origin marker on the create only', async () => {
    const client = sb.state.store.contacts.items[0]?.id;
    const body = clio.toRecord('matters', { description: 'Slip and fall intake', status: 'Pending', clientId: client, practiceArea: 'ignored: read-only' });
    expect(body).toEqual({ description: 'Slip and fall intake', status: 'Pending', client: { id: client } });
    const created = await clio.createRecord('matters', body, { writeId: 'w-1' });
    const mapped = clio.mapRecord('matters', created);
    expect(mapped.fields).toMatchObject({ description: 'Slip and fall intake', status: 'Pending', clientId: client, clientReference: 'crm-bridge:w-1' });
    expect(mapped.fromBridge).toBe(true);
    const updated = await clio.updateRecord('matters', mapped.id ?? '', { status: 'Closed' }, { writeId: 'w-2' });
    // An update does not stamp: the marker field keeps what the create put there.
    expect(clio.mapRecord('matters', updated).fields).toMatchObject({ status: 'Closed', clientReference: 'crm-bridge:w-1' });
    // A marker field of the bridge's own can be stamped on every write.
    const preset = connectorDefinitionSchema.parse(presets.clio);
    const matters = preset.objects.matters!;
    const stampingAll = createConnector({
      definition: { ...preset, objects: { ...preset.objects, matters: { ...matters, originMarker: { ...matters.originMarker!, stampOn: 'write' } } } },
      baseUrl: sb.url,
      tokens: sandboxTokens(sb),
      http: { retryBaseMs: 1 },
    });
    const restamped = await stampingAll.updateRecord('matters', mapped.id ?? '', { status: 'Open' }, { writeId: 'w-3' });
    expect(stampingAll.mapRecord('matters', restamped).fields.clientReference).toBe('crm-bridge:w-3');
    const crmBorn = sb.state.store.matters.items[0];
    expect(clio.mapRecord('matters', await clio.getRecord('matters', String(crmBorn?.id))).fromBridge).toBe(false);
  });
});

describe('clio preset: contacts', () => {
  let sb: Sandbox;
  let clio: Connector;
  beforeAll(async () => {
    sb = await startSandbox({ records: 50 });
    clio = createConnector({ definition: connectorDefinitionSchema.parse(presets.clio), baseUrl: sb.url, tokens: sandboxTokens(sb), http: { retryBaseMs: 1 } });
  });
  afterAll(() => sb.close());

  it('writes email and phone as default Work entries of email_addresses and phone_numbers, which Clio shows as the primary ones', async () => {
    const body = clio.toRecord('contacts', { name: 'ignored: read-only', firstName: 'Ada', lastName: 'Lovelace', type: 'Person', email: 'ada@example.com', phone: '+1 555 010 0000' });
    expect(body).toEqual({
      first_name: 'Ada',
      last_name: 'Lovelace',
      type: 'Person',
      email_addresses: [{ name: 'Work', address: 'ada@example.com', default_email: true }],
      phone_numbers: [{ name: 'Work', number: '+1 555 010 0000', default_number: true }],
    });
    const created = clio.mapRecord('contacts', await clio.createRecord('contacts', body));
    expect(created.fields).toMatchObject({ name: 'Ada Lovelace', email: 'ada@example.com', phone: '+1 555 010 0000' });
    const updated = await clio.updateRecord('contacts', created.id ?? '', clio.toRecord('contacts', { email: 'ada@analytical.example' }));
    expect(clio.mapRecord('contacts', updated).fields).toMatchObject({ email: 'ada@analytical.example', phone: '+1 555 010 0000' });
  });

  it('refuses to write a null through a writeAs template instead of sending something else', () => {
    expect(() => clio.toRecord('contacts', { firstName: 'Ada', phone: null })).toThrow(ConnectorError);
    expect(() => clio.toRecord('contacts', { firstName: 'Ada', phone: null })).toThrow(/contacts\.phone: a field written through writeAs cannot be cleared with null/);
  });

  it('appends the entries of two fields written into one list, and keeps the value\'s type in a lone {{value}}', () => {
    const definition = connectorDefinitionSchema.parse({
      objects: {
        people: {
          fields: { workEmail: 'work_email', homeEmail: 'home_email', vip: 'vip' },
          writeAs: {
            workEmail: { email_addresses: [{ name: 'Work', address: '{{value}}' }] },
            homeEmail: { email_addresses: [{ name: 'Home', address: 'home: {{value}}' }] },
            vip: { flags: { vip: '{{value}}' } },
          },
        },
      },
    });
    const connector = createConnector({ definition, baseUrl: 'http://127.0.0.1:9' });
    expect(connector.toRecord('people', { workEmail: 'a@work.example', homeEmail: 'a@home.example', vip: true })).toEqual({
      email_addresses: [
        { name: 'Work', address: 'a@work.example' },
        { name: 'Home', address: 'home: a@home.example' },
      ],
      flags: { vip: true },
    });
  });
});

describe('hubspot preset against the sandbox HubSpot dialect', () => {
  let sb: Sandbox;
  let hubspot: Connector;
  beforeAll(async () => {
    sb = await startSandbox({ records: 200 });
    // The preset's 275 ms floor keeps a live portal under 4 searches/s; the test run here is about paging.
    hubspot = createConnector({ definition: connectorDefinitionSchema.parse(presets.hubspot), baseUrl: sb.url, tokens: sandboxTokens(sb), http: { minIntervalMs: 0, retryBaseMs: 1 } });
  });
  beforeEach(() => sb.state.resetSwitches());
  afterAll(() => sb.close());

  it('pages changed contacts through the search API, sorted by (lastmodifieddate, hs_object_id)', async () => {
    sb.state.setSwitches({ hubspotSearchPerSecond: null });
    const since = sb.state.requestLog.lastSeq;
    const pages = await collect(hubspot.listChanges({ object: 'contacts', since: EPOCH, pageSize: 30 }));
    const records = pages.flatMap((p) => p.records).map((r) => hubspot.mapRecord('contacts', r));
    expect(new Set(records.map((r) => r.id)).size).toBe(sb.state.store.contacts.size);
    const keys = records.map((r) => [Date.parse(String(r.updatedAt)), Number(r.id)] as const);
    for (let i = 1; i < keys.length; i++) {
      const [t0, id0] = keys[i - 1] ?? [0, 0];
      const [t1, id1] = keys[i] ?? [0, 0];
      expect(t1 > t0 || (t1 === t0 && id1 > id0)).toBe(true);
    }
    const searches = sb.state.requestLog.list({ since, pathPrefix: '/crm/v3/objects/contacts/search' });
    expect(searches).toHaveLength(pages.length);
    expect(pages.every((p) => p.order === 'updatedAt')).toBe(true);
  });

  it('re-anchors past the 10,000-result cap when more than 10,000 contacts share one lastmodifieddate', async () => {
    sb.state.setSwitches({ hubspotSearchPerSecond: null });
    const imported = (await (
      await fetch(`${sb.url}/_sandbox/bulk-import`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ object: 'contacts', count: 10_450, updatedAt: '2030-01-01T00:00:00.000Z' }),
      })
    ).json()) as { firstId: number; lastId: number };
    const since = sb.state.requestLog.lastSeq;
    const pages = await collect(hubspot.listChanges({ object: 'contacts', since: '2029-12-31T23:59:00.000Z' }));
    const ids = pages.flatMap((p) => p.records).map((r) => Number(hubspot.mapRecord('contacts', r).id));
    expect(ids).toHaveLength(10_450);
    expect(new Set(ids).size).toBe(10_450);
    expect(ids[0]).toBe(imported.firstId);
    expect(ids.at(-1)).toBe(imported.lastId);
    const restarted = pages.find((p) => p.cursor.anchor !== undefined);
    expect(restarted?.cursor).toMatchObject({ query: 2, anchor: { updatedAt: String(Date.parse('2030-01-01T00:00:00.000Z')) } });
    const statuses = sb.state.requestLog.list({ since, pathPrefix: '/crm/v3' }).map((e) => e.status);
    expect(statuses.every((s) => s === 200)).toBe(true);
  });

  it('keeps under the 4 searches/s limit with the preset pacing', async () => {
    sb.state.setSwitches({ hubspotSearchPerSecond: 4 });
    const paced = createConnector({ definition: connectorDefinitionSchema.parse(presets.hubspot), baseUrl: sb.url, tokens: sandboxTokens(sb) });
    const since = sb.state.requestLog.lastSeq;
    let n = 0;
    for await (const page of paced.listChanges({ object: 'contacts', since: EPOCH, pageSize: 20 })) if (++n === 10 || page.last) break;
    const log = sb.state.requestLog.list({ since, pathPrefix: '/crm/v3' });
    expect(log).toHaveLength(10);
    expect(log.filter((e) => e.status === 429)).toEqual([]);
  });

  it('gets, creates and updates contacts with a properties body', async () => {
    const created = await hubspot.createRecord('contacts', hubspot.toRecord('contacts', { firstName: 'Grace', lastName: 'Hopper', email: 'grace@example.com' }));
    const mapped = hubspot.mapRecord('contacts', created);
    expect(mapped.fields).toMatchObject({ firstName: 'Grace', lastName: 'Hopper' });
    await hubspot.updateRecord('contacts', mapped.id ?? '', { properties: { jobtitle: 'Rear Admiral' } });
    // HubSpot's email and phone are plain properties, written where they are read.
    expect(hubspot.toRecord('contacts', { email: 'grace@example.com', phone: '+1 555 0100' })).toEqual({ properties: { email: 'grace@example.com', phone: '+1 555 0100' } });
    const fetched = hubspot.mapRecord('contacts', await hubspot.getRecord('contacts', mapped.id ?? ''));
    expect(fetched.fields).toMatchObject({ firstName: 'Grace', jobTitle: 'Rear Admiral', email: 'grace@example.com' });
    expect(await hubspot.getRecord('contacts', '999999999999')).toBeNull();
  });
});
