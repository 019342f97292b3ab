// Clio's `fields` selection: a comma list with nested braces (`client{id,name}`). Without it a
// list or item carries only `id` and `etag`; a nested relation named without braces gets the
// same default. Unknown names are ignored.
import { hashInts } from './prng.js';
import { contactEmail, contactName, contactPhone } from './seed-data.js';
import { CONTACT_CUSTOM_FIELDS, MATTER_CUSTOM_FIELDS } from './store.js';
import type { ContactRecord, CustomFieldDef, MatterRecord, PracticeAreaRecord, RecordStore } from './store.js';

export interface FieldNode {
  name: string;
  children: FieldNode[] | null;
}

export class FieldsSyntaxError extends Error {}

export function parseFields(spec: string): FieldNode[] {
  let pos = 0;
  const parseList = (depth: number): FieldNode[] => {
    const nodes: FieldNode[] = [];
    while (pos < spec.length) {
      const m = /^[A-Za-z0-9_]*/.exec(spec.slice(pos));
      const name = m?.[0] ?? '';
      pos += name.length;
      let children: FieldNode[] | null = null;
      if (spec[pos] === '{') {
        pos++;
        children = parseList(depth + 1);
        if (spec[pos] !== '}') throw new FieldsSyntaxError(`unclosed "{" in fields`);
        pos++;
      }
      if (name) nodes.push({ name, children });
      if (spec[pos] === ',') {
        pos++;
        continue;
      }
      if (spec[pos] === '}' && depth > 0) return nodes;
      if (pos < spec.length) throw new FieldsSyntaxError(`unexpected "${spec[pos]}" in fields at ${pos}`);
    }
    if (depth > 0) throw new FieldsSyntaxError(`unclosed "{" in fields`);
    return nodes;
  };
  return parseList(0);
}

export const DEFAULT_FIELDS: FieldNode[] = [
  { name: 'id', children: null },
  { name: 'etag', children: null },
];

export interface RenderContext {
  store: RecordStore;
  /** Formats an epoch-ms timestamp as the API shows it (honours one-second granularity). */
  formatTime(ms: number): string;
}

type Getter<R> = (rec: R, children: FieldNode[] | null, ctx: RenderContext) => unknown;

export function etagOf(id: number, version: number, updatedAt: number): string {
  // Clio's etags are quoted opaque strings that change on every write.
  return `"${hashInts(id, version, updatedAt)}${hashInts(version, id)}"`;
}

const day = (ms: number): string => new Date(ms).toISOString().slice(0, 10);

function render<R>(getters: Record<string, Getter<R>>, rec: R, fields: FieldNode[], ctx: RenderContext): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const f of fields) {
    const g = getters[f.name];
    if (g) out[f.name] = g(rec, f.children, ctx);
  }
  return out;
}

function customFieldValues(
  recId: number,
  defs: readonly CustomFieldDef[],
  values: ReadonlyArray<string | null>,
  children: FieldNode[] | null,
  ctx: RenderContext,
  updatedAt: number,
  createdAt: number,
): Record<string, unknown>[] {
  const getters: Record<string, Getter<{ def: CustomFieldDef; value: string }>> = {
    id: ({ def }) => `${def.fieldType}-${recId}${def.id}`,
    etag: ({ def, value }) => `"${hashInts(recId, def.id, value.length)}"`,
    field_name: ({ def }) => def.name,
    field_type: ({ def }) => def.fieldType,
    field_required: () => false,
    field_displayed: () => true,
    field_display_order: ({ def }) => def.id % 100,
    value: ({ value }) => value,
    soft_deleted: () => false,
    created_at: () => ctx.formatTime(createdAt),
    updated_at: () => ctx.formatTime(updatedAt),
    custom_field: ({ def }) => ({ id: def.id, etag: `"${hashInts(def.id)}"`, name: def.name, field_type: def.fieldType }),
  };
  const out: Record<string, unknown>[] = [];
  defs.forEach((def, i) => {
    const value = values[i];
    if (value != null) out.push(render(getters, { def, value }, children ?? DEFAULT_FIELDS, ctx));
  });
  return out;
}

const practiceAreaGetters: Record<string, Getter<PracticeAreaRecord>> = {
  id: (p) => p.id,
  etag: (p) => etagOf(p.id, p.version, p.updatedAt),
  name: (p) => p.name,
  category: (p) => p.category,
  code: (p) => p.code,
  created_at: (p, _c, ctx) => ctx.formatTime(p.createdAt),
  updated_at: (p, _c, ctx) => ctx.formatTime(p.updatedAt),
};

