import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FastifyInstance } from 'fastify';
import type { Database } from '../src/db/client.js';
import { buildTestApp } from './helpers/app.js';
import { createTestDatabase } from './helpers/database.js';

const ADMIN = 'admin-token-0123456789abcdef';

/** Every (method, path) the router holds, read from printRoutes' tree (Fastify has no route list). */
function registeredRoutes(app: FastifyInstance): Array<{ method: string; path: string }> {
  const routes: Array<{ method: string; path: string }> = [];
  const stack: string[] = [];
  for (const line of app.printRoutes({ commonPrefix: false }).split('\n')) {
    const match = /^([│ ]*)(?:[├└]── )?(\S+) \(([^)]+)\)$/.exec(line.replace(/[│├└─]/g, (c) => (c === '│' ? '│' : c)));
    if (!match) continue;
    const depth = match[1]!.length / 4;
    stack.length = depth;
    stack.push(match[2]!);
    const path = stack.join('').replace(/\/+/g, '/');
    for (const method of match[3]!.split(', ')) routes.push({ method, path });
  }
  return routes;
}

describe('OpenAPI document at /docs/json', () => {
  let database: Database;
  let app: FastifyInstance;
  beforeAll(async () => {
    database = await createTestDatabase();
    app = await buildTestApp({ database, env: { ADMIN_TOKEN: ADMIN } });
  });
  afterAll(async () => {
    await app.close();
    await database.close();
  });

  it('lists every registered route with its method (HEAD and the docs UI itself aside)', async () => {
    const res = await app.inject({ url: '/docs/json', headers: { authorization: `Bearer ${ADMIN}` } });
    expect(res.statusCode).toBe(200);
    const doc = res.json() as { openapi: string; paths: Record<string, Record<string, unknown>> };
    expect(doc.openapi).toMatch(/^3\./);

    const routes = registeredRoutes(app).filter((r) => r.method !== 'HEAD' && !r.path.startsWith('/docs'));
    expect(routes.length).toBeGreaterThanOrEqual(10);
    for (const { method, path } of routes) {
      const openapiPath = path.replace(/:(\w+)/g, '{$1}');
      expect(doc.paths[openapiPath], `${method} ${path} is in the document`).toBeDefined();
      expect(doc.paths[openapiPath]![method.toLowerCase()], `${method} ${path} is in the document`).toBeDefined();
    }
    for (const expected of ['/', '/health', '/health/live', '/metrics', '/hooks/{connection}', '/v1/dead-letters']) expect(doc.paths).toHaveProperty([expected]);
  });

  it('documents the schemas the routes validate with: a query the dead-letter API refuses is the one the document declares', async () => {
    const doc = (await app.inject({ url: '/docs/json', headers: { authorization: `Bearer ${ADMIN}` } })).json() as {
      paths: Record<string, Record<string, { parameters?: Array<{ name: string; in: string; schema: { maximum?: number } }>; responses: Record<string, unknown> }>>;
    };
    const limit = doc.paths['/v1/dead-letters']!.get!.parameters!.find((p) => p.name === 'limit' && p.in === 'query')!;
    expect(limit.schema.maximum).toBe(500);
    const over = await app.inject({ url: `/v1/dead-letters?limit=${limit.schema.maximum! + 1}`, headers: { authorization: `Bearer ${ADMIN}` } });
    expect(over.statusCode).toBe(400);
    const within = await app.inject({ url: `/v1/dead-letters?limit=${limit.schema.maximum!}`, headers: { authorization: `Bearer ${ADMIN}` } });
    expect(within.statusCode).toBe(200);

    expect(Object.keys(doc.paths['/health']!.get!.responses)).toEqual(expect.arrayContaining(['200', '503']));
    expect(Object.keys(doc.paths['/hooks/{connection}']!.post!.responses)).toEqual(expect.arrayContaining(['200', '202']));
  });

  it("documents what a pipeline write needs, as the route enforces it: the Idempotency-Key header and the pipeline's API key", async () => {
    const doc = (await app.inject({ url: '/docs/json', headers: { authorization: `Bearer ${ADMIN}` } })).json() as {
      components: { securitySchemes: Record<string, { type: string; scheme?: string }> };
      paths: Record<string, Record<string, { parameters?: Array<{ name: string; in: string; required?: boolean; schema: { pattern?: string } }>; security?: Array<Record<string, string[]>>; responses: Record<string, unknown> }>>;
    };
    const write = doc.paths['/v1/connections/{connection}/records']!.post!;
    const key = write.parameters?.find((p) => p.in === 'header' && p.name.toLowerCase() === 'idempotency-key');
    expect(key, 'the Idempotency-Key header is documented').toMatchObject({ required: true });
    expect(new RegExp(key!.schema.pattern!).test('lead-4711')).toBe(true);
    expect(new RegExp(key!.schema.pattern!).test('with space')).toBe(false);
    expect(write.security, 'the write names its credential').toEqual([{ pipelineKey: [] }]);
    expect(doc.components.securitySchemes.pipelineKey).toMatchObject({ type: 'http', scheme: 'bearer' });
    expect(Object.keys(write.responses)).toEqual(expect.arrayContaining(['200', '202']));
    const lookup = doc.paths['/v1/connections/{connection}/records/{outboundId}']!.get!;
    expect(lookup.security).toEqual([{ pipelineKey: [] }, { admin: [] }]);
  });

  it('serves the docs UI only with the admin credential', async () => {
    expect((await app.inject({ url: '/docs' })).statusCode).toBe(401);
    const ui = await app.inject({ url: '/docs/', headers: { authorization: `Basic ${Buffer.from(`ops:${ADMIN}`).toString('base64')}` } });
    expect(ui.statusCode).toBe(200);
    expect(ui.body).toMatch(/swagger/i);
  });
});
