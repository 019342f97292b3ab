import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startSandbox } from '../../src/sandbox/index.js';
import { allPages, startHarness, readJson } from './helpers.js';
import type { Harness } from './helpers.js';

describe('Clio v4 dialect', () => {
  let h: Harness;
  beforeAll(async () => {
    h = await startHarness({ records: 600, seed: 7 });
  });
  afterAll(() => h.sb.close());

  it('returns only id and etag without fields', async () => {
    const body = await h.json('/api/v4/matters.json?limit=3');
    expect(body.data).toHaveLength(3);
    for (const m of body.data) expect(Object.keys(m).sort()).toEqual(['etag', 'id']);
  });

  it('selects fields with nested client and practice_area objects, statuses capitalised', async () => {
    const body = await h.json('/api/v4/matters.json?limit=5&fields=id,display_number,status,description,client{id,name},practice_area{id,name},custom_field_values{field_name,value}');
    for (const m of body.data) {
      expect(Object.keys(m).sort()).toEqual(['client', 'custom_field_values', 'description', 'display_number', 'id', 'practice_area', 'status']);
      expect(['Open', 'Pending', 'Closed']).toContain(m.status);
      expect(Object.keys(m.client).sort()).toEqual(['id', 'name']);
      expect(typeof m.practice_area).toBe('object');
      expect(Object.keys(m.practice_area).sort()).toEqual(['id', 'name']);
      expect(m.custom_field_values.map((v: any) => v.field_name)).toContain('Intake Source');
    }
  });

  it('names a nested relation without braces as id and etag', async () => {
    const body = await h.json('/api/v4/matters.json?limit=1&fields=id,practice_area');
    expect(Object.keys(body.data[0].practice_area).sort()).toEqual(['etag', 'id']);
  });

  it('rejects limit outside 1..200 and unbalanced fields', async () => {
    for (const limit of ['0', '201', 'abc']) {
      const res = await h.api(`/api/v4/matters.json?limit=${limit}`);
      expect(res.status).toBe(400);
      expect((await readJson(res)).error.type).toBe('BadRequest');
    }
    expect((await h.api('/api/v4/matters.json?fields=client{id')).status).toBe(400);
  });

  it('pages by cursor with order=id(asc) through full next URLs and sees every record once', async () => {
    const pages = await allPages(h, '/api/v4/contacts.json?order=id(asc)&limit=200&fields=id');
    expect(pages[0].meta.paging.next).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/api\/v4\/contacts\.json\?.*page_token=/);
    const ids = pages.flatMap((p) => p.data.map((c: any) => c.id));
    expect(ids).toHaveLength(300);
    expect(new Set(ids).size).toBe(300);
    expect([...ids].sort((a, b) => a - b)).toEqual(ids);
    expect(pages.at(-1).meta.paging.next).toBeUndefined();
  });

  it('pages by offset without order=id(asc)', async () => {
    const pages = await allPages(h, '/api/v4/matters.json?limit=120');
    expect(pages[0].meta.paging.next).toContain('offset=120');
    expect(pages.flatMap((p) => p.data)).toHaveLength(300);
  });

  it('refuses offset paging at 10,000 records with 422, while cursor paging goes on', async () => {
    h.sb.state.bulkImport({ object: 'contacts', count: 10_000 });
    const ok = await h.json('/api/v4/contacts.json?offset=9800&limit=200&fields=id');
    expect(ok.data).toHaveLength(200);
    const res = await h.api(ok.meta.paging.next);
    expect(res.status).toBe(422);
    expect((await readJson(res)).error.message).toMatch(/10000/);
    const ids = (await allPages(h, '/api/v4/contacts.json?order=id(asc)&limit=200&fields=id')).flatMap((p) => p.data);
    expect(ids.length).toBe(h.sb.state.store.contacts.size);
  });

  it('filters by updated_since and created_since', async () => {
    const all = (await allPages(h, '/api/v4/matters.json?order=id(asc)&fields=id,updated_at,created_at')).flatMap((p) => p.data);
    const since = all.map((m: any) => m.updated_at).sort()[150];
    const filtered = (await allPages(h, `/api/v4/matters.json?order=id(asc)&fields=id,updated_at&updated_since=${encodeURIComponent(since)}`)).flatMap((p) => p.data);
    expect(filtered.length).toBe(all.filter((m: any) => m.updated_at >= since).length);
    const createdSince = all.map((m: any) => m.created_at).sort()[250];
    const created = await h.json(`/api/v4/matters.json?fields=id&created_since=${encodeURIComponent(createdSince)}`);
    expect(created.meta.records).toBe(all.filter((m: any) => m.created_at >= createdSince).length);
  });

  it('creates a matter with a 201 and a data envelope, writing status lowercase', async () => {
    const client = (await h.json('/api/v4/contacts.json?limit=1')).data[0];
    const res = await h.api('/api/v4/matters.json?fields=id,etag,status,description,client{id},practice_area{id,name}', {
      method: 'POST',
      body: JSON.stringify({ data: { description: 'New intake', status: 'pending', client: { id: client.id }, practice_area: { id: 3001 } } }),
    });
    expect(res.status).toBe(201);
    const { data } = await readJson(res);
    expect(data).toMatchObject({ status: 'Pending', description: 'New intake', client: { id: client.id }, practice_area: { id: 3001, name: 'Personal Injury' } });
    const bad = await h.api('/api/v4/matters.json', { method: 'POST', body: JSON.stringify({ data: { description: 'x', status: 'Open', client: { id: client.id } } }) });
    expect(bad.status).toBe(422);
    expect((await h.api('/api/v4/matters.json', { method: 'POST', body: JSON.stringify({ description: 'no envelope' }) })).status).toBe(400);
  });

  it('changes etag and updated_at on every write and honours If-Match', async () => {
    const before = (await h.json('/api/v4/matters.json?limit=1&fields=id,etag,updated_at,description')).data[0];
    h.sb.state.setClock({ advanceSeconds: 1 });
    const patched = await h.json(`/api/v4/matters/${before.id}.json?fields=id,etag,updated_at,description`, {
      method: 'PATCH',
      body: JSON.stringify({ data: { description: 'Updated by the bridge' } }),
    });
    expect(patched.data.etag).not.toBe(before.etag);
    expect(patched.data.updated_at > before.updated_at).toBe(true);
    expect(patched.data.description).toBe('Updated by the bridge');
    const stale = await h.api(`/api/v4/matters/${before.id}.json`, { method: 'PATCH', headers: { 'if-match': before.etag }, body: JSON.stringify({ data: { description: 'x' } }) });
    expect(stale.status).toBe(412);
  });

  it('hard-deletes: 204, then 404 and gone from lists', async () => {
    const victim = (await h.json('/api/v4/contacts.json?limit=1')).data[0];
    expect((await h.api(`/api/v4/contacts/${victim.id}.json`, { method: 'DELETE' })).status).toBe(204);
    const gone = await h.api(`/api/v4/contacts/${victim.id}.json`);
    expect(gone.status).toBe(404);
    expect((await readJson(gone)).error.type).toBe('RecordNotFound');
    const list = await h.json(`/api/v4/contacts.json?ids[]=${victim.id}`);
    expect(list.data).toEqual([]);
  });

  it('serves practice areas as a list and by id', async () => {
    const list = await h.json('/api/v4/practice_areas.json?fields=id,name,category,code');
    expect(list.data.length).toBe(12);
    const one = await h.json(`/api/v4/practice_areas/${list.data[0].id}.json?fields=id,name`);
    expect(one.data).toEqual({ id: list.data[0].id, name: list.data[0].name });
  });

  it('seeds the same data from the same seed and different data from another', async () => {
    const a = await startSandbox({ records: 50, seed: 99 });
    const b = await startSandbox({ records: 50, seed: 99 });
    const c = await startSandbox({ records: 50, seed: 100 });
    try {
      const dump = (s: typeof a) => JSON.stringify(s.state.store.matters.items.map((m) => s.state.renderFull('matters', m.id)));
      expect(dump(a)).toBe(dump(b));
      expect(dump(a)).not.toBe(dump(c));
      const types = new Set(a.state.store.contacts.items.map((x) => x.type));
      expect(types).toEqual(new Set(['Person', 'Company']));
    } finally {
      await Promise.all([a.close(), b.close(), c.close()]);
    }
  });
});
