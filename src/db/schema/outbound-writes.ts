import { index, integer, jsonb, pgTable, text, unique, uuid } from 'drizzle-orm/pg-core';
import { sql } from 'drizzle-orm';
import { connectionId, createdAt, timestamptz } from './columns.js';

/** `skipped`: the loop guard answered the request itself (a CRM-born record pushed back unchanged); nothing was sent. */
export const outboundStates = ['pending', 'sent', 'failed', 'skipped'] as const;
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
    /** A create makes a new record; an update names `crmId` from the start. */
    operation: text('operation', { enum: ['create', 'update'] }).notNull().default('create'),
    /**
     * What the echo must show, by canonical field: the written subset as the CRM reads it back
     * (the origin marker included). `foldCase` fields are compared case-insensitively (the
     * connector lowercases them on write; the CRM may show them capitalised). Lets the gate
     * recognise an echo that arrives before the CRM call returned, when no exact hash is known.
     */
    echoMatch: jsonb('echo_match').$type<{ fields: Record<string, unknown>; foldCase: string[] }>(),
    /**
     * Set once the stamp can no longer match a new change: the gate recorded its echo, or the
     * returned record joined the head (every later arrival of that version is a duplicate).
     * Without it, a marker that stays on the record would hide later human edits.
     */
    settledAt: timestamptz('settled_at'),
    leaseOwner: text('lease_owner'),
    leaseExpiresAt: timestamptz('lease_expires_at'),
    lastStatus: integer('last_status'),
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
    index('outbound_writes_due_idx').on(t.state, t.nextAttemptAt),
    // The gate reads live stamps on every batch; only writes in flight or not yet echoed are live,
    // so this stays small. Writes given up on after a call that may have reached the CRM stay
    // unsettled for good unless their echo comes: they are looked up by id (an origin marker),
    // never through this index, or a CRM outage's worth of them would be read on every batch.
    index('outbound_writes_live_idx').on(t.connectionId, t.object, t.crmId).where(sql`settled_at is null and state in ('pending', 'sent')`),
  ],
);
