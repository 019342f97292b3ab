import { and, eq, inArray, isNotNull, isNull, ne, or, sql } from 'drizzle-orm';
import type { Db } from '../client.js';
import { ledger, ledgerBodies, outbox, outboundWrites, pendingFetches } from '../schema/index.js';

/**
 * Retention and erasure of client data. Only bodies go (`ledger_bodies`, the excerpt an outbox
 * row kept of the pipeline's refusal, and what a finished outbound write kept of the pipeline's
 * fields: `fields` and `echo_match`): the ledger's keys, versions, hashes, sources and
 * dispositions and the record heads stay, so the gate still deduplicates, orders and recognises
 * echoes, and the audit trail still says what happened.
 */

/**
 * Deletes up to `limit` bodies of changes the bridge received before `cutoff` whose delivery is
 * not pending or dead. One short statement per batch, so a large prune never holds a long
 * transaction. Returns the event ids whose bodies went.
 *
 * Safe against the delivery workers without a lock: an outbox row only becomes pending by its
 * insert (in the same transaction as its ledger row, so never older than a body it could
 * match) or by replaying a dead letter (dead rows are skipped here); a delivered row never goes
 * back to pending.
 */
export async function pruneBodiesBatch(db: Db, params: { cutoff: Date; limit: number }): Promise<string[]> {
  const candidates = db
    .select({ eventId: ledgerBodies.eventId })
    .from(ledgerBodies)
    .innerJoin(ledger, eq(ledger.eventId, ledgerBodies.eventId))
    .where(
      and(
        sql`${ledger.receivedAt} < ${params.cutoff.toISOString()}::timestamptz`,
        sql`not exists (select 1 from ${outbox} where ${outbox.eventId} = ${ledgerBodies.eventId} and ${outbox.state} in ('pending', 'dead'))`,
      ),
    )
    .limit(params.limit);
  const rows = await db.delete(ledgerBodies).where(inArray(ledgerBodies.eventId, candidates)).returning({ eventId: ledgerBodies.eventId });
  return rows.map((r) => r.eventId);
}

/**
 * A finished outbound write: not pending (`fields` is what it has yet to write) and settled
 * (until then the gate compares changes with its `echo_match` to recognise its echo). Neither
 * column is read again once both hold.
 */
const finishedWrite = and(ne(outboundWrites.state, 'pending'), isNotNull(outboundWrites.settledAt));
const holdsFields = or(isNotNull(outboundWrites.fields), isNotNull(outboundWrites.echoMatch));

/**
 * Clears the fields and echo_match of up to `limit` finished outbound writes the pipeline asked
 * for before `cutoff`. One short statement per batch, like pruneBodiesBatch. Safe without a
 * lock: a settled write never becomes unsettled, and a write that is not pending never becomes
 * pending again. Returns the ids of the writes cleared.
 */
export async function pruneOutboundWritesBatch(db: Db, params: { cutoff: Date; limit: number }): Promise<string[]> {
  const candidates = db
    .select({ id: outboundWrites.id })
    .from(outboundWrites)
    .where(and(sql`${outboundWrites.createdAt} < ${params.cutoff.toISOString()}::timestamptz`, finishedWrite, holdsFields))
    .limit(params.limit);
  const rows = await db
    .update(outboundWrites)
    .set({ fields: null, echoMatch: null, updatedAt: sql`now()` })
    .where(inArray(outboundWrites.id, candidates))
    .returning({ id: outboundWrites.id });
  return rows.map((r) => r.id);
}

export interface RecordKey {
  connectionId: string;
  object: string;
  crmId: string;
}

const recordOf = (k: RecordKey) => and(eq(ledger.connectionId, k.connectionId), eq(ledger.object, k.object), eq(ledger.crmId, k.crmId));

/** The objects of a connection that have a ledger row for this CRM id (ids are per object). */
export async function findRecordObjects(db: Db, connectionId: string, crmId: string): Promise<string[]> {
  const rows = await db
    .selectDistinct({ object: ledger.object })
    .from(ledger)
    .where(and(eq(ledger.connectionId, connectionId), eq(ledger.crmId, crmId)));
  return rows.map((r) => r.object).sort();
}

/**
 * The record's outbox rows that still hold its data for delivery, locked (call inside the
 * erasure's transaction) so no worker claims one while the erasure decides.
 */
export async function lockUndeliveredRows(db: Db, key: RecordKey) {
  return db
    .select({ id: outbox.id, eventId: outbox.eventId, state: outbox.state, leaseOwner: outbox.leaseOwner, leased: sql<boolean>`${outbox.leaseExpiresAt} > now()` })
    .from(outbox)
    .where(and(eq(outbox.connectionId, key.connectionId), eq(outbox.object, key.object), eq(outbox.crmId, key.crmId), inArray(outbox.state, ['pending', 'dead'])))
    .orderBy(outbox.id)
    .for('update');
}

