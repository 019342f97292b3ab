import { jsonb, pgTable, uuid } from 'drizzle-orm/pg-core';
import { ledger } from './ledger.js';

/** The raw CRM record and its mapped fields for a ledger row; prunable, unlike the ledger. */
export const ledgerBodies = pgTable('ledger_bodies', {
  eventId: uuid('event_id')
    .primaryKey()
    .references(() => ledger.eventId),
  raw: jsonb('raw').$type<unknown>(),
  fields: jsonb('fields').$type<Record<string, unknown>>(),
});
