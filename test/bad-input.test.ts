import { gzipSync } from 'node:zlib';
import { sql } from 'drizzle-orm';
import type { FastifyInstance, InjectOptions } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { mulberry32, type Rng } from '../src/sandbox/prng.js';
import { buildTestApp, connection, SECRET } from './helpers/app.js';
import { TEST_TOKEN_KEY } from './helpers/bridge.js';
import { createTestDatabase } from './helpers/database.js';

// Issue 8, "bad input as tests": a seeded generator sends well over 1,000 malformed, oversized,
// wrongly typed, wrongly encoded, prototype-polluting and wrongly authenticated requests to every
// public route. Each must get a 4xx problem+json with a non-empty detail and no stack trace, and
// write no row in any table. A failure names the case.

const PIPELINE_KEY = 'pipeline-key-0123456789abcdef';
const ADMIN_TOKEN = 'admin-token-0123456789abcdef';
const METRICS_TOKEN = 'metrics-token-0123456789abcdef';
const CLIENT_SECRET = 'oauth-client-secret-0123456789';
const SECRETS = [SECRET, PIPELINE_KEY, ADMIN_TOKEN, METRICS_TOKEN, CLIENT_SECRET, TEST_TOKEN_KEY];

const database = await createTestDatabase();
let app: FastifyInstance;
let tables: string[] = [];

beforeAll(async () => {
  app = await buildTestApp({
    database,
    env: { ADMIN_TOKEN, METRICS_TOKEN, TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY, AUTH_FAILURE_LIMIT: '0' },
    connections: [
      {
        id: 'firm',
        connector: 'clio',
        // Nothing listens there: no case may get as far as a CRM call.
        baseUrl: 'http://127.0.0.1:9',
        auth: { type: 'oauth2', clientId: 'client', clientSecret: CLIENT_SECRET, tokenUrl: '/oauth/token', authorizeUrl: '/oauth/authorize' },
        inbound: { secrets: [SECRET], recordPath: 'data', object: 'matters' },
        outbound: { apiKeys: [PIPELINE_KEY] },
      },
      connection({ id: 'header', inbound: { secrets: [SECRET], header: 'X-Bridge-Secret', bodyLimit: 2048 } }),
    ],
  });
  const rows = await database.db.execute<{ table_name: string }>(sql`select table_name from information_schema.tables where table_schema = 'public' and table_type = 'BASE TABLE' order by table_name`);
  tables = rowsOf<{ table_name: string }>(rows).map((r) => r.table_name);
});
afterAll(async () => {
  await app.close();
  await database.close();
});

/** postgres.js answers an array of rows, PGlite `{ rows }`. */
const rowsOf = <T>(result: unknown): T[] => (Array.isArray(result) ? result : (result as { rows: T[] }).rows) as T[];

async function rowCounts(): Promise<Record<string, number>> {
  const query = tables.map((t) => `select '${t}' as t, count(*)::int as n from "${t}"`).join(' union all ');
  const result = await database.db.execute<{ t: string; n: number }>(sql.raw(query));
  return Object.fromEntries(rowsOf<{ t: string; n: number }>(result).map((r) => [r.t, Number(r.n)]));
}

interface Case {
  description: string;
  request: InjectOptions;
  /** The OAuth callback answers a browser with an HTML page, by design; everything else is problem+json. */
  html?: boolean;
}

type Auth = 'hook' | 'header-hook' | 'pipeline' | 'admin' | 'metrics' | 'open' | 'oauth';

interface Route {
  method: 'GET' | 'POST';
  path: string;
  auth: Auth;
  /** Headers that authenticate, and a body that would be accepted, so one thing at a time is wrong. */
  good: { headers: Record<string, string>; body?: unknown };
}

