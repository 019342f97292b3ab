import { and, count, desc, eq, gte, inArray, sql } from 'drizzle-orm';
import type { Db } from '../client.js';
import { ledger, streamCursors, type ChangeKind, type ChangeSource, type Disposition } from '../schema/index.js';

/**
 * What the status page and metrics read from the ledger. Only keys, sources, dispositions and
 * times: never a body, so nothing here can put a client's name or phone number on a page.
 */

export interface MinuteBucket {
  connectionId: string;
  /** Start of the minute. */
  minute: Date;
  source: ChangeSource;
  changes: number;
}

/** Ledger rows per connection, minute and source since `since` (uses the (connection, source, received_at) index). */
export async function countChangesPerMinute(db: Db, params: { since: Date }): Promise<MinuteBucket[]> {
  const minute = sql<string>`date_trunc('minute', ${ledger.receivedAt})`;
  const rows = await db
    .select({ connectionId: ledger.connectionId, minute, source: ledger.source, changes: count() })
    .from(ledger)
    .where(gte(ledger.receivedAt, params.since))
    .groupBy(ledger.connectionId, minute, ledger.source);
  return rows.map((r) => ({ connectionId: r.connectionId, minute: new Date(r.minute), source: r.source, changes: Number(r.changes) }));
}

export interface RecentEvent {
  eventId: string;
  connectionId: string;
  object: string;
  crmId: string;
  source: ChangeSource;
  disposition: Disposition;
  change: ChangeKind;
  receivedAt: Date;
}

/** The newest ledger rows, newest first. */
export async function listRecentEvents(db: Db, params: { limit: number; connectionId?: string | undefined }): Promise<RecentEvent[]> {
  return db
    .select({
      eventId: ledger.eventId,
      connectionId: ledger.connectionId,
      object: ledger.object,
      crmId: ledger.crmId,
      source: ledger.source,
      disposition: ledger.disposition,
      change: ledger.change,
      receivedAt: ledger.receivedAt,
    })
    .from(ledger)
    .where(params.connectionId === undefined ? undefined : eq(ledger.connectionId, params.connectionId))
    .orderBy(desc(ledger.seq))
    .limit(params.limit);
}

/**
 * Changes the hooks delivered, per connection: the denominator of the automation's miss rate
 * (`caughtByPoll` / (hook-announced + caught)). A notification-mode hook is stored as
 * `notified` (its record is fetched later, as source `notification`): it announced the change
 * all the same, so it counts.
 */
export async function countHookAccepted(db: Db): Promise<Map<string, number>> {
  const rows = await db
    .select({ connectionId: ledger.connectionId, n: count() })
    .from(ledger)
    .where(and(eq(ledger.source, 'hook'), inArray(ledger.disposition, ['accepted', 'notified'])))
    .groupBy(ledger.connectionId);
  return new Map(rows.map((r) => [r.connectionId, Number(r.n)]));
}

/** Forgets a stream's cursor row (a finished backfill), so the next backfill starts from its beginning. */
export async function deleteStreamCursor(db: Db, stream: { connectionId: string; object: string }): Promise<void> {
  await db.delete(streamCursors).where(and(eq(streamCursors.connectionId, stream.connectionId), eq(streamCursors.object, stream.object)));
}
