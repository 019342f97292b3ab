// Validates what the sandbox sends and accepts against Clio's own published OpenAPI document, so
// the dialect cannot drift from the published shapes. The document is not strict OpenAPI 3.0
// (specs/README.md), so Ajv gets its `components` with strict mode off.
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Ajv } from 'ajv';
import type { ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startHarness, readJson } from './helpers.js';
import type { Harness } from './helpers.js';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const specPath = path.resolve(repoRoot, '../shared/specs/clio-manage-v4.openapi.json');
const addFormats = addFormatsModule as unknown as (ajv: Ajv) => Ajv;

describe('Clio dialect against the official OpenAPI document', () => {
  let h: Harness;
  let spec: any;
  let ajv: Ajv;
  const validator = (ref: string): ValidateFunction => {
    const fn = ajv.getSchema(`clio#/components/schemas/${ref}`);
    if (!fn) throw new Error(`no schema ${ref}`);
    return fn;
  };
  const expectValid = (ref: string, value: unknown): void => {
    const fn = validator(ref);
    const ok = fn(value);
    expect(ok ? [] : fn.errors?.slice(0, 5)).toEqual([]);
  };
  /** The request body schema an operation declares, compiled on its own. */
  const requestSchema = (p: string, method: string): ValidateFunction => {
    const schema = spec.paths[p][method].requestBody.content['application/json'].schema;
    return ajv.compile({ $id: `req:${method}:${p}`, ...schema });
  };

  beforeAll(async () => {
    spec = JSON.parse(readFileSync(specPath, 'utf8'));
    ajv = new Ajv({ strict: false, allErrors: true, validateFormats: true });
    addFormats(ajv);
    ajv.addSchema({ $id: 'clio', components: spec.components });
    h = await startHarness({ records: 300, seed: 11 });
  });
  afterAll(() => h.sb.close());

  // The document declares no field nullable, yet Clio answers null for absent values (a
  // company's first_name, a contact without a phone). The samples below ask only for fields the
  // sandbox has values for, so the check stays strict.
  const MATTER_FIELDS =
    'id,etag,number,display_number,description,status,billable,billing_method,open_date,created_at,updated_at,client_id,shared,has_tasks,client{id,etag,name,type,created_at,updated_at,primary_email_address},practice_area{id,etag,name,category,code,created_at,updated_at},custom_field_values{id,etag,field_name,field_type,value,field_required,field_displayed,created_at,updated_at}';
  const CONTACT_FIELDS =
    'id,etag,name,type,created_at,updated_at,primary_email_address,primary_phone_number,is_client,email_addresses{id,etag,address,name,primary,created_at,updated_at},phone_numbers{id,etag,number,name,primary},custom_field_values{id,etag,field_name,field_type,value}';

  it('matter lists and items match Matter_List and Matter_Show', async () => {
    const list = await h.json(`/api/v4/matters.json?order=id(asc)&limit=50&fields=${encodeURIComponent(MATTER_FIELDS)}`);
    expect(list.data).toHaveLength(50);
    expectValid('Matter_List', list);
    expectValid('Matter_List', await h.json('/api/v4/matters.json?limit=20'));
    const one = await h.json(`/api/v4/matters/${list.data[3].id}.json?fields=${encodeURIComponent(MATTER_FIELDS)}`);
    expectValid('Matter_Show', one);
  });

  it('contact lists and items match Contact_List and Contact_Show', async () => {
    const list = await h.json(`/api/v4/contacts.json?limit=50&fields=${encodeURIComponent(CONTACT_FIELDS)}`);
    expectValid('Contact_List', list);
    expectValid('Contact_Show', await h.json(`/api/v4/contacts/${list.data[0].id}.json?fields=${encodeURIComponent(CONTACT_FIELDS)}`));
  });

  it('practice areas match PracticeArea_List and PracticeArea_Show', async () => {
    const list = await h.json('/api/v4/practice_areas.json?fields=id,etag,name,category,code,created_at,updated_at');
    expectValid('PracticeArea_List', list);
    expectValid('PracticeArea_Show', await h.json(`/api/v4/practice_areas/${list.data[0].id}.json?fields=id,name,category`));
  });

  it('the negative check works: a string practice_area or a lowercase status is rejected', () => {
    expect(validator('Matter_Show')({ data: { id: 1, practice_area: 'Family Law' } })).toBe(false);
    expect(validator('Matter_Show')({ data: { id: 1, status: 'open' } })).toBe(false);
  });

  it('write requests the sandbox accepts match the documented request bodies, and so do its answers', async () => {
    const clientId = h.sb.state.store.contacts.items[0]?.id;
    const contactBody = { data: { type: 'Person', name: 'Ada Lovelace', first_name: 'Ada', last_name: 'Lovelace', email_addresses: [{ name: 'Work', address: 'ada@example.com', default_email: true }], phone_numbers: [{ name: 'Work', number: '+1 555 010 0000', default_number: true }] } };
    expect(requestSchema('/contacts.json', 'post')(contactBody)).toBe(true);
    const contact = await h.json(`/api/v4/contacts.json?fields=${encodeURIComponent(CONTACT_FIELDS)}`, { method: 'POST', body: JSON.stringify(contactBody) });
    expectValid('Contact_Show', contact);

    const matterBody = {
      data: {
        description: 'Intake from the bridge',
        status: 'open',
        client: { id: clientId },
        practice_area: { id: 3002 },
        custom_field_values: [{ value: 'AI intake agent', custom_field: { id: 9001 } }],
      },
    };
    expect(requestSchema('/matters.json', 'post')(matterBody)).toBe(true);
    const created = await h.json(`/api/v4/matters.json?fields=${encodeURIComponent(MATTER_FIELDS)}`, { method: 'POST', body: JSON.stringify(matterBody) });
    expectValid('Matter_Show', created);

    const patchBody = { data: { status: 'closed', description: 'Closed after settlement' } };
    expect(requestSchema('/matters/{id}.json', 'patch')(patchBody)).toBe(true);
    const patched = await h.json(`/api/v4/matters/${created.data.id}.json?fields=${encodeURIComponent('id,etag,status,description,updated_at,close_date')}`, {
      method: 'PATCH',
      body: JSON.stringify(patchBody),
    });
    expectValid('Matter_Show', patched);
    expect(patched.data.status).toBe('Closed');
  });

  it('error bodies match the documented Error shape', async () => {
    const res = await h.api('/api/v4/matters/1.json');
    expect(res.status).toBe(404);
    expectValid('Error', await readJson(res));
    const bad = await h.api('/api/v4/matters.json?limit=500');
    expectValid('Error', await readJson(bad));
  });
});
