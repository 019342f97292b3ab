import { bigserial, index, pgTable, text, uuid } from 'drizzle-orm/pg-core';
import { connectionId, timestamptz } from './columns.js';

export const changeSources = ['hook', 'poll', 'sweep', 'notification', 'outbound'] as const;
export type ChangeSource = (typeof changeSources)[number];

/**
 * Why a change was or was not delivered. `duplicate` never appears here: a change the gate has
 * already seen writes nothing, so re-polling an unchanged CRM costs reads only.
 */
export const dispositions = ['accepted', 'stale', 'unchanged', 'echo', 'notified'] as const;
export type Disposition = (typeof dispositions)[number];

export const changeKinds = ['upsert', 'delete'] as const;
export type ChangeKind = (typeof changeKinds)[number];

/**
 * The append-only ledger: one row per change the gate recorded. A trigger in the migrations
 * refuses UPDATE and DELETE. Bodies live in `ledger_bodies` so retention can drop client data
 * without rewriting history.
 */
export const ledger = pgTable(
  'ledger',
  {
    seq: bigserial('seq', { mode: 'number' }).primaryKey(),
    eventId: uuid('event_id').notNull().unique('ledger_event_id_key'),
    connectionId: connectionId(),
    object: text('object').notNull(),
    crmId: text('crm_id').notNull(),
    source: text('source', { enum: changeSources }).notNull(),
    disposition: text('disposition', { enum: dispositions }).notNull(),
    change: text('change', { enum: changeKinds }).notNull(),
    version: text('version'),
    contentHash: text('content_hash'),
    origin: text('origin', { enum: ['crm', 'pipeline'] }).notNull().default('crm'),
    observedAt: timestamptz('observed_at').notNull(),
    receivedAt: timestamptz('received_at').notNull().defaultNow(),
  },
  (t) => [
    index('ledger_record_idx').on(t.connectionId, t.object, t.crmId, t.seq),
    index('ledger_connection_source_received_idx').on(t.connectionId, t.source, t.receivedAt),
  ],
);
