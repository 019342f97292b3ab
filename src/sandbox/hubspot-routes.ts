// The HubSpot CRM v3 dialect over the same contact records: objects and search as published in
// specs/hubspot-crm-contacts-v3.openapi.json, the OAuth v1 token endpoint, 30-minute tokens,
// about 4 search requests per second per token (429 with Retry-After in milliseconds), and the
// search API's 10,000-result ceiling.
import { randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { OAuthError } from './oauth-store.js';
import type { TokenResponse } from './oauth-store.js';
import { clientCredentialsOf } from './oauth-routes.js';
import { applyRateLimit, authenticateBearer, injectFaults, requestMeta } from './request-meta.js';
import type { RateWindow } from './request-meta.js';
import { contactEmail, contactPhone } from './seed-data.js';
import { SandboxWriteError } from './state.js';
import type { SandboxState } from './state.js';
import type { ContactRecord } from './store.js';

export const HUBSPOT_TOKEN_SECONDS = 1800;
export const HUBSPOT_SEARCH_CAP = 10_000;
const DEFAULT_PROPERTIES = ['createdate', 'email', 'firstname', 'hs_object_id', 'lastmodifieddate', 'lastname'];

class HubSpotError extends Error {
  constructor(
    readonly status: number,
    readonly category: string,
    message: string,
  ) {
    super(message);
  }
}

function errorBody(category: string, message: string): Record<string, unknown> {
  return { status: 'error', message, correlationId: randomUUID(), category };
}

function send(reply: FastifyReply, err: unknown): FastifyReply {
  if (err instanceof HubSpotError) return reply.code(err.status).send(errorBody(err.category, err.message));
  if (err instanceof SandboxWriteError) return reply.code(err.status === 422 ? 400 : err.status).send(errorBody(err.status === 404 ? 'OBJECT_NOT_FOUND' : 'VALIDATION_ERROR', err.message));
  throw err;
}

type Props = Record<string, string | null>;

function propertiesOf(state: SandboxState, c: ContactRecord): Props {
  const iso = (ms: number) => new Date(state.visibleTime(ms)).toISOString();
  return {
    hs_object_id: String(c.id),
    firstname: c.firstName,
    lastname: c.lastName,
    company: c.companyName,
    jobtitle: c.title,
    email: contactEmail(c),
    phone: contactPhone(c),
    createdate: iso(c.createdAt),
    lastmodifieddate: iso(c.updatedAt),
  };
}

function toObject(state: SandboxState, c: ContactRecord, wanted: string[] | undefined): Record<string, unknown> {
  const all = propertiesOf(state, c);
  const properties: Props = {};
  for (const p of wanted?.length ? wanted : DEFAULT_PROPERTIES) if (p in all) properties[p] = all[p] ?? null;
  return {
    id: String(c.id),
    properties,
    createdAt: new Date(state.visibleTime(c.createdAt)).toISOString(),
    updatedAt: new Date(state.visibleTime(c.updatedAt)).toISOString(),
    archived: false,
  };
}

/** Numeric view of a property for comparisons: dates as epoch ms (HubSpot accepts either form). */
function numeric(prop: string, v: string | null | undefined): number {
  if (v === null || v === undefined) return NaN;
  if (prop === 'lastmodifieddate' || prop === 'createdate') return /^\d+$/.test(v) ? Number(v) : Date.parse(v);
  return Number(v);
}

interface Filter {
  propertyName: string;
  operator: string;
  value?: string | number;
  values?: Array<string | number>;
}

function matchesFilter(state: SandboxState, c: ContactRecord, f: Filter): boolean {
  const props = propertiesOf(state, c);
  if (!(f.propertyName in props)) throw new HubSpotError(400, 'VALIDATION_ERROR', `Unknown property ${f.propertyName}`);
  const raw = props[f.propertyName];
  const numericProp = ['lastmodifieddate', 'createdate', 'hs_object_id'].includes(f.propertyName);
  const cmp = (value: string | number | undefined): number => {
    if (numericProp) return numeric(f.propertyName, raw) - numeric(f.propertyName, value === undefined ? undefined : String(value));
    return String(raw ?? '').localeCompare(String(value ?? ''));
  };
  switch (f.operator) {
    case 'EQ':
      return raw !== null && cmp(f.value) === 0;
    case 'NEQ':
      return raw === null || cmp(f.value) !== 0;
    case 'GT':
      return raw !== null && cmp(f.value) > 0;
    case 'GTE':
      return raw !== null && cmp(f.value) >= 0;
    case 'LT':
      return raw !== null && cmp(f.value) < 0;
    case 'LTE':
      return raw !== null && cmp(f.value) <= 0;
    case 'HAS_PROPERTY':
      return raw !== null;
    case 'NOT_HAS_PROPERTY':
      return raw === null;
    case 'IN':
      return (f.values ?? []).some((v) => cmp(v) === 0);
    default:
      throw new HubSpotError(400, 'VALIDATION_ERROR', `Operator ${f.operator} is not supported by the sandbox`);
  }
}

interface SearchBody {
  filterGroups?: Array<{ filters?: Filter[] }>;
  sorts?: Array<string | { propertyName: string; direction?: 'ASCENDING' | 'DESCENDING' }>;
  properties?: string[];
  limit?: number;
  after?: string | number;
}

function search(state: SandboxState, body: SearchBody): Record<string, unknown> {
  const limit = body.limit ?? 10;
  if (!Number.isInteger(limit) || limit < 1 || limit > 200) throw new HubSpotError(400, 'VALIDATION_ERROR', 'limit must be between 1 and 200');
  const after = body.after === undefined || body.after === '' ? 0 : Number(body.after);
  if (!Number.isInteger(after) || after < 0) throw new HubSpotError(400, 'VALIDATION_ERROR', 'after must be a non-negative integer');
  // The live search refuses to page past 10,000 results: clients must re-anchor their filter.
  if (after + limit > HUBSPOT_SEARCH_CAP) throw new HubSpotError(400, 'VALIDATION_ERROR', `Search results are limited to ${HUBSPOT_SEARCH_CAP}; narrow the filter instead of paging further`);
  const groups = body.filterGroups ?? [];
  const items = state.store.contacts.items;
  let selected = groups.length === 0 ? items : items.filter((c) => groups.some((g) => (g.filters ?? []).every((f) => matchesFilter(state, c, f))));
  const sorts = (body.sorts ?? []).map((s) =>
    typeof s === 'string'
      ? { propertyName: s.replace(/^-/, ''), dir: s.startsWith('-') ? -1 : 1 }
      : { propertyName: s.propertyName, dir: s.direction === 'DESCENDING' ? -1 : 1 },
  );
  if (sorts.length) {
    const keyed = selected.map((c) => ({ c, p: propertiesOf(state, c) }));
    keyed.sort((a, b) => {
      for (const s of sorts) {
        const d = numeric(s.propertyName, a.p[s.propertyName]) - numeric(s.propertyName, b.p[s.propertyName]);
        const diff = Number.isNaN(d) ? String(a.p[s.propertyName] ?? '').localeCompare(String(b.p[s.propertyName] ?? '')) : d;
        if (diff !== 0) return diff * s.dir;
      }
      return a.c.id - b.c.id;
    });
    selected = keyed.map((k) => k.c);
  }
  const page = selected.slice(after, after + limit);
  const out: Record<string, unknown> = { total: selected.length, results: page.map((c) => toObject(state, c, body.properties)) };
  if (after + limit < selected.length) out.paging = { next: { after: String(after + limit) } };
  return out;
}

/**
 * A property value as HubSpot keeps it: every property is text, so a number or boolean is stored
 * as its text ("5550100", "true"). An empty string is how a property is cleared, and a cleared
 * property reads back as "" (one never set reads null). A null is answered 200 and changes
 * nothing (HubSpot/hubspot-api-nodejs#324: "You can set empty string for it"): undefined here.
 */
function propertyText(name: string, v: unknown): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  throw new HubSpotError(400, 'VALIDATION_ERROR', `Property values were not valid: ${name} must be a string`);
}

