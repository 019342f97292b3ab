import { and, desc, eq, inArray, isNull, lt, lte, or, sql } from 'drizzle-orm';
import type { Db } from '../client.js';
import { claimLimit, millis } from './sql-parts.js';
import { ledger, ledgerBodies, outboundWrites, recordHeads } from '../schema/index.js';

/**
 * Outbound writes as the route and the writer see them. Like the outbox, every time that
 * decides who may act on a row (lease expiry, next attempt) is the database's `now()`.
 */

export type OutboundWrite = typeof outboundWrites.$inferSelect;
export type NewOutboundWrite = typeof outboundWrites.$inferInsert;

/**
 * Records a write under its idempotency key through the constraint, never check-then-insert:
 * `created: false` means the key was used before, and `row` is what it was used for.
 */
export async function insertOutboundWrite(db: Db, row: NewOutboundWrite): Promise<{ created: boolean; row: OutboundWrite }> {
  const [inserted] = await db.insert(outboundWrites).values(row).onConflictDoNothing({ target: [outboundWrites.connectionId, outboundWrites.idempotencyKey] }).returning();
  if (inserted) return { created: true, row: inserted };
  const existing = await findOutboundWriteByKey(db, row.connectionId, row.idempotencyKey);
  if (!existing) throw new Error(`outbound write with key ${row.idempotencyKey} vanished`);
  return { created: false, row: existing };
}

/** The write made under an idempotency key, if any: for answering a request again the same way. */
export async function findOutboundWriteByKey(db: Db, connectionId: string, idempotencyKey: string): Promise<OutboundWrite | undefined> {
  const [row] = await db.select().from(outboundWrites).where(and(eq(outboundWrites.connectionId, connectionId), eq(outboundWrites.idempotencyKey, idempotencyKey)));
  return row;
}

export async function getOutboundWrite(db: Db, connectionId: string, id: string): Promise<OutboundWrite | undefined> {
  const [row] = await db.select().from(outboundWrites).where(and(eq(outboundWrites.connectionId, connectionId), eq(outboundWrites.id, id)));
  return row;
}

/**
 * What the bridge knows of a record, for an update the pipeline asks for: the head, the fields
 * it last delivered (the newest accepted event's body), for the "CRM-born record pushed back
 * unchanged" check, and the fields the record showed when the bridge last saw it (the body of
 * the head's event: a delivered change, the echo of the bridge's own write, a touch that changed
 * nothing), unless another write of the record is still in flight, which may change it. Each
 * body is null once retention has pruned it. Undefined when the bridge has never seen the record.
 */
export async function getDeliveredState(
  db: Db,
  key: { connectionId: string; object: string; crmId: string },
): Promise<
  | { origin: 'crm' | 'pipeline'; deleted: boolean; deliveredHash: string | null; fields: Record<string, unknown> | null; seen: Record<string, unknown> | null }
  | undefined
> {
  const sameRecord = and(eq(outboundWrites.connectionId, key.connectionId), eq(outboundWrites.object, key.object), eq(outboundWrites.crmId, key.crmId));
  // The partial index outbound_writes_live_idx answers this: its predicate is repeated.
  const writing = db
    .select({ id: outboundWrites.id })
    .from(outboundWrites)
    .where(and(sameRecord, isNull(outboundWrites.settledAt), inArray(outboundWrites.state, ['pending', 'sent'])));
  const [head] = await db
    .select({
      origin: recordHeads.origin,
      deleted: recordHeads.deleted,
      deliveredHash: recordHeads.deliveredHash,
      seen: ledgerBodies.fields,
      writing: sql<boolean>`exists (${writing})`,
    })
    .from(recordHeads)
    .leftJoin(ledgerBodies, eq(ledgerBodies.eventId, recordHeads.lastEventId))
    .where(and(eq(recordHeads.connectionId, key.connectionId), eq(recordHeads.object, key.object), eq(recordHeads.crmId, key.crmId)));
  if (!head) return undefined;
  const [body] = await db
    .select({ fields: ledgerBodies.fields })
    .from(ledger)
    .innerJoin(ledgerBodies, eq(ledgerBodies.eventId, ledger.eventId))
    .where(and(eq(ledger.connectionId, key.connectionId), eq(ledger.object, key.object), eq(ledger.crmId, key.crmId), eq(ledger.disposition, 'accepted')))
    .orderBy(desc(ledger.seq))
    .limit(1);
  const { writing: inFlight, seen, ...rest } = head;
  return { ...rest, fields: body?.fields ?? null, seen: inFlight || rest.deleted ? null : seen };
}

