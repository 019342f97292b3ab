import { sql } from 'drizzle-orm';
import { bigserial, index, integer, pgTable, text, uuid } from 'drizzle-orm/pg-core';
import { ledger } from './ledger.js';
import { connectionId, createdAt, timestamptz } from './columns.js';

export const outboxStates = ['pending', 'delivered', 'dead'] as const;
export type OutboxState = (typeof outboxStates)[number];

/**
 * Changes waiting for delivery downstream. Written in the ledger's transaction, claimed by
 * workers with FOR UPDATE SKIP LOCKED and a lease.
 */
export const outbox = pgTable(
  'outbox',
  {
    id: bigserial('id', { mode: 'number' }).primaryKey(),
    eventId: uuid('event_id')
      .notNull()
      .unique('outbox_event_id_key')
      .references(() => ledger.eventId),
    connectionId: connectionId(),
    object: text('object').notNull(),
    crmId: text('crm_id').notNull(),
    state: text('state', { enum: outboxStates }).notNull().default('pending'),
    attempts: integer('attempts').notNull().default(0),
    nextAttemptAt: timestamptz('next_attempt_at').notNull().defaultNow(),
    leaseOwner: text('lease_owner'),
    leaseExpiresAt: timestamptz('lease_expires_at'),
    lastStatus: integer('last_status'),
    lastError: text('last_error'),
    createdAt: createdAt(),
    /**
     * When the row last entered the queue: its insert, or a dead-letter replay. The retry age
     * limit and the health backlog age count from here, so a replayed week-old dead letter gets
     * a fresh budget instead of dying again on its first transient failure.
     */
    queuedAt: timestamptz('queued_at').notNull().defaultNow(),
    deliveredAt: timestamptz('delivered_at'),
  },
  (t) => [
    // The claim reads pending rows of a connection in id order. Delivered rows stay until
    // retention prunes them; through the primary key a claim stepped over every one of them
    // (19 ms at 40,000), through this index it reads pending rows only.
    index('outbox_pending_idx').on(t.connectionId, t.id).where(sql`${t.state} = 'pending'`),
    index('outbox_connection_state_idx').on(t.connectionId, t.state, t.createdAt),
    index('outbox_record_idx').on(t.connectionId, t.object, t.crmId, t.id),
  ],
);
