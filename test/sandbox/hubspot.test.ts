import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { CLIENT, form, readJson, startHarness } from './helpers.js';
import type { Harness } from './helpers.js';

describe('HubSpot CRM v3 dialect', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ records: 400, seed: 3 });
  });
  beforeEach(() => {
    h.sb.state.resetSwitches();
    // Most tests here are about shapes, not the search limit.
    h.sb.state.setSwitches({ hubspotSearchPerSecond: null });
  });
  afterAll(() => h.sb.close());

  const search = (body: unknown, token?: string) =>
    h.api('/crm/v3/objects/contacts/search', { method: 'POST', body: JSON.stringify(body), ...(token ? { token } : {}) });

  it('issues 30-minute tokens at /oauth/v1/token and echoes the refresh token on refresh', async () => {
    h.sb.state.setSwitches({ autoApprove: true });
    const redirect = 'http://127.0.0.1:9/cb';
    const auth = await fetch(`${h.sb.url}/oauth/authorize?response_type=code&client_id=sandbox-client&redirect_uri=${encodeURIComponent(redirect)}`, { redirect: 'manual' });
    const code = new URL(auth.headers.get('location') ?? '').searchParams.get('code') ?? '';
    const tok = await readJson(await fetch(`${h.sb.url}/oauth/v1/token`, form({ grant_type: 'authorization_code', code, redirect_uri: redirect, ...CLIENT })));
    expect(tok).toMatchObject({ token_type: 'bearer', expires_in: 1800 });
    const refreshed = await readJson(await fetch(`${h.sb.url}/oauth/v1/token`, form({ grant_type: 'refresh_token', refresh_token: tok.refresh_token, ...CLIENT })));
    expect(refreshed).toMatchObject({ expires_in: 1800, refresh_token: tok.refresh_token });
    expect((await search({ limit: 1 }, refreshed.access_token)).status).toBe(200);
    h.sb.state.setClock({ advanceSeconds: 1801 });
    const expired = await search({ limit: 1 }, refreshed.access_token);
    expect(expired.status).toBe(401);
    expect((await readJson(expired)).category).toBe('EXPIRED_AUTHENTICATION');
    const bad = await fetch(`${h.sb.url}/oauth/v1/token`, form({ grant_type: 'refresh_token', refresh_token: 'nope', ...CLIENT }));
    expect(bad.status).toBe(400);
    expect(await readJson(bad)).toMatchObject({ status: 'BAD_REFRESH_TOKEN', error: 'invalid_grant' });
  });

  it('searches on lastmodifieddate GTE with sorts and pages through paging.next.after', async () => {
    const all = h.sb.state.store.contacts.items.map((c) => c.updatedAt).sort((a, b) => a - b);
    const since = all[50] ?? 0;
    const body = {
      filterGroups: [{ filters: [{ propertyName: 'lastmodifieddate', operator: 'GTE', value: String(since) }] }],
      sorts: [{ propertyName: 'lastmodifieddate', direction: 'ASCENDING' }],
      properties: ['email', 'lastmodifieddate', 'hs_object_id'],
      limit: 100,
    };
    const seen: any[] = [];
    let after: string | undefined;
    do {
      const page = await readJson(await search({ ...body, ...(after ? { after } : {}) }));
      expect(page.total).toBe(all.filter((t) => t >= since).length);
      seen.push(...page.results);
      after = page.paging?.next?.after;
    } while (after);
    expect(seen).toHaveLength(all.filter((t) => t >= since).length);
    const times = seen.map((r) => Date.parse(r.properties.lastmodifieddate));
    expect([...times].sort((a, b) => a - b)).toEqual(times);
    expect(Object.keys(seen[0].properties).sort()).toEqual(['email', 'hs_object_id', 'lastmodifieddate']);
    expect(seen[0]).toMatchObject({ archived: false });
    expect(typeof seen[0].id).toBe('string');
  });

  it('supports LTE, EQ and an hs_object_id GT tie-break filter', async () => {
    const c = h.sb.state.store.contacts.items[100];
    const at = new Date(c?.updatedAt ?? 0).toISOString();
    const eq = await readJson(await search({ filterGroups: [{ filters: [{ propertyName: 'lastmodifieddate', operator: 'EQ', value: at }] }] }));
    expect(eq.results.map((r: any) => r.id)).toContain(String(c?.id));
    const tie = await readJson(
      await search({
        filterGroups: [{ filters: [{ propertyName: 'lastmodifieddate', operator: 'LTE', value: at }, { propertyName: 'hs_object_id', operator: 'GT', value: String(c?.id) }] }],
        limit: 200,
      }),
    );
    for (const r of tie.results) {
      expect(Number(r.id)).toBeGreaterThan(c?.id ?? 0);
      expect(Date.parse(r.properties.lastmodifieddate)).toBeLessThanOrEqual(c?.updatedAt ?? 0);
    }
  });

  it('refuses limit over 200 and results past 10,000 with 400', async () => {
    expect((await search({ limit: 201 })).status).toBe(400);
    h.sb.state.bulkImport({ object: 'contacts', count: 10_500 });
    const ok = await readJson(await search({ limit: 200, after: '9800' }));
    expect(ok.paging.next.after).toBe('10000');
    const past = await search({ limit: 200, after: ok.paging.next.after });
    expect(past.status).toBe(400);
    expect(await readJson(past)).toMatchObject({ category: 'VALIDATION_ERROR' });
  });

  it('limits search to 4 requests/s per token with 429 and Retry-After in milliseconds', async () => {
    h.sb.state.setSwitches({ hubspotSearchPerSecond: 4 });
    // Frozen, so the one-second window cannot roll over between calls on a slow machine.
    h.sb.state.setClock({ frozen: true });
    try {
      const token = h.sb.state.issueToken().access_token;
      const statuses: number[] = [];
      for (let i = 0; i < 4; i++) statuses.push((await search({ limit: 1 }, token)).status);
      expect(statuses).toEqual([200, 200, 200, 200]);
      const limited = await search({ limit: 1 }, token);
      expect(limited.status).toBe(429);
      expect(limited.headers.get('retry-after')).toBe('1000');
      expect(await readJson(limited)).toMatchObject({ errorType: 'RATE_LIMIT', policyName: 'SECONDLY' });
      // Other calls are not search calls and are not limited; another token has its own budget.
      expect((await h.api('/crm/v3/objects/contacts?limit=1', { token })).status).toBe(200);
      expect((await search({ limit: 1 })).status).toBe(200);
      h.sb.state.setClock({ advanceSeconds: 1 });
      expect((await search({ limit: 1 }, token)).status).toBe(200);
    } finally {
      h.sb.state.setClock({ frozen: false });
    }
  });

  it('reads, creates and updates contacts through /crm/v3/objects/contacts', async () => {
    const created = await h.api('/crm/v3/objects/contacts', { method: 'POST', body: JSON.stringify({ properties: { firstname: 'Grace', lastname: 'Hopper', email: 'grace@example.com' } }) });
    expect(created.status).toBe(201);
    const obj = await readJson(created);
    expect(obj.properties).toMatchObject({ firstname: 'Grace', lastname: 'Hopper', email: 'grace@example.com', hs_object_id: obj.id });
    h.sb.state.setClock({ advanceSeconds: 1 });
    const patched = await readJson(await h.api(`/crm/v3/objects/contacts/${obj.id}`, { method: 'PATCH', body: JSON.stringify({ properties: { jobtitle: 'Admiral' } }) }));
    expect(patched.updatedAt > obj.updatedAt).toBe(true);
    const read = await readJson(await h.api(`/crm/v3/objects/contacts/${obj.id}?properties=jobtitle,email`));
    expect(read.properties).toEqual({ jobtitle: 'Admiral', email: 'grace@example.com' });
    expect((await h.api('/crm/v3/objects/contacts/999')).status).toBe(404);
    const list = await readJson(await h.api('/crm/v3/objects/contacts?limit=5'));
    expect(list.results).toHaveLength(5);
    expect(list.paging.next.after).toBeTruthy();
  });

  it('keeps every property as text: a number is stored as its text, "" clears a property (read back as ""), null changes nothing', async () => {
    const created = await readJson(await h.api('/crm/v3/objects/contacts', { method: 'POST', body: JSON.stringify({ properties: { firstname: 'Ada', lastname: 'Lovelace', phone: 5550100, jobtitle: 'Analyst' } }) }));
    const read = async () => (await readJson(await h.api(`/crm/v3/objects/contacts/${created.id}?properties=phone,jobtitle,lastname`))).properties;
    expect(await read()).toEqual({ phone: '5550100', jobtitle: 'Analyst', lastname: 'Lovelace' });
    const patch = (properties: unknown) => h.api(`/crm/v3/objects/contacts/${created.id}`, { method: 'PATCH', body: JSON.stringify({ properties }) });
    expect((await patch({ phone: null, jobtitle: null })).status).toBe(200);
    expect(await read()).toEqual({ phone: '5550100', jobtitle: 'Analyst', lastname: 'Lovelace' });
    expect((await patch({ phone: '', jobtitle: '' })).status).toBe(200);
    expect(await read()).toEqual({ phone: '', jobtitle: '', lastname: 'Lovelace' });
  });
});
