// The Clio Manage API v4 dialect, as published in specs/clio-manage-v4.openapi.json and as the
// live system behaves where the two differ (see specs/README.md).
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { DEFAULT_FIELDS, FieldsSyntaxError, parseFields, renderContact, renderMatter, renderPracticeArea } from './clio-render.js';
import type { FieldNode, RenderContext } from './clio-render.js';
import { applyRateLimit, authenticateBearer, injectFaults, requestMeta } from './request-meta.js';
import type { RateWindow } from './request-meta.js';
import { SandboxWriteError } from './state.js';
import type { SandboxState } from './state.js';
import type { ContactRecord, MatterRecord, ObjectName, PracticeAreaRecord } from './store.js';

/** Clio refuses offset paging past this many records; cursor paging (order=id(asc)) has no cap. */
export const OFFSET_CAP = 10_000;
export const MAX_LIMIT = 200;

type Query = Record<string, string | string[] | undefined>;
type AnyRecord = MatterRecord | ContactRecord | PracticeAreaRecord;

interface Resource<R extends AnyRecord> {
  items: () => R[];
  get: (id: number) => R | undefined;
  render: (r: R, f: FieldNode[], ctx: RenderContext) => Record<string, unknown>;
  filter: (q: Query) => ((r: R) => boolean) | null;
  label: string;
}

class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly type: string,
    message: string,
  ) {
    super(message);
  }
}

const first = (v: string | string[] | undefined): string | undefined => (Array.isArray(v) ? v[0] : v);
const many = (v: string | string[] | undefined): string[] => (v === undefined ? [] : Array.isArray(v) ? v : [v]);

function intParam(q: Query, name: string): number | undefined {
  const raw = first(q[name]);
  if (raw === undefined) return undefined;
  if (!/^-?\d+$/.test(raw)) throw new ApiError(400, 'BadRequest', `${name} must be an integer`);
  return Number(raw);
}

function timeParam(q: Query, name: string): number | undefined {
  const raw = first(q[name]);
  if (raw === undefined) return undefined;
  const t = Date.parse(raw);
  if (!Number.isFinite(t)) throw new ApiError(400, 'BadRequest', `${name} must be an ISO-8601 timestamp`);
  return t;
}

function fieldsParam(q: Query): FieldNode[] {
  const raw = first(q.fields);
  if (raw === undefined || raw === '') return DEFAULT_FIELDS;
  try {
    return parseFields(raw);
  } catch (err) {
    if (err instanceof FieldsSyntaxError) throw new ApiError(400, 'BadRequest', err.message);
    throw err;
  }
}

function encodePageToken(afterId: number): string {
  return Buffer.from(JSON.stringify({ a: afterId })).toString('base64url');
}

function decodePageToken(token: string): number {
  try {
    const parsed: unknown = JSON.parse(Buffer.from(token, 'base64url').toString('utf8'));
    if (typeof parsed === 'object' && parsed !== null && typeof (parsed as { a?: unknown }).a === 'number') return (parsed as { a: number }).a;
  } catch {
    // fall through to the 400
  }
  throw new ApiError(400, 'BadRequest', 'page_token is invalid');
}

const ORDERS = new Set(['id(asc)', 'id(desc)', 'updated_at(asc)', 'updated_at(desc)', 'created_at(asc)', 'created_at(desc)']);

function nextUrl(req: FastifyRequest, q: Query, set: Record<string, string>): string {
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(q)) {
    if (k in set) continue;
    for (const item of many(v)) params.append(k, item);
  }
  for (const [k, v] of Object.entries(set)) params.set(k, v);
  const path = req.url.split('?')[0] ?? '';
  return `${req.protocol}://${req.headers.host ?? 'localhost'}${path}?${params.toString()}`;
}

