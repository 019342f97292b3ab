import type { ConnectorDefinitionInput } from './index.js';

/**
 * Clio Manage API v4 (specs/clio-manage-v4.openapi.json, and specs/README.md for where the live
 * system differs). Facts this definition depends on:
 * - Without `fields` a record has only `id` and `etag`; relations are selected with braces, and
 *   `practice_area` is an object ({id, name, ...}), not the string some docs and integrations assume.
 * - Cursor paging follows `meta.paging.next` (a full URL) and requires `order=id(asc)`; offset
 *   paging stops at 10,000 records. Pages are in id order, so a poll may only move its cursor
 *   once the whole run has completed.
 * - Statuses read capitalised (`Open`) and are accepted only lowercase on write.
 * - A contact's `primary_email_address` and `primary_phone_number` are read-only; a write goes
 *   through the nested `email_addresses` / `phone_numbers` attributes, which add an entry for
 *   every item without an id and remove one only by `{id, _destroy: true}`.
 * - 50 requests/min per token with X-RateLimit-* headers; 429 Retry-After is in seconds.
 */
const MATTER_FIELDS =
  'id,etag,number,display_number,description,status,location,client_reference,billable,open_date,pending_date,close_date,created_at,updated_at,client{id,name},practice_area{id,name}';
const CONTACT_FIELDS = 'id,etag,name,first_name,last_name,type,title,primary_email_address,primary_phone_number,created_at,updated_at';

function clioObject(resource: 'matters' | 'contacts', fields: string) {
  return {
    list: {
      request: {
        method: 'GET' as const,
        path: `/api/v4/${resource}.json`,
        query: { fields, order: 'id(asc)', limit: '{{limit}}', updated_since: '{{since}}' },
      },
      limit: 200,
      records: 'data',
      totalPath: 'meta.records',
      pagination: { style: 'nextUrl' as const, nextUrlPath: 'meta.paging.next' },
      since: { format: 'iso8601' as const },
      order: 'id' as const,
    },
    get: { request: { method: 'GET' as const, path: `/api/v4/${resource}/{{id}}.json`, query: { fields } }, record: 'data' },
    create: { request: { method: 'POST' as const, path: `/api/v4/${resource}.json`, query: { fields } }, bodyPath: 'data', record: 'data' },
    update: { request: { method: 'PATCH' as const, path: `/api/v4/${resource}/{{id}}.json`, query: { fields } }, bodyPath: 'data', record: 'data' },
  };
}

export const clio: ConnectorDefinitionInput = {
  baseUrl: 'https://app.clio.com',
  // A token from one region gets 401 on another; app.goclio.com is the legacy US host.
  regionalHosts: ['https://app.clio.com', 'https://eu.app.clio.com', 'https://ca.app.clio.com', 'https://au.app.clio.com'],
  rateLimit: { retryAfterUnit: 'seconds', minIntervalMs: 0 },
  objects: {
    matters: {
      idPath: 'id',
      updatedAtPath: 'updated_at',
      // The etag changes on every write; updated_at has one-second granularity, so two edits in
      // one second share it. The gate dedups on the etag and orders by updated_at.
      versionPath: 'etag',
      fields: {
        displayNumber: 'display_number',
        description: 'description',
        status: 'status',
        practiceArea: 'practice_area.name',
        practiceAreaId: 'practice_area.id',
        clientId: 'client.id',
        clientName: 'client.name',
        location: 'location',
        clientReference: 'client_reference',
        billable: 'billable',
        openDate: 'open_date',
        closeDate: 'close_date',
      },
      fieldTypes: { displayNumber: 'string', status: 'string', practiceArea: 'string', clientName: 'string', billable: 'boolean' },
      // Clio computes the display number, and relations are written by id, not by name.
      readOnly: ['displayNumber', 'practiceArea', 'clientName'],
      // What happened to a client and who they are; the matter number and status are not.
      sensitive: ['description', 'clientName', 'clientReference', 'location'],
      volatile: ['etag'],
      lowercaseOnWrite: ['status'],
      originMarker: { path: 'client_reference', value: 'crm-bridge:{{writeId}}' },
      ...clioObject('matters', MATTER_FIELDS),
    },
    contacts: {
      idPath: 'id',
      updatedAtPath: 'updated_at',
      versionPath: 'etag',
      fields: {
        name: 'name',
        firstName: 'first_name',
        lastName: 'last_name',
        type: 'type',
        title: 'title',
        email: 'primary_email_address',
        phone: 'primary_phone_number',
      },
      fieldTypes: { name: 'string', type: 'string' },
      // Clio computes the name from its parts.
      readOnly: ['name'],
      // Clio derives the primary email and phone from nested lists and takes a write only there
      // (`name` is one of Work, Home, Other; phones also Mobile, Fax, ...). Each entry sent
      // without an id is added, so the outbound route leaves an unchanged value out of an update.
      writeAs: {
        email: { email_addresses: [{ name: 'Work', address: '{{value}}', default_email: true }] },
        phone: { phone_numbers: [{ name: 'Work', number: '{{value}}', default_number: true }] },
      },
      sensitive: ['name', 'firstName', 'lastName', 'title', 'email', 'phone'],
      volatile: ['etag'],
      ...clioObject('contacts', CONTACT_FIELDS),
    },
  },
};
