import Fastify from 'fastify';
import type { FastifyInstance } from 'fastify';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { connectorDefinitionSchema } from '../../src/config/schema.js';
import { createConnector } from '../../src/crm/connector.js';
import type { Connector } from '../../src/crm/connector.js';

/**
 * A CRM unlike Clio and HubSpot: JSON:API (records as `data[].attributes` and
 * `relationships`, page-number paging with `page[number]`/`page[size]`, a total page count in
 * `meta`, `application/vnd.api+json`, writes as `{data: {type, id, attributes}}`). Its
 * connector is nothing but the definition below: proof that the model is data, not code.
 */
const definition = connectorDefinitionSchema.parse({
  objects: {
    people: {
      idPath: 'id',
      updatedAtPath: 'attributes.updated-at',
      fields: {
        name: 'attributes.name',
        email: 'attributes.email',
        organisationId: 'relationships.organisation.data.id',
      },
      fieldTypes: { name: 'string', organisationId: 'string' },
      list: {
        request: {
          path: '/people',
          query: { 'page[number]': '{{page}}', 'page[size]': '{{limit}}', 'filter[updated-since]': '{{since}}', sort: 'updated-at' },
          headers: { accept: 'application/vnd.api+json' },
        },
        limit: 7,
        records: 'data',
        pagination: { style: 'page', firstPage: 1, totalPagesPath: 'meta.total-pages' },
        since: { format: 'epoch-seconds' },
        order: 'updatedAt',
      },
      get: { request: { path: '/people/{{id}}' }, record: 'data' },
      create: {
        request: { method: 'POST', path: '/people', body: { data: { type: 'people' } }, headers: { 'content-type': 'application/vnd.api+json' } },
        bodyPath: 'data',
        record: 'data',
      },
      update: {
        request: { method: 'PATCH', path: '/people/{{id}}', body: { data: { type: 'people', id: '{{id}}' } }, headers: { 'content-type': 'application/vnd.api+json' } },
        bodyPath: 'data',
        record: 'data',
      },
    },
  },
});

interface Person {
  id: string;
  name: string;
  email: string;
  org: string;
  updated: number;
}

function resource(p: Person) {
  return {
    type: 'people',
    id: p.id,
    attributes: { name: p.name, email: p.email, 'updated-at': new Date(p.updated * 1000).toISOString() },
    relationships: { organisation: { data: { type: 'organisations', id: p.org } } },
  };
}

describe('a JSON:API connector written purely as data', () => {
  let app: FastifyInstance;
  let connector: Connector;
  const people: Person[] = Array.from({ length: 30 }, (_, i) => ({ id: String(i + 1), name: `Person ${i + 1}`, email: `p${i + 1}@example.com`, org: String((i % 3) + 1), updated: 1_700_000_000 + i * 60 }));
  const seenQueries: Array<Record<string, string>> = [];
  const seenBodies: unknown[] = [];

  beforeAll(async () => {
    app = Fastify({ forceCloseConnections: true });
    app.addContentTypeParser('application/vnd.api+json', { parseAs: 'string' }, (_req, body, done) => done(null, JSON.parse(String(body))));
    app.get('/people', async (req, reply) => {
      const q = req.query as Record<string, string>;
      seenQueries.push(q);
      const size = Number(q['page[size]']);
      const number = Number(q['page[number]']);
      const since = q['filter[updated-since]'] === undefined ? -Infinity : Number(q['filter[updated-since]']);
      const matching = people.filter((p) => p.updated >= since).sort((a, b) => a.updated - b.updated);
      reply.type('application/vnd.api+json');
      return { data: matching.slice((number - 1) * size, number * size).map(resource), meta: { 'total-pages': Math.ceil(matching.length / size) } };
    });
    app.get<{ Params: { id: string } }>('/people/:id', async (req, reply) => {
      const p = people.find((x) => x.id === req.params.id);
      reply.type('application/vnd.api+json');
      return p ? { data: resource(p) } : reply.code(404).send({ errors: [{ status: '404', title: 'Not Found' }] });
    });
    app.post('/people', async (req, reply) => {
      seenBodies.push(req.body);
      const data = (req.body as { data: { attributes: Record<string, string>; relationships?: { organisation?: { data?: { id?: string } } } } }).data;
      const p: Person = { id: String(people.length + 1), name: data.attributes.name ?? '', email: data.attributes.email ?? '', org: data.relationships?.organisation?.data?.id ?? '1', updated: 1_800_000_000 };
      people.push(p);
      return reply.code(201).type('application/vnd.api+json').send({ data: resource(p) });
    });
    app.patch<{ Params: { id: string } }>('/people/:id', async (req) => {
      seenBodies.push(req.body);
      const p = people.find((x) => x.id === req.params.id);
      if (!p) throw new Error('no such person');
      Object.assign(p, (req.body as { data: { attributes: Partial<Person> } }).data.attributes, { updated: 1_800_000_100 });
      return { data: resource(p) };
    });
    await app.listen({ port: 0, host: '127.0.0.1' });
    connector = createConnector({ definition, baseUrl: `http://127.0.0.1:${(app.server.address() as AddressInfo).port}` });
  });
  afterAll(() => app.close());

  it('pages by page number until the total page count, mapping attributes and relationships', async () => {
    const pages = [];
    for await (const page of connector.listChanges({ object: 'people', since: new Date(1_700_000_000_000 + 10 * 60_000) })) pages.push(page);
    expect(pages.map((p) => p.records.length)).toEqual([7, 7, 6]);
    expect(pages.map((p) => p.cursor.next)).toEqual([2, 3, undefined]);
    expect(seenQueries.slice(-3).map((q) => q['page[number]'])).toEqual(['1', '2', '3']);
    expect(seenQueries.at(-1)?.['filter[updated-since]']).toBe(String(1_700_000_000 + 600));
    const first = connector.mapRecord('people', pages[0]?.records[0]);
    expect(first).toMatchObject({ id: '11', version: new Date((1_700_000_000 + 600) * 1000).toISOString(), fields: { name: 'Person 11', email: 'p11@example.com', organisationId: '2' } });
  });

  it('lists all ids for the sweep without a since filter', async () => {
    const ids: string[] = [];
    for await (const page of connector.listAll({ object: 'people' })) ids.push(...page.map((r) => r.id));
    expect(ids).toHaveLength(people.length);
    expect(seenQueries.at(-1)).not.toHaveProperty('filter[updated-since]');
  });

  it('gets by id, and writes {data: {type, id, attributes, relationships}} built from canonical fields', async () => {
    expect(connector.mapRecord('people', await connector.getRecord('people', '4')).fields.name).toBe('Person 4');
    expect(await connector.getRecord('people', '404')).toBeNull();

    const created = await connector.createRecord('people', connector.toRecord('people', { name: 'Ada', email: 'ada@example.com', organisationId: '2' }));
    expect(seenBodies.at(-1)).toEqual({ data: { type: 'people', attributes: { name: 'Ada', email: 'ada@example.com' }, relationships: { organisation: { data: { id: '2' } } } } });
    const id = connector.mapRecord('people', created).id ?? '';
    const updated = await connector.updateRecord('people', id, connector.toRecord('people', { name: 'Ada Lovelace' }));
    expect(seenBodies.at(-1)).toEqual({ data: { type: 'people', id, attributes: { name: 'Ada Lovelace' } } });
    expect(connector.mapRecord('people', updated).fields).toMatchObject({ name: 'Ada Lovelace', organisationId: '2' });
  });
});
