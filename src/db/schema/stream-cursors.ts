import { doublePrecision, integer, jsonb, pgTable, primaryKey, text } from 'drizzle-orm/pg-core';
import { connectionId, createdAt, timestamptz } from './columns.js';

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

/**
 * Deletes a completed sweep found and did not make, for an operator to look at (see
 * `sweepStream`); null once a sweep made every delete it found.
 */
export interface SweepHold {
  /**
   * `over_limit`: more of the stream's records vanished at once than `poll.sweepDeleteLimit`
   * lets a sweep delete by itself; `listing_incomplete`: records the listing left out were
   * still there when fetched by id, so the rest it left out cannot be taken for deletes.
   */
  reason: 'over_limit' | 'listing_incomplete';
  /** Records the listing no longer showed that were not deleted. */
  deletes: number;
  /** The stream's live records when the sweep began. */
  records: number;
  /** When that sweep's listing began. */
  at: string;
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
    sweepHeld: jsonb('sweep_held').$type<SweepHold>(),
    /**
     * The stream's first run (the row is made by its first attempt): a stream that has never
     * succeeded is stale `staleAfter` from then, whenever the process that asks was started.
     */
    createdAt: createdAt(),
  },
  (t) => [primaryKey({ name: 'stream_cursors_pkey', columns: [t.connectionId, t.object] })],
);
