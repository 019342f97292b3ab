import type { ConnectionConfig, ConnectorDefinition, ListCall, ObjectDefinition, RecordCall, RequestTemplate, TimeFormat } from '../config/schema.js';
import { AppError } from '../errors.js';
import { getPath, mapFields, readId, readVersion } from '../sync/record.js';
import { createCrmHttpClient } from './http-client.js';
import type { CrmHttpClient, CrmHttpClientOptions, CrmHttpLog } from './http-client.js';
import type { TokenProvider } from './token-provider.js';

/**
 * The declarative connector runtime: turns a connector definition (plain data, validated by
 * the config schema) into list, get, create and update calls through the CRM HTTP client.
 * Nothing here knows a CRM by name; presets are data in src/crm/presets/.
 */

export class ConnectorError extends AppError {
  constructor(code: 'CONNECTOR_NOT_CONFIGURED' | 'CONNECTOR_BAD_RESPONSE' | 'CONNECTOR_TEMPLATE', detail: string) {
    super(502, code, detail);
    this.name = 'ConnectorError';
  }
}

/** Where a page left the listing, for logs and for resuming. */
export interface PageCursor {
  /** The next page's URL (nextUrl), token (cursor), number (page) or offset; absent on the last page. */
  next?: string | number;
  /** Set on the first page of a query restarted at an anchor (a result cap was near). */
  anchor?: { updatedAt: string; id: string };
  /** How many queries this listing has run (1 + restarts). */
  query: number;
}

export interface ListPage {
  object: string;
  records: unknown[];
  cursor: PageCursor;
  last: boolean;
  /** What the pages are ordered by, from the definition: it decides when a poll cursor may advance. */
  order: ListCall['order'];
  /** How many records match the whole query, when the CRM says (`totalPath`). */
  total?: number;
}

export interface MappedRecord {
  id: string | undefined;
  version: string | null;
  updatedAt: unknown;
  fields: Record<string, unknown>;
  /** The record carries the bridge's origin marker. */
  fromBridge: boolean;
}

export interface WriteOptions {
  signal?: AbortSignal;
  /** Stamped into the origin marker (`{{writeId}}`) when the object has one. */
  writeId?: string;
  headers?: Record<string, string>;
}

export interface Connector {
  readonly definition: ConnectorDefinition;
  readonly client: CrmHttpClient;
  /**
   * Pages of records changed at or after `since` (exclusive or inclusive as the CRM decides);
   * with `from` (a page's `cursor.next`), from that page on, as a listing stopped part-way.
   */
  listChanges(args: { object: string; since: Date | string; signal?: AbortSignal; pageSize?: number; from?: string | number }): AsyncIterable<ListPage>;
  /** Every record's id and version, page by page, for the sweep. */
  listAll(args: { object: string; signal?: AbortSignal }): AsyncIterable<Array<{ id: string; version: string | null }>>;
  /** The raw record, or null when the CRM says it does not exist. */
  getRecord(object: string, id: string, opts?: { signal?: AbortSignal }): Promise<unknown>;
  /** `record` is in the CRM's own shape (see toRecord); returns the CRM's answer. */
  createRecord(object: string, record: Record<string, unknown>, opts?: WriteOptions): Promise<unknown>;
  updateRecord(object: string, id: string, record: Record<string, unknown>, opts?: WriteOptions): Promise<unknown>;
  mapRecord(object: string, raw: unknown): MappedRecord;
  /**
   * Canonical fields back into the CRM's record shape, by the field map: read-only fields left
   * out, `writeAs` fields written through their template.
   */
  toRecord(object: string, fields: Record<string, unknown>): Record<string, unknown>;
}

export interface CreateConnectorOptions {
  definition: ConnectorDefinition;
  /** A connection's override of the definition's base URL. */
  baseUrl?: string;
  tokens?: TokenProvider;
  log?: CrmHttpLog;
  /** Client settings beyond what the definition says (timeouts, retries). */
  http?: Partial<CrmHttpClientOptions>;
  /** An existing client (the probe passes one per host it tries). */
  client?: CrmHttpClient;
  /**
   * The escape hatch for what data cannot express: replace any method of the built connector.
   * The presets do not use it; a CRM that needs it should say why in a comment.
   */
  extend?: (base: Connector) => Partial<Connector>;
}

export function connectorForConnection(connection: Pick<ConnectionConfig, 'connector' | 'baseUrl'>, opts: Omit<CreateConnectorOptions, 'definition' | 'baseUrl'> = {}): Connector {
  return createConnector({ ...opts, definition: connection.connector, ...(connection.baseUrl === undefined ? {} : { baseUrl: connection.baseUrl }) });
}