const STOPPED_MID_CALL = 'no answer: the writer stopped before recording the outcome of its attempt';

/**
 * Claims up to `limit` due writes of one connection for `owner` until the lease runs out, in
 * one statement. Due: pending, next attempt come, no live lease (an expired one means the
 * writer died; the row is claimable again). SKIP LOCKED lets replicas pass over each other's
 * rows. The attempt is counted at claim time, so a writer killed mid-call still uses one up.
 */
export async function claimOutboundWrites(db: Db, params: { connectionId: string; owner: string; limit: number; leaseMs: number }): Promise<OutboundWrite[]> {
  const due = db
    .select({ id: outboundWrites.id })
    .from(outboundWrites)
    .where(
      and(
        eq(outboundWrites.connectionId, params.connectionId),
        eq(outboundWrites.state, 'pending'),
        lte(outboundWrites.nextAttemptAt, sql`now()`),
        or(isNull(outboundWrites.leaseExpiresAt), lt(outboundWrites.leaseExpiresAt, sql`now()`)),
      ),
    )
    .orderBy(outboundWrites.createdAt)
    .limit(claimLimit(params.limit))
    .for('update', { skipLocked: true });
  // A lease still named on a due row ran out: its writer died mid-attempt (a graceful stop and
  // every outcome clear it). That attempt ended without an answer, which is what makes the next
  // attempt of a create look for the record it may have made.
  const leftover = sql`${outboundWrites.leaseOwner} is not null`;
  const rows = await db
    .update(outboundWrites)
    .set({
      leaseOwner: params.owner,
      leaseExpiresAt: sql`now() + ${millis(params.leaseMs)}`,
      attempts: sql`${outboundWrites.attempts} + 1`,
      lastStatus: sql`case when ${leftover} then null else ${outboundWrites.lastStatus} end`,
      lastError: sql`case when ${leftover} then ${STOPPED_MID_CALL} else ${outboundWrites.lastError} end`,
      updatedAt: sql`now()`,
    })
    .where(inArray(outboundWrites.id, due))
    .returning();
  return rows.sort((a, b) => a.createdAt.getTime() - b.createdAt.getTime());
}

/** Fenced by the lease: a writer whose lease was taken over no longer decides the row's fate. */
function heldBy(id: string, owner: string) {
  return and(eq(outboundWrites.id, id), eq(outboundWrites.state, 'pending'), eq(outboundWrites.leaseOwner, owner));
}

/** Extends the lease of a write whose CRM call is still running; false when another writer has it. */
export async function renewOutboundClaim(db: Db, params: { id: string; owner: string; leaseMs: number }): Promise<boolean> {
  const rows = await db
    .update(outboundWrites)
    .set({ leaseExpiresAt: sql`now() + ${millis(params.leaseMs)}` })
    .where(heldBy(params.id, params.owner))
    .returning({ id: outboundWrites.id });
  return rows.length === 1;
}

/**
 * The write reached the CRM: the row learns the CRM id and, when the CRM answered, the version
 * and the exact content hash of the record it returned. The stamp stays live until
 * settleOutboundWrite (after the returned record passed the gate) or its echo settles it.
 * Returns false when the lease was lost.
 */
