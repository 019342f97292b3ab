import { createServer } from 'node:http';
import type { IncomingHttpHeaders, Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { startHarness, readJson } from './helpers.js';
import type { Harness } from './helpers.js';

interface Hook {
  path: string;
  headers: IncomingHttpHeaders;
  body: any;
}

/** A real little HTTP receiver that records every hook it is sent. */
async function startReceiver(): Promise<{ url: string; hooks: Hook[]; close(): Promise<void> }> {
  const hooks: Hook[] = [];
  const server: Server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      hooks.push({ path: req.url ?? '', headers: req.headers, body: JSON.parse(Buffer.concat(chunks).toString('utf8') || 'null') });
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, hooks, close: () => new Promise((resolve) => server.close(() => resolve())) };
}

describe('sandbox automation builder', () => {
  let h: Harness;
  let rx: Awaited<ReturnType<typeof startReceiver>>;
  beforeAll(async () => {
    h = await startHarness({ records: 100 });
    rx = await startReceiver();
  });
  beforeEach(() => {
    for (const r of [...h.sb.state.automation.rules]) h.sb.state.automation.removeRule(r.id);
    h.sb.state.automation.clearLog();
    rx.hooks.length = 0;
  });
  afterAll(async () => {
    await h.sb.close();
    await rx.close();
  });

  const clientId = () => h.sb.state.store.contacts.items[0]?.id ?? 0;

  it('POSTs the full record with a bearer secret on create, update and delete through the API', async () => {
    const res = await fetch(`${h.sb.url}/_sandbox/automation/rules`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ object: 'matters', events: ['created', 'updated', 'deleted'], url: `${rx.url}/hooks/clio`, auth: { type: 'bearer', value: 's3cret' }, payload: 'record' }),
    });
    expect(res.status).toBe(201);
    const created = await h.json('/api/v4/matters.json', { method: 'POST', body: JSON.stringify({ data: { description: 'Hooked', client: { id: clientId() } } }) });
    const id = created.data.id;
    await h.api(`/api/v4/matters/${id}.json`, { method: 'PATCH', body: JSON.stringify({ data: { status: 'pending' } }) });
    await h.api(`/api/v4/matters/${id}.json`, { method: 'DELETE' });
    await h.sb.state.automationIdle();
    expect(rx.hooks.map((x) => x.body.meta.event)).toEqual(['created', 'updated', 'deleted']);
    for (const hook of rx.hooks) {
      expect(hook.path).toBe('/hooks/clio');
      expect(hook.headers.authorization).toBe('Bearer s3cret');
      expect(hook.body.data).toMatchObject({ id, description: 'Hooked' });
      expect(hook.body.data.practice_area === null || typeof hook.body.data.practice_area === 'object').toBe(true);
    }
    expect(rx.hooks[1]?.body.data.status).toBe('Pending');
  });

  it('sends a named header secret and a notification payload with the id only; never an HMAC header', async () => {
    h.sb.state.addAutomationRule({
      object: 'contacts',
      events: ['updated'],
      url: `${rx.url}/hooks/contacts`,
      auth: { type: 'header', name: 'X-Webhook-Secret', value: 'abc' },
      payload: 'notification',
      hmacScaffold: { header: 'X-Hook-Signature', secret: 'signing-key' },
    });
    h.sb.state.updateRecord('contacts', clientId(), { title: 'CEO' });
    await h.sb.state.automationIdle();
    expect(rx.hooks).toHaveLength(1);
    const hook = rx.hooks[0] as Hook;
    expect(hook.headers['x-webhook-secret']).toBe('abc');
    expect(hook.headers.authorization).toBeUndefined();
    expect(hook.headers['x-hook-signature']).toBeUndefined();
    expect(hook.body.data).toEqual({ id: clientId() });
    expect(hook.body.meta).toMatchObject({ event: 'updated', object: 'contacts' });
  });

  it('drops fires silently at the drop rate, and the log accounts for every fire and drop', async () => {
    h.sb.state.addAutomationRule({ object: 'contacts', events: ['updated'], url: `${rx.url}/hooks/drop`, dropRate: 0.5 });
    const ids = h.sb.state.store.contacts.items.slice(0, 40).map((c) => c.id);
    for (const id of ids) h.sb.state.updateRecord('contacts', id, { title: 'Mx.' });
    await h.sb.state.automationIdle();
    const log = await readJson(await fetch(`${h.sb.url}/_sandbox/automation-log?wait=idle`));
    const fired = log.entries.filter((e: any) => e.status === 'fired');
    const dropped = log.entries.filter((e: any) => e.status === 'dropped');
    expect(fired.length + dropped.length).toBe(40);
    expect(dropped.length).toBeGreaterThan(5);
    expect(fired.length).toBeGreaterThan(5);
    expect(rx.hooks).toHaveLength(fired.length);
    expect(new Set(rx.hooks.map((x) => x.body.data.id))).toEqual(new Set(fired.map((e: any) => e.recordId)));
    expect(new Set([...fired, ...dropped].map((e: any) => e.recordId))).toEqual(new Set(ids));
    for (const e of fired) expect(e.httpStatus).toBe(204);
  });

  it('fires duplicates at the duplicate rate and logs them', async () => {
    h.sb.state.addAutomationRule({ object: 'matters', events: ['updated'], url: `${rx.url}/hooks/dup`, duplicateRate: 1, payload: 'notification' });
    const id = h.sb.state.store.matters.items[0]?.id ?? 0;
    h.sb.state.updateRecord('matters', id, { location: 'Annex' });
    await h.sb.state.automationIdle();
    expect(rx.hooks).toHaveLength(2);
    expect(rx.hooks[0]?.body).toEqual(rx.hooks[1]?.body);
    expect(h.sb.state.automation.entries().map((e) => e.status)).toEqual(['fired', 'duplicate']);
  });

  it('delays fires by delayMs and uses the global automation switches as defaults', async () => {
    h.sb.state.setSwitches({ automationDelayMs: 50, automationDropRate: 1 });
    h.sb.state.addAutomationRule({ object: 'matters', events: ['updated'], url: `${rx.url}/hooks/global` });
    h.sb.state.updateRecord('matters', h.sb.state.store.matters.items[0]?.id ?? 0, { location: 'A' });
    await h.sb.state.automationIdle();
    expect(rx.hooks).toHaveLength(0);
    expect(h.sb.state.automation.entries().map((e) => e.status)).toEqual(['dropped']);
    h.sb.state.setSwitches({ automationDropRate: 0 });
    h.sb.state.updateRecord('matters', h.sb.state.store.matters.items[0]?.id ?? 0, { location: 'B' });
    // Not yet sent: the delay holds it back.
    expect(rx.hooks).toHaveLength(0);
    await h.sb.state.automationIdle();
    expect(rx.hooks).toHaveLength(1);
    h.sb.state.resetSwitches();
  });

  it('records a failed delivery in the log instead of throwing', async () => {
    h.sb.state.addAutomationRule({ object: 'matters', events: ['updated'], url: 'http://127.0.0.1:9/nowhere' });
    h.sb.state.updateRecord('matters', h.sb.state.store.matters.items[0]?.id ?? 0, { location: 'C' });
    await h.sb.state.automationIdle();
    const [entry] = h.sb.state.automation.entries();
    expect(entry?.status).toBe('fired');
    expect(entry?.error).toBeTruthy();
  });

  it('rejects a header rule without a header name', async () => {
    const res = await fetch(`${h.sb.url}/_sandbox/automation/rules`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ object: 'matters', events: ['created'], url: `${rx.url}/x`, auth: { type: 'header', value: 'v' } }),
    });
    expect(res.status).toBe(400);
  });
});