/**
 * The record's outbound writes that still need what they hold: pending ones (their fields are
 * still to be written) and unsettled ones (their echo_match recognises the echo still to come).
 * Locked like lockUndeliveredRows; `leased` is a write whose CRM call is under way.
 */
export async function lockUnfinishedWrites(db: Db, key: RecordKey) {
  return db
    .select({ id: outboundWrites.id, state: outboundWrites.state, leased: sql<boolean>`${outboundWrites.leaseExpiresAt} > now()` })
    .from(outboundWrites)
    .where(
      and(
        eq(outboundWrites.connectionId, key.connectionId),
        eq(outboundWrites.object, key.object),
        eq(outboundWrites.crmId, key.crmId),
        or(eq(outboundWrites.state, 'pending'), isNull(outboundWrites.settledAt)),
      ),
    )
    .orderBy(outboundWrites.createdAt)
    .for('update');
}

/**
 * Unfinished writes erased with `--force`: a pending one is never made (failed, marked ERASED,
 * as a delivery is dead-lettered); every one is settled, so no later change is taken for its
 * echo. Its fields and echo_match then go with the record's other bodies.
 */
export async function settleErasedWrites(db: Db, ids: string[]): Promise<void> {
  if (ids.length === 0) return;
  await db
    .update(outboundWrites)
    .set({ state: 'failed', lastStatus: null, lastError: 'ERASED', leaseOwner: null, leaseExpiresAt: null })
    .where(and(inArray(outboundWrites.id, ids), eq(outboundWrites.state, 'pending')));
  await db
    .update(outboundWrites)
    .set({ settledAt: sql`coalesce(${outboundWrites.settledAt}, now())`, updatedAt: sql`now()` })
    .where(inArray(outboundWrites.id, ids));
}

/** Pending rows become dead letters that say why: a change without its body is not sent on its own. */
export async function deadLetterErased(db: Db, ids: number[]): Promise<void> {
  if (ids.length === 0) return;
  await db
    .update(outbox)
    .set({ state: 'dead', lastStatus: null, lastError: 'ERASED', leaseOwner: null, leaseExpiresAt: null })
    .where(and(inArray(outbox.id, ids), eq(outbox.state, 'pending')));
}

export interface ErasedBodies {
  /** Event ids whose ledger body was deleted, oldest first. */
  eventIds: string[];
  /** The event id of a pending notification fetch whose stored hook body went, if any. */
  pendingFetchEventId: string | null;
  /** Outbox rows whose stored error text (an excerpt of the pipeline's answer) was cleared. */
  clearedErrors: number;
  /** Finished outbound writes to the record whose fields and echo_match were cleared. */
  clearedOutboundWrites: number;
}

/**
 * Deletes every stored body of one record: each ledger row's body (the notification's among
 * them), the excerpts of the pipeline's answers kept on its outbox rows (they may quote it),
 * and the fields and echo_match of finished outbound writes to it (the caller settles or
 * refuses the unfinished ones first: lockUnfinishedWrites). Its ledger rows and head stay.
 */
export async function eraseRecordBodies(db: Db, key: RecordKey): Promise<ErasedBodies> {
  const events = db.select({ eventId: ledger.eventId }).from(ledger).where(recordOf(key));
  const deleted = await db.delete(ledgerBodies).where(inArray(ledgerBodies.eventId, events)).returning({ eventId: ledgerBodies.eventId });
  const order = await db.select({ eventId: ledger.eventId }).from(ledger).where(recordOf(key)).orderBy(ledger.seq);
  const gone = new Set(deleted.map((d) => d.eventId));
  const [pending] = await db
    .select({ eventId: pendingFetches.eventId })
    .from(pendingFetches)
    .where(and(eq(pendingFetches.connectionId, key.connectionId), eq(pendingFetches.object, key.object), eq(pendingFetches.crmId, key.crmId)));
  const cleared = await db
    .update(outbox)
    .set({ lastError: null })
    .where(and(eq(outbox.connectionId, key.connectionId), eq(outbox.object, key.object), eq(outbox.crmId, key.crmId), isNotNull(outbox.lastError), ne(outbox.lastError, 'ERASED')))
    .returning({ id: outbox.id });
  const writes = await db
    .update(outboundWrites)
    .set({ fields: null, echoMatch: null, updatedAt: sql`now()` })
    .where(
      and(
        eq(outboundWrites.connectionId, key.connectionId),
        eq(outboundWrites.object, key.object),
        eq(outboundWrites.crmId, key.crmId),
        finishedWrite,
        holdsFields,
      ),
    )
    .returning({ id: outboundWrites.id });
  return {
    eventIds: order.map((o) => o.eventId).filter((id) => gone.has(id)),
    pendingFetchEventId: pending && gone.has(pending.eventId) ? pending.eventId : null,
    clearedErrors: cleared.length,
    clearedOutboundWrites: writes.length,
  };
}