export function createConnector(opts: CreateConnectorOptions): Connector {
  const { definition } = opts;
  const baseUrl = opts.baseUrl ?? definition.baseUrl;
  const client =
    opts.client ??
    (() => {
      if (baseUrl === undefined) throw new ConnectorError('CONNECTOR_NOT_CONFIGURED', 'the connector has no baseUrl and the connection sets none');
      return createCrmHttpClient({
        baseUrl,
        retryAfterUnit: definition.rateLimit.retryAfterUnit,
        minIntervalMs: definition.rateLimit.minIntervalMs,
        userAgent: 'crm-bridge',
        ...(opts.tokens ? { tokens: opts.tokens } : {}),
        ...(opts.log ? { log: opts.log } : {}),
        ...opts.http,
      });
    })();

  function objectDef(object: string): ObjectDefinition {
    const def = definition.objects[object];
    if (def === undefined) throw new ConnectorError('CONNECTOR_NOT_CONFIGURED', `the connector has no object "${object}" (it has ${Object.keys(definition.objects).join(', ')})`);
    return def;
  }

  function call<K extends 'list' | 'get' | 'create' | 'update'>(object: string, kind: K): NonNullable<ObjectDefinition[K]> {
    const c = objectDef(object)[kind];
    if (c === undefined) throw new ConnectorError('CONNECTOR_NOT_CONFIGURED', `the connector defines no ${kind} call for "${object}"`);
    return c as NonNullable<ObjectDefinition[K]>;
  }

  async function send(template: RequestTemplate, vars: Vars, signal: AbortSignal | undefined, extra: { body?: unknown; idempotent?: boolean; headers?: Record<string, string>; acceptStatus?: number[] } = {}) {
    const query: Record<string, string> = {};
    for (const [k, v] of Object.entries(template.query)) {
      const rendered = renderValue(v, vars, `query.${k}`);
      if (rendered !== OMIT) query[k] = String(rendered);
    }
    const templatedBody = template.body === undefined ? undefined : renderValue(template.body, vars, 'body');
    const body = extra.body ?? (templatedBody === OMIT ? undefined : templatedBody);
    return client.request({
      method: template.method,
      url: renderPath(template.path, vars),
      query,
      ...(body === undefined ? {} : { json: body }),
      headers: { ...template.headers, ...extra.headers },
      ...(signal ? { signal } : {}),
      // List and get calls read only, including a search that is a POST (HubSpot).
      idempotent: extra.idempotent ?? true,
      ...(extra.acceptStatus ? { acceptStatus: extra.acceptStatus } : {}),
    });
  }

  async function* pages(object: string, since: string | undefined, signal: AbortSignal | undefined, pageSize?: number, from?: string | number): AsyncGenerator<ListPage> {
    const def = objectDef(object);
    const defined = call(object, 'list');
    const list = pageSize === undefined ? defined : { ...defined, limit: pageSize };
    const firstPage = list.pagination.style === 'page' ? list.pagination.firstPage : 1;
    let template = list.request;
    let vars: Vars = { since, limit: list.limit, page: firstPage, offset: 0 };
    let nextUrl: string | undefined;
    // The links and cursors this query has followed: one handed back again (a CRM bug, a cache in
    // front of it) would page forever, spending the rate limit while the run holds its lease.
    let followed = new Set<string | number>(from === undefined ? [] : [from]);
    // Going on from a page a stopped listing reached: its `next`, in the pagination's own terms.
    if (from !== undefined) {
      const style = list.pagination.style;
      if (style === 'nextUrl') nextUrl = String(from);
      else if (style === 'cursor') vars = { ...vars, cursor: from };
      else if (style === 'page') vars = { ...vars, page: Number(from) };
      else if (style === 'offset') vars = { ...vars, offset: Number(from) };
    }
    let readInQuery = 0;
    let query = 1;
    let anchor: PageCursor['anchor'];
    for (;;) {
      const res = nextUrl !== undefined ? await client.request({ url: nextUrl, ...(signal ? { signal } : {}), headers: template.headers }) : await send(template, vars, signal);
      const records = list.records === undefined ? res.body : getPath(res.body, list.records);
      if (!Array.isArray(records)) {
        throw new ConnectorError('CONNECTOR_BAD_RESPONSE', `${res.url}: expected an array of records at "${list.records ?? '(the response)'}", found ${describeType(records)}`);
      }
      readInQuery += records.length;

      let next: string | number | undefined;
      const p = list.pagination;
      switch (p.style) {
        case 'nextUrl': {
          const u = getPath(res.body, p.nextUrlPath);
          next = typeof u === 'string' && u !== '' ? u : undefined;
          nextUrl = next;
          break;
        }
        case 'cursor': {
          const c = getPath(res.body, p.cursorPath);
          next = (typeof c === 'string' && c !== '') || typeof c === 'number' ? c : undefined;
          vars = { ...vars, cursor: next };
          break;
        }
        case 'page': {
          const page = Number(vars.page);
          const total = p.totalPagesPath === undefined ? undefined : Number(getPath(res.body, p.totalPagesPath));
          const more = records.length > 0 && (total !== undefined && Number.isFinite(total) ? page - firstPage + 1 < total : records.length >= list.limit);
          next = more ? page + 1 : undefined;
          vars = { ...vars, page: page + 1 };
          break;
        }
        case 'offset': {
          const offset = Number(vars.offset) + records.length;
          const total = p.totalPath === undefined ? undefined : Number(getPath(res.body, p.totalPath));
          const more = records.length > 0 && (total !== undefined && Number.isFinite(total) ? offset < total : records.length >= list.limit);
          next = more ? offset : undefined;
          vars = { ...vars, offset };
          break;
        }
        case 'none':
          next = undefined;
      }
      if (next !== undefined && (p.style === 'nextUrl' || p.style === 'cursor')) {
        if (followed.has(next)) throw new ConnectorError('CONNECTOR_BAD_RESPONSE', `${res.url}: the next page it names repeats one this "${object}" listing already followed; it would never end`);
        followed.add(next);
      }

      const last = next === undefined;
      const total = list.totalPath === undefined ? NaN : Number(getPath(res.body, list.totalPath));
      yield {
        object,
        records,
        cursor: { ...(next === undefined ? {} : { next }), ...(anchor ? { anchor } : {}), query },
        last,
        order: list.order,
        ...(Number.isFinite(total) ? { total } : {}),
      };
      if (last) return;

      // A CRM that caps one query's results (HubSpot search: 10,000) is asked again from the
      // last record read, before the page that would cross the cap.
      if (list.restart && readInQuery + list.limit > list.restart.afterRecords) {
        const lastRecord = records.at(-1);
        const id = readId(lastRecord, def);
        const updatedAt = def.updatedAtPath === undefined ? undefined : formatTime(getPath(lastRecord, def.updatedAtPath), list.since.format);
        if (id === undefined || updatedAt === undefined) {
          throw new ConnectorError('CONNECTOR_BAD_RESPONSE', `cannot restart the "${object}" listing: the last record has no id or ${def.updatedAtPath ?? 'updatedAtPath'}`);
        }
        if (anchor && anchor.id === id && anchor.updatedAt === updatedAt) {
          throw new ConnectorError('CONNECTOR_BAD_RESPONSE', `the "${object}" listing made no progress after restarting at ${updatedAt} / ${id}`);
        }
        anchor = { updatedAt, id };
        template = list.restart.request;
        vars = { since, limit: list.limit, page: firstPage, offset: 0, 'anchor.updatedAt': updatedAt, 'anchor.id': id };
        nextUrl = undefined;
        followed = new Set();
        readInQuery = 0;
        query++;
      }
    }
  }

  function mapRecord(object: string, raw: unknown): MappedRecord {
    const def = objectDef(object);
    return {
      id: readId(raw, def),
      version: readVersion(raw, def),
      updatedAt: def.updatedAtPath === undefined ? undefined : getPath(raw, def.updatedAtPath),
      fields: mapFields(raw, def),
      fromBridge: carriesOriginMarker(raw, def),
    };
  }

  function writeBody(object: string, c: RecordCall, operation: 'create' | 'update', record: Record<string, unknown>, writeId: string | undefined, vars: Vars): unknown {
    const def = objectDef(object);
    const out = structuredClone(record);
    for (const path of def.lowercaseOnWrite ?? []) {
      const v = getPath(out, path);
      if (typeof v === 'string') setPath(out, path, v.toLowerCase());
    }
    if (def.originMarker && stampsMarker(def, operation)) {
      const value = renderPath(def.originMarker.value, { writeId }, false);
      setPath(out, def.originMarker.path, value);
    }
    if (c.bodyPath === undefined) return out;
    // The template may hold fixed parts of the envelope (JSON:API `type`, `id`); the record merges into them.
    const base = c.request.body === undefined ? {} : renderValue(c.request.body, vars, 'body');
    const envelope = base !== null && typeof base === 'object' && !Array.isArray(base) ? (base as Record<string, unknown>) : {};
    const existing = getPath(envelope, c.bodyPath);
    setPath(envelope, c.bodyPath, isPlainObject(existing) ? deepMerge(existing, out) : out);
    return envelope;
  }

  function recordOf(body: unknown, c: RecordCall): unknown {
    return c.record === undefined ? body : getPath(body, c.record);
  }

  const base: Connector = {
    definition,
    client,
    listChanges({ object, since, signal, pageSize, from }) {
      const list = call(object, 'list');
      return pages(object, formatTime(since, list.since.format), signal, pageSize, from);
    },
    async *listAll({ object, signal }) {
      const def = objectDef(object);
      const list = call(object, 'list');
      for await (const page of pages(object, list.since.whenListingAll, signal)) {
        yield page.records.flatMap((r) => {
          const id = readId(r, def);
          return id === undefined ? [] : [{ id, version: readVersion(r, def) }];
        });
      }
    },
    async getRecord(object, id, opts = {}) {
      const c = call(object, 'get');
      const res = await send(c.request, { id }, opts.signal, { acceptStatus: [404] });
      if (res.status === 404) return null;
      return recordOf(res.body, c);
    },
    async createRecord(object, record, opts = {}) {
      const c = call(object, 'create');
      const res = await send(c.request, {}, opts.signal, { body: writeBody(object, c, 'create', record, opts.writeId, {}), idempotent: false, ...(opts.headers ? { headers: opts.headers } : {}) });
      return recordOf(res.body, c);
    },
    async updateRecord(object, id, record, opts = {}) {
      const c = call(object, 'update');
      const res = await send(c.request, { id }, opts.signal, { body: writeBody(object, c, 'update', record, opts.writeId, { id }), idempotent: false, ...(opts.headers ? { headers: opts.headers } : {}) });
      return recordOf(res.body, c);
    },
    mapRecord,
    toRecord(object, fields) {
      const def = objectDef(object);
      if (def.fields === undefined) return structuredClone(fields);
      const readOnly = new Set(def.readOnly ?? []);
      const out: Record<string, unknown> = {};
      for (const [name, path] of Object.entries(def.fields)) {
        if (readOnly.has(name) || !Object.hasOwn(fields, name)) continue;
        const writeAs = def.writeAs !== undefined && Object.hasOwn(def.writeAs, name) ? def.writeAs[name] : undefined;
        if (writeAs !== undefined) mergeWritten(out, renderWriteAs(object, name, writeAs, fields[name]));
        // A relation written by id is cleared as a whole: `practice_area: null`, not
        // `practice_area: {id: null}`, which Clio refuses (as JSON:API wants `data: null`).
        else if (fields[name] === null && path.endsWith('.id')) setPath(out, path.slice(0, -'.id'.length), null);
        // HubSpot clears a property only when sent "" (`nullAs`); a null it accepts and ignores.
        else if (fields[name] === null && def.nullAs !== undefined) setPath(out, path, def.nullAs);
        else setPath(out, path, fields[name]);
      }
      return out;
    },
  };
  return opts.extend ? { ...base, ...opts.extend(base) } : base;
}

