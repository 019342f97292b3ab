import { createHash } from 'node:crypto';
import type { ObjectDefinition } from '../config/schema.js';
import type { ChangeSource } from '../db/schema/index.js';
import type { ObservedChange } from './change-gate.js';

/** Reads a dotted path through own properties only, so `__proto__.x` can never reach a prototype. */
export function getPath(value: unknown, path: string): unknown {
  let current: unknown = value;
  // Walks the dots without splitting: the poller reads a dozen paths of every record it lists.
  let start = 0;
  for (;;) {
    const dot = path.indexOf('.', start);
    const key = dot < 0 ? path.slice(start) : path.slice(start, dot);
    if (current === null || typeof current !== 'object' || !Object.hasOwn(current, key)) return undefined;
    current = (current as Record<string, unknown>)[key];
    if (dot < 0) return current;
    start = dot + 1;
  }
}

/**
 * Whether a record answers for a path: it has the key, or a null (or a scalar) on the way makes
 * the mapped value null. False only where an object lacks the key: the record leaves it out.
 */
export function holdsPath(value: unknown, path: string): boolean {
  let current: unknown = value;
  for (const key of path.split('.')) {
    if (current === null || typeof current !== 'object') return true;
    if (!Object.hasOwn(current, key)) return false;
    current = (current as Record<string, unknown>)[key];
  }
  return true;
}

/** JSON with object keys sorted at every depth: equal content, equal text, whatever the key order. */
export function canonicalJson(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  // Built by appending, with no array per level: the poller hashes every record it maps.
  let out: string;
  if (Array.isArray(value)) {
    out = '[';
    for (let i = 0; i < value.length; i++) out += (i === 0 ? '' : ',') + canonicalJson(value[i]);
    return `${out}]`;
  }
  out = '{';
  for (const k of Object.keys(value).sort()) {
    const v = (value as Record<string, unknown>)[k];
    if (v === undefined) continue;
    out += (out.length === 1 ? '' : ',') + JSON.stringify(k) + ':' + canonicalJson(v);
  }
  return `${out}}`;
}

export function contentHash(fields: unknown): string {
  return createHash('sha256').update(canonicalJson(fields)).digest('hex');
}

/**
 * The canonical fields delivered downstream and hashed by the gate. Without a field map, the
 * whole record minus volatile keys and the version/timestamp keys (they change on every write,
 * so keeping them would hide no-op touches). With one, a field holding the object's `nullAs`
 * is null.
 */
export function mapFields(raw: unknown, def: ObjectDefinition): Record<string, unknown> {
  if (def.fields) {
    // A CRM that clears a field to a value (`nullAs`: HubSpot's "") has cleared it: null.
    const nullAs = def.nullAs;
    return Object.fromEntries(
      Object.entries(def.fields).map(([name, path]) => {
        const value = getPath(raw, path) ?? null;
        return [name, nullAs !== undefined && value === nullAs ? null : value];
      }),
    );
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) return {};
  const excluded = new Set([...def.volatile, def.updatedAtPath, def.versionPath].filter((k): k is string => k !== undefined));
  return Object.fromEntries(Object.entries(raw).filter(([k]) => !excluded.has(k)));
}

/** An id as the CRM gave it (number or string), normalised to a non-empty string. */
export function readId(raw: unknown, def: ObjectDefinition): string | undefined {
  const id = getPath(raw, def.idPath);
  if (typeof id === 'number' && Number.isFinite(id)) return String(id);
  if (typeof id === 'string' && id.trim() !== '' && id.length <= 256) return id;
  return undefined;
}

export function readVersion(raw: unknown, def: ObjectDefinition): string | null {
  const path = def.versionPath ?? def.updatedAtPath;
  if (path === undefined) return null;
  const version = getPath(raw, path);
  if (typeof version === 'number' && Number.isFinite(version)) return String(version);
  return typeof version === 'string' && version !== '' ? version : null;
}

// The offset may be hours alone (ISO 8601's `±hh`): Postgres writes a timestamptz as
// `2026-11-20 10:00:00+00`, and a CRM passing its database's text on sends just that.
const ISO_DATE = /^\d{4}-\d{2}-\d{2}(?:[Tt ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?<offset>[Zz]|[+-]\d{2}(?::?\d{2})?)?|[Zz])?$/;