const uuid = (rng: Rng) => '10000000-1000-4000-8000-100000000000'.replace(/[018]/g, (c) => (Number(c) ^ (Math.floor(rng() * 16) >> (Number(c) / 4))).toString(16));
const matter = { data: { id: 4211, updated_at: '2026-11-20T10:00:00Z', etag: 'e1', description: 'Slip and fall', status: 'Open' } };
const write = { object: 'matters', externalId: 'lead-1', fields: { description: 'Intake lead', status: 'Open', clientId: 100000001 } };

/** Every public route, from the OpenAPI document plus the documentation pages it does not list. */
async function publicRoutes(): Promise<Route[]> {
  const doc = (await app.inject({ url: '/docs/json', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })).json() as { paths: Record<string, Record<string, unknown>> };
  const listed = Object.entries(doc.paths).flatMap(([path, ops]) => Object.keys(ops).map((m) => ({ method: m.toUpperCase() as 'GET' | 'POST', path })));
  const docs = ['/docs', '/docs/json', '/docs/yaml', '/docs/static/index.html'].map((path) => ({ method: 'GET' as const, path }));
  return [...listed, ...docs].map(({ method, path }) => {
    const rng = mulberry32(path.length);
    const concrete = path.replace('{connection}', 'firm').replace('{outboundId}', uuid(rng)).replace('{eventId}', uuid(rng));
    const route = (auth: Auth, good: Route['good']): Route => ({ method, path: concrete, auth, good });
    if (path === '/hooks/{connection}') return route('hook', { headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' }, body: matter });
    if (path === '/v1/connections/{connection}/records') return route('pipeline', { headers: { authorization: `Bearer ${PIPELINE_KEY}`, 'content-type': 'application/json', 'idempotency-key': 'k-1' }, body: write });
    if (path.startsWith('/v1/connections/')) return route('pipeline', { headers: { authorization: `Bearer ${PIPELINE_KEY}` } });
    if (path.startsWith('/v1/dead-letters') || path === '/' || path.startsWith('/docs') || path === '/oauth/{connection}/start') return route('admin', { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } });
    if (path === '/metrics') return route('metrics', { headers: { authorization: `Bearer ${METRICS_TOKEN}` } });
    if (path.startsWith('/health')) return route('open', { headers: {} });
    if (path.startsWith('/oauth/')) return route('oauth', { headers: {} });
    throw new Error(`${method} ${path} is a new public route: classify it here so bad input reaches it`);
  });
}

function randomText(rng: Rng, length: number, alphabet = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~+/='): string {
  let s = '';
  for (let i = 0; i < length; i++) s += alphabet[Math.floor(rng() * alphabet.length)];
  return s;
}

/** Credentials that must all be refused: absent, wrong of every length, near misses, the wrong kind. */
function wrongCredentials(rng: Rng, auth: Auth): Array<[string, Record<string, string>]> {
  const right = { hook: SECRET, 'header-hook': SECRET, pipeline: PIPELINE_KEY, admin: ADMIN_TOKEN, metrics: METRICS_TOKEN, open: '', oauth: '' }[auth];
  const out: Array<[string, Record<string, string>]> = [['no credentials', {}]];
  for (const length of [1, 15, 16, 27, 28, 29, 32, 64, 255, 1024, 8000]) out.push([`a wrong bearer of ${length} characters`, { authorization: `Bearer ${randomText(rng, length)}` }]);
  out.push(
    ['an empty bearer', { authorization: 'Bearer ' }],
    ['the right secret with one character changed', { authorization: `Bearer ${right.slice(0, -1)}${right.endsWith('x') ? 'y' : 'x'}` }],
    ['the right secret with a character appended', { authorization: `Bearer ${right}x` }],
    ['a prefix of the right secret', { authorization: `Bearer ${right.slice(0, 8)}` }],
    ['the right secret in another case', { authorization: `Bearer ${right.toUpperCase()}` }],
    ['the right secret under another scheme', { authorization: `Token ${right}` }],
    ['the right secret without a scheme', { authorization: right }],
    ['the right secret in the query string', {}],
    ['a wrong basic password', { authorization: `Basic ${Buffer.from(`admin:${randomText(rng, 20)}`).toString('base64')}` }],
    ['basic with no colon', { authorization: `Basic ${Buffer.from(right).toString('base64')}` }],
    ['basic that is not base64', { authorization: 'Basic !!!not-base64!!!' }],
    ['a bearer with non-ASCII characters', { authorization: `Bearer ${encodeURIComponent('sécret-ключ-密钥-0123456789')}` }],
    ['a bearer with a NUL byte escaped', { authorization: `Bearer ${right}%00` }],
  );
  for (const [kind, other] of [['hook secret', SECRET], ['pipeline key', PIPELINE_KEY], ['admin token', ADMIN_TOKEN], ['metrics token', METRICS_TOKEN], ['OAuth client secret', CLIENT_SECRET]] as const) {
    if (other !== right) out.push([`the ${kind} on a route that takes another credential`, { authorization: `Bearer ${other}` }]);
  }
  if (auth === 'hook') out.push(['the hook secret in another connection\'s header', { 'x-bridge-secret': SECRET }]);
  return out;
}

const DEEP = 20_000;
/** Bodies no POST route may accept, whatever its schema: not JSON, not an object, poisoned, badly encoded. */
/**
 * `valid` as JSON text with a key holding arrays nested `depth` deep in every object below the
 * top (the hook's record, the write's fields), where they are mapped and hashed; at the top
 * when there is no object below it.
 */
function withDeepField(valid: unknown, depth: number): string {
  const mark = 'deep-value-mark';
  const text = JSON.stringify(valid, (key, v: unknown) => (key !== '' && v !== null && typeof v === 'object' && !Array.isArray(v) ? { ...v, deep: mark } : v));
  const nested = `${'['.repeat(depth)}${']'.repeat(depth)}`;
  return text.includes(mark) ? text.replaceAll(`"${mark}"`, nested) : `${text.slice(0, -1)},"deep":${nested}}`;
}

function badBodies(rng: Rng, valid: unknown): Array<[string, { body: Buffer | string; headers?: Record<string, string> }]> {
  const text = JSON.stringify(valid);
  const out: Array<[string, { body: Buffer | string; headers?: Record<string, string> }]> = [
    ['an empty body', { body: '' }],
    ['whitespace only', { body: '   \n\t ' }],
    ['the literal null', { body: 'null' }],
    ['a JSON array', { body: '[]' }],
    ['an array of the valid body', { body: `[${text}]` }],
    ['a JSON string', { body: '"hello"' }],
    ['a JSON number', { body: '42' }],
    ['true', { body: 'true' }],
    ['a single quote object', { body: "{'a': 1}" }],
    ['trailing comma', { body: `${text.slice(0, -1)},}` }],
    ['two objects', { body: `${text}${text}` }],
    ['NaN as a value', { body: '{"data": {"id": NaN}}' }],
    ['a comment inside', { body: `/* hi */ ${text}` }],
    ['a __proto__ key at the top', { body: '{"__proto__": {"polluted": "yes"}, "data": {"id": 1}}' }],
    ['a __proto__ key in the record', { body: '{"data": {"id": 1, "__proto__": {"polluted": "yes"}}}' }],
    ['a __proto__ key in fields', { body: '{"object": "matters", "externalId": "x", "fields": {"__proto__": {"polluted": "yes"}}}' }],
    ['a constructor.prototype key', { body: '{"constructor": {"prototype": {"polluted": "yes"}}, "data": {"id": 1}}' }],
    ['a nested constructor.prototype', { body: '{"data": {"id": 1, "constructor": {"prototype": {"polluted": "yes"}}}}' }],
    ['an escaped __proto__ key', { body: '{"\\u005f_proto__": {"polluted": "yes"}, "data": {"id": 1}}' }],
    [`arrays nested ${DEEP} deep`, { body: `${'['.repeat(DEEP)}${']'.repeat(DEEP)}` }],
    [`objects nested ${DEEP} deep`, { body: `${'{"a":'.repeat(DEEP)}1${'}'.repeat(DEEP)}` }],
    // Inside an otherwise valid body, where the record's fields are mapped and hashed.
    ...[65, 5_000, DEEP].map((depth): [string, { body: string }] => [`the valid body with a field nested ${depth} deep`, { body: withDeepField(valid, depth) }]),
    ['a body over the 1 MiB limit', { body: `{"data": {"id": 1, "pad": "${'x'.repeat(1024 * 1024 + 10)}"}}` }],
    ['invalid UTF-8 inside a string', { body: Buffer.concat([Buffer.from(text.slice(0, -2)), Buffer.from([0xff, 0xfe, 0xc3]), Buffer.from(text.slice(-2))]) }],
    ['an overlong UTF-8 encoding', { body: Buffer.concat([Buffer.from('{"data": {"id": 1, "x": "'), Buffer.from([0xc0, 0xaf]), Buffer.from('"}}')]) }],
    ['a lone surrogate in UTF-8 bytes', { body: Buffer.concat([Buffer.from('{"data": {"id": 1, "x": "'), Buffer.from([0xed, 0xa0, 0x80]), Buffer.from('"}}')]) }],
    ['Latin-1 bytes declared as Latin-1', { body: Buffer.from(JSON.stringify({ ...(valid as object), note: 'café' }), 'latin1'), headers: { 'content-type': 'application/json; charset=iso-8859-1' } }],
    ['UTF-16LE with a BOM', { body: Buffer.concat([Buffer.from([0xff, 0xfe]), Buffer.from(text, 'utf16le')]) }],
    ['UTF-16 declared as UTF-16', { body: Buffer.from(text, 'utf16le'), headers: { 'content-type': 'application/json; charset=utf-16' } }],
    ['valid JSON declared in another charset', { body: text, headers: { 'content-type': 'application/json; charset=windows-1252' } }],
    ['gzip without Content-Encoding', { body: gzipSync(text) }],
    ['plain JSON declared as gzip', { body: text, headers: { 'content-encoding': 'gzip' } }],
    ['gzip declared as gzip', { body: gzipSync(text), headers: { 'content-encoding': 'gzip' } }],
    ['JSON declared as brotli', { body: text, headers: { 'content-encoding': 'br' } }],
    ['JSON declared as deflate', { body: text, headers: { 'content-encoding': 'deflate' } }],
    ['the valid body as text/plain', { body: text, headers: { 'content-type': 'text/plain' } }],
    ['the valid body as a form', { body: text, headers: { 'content-type': 'application/x-www-form-urlencoded' } }],
    ['a form body', { body: 'data[id]=1&object=matters', headers: { 'content-type': 'application/x-www-form-urlencoded' } }],
    ['multipart', { body: '--b\r\nContent-Disposition: form-data; name="data"\r\n\r\n{}\r\n--b--', headers: { 'content-type': 'multipart/form-data; boundary=b' } }],
    ['XML', { body: '<data><id>1</id></data>', headers: { 'content-type': 'application/xml' } }],
    ['no Content-Type', { body: text, headers: { 'content-type': '' } }],
    ['a made-up content type', { body: text, headers: { 'content-type': 'application/x-crm' } }],
    ['a malformed content type', { body: text, headers: { 'content-type': ';;;' } }],
  ];
  // Seeded damage to the valid body: truncated anywhere, or a byte that cannot be UTF-8 put anywhere.
  for (let i = 0; i < 40; i++) {
    const at = 1 + Math.floor(rng() * (text.length - 1));
    out.push([`the valid body truncated at byte ${at}`, { body: text.slice(0, at) }]);
  }
  for (let i = 0; i < 40; i++) {
    const at = Math.floor(rng() * text.length);
    const byte = 0x80 + Math.floor(rng() * 0x80);
    out.push([`byte 0x${byte.toString(16)} inserted at ${at}`, { body: Buffer.concat([Buffer.from(text.slice(0, at)), Buffer.from([byte]), Buffer.from(text.slice(at))]) }]);
  }
  for (let i = 0; i < 20; i++) {
    const length = 1 + Math.floor(rng() * 400);
    out.push([`${length} random bytes`, { body: Buffer.from(Array.from({ length }, () => Math.floor(rng() * 256))) }]);
  }
  return out;
}

/** Bodies of the right shape but the wrong types or values for one route. */
function wronglyTyped(route: Route, rng: Rng): Array<[string, unknown]> {
  if (route.auth === 'hook' || route.auth === 'header-hook') {
    const record = (r: unknown) => (route.auth === 'hook' ? { data: r } : r);
    const ids: Array<[string, unknown]> = [['an object', { a: 1 }], ['an array', [1]], ['true', true], ['false', false], ['null', null], ['an empty string', '']];
    return [
      ...ids.map(([name, id]) => [`a record whose id is ${name}`, record({ ...matter.data, id })] as [string, unknown]),
      ['a record without an id', record({ updated_at: '2026-11-20T10:00:00Z' })],
      ['an empty record', record({})],
      ...(route.auth === 'hook'
        ? ([
            ['no data key', { id: 4211 }],
            ['data as a string', { data: 'x' }],
            ['data as an array', { data: [matter.data] }],
            ['data as null', { data: null }],
            ['data as a number', { data: 4211 }],
          ] as Array<[string, unknown]>)
        : []),
    ];
  }
  if (route.method === 'POST' && route.auth === 'pipeline') {
    const variants: Array<[string, unknown]> = [
      ['no object', { externalId: 'x', fields: {} }],
      ['no externalId', { object: 'matters', fields: {} }],
      ['no fields', { object: 'matters', externalId: 'x' }],
      ['object as a number', { ...write, object: 7 }],
      ['object empty', { ...write, object: '' }],
      ['object too long', { ...write, object: 'm'.repeat(65) }],
      ['an unknown object', { ...write, object: 'invoices' }],
      ['object __proto__', { ...write, object: '__proto__' }],
      ['object toString', { ...write, object: 'toString' }],
      ['object constructor', { ...write, object: 'constructor' }],
      ['externalId empty', { ...write, externalId: '' }],
      ['externalId too long', { ...write, externalId: 'e'.repeat(257) }],
      ['externalId as an object', { ...write, externalId: { a: 1 } }],
      ['crmId empty', { ...write, crmId: '' }],
      ['crmId too long', { ...write, crmId: '1'.repeat(257) }],
      // (`crmId: ['1']` is not here: Fastify's default Ajv coerces a one-element array to its element.)
      ['crmId as an object', { ...write, crmId: { id: '1' } }],
      ['crmId as nested arrays', { ...write, crmId: [['1', '2']] }],
      ['fields as an array', { ...write, fields: [1, 2] }],
      ['fields as a string', { ...write, fields: 'description=x' }],
      ['fields as null', { ...write, fields: null }],
      // Unknown keys are refused: stripped, a misspelt crmId would turn an update into a create.
      ['crm_id for crmId', { ...write, crm_id: '1' }],
      ['an unknown key', { ...write, note: 'x' }],
    ];
    for (let i = 0; i < 10; i++) variants.push([`externalId as random number ${i}`, { ...write, externalId: { n: rng() } }]);
    return variants;
  }
  return [];
}

function buildCases(routes: Route[]): Case[] {
  const rng = mulberry32(20_261_120);
  const cases: Case[] = [];
  const add = (route: Route, what: string, request: { url?: string; method?: 'GET' | 'POST' | 'PUT' | 'PATCH' | 'DELETE'; headers?: Record<string, string>; payload?: string | Buffer }) => {
    const method = request.method ?? route.method;
    const url = request.url ?? route.path;
    const shown = url.length > 100 ? `${url.slice(0, 100)}…(${url.length} chars)` : url;
    cases.push({ description: `${method} ${shown}: ${what}`, request: { ...request, method, url }, ...(route.auth === 'oauth' ? { html: true } : {}) });
  };
  const payload = (route: Route) => (route.good.body === undefined ? {} : { payload: JSON.stringify(route.good.body) });
  const withoutAuth = (h: Record<string, string>) => Object.fromEntries(Object.entries(h).filter(([k]) => k !== 'authorization'));

  for (const route of routes) {
    // Wrong credentials, each with an otherwise acceptable request.
    if (!['open', 'oauth'].includes(route.auth)) {
      for (const [what, credentials] of wrongCredentials(rng, route.auth)) {
        const url = what.includes('query string') ? `${route.path}?secret=${encodeURIComponent(SECRET)}&token=${encodeURIComponent(ADMIN_TOKEN)}` : route.path;
        add(route, what, { url, headers: { ...withoutAuth(route.good.headers), ...credentials }, ...payload(route) });
      }
    }
    // Methods the route does not have.
    for (const method of ['PUT', 'PATCH', 'DELETE', route.method === 'GET' ? 'POST' : 'GET'] as const) {
      add(route, `method ${method}`, { method, headers: route.good.headers, ...payload(route) });
    }
    // Paths that name no connection, or not one the route can take.
    if (route.path.includes('/firm')) {
      const names = ['nope', 'FIRM', 'firm%00', 'firm%2F..%2F..', '..%2F..%2Fetc%2Fpasswd', 'a'.repeat(64), 'a'.repeat(2000), '%E2%80%AE', '%ZZ', '%', '__proto__', 'constructor', 'hasOwnProperty', 'toString', 'header'];
      for (const name of names) {
        // The `header` connection takes hooks in its own header; everything else is unknown.
        if (name === 'header' && route.auth === 'hook') continue;
        add(route, `connection "${name}"`, { url: route.path.replace('/firm', `/${name}`), headers: route.good.headers, ...payload(route) });
      }
    }
    // Ids that are not ids.
    for (const [what, replace] of [
      ['outboundId', /\/records\/[^/]+$/],
      ['eventId', /\/dead-letters\/[^/]+/],
    ] as const) {
      if (!replace.test(route.path)) continue;
      for (const bad of ['1', 'not-a-uuid', 'ZZZZZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZZZZZZZZZ', '00000000-0000-0000-0000-000000000000%00', `${uuid(rng)}x`, "1' or '1'='1", '%27%3B%20drop%20table%20ledger%3B--', 'x'.repeat(500)]) {
        add(route, `${what} "${bad}"`, { url: route.path.replace(replace, (m) => m.replace(/[^/]+$/, bad)), headers: route.good.headers });
      }
      // A well-formed id of nothing.
      add(route, `${what} of nothing`, { url: route.path.replace(replace, (m) => m.replace(/[^/]+$/, uuid(rng))), headers: route.good.headers });
    }
    // Query strings a route does not take or cannot use.
    if (route.auth === 'hook') {
      // Unknown parameters are ignored (Fastify strips them), as most APIs do: not bad input.
      for (const q of ['object=__proto__', 'object=constructor', 'object=toString', 'object=hasOwnProperty', 'object=invoices', 'object=', `object=${'o'.repeat(65)}`, 'object=%00', 'object=matters%00']) {
        add(route, `query ${q.slice(0, 40)}`, { url: `${route.path}?${q}`, headers: route.good.headers, ...payload(route) });
      }
    }
    if (route.path === '/v1/dead-letters') {
      for (const q of ['limit=-1', 'limit=0', 'limit=abc', 'limit=1e9', 'limit=1.5', 'before=x', 'before=-5', `connection=${'c'.repeat(100)}`]) {
        add(route, `query ${q.slice(0, 40)}`, { url: `${route.path}?${q}`, headers: route.good.headers });
      }
    }
    if (route.auth === 'oauth') {
      for (const q of ['', 'code=abc', 'state=abc', 'code=abc&state=abc', `state=${'s'.repeat(5000)}`, 'error=access_denied', 'error=<script>alert(1)</script>&state=x', 'code=%ZZ', 'state=%00%00']) {
        add(route, `callback query "${q.slice(0, 40)}"`, { url: `${route.path}?${q}`, headers: { cookie: `crm_bridge_oauth_firm=${randomText(rng, 22)}` } });
      }
    }
    // Bodies: malformed, badly encoded, poisoned, and (per route) wrongly typed.
    if (route.method === 'POST') {
      for (const [what, { body, headers }] of badBodies(rng, route.good.body ?? {})) {
        add(route, what, { headers: { ...route.good.headers, ...headers }, payload: body });
      }
      for (const [what, body] of wronglyTyped(route, rng)) add(route, what, { headers: route.good.headers, payload: JSON.stringify(body) });
    }
    if (route.method === 'POST' && route.auth === 'pipeline') {
      for (const key of ['', ' ', 'with space', 'k'.repeat(256), 'clé', 'tab\tkey']) {
        add(route, `Idempotency-Key "${key.slice(0, 20)}"`, { headers: { ...route.good.headers, 'idempotency-key': key }, payload: JSON.stringify(write) });
      }
      add(route, 'no Idempotency-Key', { headers: withoutAuth(route.good.headers), payload: JSON.stringify(write) });
    }
  }

  // The named-header connection: the same hook families through its own header and 2 KiB limit.
  const headerHook: Route = { method: 'POST', path: '/hooks/header', auth: 'header-hook', good: { headers: { 'x-bridge-secret': SECRET, 'content-type': 'application/json' }, body: matter.data } };
  for (const [what, credentials] of [
    ['no header', {}],
    ['the secret as a bearer instead of the header', { authorization: `Bearer ${SECRET}` }],
    ['a wrong header value', { 'x-bridge-secret': randomText(rng, 28) }],
    ['an empty header', { 'x-bridge-secret': '' }],
    ['the header with Bearer in it', { 'x-bridge-secret': `Bearer ${SECRET}` }],
  ] as Array<[string, Record<string, string>]>) {
    add(headerHook, what, { headers: { 'content-type': 'application/json', ...credentials }, payload: JSON.stringify(matter.data) });
  }
  add(headerHook, 'a body over its 2 KiB limit', { headers: headerHook.good.headers, payload: JSON.stringify({ ...matter.data, pad: 'x'.repeat(4096) }) });
  for (const [what, body] of wronglyTyped(headerHook, rng)) add(headerHook, what, { headers: headerHook.good.headers, payload: JSON.stringify(body) });
  for (const [what, { body, headers }] of badBodies(rng, matter.data)) add(headerHook, what, { headers: { ...headerHook.good.headers, ...headers }, payload: body });
  return cases;
}

describe('bad input to every public route', () => {
  it('an empty body declared as JSON is no body on a POST route that takes none, and refused with 400 saying so where a body is needed', async () => {
    const posts = (await publicRoutes()).filter((r) => r.method === 'POST');
    expect(posts.filter((r) => r.good.body === undefined).map((r) => r.path)).toEqual(expect.arrayContaining([expect.stringMatching(/^\/v1\/dead-letters\/[^/]+\/replay$/)]));
    expect(posts.filter((r) => r.good.body !== undefined).map((r) => r.path)).toEqual(expect.arrayContaining(['/hooks/firm', '/v1/connections/firm/records']));
    const answers: Record<string, [number, string]> = {};
    for (const route of posts) {
      // What `curl -X POST -H 'Content-Type: application/json'` without -d sends.
      const res = await app.inject({ method: 'POST', url: route.path, headers: { ...route.good.headers, 'content-type': 'application/json', 'content-length': '0' }, payload: '' });
      const { code, detail } = res.json() as { code: string; detail: string };
      answers[route.path] = [res.statusCode, route.good.body === undefined ? code : `${code}: ${detail}`];
    }
    expect(answers).toEqual(
      Object.fromEntries(
        posts.map((r) =>
          r.good.body === undefined
            ? // The replay of an event id that names nothing: the route ran, the body was none.
              [r.path, [404, 'NOT_FOUND']]
            : [r.path, [400, 'INVALID_JSON: The body is empty; send a JSON object.']],
        ),
      ),
    );
  });

  it("an empty form (curl -X POST -d '') is no body on a POST route that takes none, and refused with 415 where a body is needed", async () => {
    const posts = (await publicRoutes()).filter((r) => r.method === 'POST');
    const answers: Record<string, [number, string]> = {};
    for (const route of posts) {
      const res = await app.inject({ method: 'POST', url: route.path, headers: { ...route.good.headers, 'content-type': 'application/x-www-form-urlencoded', 'content-length': '0' }, payload: '' });
      answers[route.path] = [res.statusCode, (res.json() as { code: string }).code];
    }
    expect(answers).toEqual(Object.fromEntries(posts.map((r) => [r.path, r.good.body === undefined ? [404, 'NOT_FOUND'] : [415, 'UNSUPPORTED_MEDIA_TYPE']])));
    // A form with something in it is refused everywhere, the replay included.
    const replay = posts.find((r) => r.good.body === undefined)!;
    const res = await app.inject({ method: 'POST', url: replay.path, headers: { ...replay.good.headers, 'content-type': 'application/x-www-form-urlencoded' }, payload: 'force=true' });
    expect([res.statusCode, res.json()]).toEqual([415, expect.objectContaining({ code: 'UNSUPPORTED_MEDIA_TYPE', detail: 'Send the body as JSON with Content-Type: application/json.' })]);
  });

  it('answers each of more than 1,000 generated bad requests with a 4xx problem+json, never a 5xx, and writes no row', async () => {
    const routes = await publicRoutes();
    expect(routes.map((r) => `${r.method} ${r.path}`)).toEqual(expect.arrayContaining(['POST /hooks/firm', 'POST /v1/connections/firm/records', 'GET /metrics', 'GET /']));
    const cases = buildCases(routes);
    expect(cases.length).toBeGreaterThanOrEqual(1_000);

    const failures: string[] = [];
    let routerRefusals = 0;
    let before = await rowCounts();
    for (const c of cases) {
      const res = await app.inject(c.request);
      const problems: string[] = [];
      if (res.statusCode < 400 || res.statusCode >= 500) problems.push(`status ${res.statusCode}`);
      const type = String(res.headers['content-type'] ?? '');
      // A URL the router cannot decode, or an over-long path parameter, is refused before any hook
      // or error handler, through the app's `frameworkErrors` (src/app.ts): counted, and checked
      // like every other refusal.
      if (type.startsWith('application/problem+json') && res.body.includes('"code":"BAD_URL"')) routerRefusals++;
      if (c.html && type.startsWith('text/html')) {
        if (res.body.length === 0) problems.push('empty page');
      } else if (!type.startsWith('application/problem+json')) {
        problems.push(`content-type ${type || 'none'}`);
      } else {
        const body = res.json() as { detail?: unknown; status?: unknown };
        if (typeof body.detail !== 'string' || body.detail.trim() === '') problems.push('no detail');
        if (body.status !== res.statusCode) problems.push(`body status ${String(body.status)}`);
      }
      if (/\n\s+at |node_modules|\.ts:\d+/.test(res.body)) problems.push('a stack trace in the body');
      for (const secret of SECRETS) if (res.body.includes(secret)) problems.push('a configured secret in the body');
      const after = await rowCounts();
      const written = Object.keys(after).filter((t) => after[t] !== before[t]);
      if (written.length > 0) problems.push(`rows written in ${written.join(', ')}`);
      before = after;
      if (problems.length > 0) failures.push(`${problems.join('; ')} ← ${c.description} (${res.body.slice(0, 200)})`);
    }
    expect(({} as Record<string, unknown>).polluted, 'Object.prototype was polluted').toBeUndefined();
    console.log(`${cases.length} bad requests to ${routes.length} routes (${routerRefusals} refused by the router, as problem+json)`);
    expect(failures, `${failures.length} of ${cases.length} cases failed`).toEqual([]);
  }, 120_000);
});
