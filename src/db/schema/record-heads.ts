import { boolean, doublePrecision, pgTable, primaryKey, text, uuid } from 'drizzle-orm/pg-core';
import { connectionId, timestamptz } from './columns.js';

/**
 * The latest state the gate accepted for each CRM record. Dedup, staleness and echo checks are
 * against this row (never against all history), under its row lock.
 */
export const recordHeads = pgTable(
  'record_heads',
  {
    connectionId: connectionId(),
    object: text('object').notNull(),
    crmId: text('crm_id').notNull(),
    version: text('version'),
    /** A sortable reading of `version` (a number or an epoch-ms time); null when opaque. */
    versionRank: doublePrecision('version_rank'),
    contentHash: text('content_hash'),
    deleted: boolean('deleted').notNull().default(false),
    /** Who last wrote the content: the CRM's users, or the pipeline through the bridge. */
    origin: text('origin', { enum: ['crm', 'pipeline'] }).notNull().default('crm'),
    lastEventId: uuid('last_event_id').notNull(),
    /** The last event that was delivered downstream; echo checks for outbound writes use it. */
    deliveredHash: text('delivered_hash'),
    updatedAt: timestamptz('updated_at').notNull().defaultNow(),
  },
  (t) => [primaryKey({ name: 'record_heads_pkey', columns: [t.connectionId, t.object, t.crmId] })],
);
