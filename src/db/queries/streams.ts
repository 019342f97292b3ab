import { and, eq, gt, sql } from 'drizzle-orm';
import { rowsOf, type Db } from '../client.js';
import { headsByKey } from './heads.js';
import { pendingFetches, recordHeads, streamCursors, type ListingResume, type SweepHold } from '../schema/index.js';

export type StreamKey = { connectionId: string; object: string };
export type StreamCursor = typeof streamCursors.$inferSelect;

const keyOf = (s: StreamKey) => and(eq(streamCursors.connectionId, s.connectionId), eq(streamCursors.object, s.object));

export async function getStreamCursor(db: Db, stream: StreamKey): Promise<StreamCursor | undefined> {
  const [row] = await db.select().from(streamCursors).where(keyOf(stream));
  return row;
}

export async function listStreamCursors(db: Db): Promise<StreamCursor[]> {
  return db.select().from(streamCursors);
}

export type PendingFetchCounts = Array<StreamKey & { waiting: number; failing: number }>;

/** Notified records waiting to be fetched, per stream, and how many of them the CRM last refused. */
export async function countPendingFetches(db: Db): Promise<PendingFetchCounts> {
  return db
    .select({
      connectionId: pendingFetches.connectionId,
      object: pendingFetches.object,
      waiting: sql<number>`count(*)::int`,
      failing: sql<number>`count(${pendingFetches.lastError})::int`,
    })
    .from(pendingFetches)
    .groupBy(pendingFetches.connectionId, pendingFetches.object);
}

/**
 * Records the start of a run; creates the stream's row on its first run. Run times are the
 * database's clock, as leases are: /health on any replica compares them with that clock too,
 * so a replica whose clock is minutes off neither makes a live stream look stale nor hides a
 * stalled one.
 */
export async function markStreamAttempt(db: Db, stream: StreamKey): Promise<Date> {
  const [row] = await db
    .insert(streamCursors)
    .values({ ...stream, lastAttemptAt: sql`now()` })
    .onConflictDoUpdate({ target: [streamCursors.connectionId, streamCursors.object], set: { lastAttemptAt: sql`now()` } })
    .returning({ at: streamCursors.lastAttemptAt });
  return row!.at!;
}

/**
 * Whether a stream's sweep is due: its last sweep began `intervalMs` ago or more, or never. By
 * the database's clock, which wrote `lastSweepAt`: a replica whose clock runs a day ahead would
 * otherwise sweep (a full listing) on every poll, and one behind would not sweep for days.
 */
export async function sweepDue(db: Db, stream: StreamKey, intervalMs: number): Promise<boolean> {
  const [row] = await db
    .select({ due: sql<boolean>`${streamCursors.lastSweepAt} is null or ${streamCursors.lastSweepAt} <= now() - ${intervalMs} * interval '1 millisecond'` })
    .from(streamCursors)
    .where(keyOf(stream));
  return row?.due ?? true;
}

/**
 * Moves the cursor forward, never back: the CRM's (updated_at, id) of the newest record read.
 * `rank` is updated_at as epoch ms, compared so that text formats cannot reorder it.
 */
export async function advanceStreamCursor(db: Db, stream: StreamKey, cursor: { updatedAt: string; id: string; rank: number }): Promise<void> {
  await db
    .update(streamCursors)
    .set({ cursorUpdatedAt: cursor.updatedAt, cursorId: cursor.id, cursorRank: cursor.rank })
    .where(and(keyOf(stream), sql`(${streamCursors.cursorRank} is null or ${streamCursors.cursorRank} <= ${cursor.rank})`));
}

/** Notes where an id-ordered listing has got to (call in the page's transaction, under the lease). */
export async function saveListingResume(db: Db, stream: StreamKey, resume: ListingResume | null): Promise<void> {
  await db.update(streamCursors).set({ resume }).where(keyOf(stream));
}

/** The database's clock: one clock for every replica, so a listing resumed elsewhere measures its age right. */
export async function databaseNow(db: Db): Promise<Date> {
  const [row] = await rowsOf<{ now: string | Date }>(db.execute(sql`select now() as now`));
  return new Date(row!.now);
}