function listRecords<R extends AnyRecord>(state: SandboxState, res: Resource<R>, req: FastifyRequest): Record<string, unknown> {
  const q = req.query as Query;
  const sw = state.switches;
  const fields = fieldsParam(q);
  const limit = intParam(q, 'limit') ?? MAX_LIMIT;
  if (limit < 1 || limit > MAX_LIMIT) throw new ApiError(400, 'BadRequest', `limit must be between 1 and ${MAX_LIMIT}`);
  const orderRaw = first(q.order);
  if (orderRaw !== undefined && !ORDERS.has(orderRaw)) throw new ApiError(400, 'BadRequest', `order ${orderRaw} is not supported`);
  const pageToken = first(q.page_token);
  const cursorMode = pageToken !== undefined || orderRaw === 'id(asc)';
  if (pageToken !== undefined && orderRaw !== undefined && orderRaw !== 'id(asc)') {
    throw new ApiError(400, 'BadRequest', 'page_token requires order=id(asc)');
  }

  const updatedSince = timeParam(q, 'updated_since');
  const createdSince = timeParam(q, 'created_since');
  const ids = many(q['ids[]']).map(Number);
  const idSet = ids.length ? new Set(ids) : null;
  const extra = res.filter(q);
  const inclusive = sw.updatedSinceInclusive;
  const matches =
    updatedSince === undefined && createdSince === undefined && !idSet && !extra
      ? null
      : (r: R): boolean =>
          (updatedSince === undefined || (inclusive ? state.visibleTime(r.updatedAt) >= updatedSince : state.visibleTime(r.updatedAt) > updatedSince)) &&
          (createdSince === undefined || state.visibleTime(r.createdAt) >= createdSince) &&
          (!idSet || idSet.has(r.id)) &&
          (!extra || extra(r));

  const items = res.items();
  const ctx = state.renderContext;
  const page: R[] = [];
  let hasMore = false;
  let total = 0;

  if (cursorMode) {
    const after = pageToken === undefined ? -Infinity : decodePageToken(pageToken);
    let i = after === -Infinity ? 0 : lowerBound(items, after + 1);
    for (; i < items.length; i++) {
      const r = items[i] as R;
      if (matches && !matches(r)) continue;
      if (page.length === limit) {
        hasMore = true;
        break;
      }
      page.push(r);
    }
    total = matches ? items.reduce((n, r) => (matches(r) ? n + 1 : n), 0) : items.length;
    const last = page[page.length - 1];
    const meta: Record<string, unknown> = { paging: {}, records: total };
    if (hasMore && last) {
      // With the switch on the cursor stops one short, so the last record opens the next page too.
      const afterId = sw.repeatAtPageBoundary ? last.id - 1 : last.id;
      meta.paging = { next: nextUrl(req, q, { page_token: encodePageToken(afterId), order: 'id(asc)' }) };
    }
    return { data: page.map((r) => res.render(r, fields, ctx)), meta };
  }

  const offset = intParam(q, 'offset') ?? 0;
  if (offset < 0) throw new ApiError(400, 'BadRequest', 'offset must not be negative');
  if (offset >= OFFSET_CAP) {
    throw new ApiError(422, 'UnprocessableEntity', `Offset pagination is limited to ${OFFSET_CAP} records; use order=id(asc) with page_token`);
  }
  const order = orderRaw ?? 'id(asc)';
  let selected: R[];
  if (order.startsWith('id(')) {
    selected = matches ? items.filter(matches) : items;
    if (order === 'id(desc)') selected = [...selected].reverse();
  } else {
    const key = order.startsWith('updated_at') ? 'updatedAt' : 'createdAt';
    const dir = order.endsWith('(asc)') ? 1 : -1;
    selected = (matches ? items.filter(matches) : [...items]).sort((a, b) => (a[key] - b[key] || a.id - b.id) * dir);
  }
  total = selected.length;
  page.push(...selected.slice(offset, offset + limit));
  const meta: Record<string, unknown> = { paging: {}, records: total };
  if (offset + limit < total) {
    const nextOffset = sw.repeatAtPageBoundary ? offset + limit - 1 : offset + limit;
    meta.paging = { next: nextUrl(req, q, { offset: String(nextOffset) }) };
  }
  if (offset > 0) meta.paging = { ...(meta.paging as object), previous: nextUrl(req, q, { offset: String(Math.max(0, offset - limit)) }) };
  return { data: page.map((r) => res.render(r, fields, ctx)), meta };
}

