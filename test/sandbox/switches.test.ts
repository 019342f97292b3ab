import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { allPages, startHarness, readJson } from './helpers.js';
import type { Harness } from './helpers.js';

const control = (h: Harness, path: string, method = 'GET', body?: unknown) =>
  fetch(`${h.sb.url}/_sandbox${path}`, {
    method,
    ...(body === undefined ? {} : { headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) }),
  });

describe('sandbox switches', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ records: 400 });
  });
  beforeEach(() => {
    h.sb.state.resetSwitches();
  });
  afterAll(() => h.sb.close());

  it('are all off by default and change at runtime through PATCH /_sandbox/switches', async () => {
    const defaults = await readJson(await control(h, '/switches'));
    expect(defaults).toMatchObject({ rateLimit: null, errorRate: 0, resetRate: 0, latencyMs: 0, repeatAtPageBoundary: false, updatedSinceInclusive: true, tokenRealLifetimeSeconds: null });
    const patched = await readJson(await control(h, '/switches', 'PATCH', { errorRate: 0.25 }));
    expect(patched.errorRate).toBe(0.25);
    expect((await control(h, '/switches', 'PATCH', { errorRate: 2 })).status).toBe(400);
    expect((await control(h, '/switches', 'PATCH', { noSuchSwitch: true })).status).toBe(400);
  });

  it('documentedHostBroken: the documented host serves an HTML error page; off, it mirrors the API', async () => {
    expect((await h.api(`${h.sb.documentedUrl}/api/v4/matters.json`)).status).toBe(200);
    h.sb.state.setSwitches({ documentedHostBroken: true });
    const res = await h.api(`${h.sb.documentedUrl}/api/v4/matters.json`);
    expect(res.status).toBe(404);
    expect(res.headers.get('content-type')).toMatch(/text\/html/);
    expect(await res.text()).toMatch(/^<!DOCTYPE html>/);
    const tokenRes = await fetch(`${h.sb.documentedUrl}/oauth/token`, { method: 'POST', body: 'grant_type=client_credentials', headers: { 'content-type': 'application/x-www-form-urlencoded' } });
    expect(tokenRes.headers.get('content-type')).toMatch(/text\/html/);
    expect((await h.api('/api/v4/matters.json')).status).toBe(200);
  });

  it('updatedSinceInclusive: a record stamped exactly at updated_since is in (true) or out (false)', async () => {
    const m = h.sb.state.store.matters.items[10];
    const at = new Date(m?.updatedAt ?? 0).toISOString();
    const url = `/api/v4/matters.json?fields=id&ids[]=${m?.id}&updated_since=${encodeURIComponent(at)}`;
    expect((await h.json(url)).data).toEqual([{ id: m?.id }]);
    h.sb.state.setSwitches({ updatedSinceInclusive: false });
    expect((await h.json(url)).data).toEqual([]);
  });

  it('oneSecondTimestamps: writes in one second share one updated_at without fractions', async () => {
    h.sb.state.setSwitches({ oneSecondTimestamps: true });
    const ids = h.sb.state.store.contacts.items.slice(0, 5).map((c) => c.id);
    for (const id of ids) h.sb.state.updateRecord('contacts', id, { title: 'Dr.' });
    const body = await h.json(`/api/v4/contacts.json?fields=id,updated_at&${ids.map((id) => `ids[]=${id}`).join('&')}`);
    for (const c of body.data) expect(c.updated_at).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/);
    const first = h.sb.state.store.contacts.get(ids[0] ?? 0);
    expect((first?.updatedAt ?? 1) % 1000).toBe(0);
    h.sb.state.setSwitches({ oneSecondTimestamps: false });
    h.sb.state.updateRecord('contacts', ids[0] ?? 0, { title: 'Ms.' });
    const after = await h.json(`/api/v4/contacts/${ids[0]}.json?fields=updated_at`);
    expect(after.data.updated_at).toMatch(/\.\d{3}Z$/);
  });

  it('clockSkewSeconds: the sandbox stamps writes with its own skewed clock', async () => {
    const id = h.sb.state.store.matters.items[0]?.id ?? 0;
    await control(h, '/clock', 'POST', { skewSeconds: -3600 });
    const before = Date.now();
    const res = await h.json(`/api/v4/matters/${id}.json?fields=updated_at`, { method: 'PATCH', body: JSON.stringify({ data: { location: 'Room 2' } }) });
    const stamped = Date.parse(res.data.updated_at);
    expect(stamped).toBeLessThan(before - 3500 * 1000);
    // Its Date header is read from the same clock, as a real server's is, so a client can measure the skew.
    const answered = Date.parse((await h.api(`/api/v4/matters/${id}.json`)).headers.get('date')!);
    expect(answered).toBeLessThan(before - 3500 * 1000);
    const info = await readJson(await control(h, '/clock'));
    expect(info.skewSeconds).toBe(-3600);
  });

  it('bulk import stamps thousands of records with one updated_at', async () => {
    const res = await readJson(await control(h, '/bulk-import', 'POST', { object: 'matters', count: 2500, updatedAt: '2025-07-01T12:00:00.000Z' }));
    expect(res.count).toBe(2500);
    const pages = await allPages(h, `/api/v4/matters.json?order=id(asc)&fields=id,updated_at&updated_since=2025-07-01T12:00:00Z`);
    const rows = pages.flatMap((p) => p.data).filter((r: any) => r.id >= res.firstId && r.id <= res.lastId);
    expect(rows).toHaveLength(2500);
    expect(new Set(rows.map((r: any) => r.updated_at))).toEqual(new Set(['2025-07-01T12:00:00.000Z']));
  });

  it('rateLimit: X-RateLimit-* on every response, 429 with Retry-After, a new window after the reset', async () => {
    h.sb.state.setSwitches({ rateLimit: { limit: 3, windowSeconds: 60 } });
    const token = h.sb.state.issueToken().access_token;
    const remaining: string[] = [];
    for (let i = 0; i < 3; i++) {
      const res = await h.api('/api/v4/practice_areas.json', { token });
      expect(res.status).toBe(200);
      expect(res.headers.get('x-ratelimit-limit')).toBe('3');
      expect(Number(res.headers.get('x-ratelimit-reset'))).toBeGreaterThan(Date.now() / 1000 - 1);
      remaining.push(res.headers.get('x-ratelimit-remaining') ?? '');
    }
    expect(remaining).toEqual(['2', '1', '0']);
    const limited = await h.api('/api/v4/practice_areas.json', { token });
    expect(limited.status).toBe(429);
    const retryAfter = Number(limited.headers.get('retry-after'));
    expect(retryAfter).toBeGreaterThan(0);
    expect(retryAfter).toBeLessThanOrEqual(60);
    expect(limited.headers.get('x-ratelimit-remaining')).toBe('0');
    // Another token has its own budget.
    expect((await h.api('/api/v4/practice_areas.json')).status).toBe(200);
    h.sb.state.setClock({ advanceSeconds: 61 });
    expect((await h.api('/api/v4/practice_areas.json', { token })).status).toBe(200);
  });

  it('errorRate: answers 5xx at the chosen rate', async () => {
    h.sb.state.setSwitches({ errorRate: 1 });
    const res = await h.api('/api/v4/matters.json');
    expect(res.status).toBeGreaterThanOrEqual(500);
    h.sb.state.setSwitches({ errorRate: 0.5 });
    const statuses = await Promise.all(Array.from({ length: 40 }, async () => (await h.api('/api/v4/practice_areas.json')).status));
    const errors = statuses.filter((s) => s >= 500).length;
    expect(errors).toBeGreaterThan(5);
    expect(errors).toBeLessThan(35);
  });

  it('resetRate: destroys the socket without an answer', async () => {
    h.sb.state.setSwitches({ resetRate: 1 });
    const since = h.sb.state.requestLog.lastSeq;
    await expect(h.api('/api/v4/matters.json')).rejects.toThrow();
    const log = h.sb.state.requestLog.list({ since });
    expect(log.at(-1)).toMatchObject({ status: 0, fault: 'reset' });
  });

  it('latencyMs: answers no sooner than the configured delay', async () => {
    h.sb.state.setSwitches({ latencyMs: 150 });
    const started = performance.now();
    expect((await h.api('/api/v4/practice_areas.json')).status).toBe(200);
    // A lower bound only: timers never fire early by more than a millisecond.
    expect(performance.now() - started).toBeGreaterThanOrEqual(148);
  });

  it('repeatAtPageBoundary: the last record of a cursor page is the first of the next', async () => {
    h.sb.state.setSwitches({ repeatAtPageBoundary: true });
    const pages = await allPages(h, '/api/v4/contacts.json?order=id(asc)&limit=50&fields=id');
    for (let i = 1; i < pages.length; i++) expect(pages[i].data[0].id).toBe(pages[i - 1].data.at(-1).id);
    const ids = pages.flatMap((p) => p.data.map((c: any) => c.id));
    expect(new Set(ids).size).toBe(h.sb.state.store.contacts.size);
    expect(ids.length).toBe(h.sb.state.store.contacts.size + pages.length - 1);
    const offsetPages = await allPages(h, '/api/v4/contacts.json?limit=50&fields=id');
    expect(offsetPages[1].data[0].id).toBe(offsetPages[0].data.at(-1).id);
  });

  it('request log can be filtered by seq, method and path, and cleared', async () => {
    const since = h.sb.state.requestLog.lastSeq;
    await h.api('/api/v4/practice_areas.json');
    await h.api('/api/v4/matters.json?limit=1');
    const log = await readJson(await control(h, `/requests?since=${since}&path=/api/v4/matters`));
    expect(log.requests).toHaveLength(1);
    expect(log.requests[0]).toMatchObject({ method: 'GET', path: '/api/v4/matters.json', query: { limit: '1' }, status: 200 });
    expect(log.requests[0].seq).toBeGreaterThan(since);
    expect((await control(h, '/requests', 'DELETE')).status).toBe(204);
    expect((await readJson(await control(h, '/requests'))).requests).toEqual([]);
  });

  it('control API creates, updates and deletes records as a staff member would', async () => {
    const client = h.sb.state.store.contacts.items[0];
    const created = await readJson(await control(h, '/records/matters', 'POST', { description: 'Walk-in', client: { id: client?.id } }));
    expect(created.data.status).toBe('Open');
    const updated = await readJson(await control(h, `/records/matters/${created.data.id}`, 'PATCH', { status: 'closed' }));
    expect(updated.data.status).toBe('Closed');
    expect(updated.data.etag).not.toBe(created.data.etag);
    expect((await control(h, `/records/matters/${created.data.id}`, 'DELETE')).status).toBe(204);
    expect((await control(h, `/records/matters/${created.data.id}`)).status).toBe(404);
    const ids = await readJson(await control(h, '/records/matters/ids'));
    expect(ids.ids).not.toContain(created.data.id);
  });
});