/** Whether a write of this kind carries the origin marker (see `originMarker.stampOn`). */
export function stampsMarker(def: ObjectDefinition, operation: 'create' | 'update'): boolean {
  return def.originMarker !== undefined && (operation === 'create' || def.originMarker.stampOn === 'write');
}

/** The record was written by the bridge: its marker starts with the marker's fixed prefix. */
export function carriesOriginMarker(raw: unknown, def: ObjectDefinition): boolean {
  if (!def.originMarker) return false;
  const prefix = def.originMarker.value.split('{{')[0] ?? '';
  const v = getPath(raw, def.originMarker.path);
  return typeof v === 'string' && prefix !== '' && v.startsWith(prefix);
}

/**
 * A field's `writeAs` template with `{{value}}` filled in. A null cannot be written this way: the
 * template can only add what it describes (Clio removes an email address only by the id of its
 * entry), so the outbound route refuses such a write before it is queued, and this refuses it
 * rather than send something else.
 */
function renderWriteAs(object: string, name: string, template: unknown, value: unknown): unknown {
  if (value === null) throw new ConnectorError('CONNECTOR_TEMPLATE', `${object}.${name}: a field written through writeAs cannot be cleared with null`);
  return renderValue(template, { value }, `${object}.writeAs.${name}`);
}

