import { doublePrecision, integer, jsonb, pgTable, primaryKey, text } from 'drizzle-orm/pg-core';
import { connectionId, timestamptz } from './columns.js';

/**
 * An id-ordered listing (Clio's) stopped part-way: the CRM's link or token for its next page, the
 * newest record read so far, and when the listing began by the database's clock (one clock for
 * every replica), from which the cursor it ends with is measured back.
 */
export interface ListingResume {
  next: string | number;
  newest: { updatedAt: string; id: string; rank: number } | null;
  startedAt: string;
  listsEverything: boolean;
}

/** Where each (connection, object) poll stream stands, in the CRM's own timestamps. */
export const streamCursors = pgTable(
  'stream_cursors',
  {
    connectionId: connectionId(),
    object: text('object').notNull(),
    cursorUpdatedAt: text('cursor_updated_at'),
    cursorId: text('cursor_id'),
    /** cursor_updated_at as epoch ms, so the cursor only ever moves forward whatever the text format. */
    cursorRank: doublePrecision('cursor_rank'),
    lastAttemptAt: timestamptz('last_attempt_at'),
    lastSuccessAt: timestamptz('last_success_at'),
    lastError: text('last_error'),
    lastSweepAt: timestamptz('last_sweep_at'),
    caughtByPoll: integer('caught_by_poll').notNull().default(0),
    counts: jsonb('counts').$type<Record<string, number>>(),
    /** Where an id-ordered listing stopped part-way, so the next run goes on from there; null once it ends. */
    resume: jsonb('resume').$type<ListingResume>(),
  },
  (t) => [primaryKey({ name: 'stream_cursors_pkey', columns: [t.connectionId, t.object] })],
);
