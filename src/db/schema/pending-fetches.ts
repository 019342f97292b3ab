import { pgTable, primaryKey, text, uuid } from 'drizzle-orm/pg-core';
import { connectionId, timestamptz } from './columns.js';

/**
 * Notification-mode hooks carry only an id: the record must be fetched from the CRM. A pending
 * fetch is durable (never dropped while auth is down) and unique per record, so a burst of
 * notifications for one record costs one fetch.
 */
export const pendingFetches = pgTable(
  'pending_fetches',
  {
    connectionId: connectionId(),
    object: text('object').notNull(),
    crmId: text('crm_id').notNull(),
    eventId: uuid('event_id').notNull(),
    receivedAt: timestamptz('received_at').notNull().defaultNow(),
    lastError: text('last_error'),
  },
  (t) => [primaryKey({ name: 'pending_fetches_pkey', columns: [t.connectionId, t.object, t.crmId] })],
);