export async function markOutboundSent(
  db: Db,
  params: { id: string; owner: string; crmId: string; crmVersion: string | null; contentHash: string },
): Promise<boolean> {
  const rows = await db
    .update(outboundWrites)
    .set({
      state: 'sent',
      crmId: params.crmId,
      crmVersion: params.crmVersion,
      contentHash: params.contentHash,
      lastError: null,
      lastStatus: null,
      leaseOwner: null,
      leaseExpiresAt: null,
      updatedAt: sql`now()`,
    })
    .where(heldBy(params.id, params.owner))
    .returning({ id: outboundWrites.id });
  return rows.length === 1;
}

/** Settles a sent write once its returned record has passed the gate (whatever the gate decided). */
export async function settleOutboundWrite(db: Db, id: string): Promise<void> {
  await db.update(outboundWrites).set({ settledAt: sql`coalesce(${outboundWrites.settledAt}, now())` }).where(eq(outboundWrites.id, id));
}

export async function scheduleOutboundRetry(db: Db, params: { id: string; owner: string; delayMs: number; status: number | null; error: string }): Promise<boolean> {
  const rows = await db
    .update(outboundWrites)
    .set({
      nextAttemptAt: sql`now() + ${millis(params.delayMs)}`,
      lastStatus: params.status,
      lastError: params.error,
      leaseOwner: null,
      leaseExpiresAt: null,
      updatedAt: sql`now()`,
    })
    .where(heldBy(params.id, params.owner))
    .returning({ id: outboundWrites.id });
  return rows.length === 1;
}

/**
 * A permanent failure. `settle` when nothing reached the CRM: the stamp can never be echoed, and
 * a failed write must not swallow a later change that happens to match it. A write given up on
 * after it may have reached the CRM stays unsettled: the gate then takes a record whose origin
 * marker names it (and only such a record) as its echo, and the write turns `sent`.
 */
export async function markOutboundFailed(db: Db, params: { id: string; owner: string; status: number | null; error: string; settle: boolean }): Promise<boolean> {
  const rows = await db
    .update(outboundWrites)
    .set({
      state: 'failed',
      lastStatus: params.status,
      lastError: params.error,
      ...(params.settle ? { settledAt: sql`now()` } : {}),
      leaseOwner: null,
      leaseExpiresAt: null,
      updatedAt: sql`now()`,
    })
    .where(heldBy(params.id, params.owner))
    .returning({ id: outboundWrites.id });
  return rows.length === 1;
}

/**
 * A writer whose connection needs re-authorisation (`reason`, shown as the write's last error)
 * gives the row back untried: the attempt it counted is returned too. The last status stays:
 * with it, the next attempt still knows whether the one before this may have made the record.
 */
export async function releaseOutboundClaim(db: Db, params: { id: string; owner: string; reason: string }): Promise<void> {
  await db
    .update(outboundWrites)
    .set({
      leaseOwner: null,
      leaseExpiresAt: null,
      attempts: sql`greatest(${outboundWrites.attempts} - 1, 0)`,
      lastError: params.reason,
      updatedAt: sql`now()`,
    })
    .where(heldBy(params.id, params.owner));
}

/** Per connection: writes not yet made (pending) and writes that failed for good. */
export async function getOutboundStats(db: Db): Promise<Map<string, { pending: number; failed: number }>> {
  const rows = await db
    .select({
      connectionId: outboundWrites.connectionId,
      pending: sql<number>`count(*) filter (where ${outboundWrites.state} = 'pending')`.mapWith(Number),
      failed: sql<number>`count(*) filter (where ${outboundWrites.state} = 'failed')`.mapWith(Number),
    })
    .from(outboundWrites)
    .where(inArray(outboundWrites.state, ['pending', 'failed']))
    .groupBy(outboundWrites.connectionId);
  return new Map(rows.map((r) => [r.connectionId, { pending: r.pending, failed: r.failed }]));
}
