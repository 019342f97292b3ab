import type { ConnectorDefinitionInput } from './index.js';

/**
 * HubSpot CRM v3 contacts (specs/hubspot-crm-contacts-v3.openapi.json, and specs/README.md).
 * Facts this definition depends on:
 * - Changes come from POST /crm/v3/objects/contacts/search with a `lastmodifieddate GTE` filter
 *   (contacts; other objects use hs_lastmodifieddate), up to 200 per page, `paging.next.after`.
 * - One search query cannot page past 10,000 results (400), and bulk jobs stamp more than that
 *   with one timestamp. So the listing restarts before the cap, anchored at the last record read:
 *   (lastmodifieddate = T AND hs_object_id > id) OR lastmodifieddate > T. Filter groups are OR-ed,
 *   filters inside a group AND-ed; the sorts make (lastmodifieddate, hs_object_id) the order, so
 *   the anchor is a true position and nothing is skipped or read twice.
 * - Search is limited to about 4 requests/s per token and announces it only by a 429 whose
 *   Retry-After is in milliseconds.
 * - Every property is text: a number written is read back as its text ("5550100"), so every
 *   field is typed `string`. There is no null to write either: a property is cleared by writing
 *   "" (a null is answered 200 and changes nothing) and then reads back as "" (`nullAs`).
 */
const PROPERTIES = ['email', 'firstname', 'lastname', 'phone', 'company', 'jobtitle', 'createdate', 'lastmodifieddate', 'hs_object_id'];
const SORTS = [
  { propertyName: 'lastmodifieddate', direction: 'ASCENDING' },
  { propertyName: 'hs_object_id', direction: 'ASCENDING' },
];

export const hubspot: ConnectorDefinitionInput = {
  baseUrl: 'https://api.hubapi.com',
  // EU-hosted portals are also served at api-eu1; a token works on both.
  regionalHosts: ['https://api.hubapi.com', 'https://api-eu1.hubapi.com'],
  rateLimit: { retryAfterUnit: 'milliseconds', minIntervalMs: 275 },
  objects: {
    contacts: {
      idPath: 'id',
      updatedAtPath: 'properties.lastmodifieddate',
      fields: {
        email: 'properties.email',
        firstName: 'properties.firstname',
        lastName: 'properties.lastname',
        phone: 'properties.phone',
        company: 'properties.company',
        jobTitle: 'properties.jobtitle',
      },
      fieldTypes: { email: 'string', firstName: 'string', lastName: 'string', phone: 'string', company: 'string', jobTitle: 'string' },
      nullAs: '',
      sensitive: ['email', 'firstName', 'lastName', 'phone'],
      list: {
        request: {
          method: 'POST',
          path: '/crm/v3/objects/contacts/search',
          body: {
            filterGroups: [{ filters: [{ propertyName: 'lastmodifieddate', operator: 'GTE', value: '{{since}}' }] }],
            sorts: SORTS,
            properties: PROPERTIES,
            limit: '{{limit}}',
            after: '{{cursor}}',
          },
        },
        limit: 200,
        records: 'results',
        pagination: { style: 'cursor', cursorPath: 'paging.next.after' },
        since: { format: 'epoch-ms', whenListingAll: '0' },
        order: 'updatedAt',
        // Every page is a new query from the last record read (keyset paging), not the next
        // `after` of one query: `after` is an offset into the sorted results, so a record read
        // earlier and edited meanwhile moves to the end and shifts the rest back by one, and the
        // record at the page boundary was never returned. Anchored, an edit only moves a record
        // later in the order; the 10,000-result cap of one query is never reached either.
        restart: {
          afterRecords: 1,
          request: {
            method: 'POST',
            path: '/crm/v3/objects/contacts/search',
            body: {
              filterGroups: [
                {
                  filters: [
                    { propertyName: 'lastmodifieddate', operator: 'EQ', value: '{{anchor.updatedAt}}' },
                    { propertyName: 'hs_object_id', operator: 'GT', value: '{{anchor.id}}' },
                  ],
                },
                { filters: [{ propertyName: 'lastmodifieddate', operator: 'GT', value: '{{anchor.updatedAt}}' }] },
              ],
              sorts: SORTS,
              properties: PROPERTIES,
              limit: '{{limit}}',
              after: '{{cursor}}',
            },
          },
        },
      },
      get: { request: { method: 'GET', path: '/crm/v3/objects/contacts/{{id}}', query: { properties: PROPERTIES.join(',') } } },
      create: { request: { method: 'POST', path: '/crm/v3/objects/contacts' } },
      update: { request: { method: 'PATCH', path: '/crm/v3/objects/contacts/{{id}}' } },
    },
  },
};