const contactGetters: Record<string, Getter<ContactRecord>> = {
  id: (c) => c.id,
  etag: (c) => etagOf(c.id, c.version, c.updatedAt),
  name: (c) => contactName(c),
  first_name: (c) => c.firstName,
  last_name: (c) => c.lastName,
  type: (c) => c.type,
  title: (c) => c.title,
  initials: (c) =>
    contactName(c)
      .split(/\s+/)
      .map((w) => w[0] ?? '')
      .join('')
      .toUpperCase(),
  is_client: () => true,
  primary_email_address: (c) => contactEmail(c),
  primary_phone_number: (c) => contactPhone(c),
  created_at: (c, _ch, ctx) => ctx.formatTime(c.createdAt),
  updated_at: (c, _ch, ctx) => ctx.formatTime(c.updatedAt),
  email_addresses: (c, children, ctx) => {
    const address = contactEmail(c);
    if (address === null) return [];
    const e = { id: c.id * 10 + 1, etag: `"${hashInts(c.id, 1, c.version)}"`, address, name: 'Work', primary: true, created_at: ctx.formatTime(c.createdAt), updated_at: ctx.formatTime(c.updatedAt) };
    return [pickKeys(e, children)];
  },
  phone_numbers: (c, children, ctx) => {
    const number = contactPhone(c);
    if (number === null) return [];
    const p = { id: c.id * 10 + 2, etag: `"${hashInts(c.id, 2, c.version)}"`, number, name: 'Work', primary: true, created_at: ctx.formatTime(c.createdAt), updated_at: ctx.formatTime(c.updatedAt) };
    return [pickKeys(p, children)];
  },
  custom_field_values: (c, children, ctx) =>
    customFieldValues(c.id, CONTACT_CUSTOM_FIELDS, c.custom, children, ctx, c.updatedAt, c.createdAt),
};

function pickKeys(obj: Record<string, unknown>, children: FieldNode[] | null): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const f of children ?? DEFAULT_FIELDS) if (f.name in obj) out[f.name] = obj[f.name];
  return out;
}

const capitalised = { open: 'Open', pending: 'Pending', closed: 'Closed' } as const;

const matterGetters: Record<string, Getter<MatterRecord>> = {
  id: (m) => m.id,
  etag: (m) => etagOf(m.id, m.version, m.updatedAt),
  number: (m) => m.number,
  display_number: (m, _c, ctx) => {
    const client = m.clientId === null ? undefined : ctx.store.contacts.get(m.clientId);
    const label = client ? (client.lastName ?? contactName(client)) : 'Unassigned';
    return `${String(m.number).padStart(5, '0')}-${label}`;
  },
  description: (m) => m.description,
  // Clio reads statuses capitalised and accepts only lowercase on write.
  status: (m) => capitalised[m.status],
  location: (m) => m.location,
  client_reference: (m) => m.clientReference,
  client_id: (m) => m.clientId,
  billable: (m) => m.billable,
  billing_method: () => 'hourly',
  open_date: (m) => (m.openDate === undefined ? day(m.createdAt) : m.openDate),
  pending_date: (m) => (m.pendingDate === undefined ? null : m.pendingDate),
  close_date: (m) => (m.closeDate === undefined ? (m.status === 'closed' ? day(m.updatedAt) : null) : m.closeDate),
  created_at: (m, _c, ctx) => ctx.formatTime(m.createdAt),
  updated_at: (m, _c, ctx) => ctx.formatTime(m.updatedAt),
  shared: () => false,
  has_tasks: () => false,
  client: (m, children, ctx) => {
    const client = m.clientId === null ? undefined : ctx.store.contacts.get(m.clientId);
    return client ? render(contactGetters, client, children ?? DEFAULT_FIELDS, ctx) : null;
  },
  // A nested object, not the string some docs and integrations assume.
  practice_area: (m, children, ctx) => {
    const pa = m.practiceAreaId === null ? undefined : ctx.store.practiceAreas.get(m.practiceAreaId);
    return pa ? render(practiceAreaGetters, pa, children ?? DEFAULT_FIELDS, ctx) : null;
  },
  custom_field_values: (m, children, ctx) =>
    customFieldValues(m.id, MATTER_CUSTOM_FIELDS, m.custom, children, ctx, m.updatedAt, m.createdAt),
};

export const renderMatter = (m: MatterRecord, fields: FieldNode[], ctx: RenderContext) => render(matterGetters, m, fields, ctx);
export const renderContact = (c: ContactRecord, fields: FieldNode[], ctx: RenderContext) => render(contactGetters, c, fields, ctx);
export const renderPracticeArea = (p: PracticeAreaRecord, fields: FieldNode[], ctx: RenderContext) =>
  render(practiceAreaGetters, p, fields, ctx);

/** Everything the sandbox knows about a record: used by automation payloads and the control API. */
export const FULL_MATTER_FIELDS = parseFields(
  'id,etag,number,display_number,description,status,location,client_reference,client_id,billable,billing_method,open_date,pending_date,close_date,created_at,updated_at,client{id,etag,name,type},practice_area{id,etag,name,category,code},custom_field_values{id,etag,field_name,field_type,value,custom_field}',
);
export const FULL_CONTACT_FIELDS = parseFields(
  'id,etag,name,first_name,last_name,type,title,primary_email_address,primary_phone_number,created_at,updated_at,custom_field_values{id,etag,field_name,field_type,value,custom_field}',
);
export const FULL_PRACTICE_AREA_FIELDS = parseFields('id,etag,name,category,code,created_at,updated_at');