/**
 * A sortable reading of a version: numbers as themselves, ISO times as epoch ms. Opaque
 * versions (etags) rank null and are only ever compared for equality.
 */
export function versionRank(version: string | null): number | null {
  if (version === null) return null;
  if (/^-?\d+(\.\d+)?$/.test(version)) return Number(version);
  const iso = ISO_DATE.exec(version);
  if (iso === null) return null;
  // Date.parse reads `+01` as nothing at all (NaN): such a time ranked null, so the record lost
  // its order and an older version arriving after a newer one went downstream (rule 3).
  const ms = Date.parse(iso.groups?.offset?.length === 3 ? `${version}:00` : version);
  return Number.isNaN(ms) ? null : ms;
}

/** One version however it is written: equal text, or equal instants/numbers for versions that rank. */
export function sameVersion(a: string | null, b: string | null): boolean {
  if (a === null || b === null) return a === b;
  if (a === b) return true;
  const ra = versionRank(a);
  return ra !== null && ra === versionRank(b);
}

/**
 * The write id in a record's origin marker (`crm-bridge:{{writeId}}` → the id), or undefined
 * when the object has no marker or the record does not carry one. The value, not a yes/no: the
 * marker stays on a record the bridge created, so only the write it names can be echoed by it.
 */
export function readOriginMarker(raw: unknown, def: ObjectDefinition): string | undefined {
  if (!def.originMarker) return undefined;
  const template = def.originMarker.value;
  const start = template.indexOf('{{');
  const end = template.indexOf('}}', start);
  if (start < 0 || end < 0) return undefined;
  const prefix = template.slice(0, start);
  const suffix = template.slice(end + 2);
  const value = getPath(raw, def.originMarker.path);
  if (typeof value !== 'string' || prefix === '' || !value.startsWith(prefix) || !value.endsWith(suffix)) return undefined;
  const writeId = value.slice(prefix.length, value.length - suffix.length);
  return writeId === '' ? undefined : writeId;
}

/** Who a raw record is and which version of it: what deciding a duplicate needs, without mapping or hashing. */
export interface RecordIdentity {
  crmId: string;
  version: string | null;
  /** Where the version sits in the record's history (see ObservedChange.rank). */
  rank: number | null;
  /** The CRM's updated_at as given, when the object has one. */
  updatedAt: unknown;
}

export function identifyRecord(raw: unknown, definition: ObjectDefinition): RecordIdentity | undefined {
  const crmId = readId(raw, definition);
  if (crmId === undefined) return undefined;
  const version = readVersion(raw, definition);
  const updatedAt = definition.updatedAtPath === undefined ? undefined : getPath(raw, definition.updatedAtPath);
  const rank = versionRank(typeof updatedAt === 'string' || typeof updatedAt === 'number' ? String(updatedAt) : version);
  return { crmId, version, rank, updatedAt };
}

/**
 * A raw CRM record as the gate sees it: id, version, mapped fields and their hash. The one
 * place hooks, polls, sweeps and fetched notifications turn a record into a change.
 */
export function observeRecord(args: {
  connectionId: string;
  object: string;
  definition: ObjectDefinition;
  raw: unknown;
  source: ChangeSource;
  observedAt: Date;
  deliverUnchanged?: boolean;
  /** The record's identity when the caller already read it. */
  identity?: RecordIdentity;
}): ObservedChange | undefined {
  const identity = args.identity ?? identifyRecord(args.raw, args.definition);
  if (identity === undefined) return undefined;
  const fields = mapFields(args.raw, args.definition);
  const originMarker = readOriginMarker(args.raw, args.definition);
  return {
    connectionId: args.connectionId,
    object: args.object,
    crmId: identity.crmId,
    source: args.source,
    change: 'upsert',
    version: identity.version,
    rank: identity.rank,
    raw: args.raw,
    fields,
    contentHash: contentHash(fields),
    ...(originMarker === undefined ? {} : { originMarker }),
    observedAt: args.observedAt,
    deliverUnchanged: args.deliverUnchanged ?? false,
  };
}