/**
 * Merges a rendered `writeAs` template into the record being written: objects key by key, and
 * arrays appended, so two fields written into one list (a work and a home email) each add their
 * entry instead of the second replacing the first.
 */
function mergeWritten(target: Record<string, unknown>, written: unknown): void {
  if (!isPlainObject(written)) return;
  for (const [key, value] of Object.entries(written)) {
    if (key === '__proto__' || key === 'constructor' || key === 'prototype') continue;
    const prev = target[key];
    if (Array.isArray(prev) && Array.isArray(value)) target[key] = [...prev, ...value];
    else if (isPlainObject(prev) && isPlainObject(value)) {
      const merged = { ...prev };
      mergeWritten(merged, value);
      target[key] = merged;
    } else target[key] = value;
  }
}

// ---- templates ----------------------------------------------------------------------------

type Vars = Record<string, unknown>;
const OMIT = Symbol('omit');
const WHOLE = /^\{\{\s*([\w.]+)\s*\}\}$/;
const PLACEHOLDER = /\{\{\s*([\w.]+)\s*\}\}/g;

/** A template value: a lone `{{x}}` keeps the variable's type (limits stay numbers) or omits the key when unset. */
function renderValue(value: unknown, vars: Vars, where: string): unknown {
  if (typeof value === 'string') {
    const whole = WHOLE.exec(value);
    if (whole) {
      const v = vars[whole[1] ?? ''];
      return v === undefined ? OMIT : v;
    }
    return value.replace(PLACEHOLDER, (_m, name: string) => {
      const v = vars[name];
      if (v === undefined) throw new ConnectorError('CONNECTOR_TEMPLATE', `${where}: {{${name}}} has no value here`);
      if (v !== null && typeof v === 'object') throw new ConnectorError('CONNECTOR_TEMPLATE', `${where}: {{${name}}} is ${describeType(v)}, which cannot go inside a string`);
      return String(v);
    });
  }
  if (Array.isArray(value)) return value.map((v, i) => renderValue(v, vars, `${where}[${i}]`)).filter((v) => v !== OMIT);
  if (value !== null && typeof value === 'object') {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) {
      const r = renderValue(v, vars, `${where}.${k}`);
      if (r !== OMIT) out[k] = r;
    }
    return out;
  }
  return value;
}

