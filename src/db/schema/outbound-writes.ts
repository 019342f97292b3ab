import { index, integer, jsonb, pgTable, text, unique, uuid } from 'drizzle-orm/pg-core';
import { connectionId, createdAt, timestamptz } from './columns.js';

export const outboundStates = ['pending', 'sent', 'failed'] as const;
export type OutboundState = (typeof outboundStates)[number];

/**
 * Writes the pipeline asked the bridge to make in the CRM, stamped before the CRM call so their
 * echo (by hook or poll, before or after the CRM id is known) is recognised by the gate.
 */
export const outboundWrites = pgTable(
  'outbound_writes',
  {
    id: uuid('id').primaryKey(),
    connectionId: connectionId(),
    object: text('object').notNull(),
    idempotencyKey: text('idempotency_key').notNull(),
    requestHash: text('request_hash').notNull(),
    externalId: text('external_id'),
    crmId: text('crm_id'),
    /** Hash of the fields as they will read back from the CRM (the gate's content hash). */
    contentHash: text('content_hash').notNull(),
    fields: jsonb('fields').$type<Record<string, unknown>>(),
    state: text('state', { enum: outboundStates }).notNull().default('pending'),
    attempts: integer('attempts').notNull().default(0),
    nextAttemptAt: timestamptz('next_attempt_at').notNull().defaultNow(),
    lastError: text('last_error'),
    crmVersion: text('crm_version'),
    createdAt: createdAt(),
    updatedAt: timestamptz('updated_at').notNull().defaultNow(),
  },
  (t) => [
    unique('outbound_writes_idempotency_key').on(t.connectionId, t.idempotencyKey),
    index('outbound_writes_record_idx').on(t.connectionId, t.object, t.crmId),
    index('outbound_writes_hash_idx').on(t.connectionId, t.object, t.contentHash),
  ],
);