function contactInput(body: unknown): Record<string, unknown> {
  const props = (body as { properties?: unknown } | null)?.properties;
  if (typeof props !== 'object' || props === null) throw new HubSpotError(400, 'VALIDATION_ERROR', 'properties is required');
  const p = props as Record<string, unknown>;
  const data: Record<string, unknown> = {};
  const firstname = propertyText('firstname', p.firstname);
  const lastname = propertyText('lastname', p.lastname);
  const jobtitle = propertyText('jobtitle', p.jobtitle);
  const email = propertyText('email', p.email);
  const phone = propertyText('phone', p.phone);
  if (firstname !== undefined) data.first_name = firstname;
  if (lastname !== undefined) data.last_name = lastname;
  if (jobtitle !== undefined) data.title = jobtitle;
  if (email !== undefined) data.email_addresses = [{ address: email, default_email: true }];
  if (phone !== undefined) data.phone_numbers = [{ number: phone, default_number: true }];
  return data;
}

export async function hubspotRoutes(app: FastifyInstance, opts: { state: SandboxState }): Promise<void> {
  const { state } = opts;
  const searchWindows = new Map<string, RateWindow>();

  app.post('/oauth/v1/token', async (req, reply) => {
    const body = (req.body ?? {}) as Record<string, string | undefined>;
    const creds = clientCredentialsOf(req, body);
    const meta = requestMeta(req);
    meta.auth = { scheme: 'client', ...(creds.id ? { clientId: creds.id } : {}), ...(body.grant_type ? { grantType: body.grant_type } : {}) };
    try {
      const client = state.oauth.authenticateClient(creds.id, creds.secret);
      let token: TokenResponse;
      if (body.grant_type === 'authorization_code') token = state.oauth.exchangeCode(client, body.code, body.redirect_uri, HUBSPOT_TOKEN_SECONDS);
      else if (body.grant_type === 'refresh_token') token = state.oauth.refreshGrant(client, body.refresh_token, { echoRefreshToken: true, expiresIn: HUBSPOT_TOKEN_SECONDS });
      else throw new OAuthError('unsupported_grant_type', `grant_type ${body.grant_type ?? ''} is not supported`);
      const named = state.oauth.describe(token.access_token);
      if (named) meta.auth = { ...meta.auth, ...named };
      return token;
    } catch (err) {
      if (!(err instanceof OAuthError)) throw err;
      const status = err.error === 'invalid_grant' ? 'BAD_REFRESH_TOKEN' : err.error === 'invalid_client' ? 'BAD_CLIENT_ID' : 'BAD_GRANT_TYPE';
      // HubSpot's own shape, with the RFC 6749 fields alongside so generic clients can read it.
      return reply.code(400).send({ status, message: err.description, correlationId: randomUUID(), error: err.error, error_description: err.description });
    }
  });

  await app.register(async (api) => {
    api.addHook('onRequest', async (req, reply) => {
      if (await injectFaults(state, req, reply, 'before-auth')) return reply;
      const check = authenticateBearer(state, req);
      if (!check.ok) {
        return reply.code(401).send(errorBody('EXPIRED_AUTHENTICATION', check.reason === 'expired' ? 'The OAuth token used to make this call expired.' : 'Authentication credentials not found.'));
      }
      if (req.method === 'POST' && req.url.startsWith('/crm/v3/objects/contacts/search')) {
        const perSecond = state.switches.hubspotSearchPerSecond;
        const limited = await applyRateLimit(state, searchWindows, check.tokenId, perSecond === null ? null : { limit: perSecond, windowSeconds: 1 }, req, reply, {
          retryAfterUnit: 'milliseconds',
          headers: false,
          body: { ...errorBody('RATE_LIMITS', 'You have reached your secondly limit.'), errorType: 'RATE_LIMIT', policyName: 'SECONDLY' },
        });
        if (limited) return reply;
      }
      if (await injectFaults(state, req, reply, 'after-auth')) return reply;
      return undefined;
    });

    const propsParam = (req: FastifyRequest): string[] | undefined => {
      const p = (req.query as Record<string, string | string[] | undefined>).properties;
      if (p === undefined) return undefined;
      return (Array.isArray(p) ? p : [p]).flatMap((s) => s.split(',')).filter(Boolean);
    };
    const contactOr404 = (id: string): ContactRecord => {
      const c = /^\d+$/.test(id) ? state.store.contacts.get(Number(id)) : undefined;
      if (!c) throw new HubSpotError(404, 'OBJECT_NOT_FOUND', `Object not found. objectId are usually numeric.`);
      return c;
    };

    api.post('/crm/v3/objects/contacts/search', async (req, reply) => {
      try {
        return search(state, (req.body ?? {}) as SearchBody);
      } catch (err) {
        return send(reply, err);
      }
    });

    api.get('/crm/v3/objects/contacts', async (req, reply) => {
      try {
        const q = req.query as Record<string, string | undefined>;
        const limit = q.limit === undefined ? 10 : Number(q.limit);
        if (!Number.isInteger(limit) || limit < 1 || limit > 100) throw new HubSpotError(400, 'VALIDATION_ERROR', 'limit must be between 1 and 100');
        const items = state.store.contacts.items;
        const start = q.after === undefined ? 0 : state.store.contacts.lowerBound(Number(q.after));
        const page = items.slice(start, start + limit);
        const out: Record<string, unknown> = { results: page.map((c) => toObject(state, c, propsParam(req))) };
        const next = items[start + limit];
        if (next) out.paging = { next: { after: String(next.id), link: `${state.url}/crm/v3/objects/contacts?after=${next.id}` } };
        return out;
      } catch (err) {
        return send(reply, err);
      }
    });

    api.get<{ Params: { id: string } }>('/crm/v3/objects/contacts/:id', async (req, reply) => {
      try {
        return toObject(state, contactOr404(req.params.id), propsParam(req));
      } catch (err) {
        return send(reply, err);
      }
    });

    api.post('/crm/v3/objects/contacts', async (req, reply) => {
      requestMeta(req).body = req.body;
      try {
        const data = contactInput(req.body);
        const rec = state.createRecord('contacts', { type: 'Person', ...data });
        return reply.code(201).send(toObject(state, rec as ContactRecord, undefined));
      } catch (err) {
        return send(reply, err);
      }
    });

    api.patch<{ Params: { id: string } }>('/crm/v3/objects/contacts/:id', async (req, reply) => {
      requestMeta(req).body = req.body;
      try {
        const c = contactOr404(req.params.id);
        const rec = state.updateRecord('contacts', c.id, contactInput(req.body));
        return toObject(state, rec as ContactRecord, undefined);
      } catch (err) {
        return send(reply, err);
      }
    });
  });
}