function renderPath(path: string, vars: Vars, encode = true): string {
  return path.replace(PLACEHOLDER, (_m, name: string) => {
    const v = vars[name];
    if (v === undefined) throw new ConnectorError('CONNECTOR_TEMPLATE', `${path}: {{${name}}} has no value here`);
    return encode ? encodeURIComponent(String(v)) : String(v);
  });
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

function deepMerge(a: Record<string, unknown>, b: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = { ...a };
  for (const [k, v] of Object.entries(b)) {
    const prev = out[k];
    out[k] = isPlainObject(prev) && isPlainObject(v) ? deepMerge(prev, v) : v;
  }
  return out;
}

/** Sets a dotted path, creating plain objects on the way; refuses prototype keys. */
export function setPath(target: Record<string, unknown>, path: string, value: unknown): void {
  const keys = path.split('.');
  let current: Record<string, unknown> = target;
  for (const [i, key] of keys.entries()) {
    if (key === '__proto__' || key === 'constructor' || key === 'prototype') return;
    if (i === keys.length - 1) {
      current[key] = value;
      return;
    }
    const next = current[key];
    if (next === null || typeof next !== 'object' || Array.isArray(next)) current[key] = {};
    current = current[key] as Record<string, unknown>;
  }
}

/** A time as the CRM wants it in a request; accepts a Date, an ISO string or epoch milliseconds. */
export function formatTime(value: unknown, format: TimeFormat): string | undefined {
  let ms: number;
  if (value instanceof Date) ms = value.getTime();
  else if (typeof value === 'number') ms = value;
  else if (typeof value === 'string' && /^\d{11,}$/.test(value)) ms = Number(value);
  else if (typeof value === 'string') ms = Date.parse(value);
  else return undefined;
  if (!Number.isFinite(ms)) return undefined;
  switch (format) {
    case 'iso8601':
      return new Date(ms).toISOString();
    case 'iso8601-seconds':
      // Flooring can only widen a changed-since window; the gate absorbs the overlap.
      return new Date(Math.floor(ms / 1000) * 1000).toISOString().replace('.000Z', 'Z');
    case 'epoch-ms':
      return String(ms);
    case 'epoch-seconds':
      return String(Math.floor(ms / 1000));
  }
}

export function describeType(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  return typeof value === 'object' ? 'an object' : `a ${typeof value}`;
}