export async function finishStreamRun(
  db: Db,
  stream: StreamKey,
  result: { error: string | null; counts: Record<string, number>; caught: number; sweptAt?: Date; sweepHeld?: SweepHold | null },
): Promise<void> {
  await db
    .update(streamCursors)
    .set({
      // A listing that ended leaves nothing to resume.
      ...(result.error === null ? { lastSuccessAt: sql`now()`, lastError: null, resume: null } : { lastError: result.error }),
      counts: result.counts,
      caughtByPoll: sql`${streamCursors.caughtByPoll} + ${result.caught}`,
      ...(result.sweptAt ? { lastSweepAt: result.sweptAt } : {}),
      ...(result.sweepHeld !== undefined ? { sweepHeld: result.sweepHeld } : {}),
    })
    .where(keyOf(stream));
}

/** Every live record head of a stream, for the sweep to compare with the CRM's full listing. */
export async function listStreamHeads(db: Db, stream: StreamKey): Promise<Array<{ crmId: string; version: string | null; lastEventId: string }>> {
  return db
    .select({ crmId: recordHeads.crmId, version: recordHeads.version, lastEventId: recordHeads.lastEventId })
    .from(recordHeads)
    .where(and(eq(recordHeads.connectionId, stream.connectionId), eq(recordHeads.object, stream.object), eq(recordHeads.deleted, false)));
}

/**
 * The committed heads of some records of a stream, read without a lock: the poller answers a
 * change its head already holds (DESIGN rule 1) from this before opening a transaction. Looked
 * up key by key through the primary key (`headsByKey`), as the gate does.
 */
export async function getStreamHeads(
  db: Db,
  stream: StreamKey,
  crmIds: readonly string[],
): Promise<Array<{ crmId: string; version: string | null; contentHash: string | null; deleted: boolean; lastEventId: string }>> {
  if (crmIds.length === 0) return [];
  const keys = crmIds.map((crmId) => ({ connection_id: stream.connectionId, object: stream.object, crm_id: crmId }));
  const rows = await rowsOf<{ crm_id: string; version: string | null; content_hash: string | null; deleted: boolean; last_event_id: string }>(
    db.execute(headsByKey(sql.raw('h.crm_id, h.version, h.content_hash, h.deleted, h.last_event_id'), keys)),
  );
  return rows.map((r) => ({ crmId: r.crm_id, version: r.version, contentHash: r.content_hash, deleted: r.deleted, lastEventId: r.last_event_id }));
}

/** Pending fetches of a stream in id order (the primary key's), `after` the last id of the previous batch. */
export async function listPendingFetches(db: Db, stream: StreamKey, limit: number, after?: string) {
  return db
    .select()
    .from(pendingFetches)
    .where(
      and(
        eq(pendingFetches.connectionId, stream.connectionId),
        eq(pendingFetches.object, stream.object),
        after === undefined ? undefined : gt(pendingFetches.crmId, after),
      ),
    )
    .orderBy(pendingFetches.crmId)
    .limit(limit);
}

/** Pending fetches for an operator, oldest first: every connection's, or one's. */
export async function listPendingFetchesForOperator(db: Db, options: { connectionId?: string | undefined; limit: number }) {
  return db
    .select()
    .from(pendingFetches)
    .where(options.connectionId === undefined ? undefined : eq(pendingFetches.connectionId, options.connectionId))
    .orderBy(pendingFetches.receivedAt, pendingFetches.crmId)
    .limit(options.limit);
}

/** Drops one record's pending fetch, whatever its event (an operator gave up on it); the row it was, or undefined. */
export async function dropPendingFetch(db: Db, key: StreamKey & { crmId: string }) {
  const [row] = await db
    .delete(pendingFetches)
    .where(and(eq(pendingFetches.connectionId, key.connectionId), eq(pendingFetches.object, key.object), eq(pendingFetches.crmId, key.crmId)))
    .returning();
  return row;
}

export async function deletePendingFetch(db: Db, stream: StreamKey, crmId: string, eventId: string, receivedAt?: Date): Promise<void> {
  await db
    .delete(pendingFetches)
    .where(
      and(
        eq(pendingFetches.connectionId, stream.connectionId),
        eq(pendingFetches.object, stream.object),
        eq(pendingFetches.crmId, crmId),
        eq(pendingFetches.eventId, eventId),
        receivedAt === undefined ? undefined : sql`date_trunc('milliseconds', ${pendingFetches.receivedAt}) <= ${receivedAt.toISOString()}::timestamptz`,
      ),
    );
}

export async function notePendingFetchError(db: Db, stream: StreamKey, crmId: string, error: string): Promise<void> {
  await db
    .update(pendingFetches)
    .set({ lastError: error })
    .where(and(eq(pendingFetches.connectionId, stream.connectionId), eq(pendingFetches.object, stream.object), eq(pendingFetches.crmId, crmId)));
}