function lowerBound(items: { id: number }[], id: number): number {
  let lo = 0;
  let hi = items.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if ((items[mid] as { id: number }).id < id) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function parseIdFile(file: string): number {
  const m = /^(\d+)\.json$/.exec(file);
  if (!m) throw new ApiError(404, 'RecordNotFound', 'Not found');
  return Number(m[1]);
}

function sendError(reply: FastifyReply, err: unknown): FastifyReply {
  if (err instanceof ApiError || err instanceof SandboxWriteError) {
    return reply.code(err.status).send({ error: { type: err.type, message: err.message } });
  }
  if (err instanceof Error && err.name === 'ZodError') return reply.code(400).send({ error: { type: 'BadRequest', message: err.message } });
  throw err;
}

function dataEnvelope(body: unknown): Record<string, unknown> {
  if (typeof body !== 'object' || body === null || typeof (body as { data?: unknown }).data !== 'object' || (body as { data?: unknown }).data === null) {
    throw new ApiError(400, 'BadRequest', 'The request body must be a JSON object with a "data" object');
  }
  return (body as { data: Record<string, unknown> }).data;
}

/** Registers /api/v4 behind bearer auth, rate limits and injected faults. */
export async function clioApiRoutes(app: FastifyInstance, opts: { state: SandboxState }): Promise<void> {
  const { state } = opts;
  const windows = new Map<string, RateWindow>();

  app.addHook('onRequest', async (req, reply) => {
    if (await injectFaults(state, req, reply, 'before-auth')) return reply;
    const check = authenticateBearer(state, req);
    if (!check.ok) {
      return reply
        .code(401)
        .header('WWW-Authenticate', 'Bearer error="invalid_token"')
        .send({ error: 'invalid_token' });
    }
    const limited = await applyRateLimit(state, windows, check.tokenId, state.switches.rateLimit, req, reply, {
      retryAfterUnit: 'seconds',
      headers: true,
      body: { error: { type: 'RateLimited', message: 'Rate limit exceeded. Retry later.' } },
    });
    if (limited) return reply;
    if (await injectFaults(state, req, reply, 'after-auth')) return reply;
    return undefined;
  });

  const matterFilter = (q: Query): ((m: MatterRecord) => boolean) | null => {
    const status = first(q.status);
    const clientId = intParam(q, 'client_id');
    const paId = intParam(q, 'practice_area_id');
    if (status === undefined && clientId === undefined && paId === undefined) return null;
    return (m) =>
      (status === undefined || m.status === status) && (clientId === undefined || m.clientId === clientId) && (paId === undefined || m.practiceAreaId === paId);
  };
  const contactFilter = (q: Query): ((c: ContactRecord) => boolean) | null => {
    const type = first(q.type);
    return type === undefined ? null : (c) => c.type === type;
  };

  const resources = {
    matters: { items: () => state.store.matters.items, get: (id: number) => state.store.matters.get(id), render: renderMatter, filter: matterFilter, label: 'Matter' },
    contacts: { items: () => state.store.contacts.items, get: (id: number) => state.store.contacts.get(id), render: renderContact, filter: contactFilter, label: 'Contact' },
    practice_areas: {
      items: () => state.store.practiceAreas.items,
      get: (id: number) => state.store.practiceAreas.get(id),
      render: renderPracticeArea,
      filter: () => null,
      label: 'PracticeArea',
    },
  } as const;

  for (const [name, res] of Object.entries(resources) as [keyof typeof resources, Resource<AnyRecord>][]) {
    app.get(`/api/v4/${name}.json`, async (req, reply) => {
      try {
        return listRecords(state, res, req);
      } catch (err) {
        return sendError(reply, err);
      }
    });
    app.get<{ Params: { file: string } }>(`/api/v4/${name}/:file`, async (req, reply) => {
      try {
        const id = parseIdFile(req.params.file);
        const rec = res.get(id);
        if (!rec) throw new ApiError(404, 'RecordNotFound', `${res.label} ${id} not found`);
        return { data: res.render(rec, fieldsParam(req.query as Query), state.renderContext) };
      } catch (err) {
        return sendError(reply, err);
      }
    });
  }

  for (const object of ['matters', 'contacts'] as const satisfies readonly ObjectName[]) {
    const res = resources[object] as Resource<AnyRecord>;
    app.post(`/api/v4/${object}.json`, async (req, reply) => {
      requestMeta(req).body = req.body;
      try {
        const rec = state.createRecord(object, dataEnvelope(req.body));
        return reply.code(201).send({ data: res.render(rec, fieldsParam(req.query as Query), state.renderContext) });
      } catch (err) {
        return sendError(reply, err);
      }
    });
    app.patch<{ Params: { file: string } }>(`/api/v4/${object}/:file`, async (req, reply) => {
      requestMeta(req).body = req.body;
      try {
        const id = parseIdFile(req.params.file);
        const ifMatch = req.headers['if-match'];
        const rec = state.updateRecord(object, id, dataEnvelope(req.body), typeof ifMatch === 'string' ? ifMatch : undefined);
        return { data: res.render(rec, fieldsParam(req.query as Query), state.renderContext) };
      } catch (err) {
        return sendError(reply, err);
      }
    });
    app.delete<{ Params: { file: string } }>(`/api/v4/${object}/:file`, async (req, reply) => {
      try {
        state.deleteRecord(object, parseIdFile(req.params.file));
        return reply.code(204).send();
      } catch (err) {
        return sendError(reply, err);
      }
    });
  }

  // Any other /api path: Clio's JSON 404, not Fastify's.
  app.all('/api/*', async (req, reply) => {
    requestMeta(req);
    return reply.code(404).send({ error: { type: 'NotFound', message: `No route matches ${req.method} ${req.url.split('?')[0]}` } });
  });
}
