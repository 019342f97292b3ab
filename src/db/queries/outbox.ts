import { and, desc, eq, isNull, lt, lte, or, sql } from 'drizzle-orm';
import { alias } from 'drizzle-orm/pg-core';
import { rowsOf, type Db } from '../client.js';
import { claimLimit, millis } from './sql-parts.js';
import { ledger, ledgerBodies, outbox, type ChangeKind, type ChangeSource } from '../schema/index.js';

/**
 * The outbox as the delivery workers see it. Every timestamp that decides who may act on a row
 * (lease expiry, next attempt) is the database's `now()`, so replicas with skewed clocks agree.
 */

export interface ClaimedDelivery {
  id: number;
  eventId: string;
  connectionId: string;
  object: string;
  crmId: string;
  /** Including this claim. */
  attempts: number;
  queuedAt: Date;
  /** What the ledger knows about the event; null only if its ledger row is missing (a broken database). */
  content: DeliveryContent | null;
}

export interface DeliveryContent {
  change: ChangeKind;
  version: string | null;
  origin: 'crm' | 'pipeline';
  source: ChangeSource;
  observedAt: Date;
  /**
   * The CRM record and its mapped fields as JSON text, as the database renders them (null when
   * the body was pruned): they go into the delivery's body as they are, never parsed here.
   */
  rawJson: string | null;
  fieldsJson: string | null;
}

/**
 * `id = any($1)` with the ids as one array parameter: one statement text whatever the count, so
 * the driver prepares it once instead of once per batch size, as `in ($1, $2, ...)` would.
 */
const idIn = (ids: readonly number[]) => sql`${outbox.id} = any(${sql.param([...ids])}::bigint[])`;

/**
 * Claims up to `limit` due rows of one connection for `owner` until the lease runs out, and
 * returns them with their ledger content, in one statement (so the lease is written in the
 * claiming transaction, and a claim costs one round trip). A row is due when it is pending, its
 * next attempt has come, nobody holds a live lease on it (an expired lease means its worker died
 * or hung: the row is claimable again, nothing is lost), and no older row of the same record is
 * still pending: per-record order is enforced here, so the workers never need to coordinate.
 * SKIP LOCKED lets concurrent claimers pass over each other's rows instead of waiting. The
 * attempt is counted at claim time, so a worker killed mid-request still uses up an attempt.
 */
export async function claimDeliveries(db: Db, params: ClaimParams): Promise<ClaimedDelivery[]> {
  const rows = await claimStatement(db, params);
  return rows.map(({ change, version, origin, source, observedAt, rawJson, fieldsJson, ...row }) => ({
    ...row,
    // Ledger columns are not null, so one null here means no ledger row (a left join miss).
    content:
      change === null || origin === null || source === null || observedAt === null
        ? null
        : { change, version, origin, source, observedAt, rawJson, fieldsJson },
  }));
}

type ClaimParams = { connectionId: string; owner: string; limit: number; leaseMs: number };

/** The claim of claimDeliveries as a statement not yet run (its plan is tested). */
export function claimStatement(db: Db, params: ClaimParams) {
  const older = alias(outbox, 'older');
  const due = db
    .select({ id: outbox.id })
    .from(outbox)
    .where(
      and(
        // The connection as a range of one value, with the rows in (connection, id) order: only
        // outbox_pending_idx yields that order, so the claim reads pending rows only. As an
        // equality, the connection drops out of the order and the primary key yields id order
        // too; with statistics taken while the queue was all pending (a backlog building up),
        // the planner chose it, and each claim stepped over every row delivered since.
        sql`${outbox.connectionId} >= ${params.connectionId} and ${outbox.connectionId} <= ${params.connectionId}`,
        // A literal, not a parameter: a cached generic plan can then use outbox_pending_idx.
        sql`${outbox.state} = 'pending'`,
        lte(outbox.nextAttemptAt, sql`now()`),
        or(isNull(outbox.leaseExpiresAt), lt(outbox.leaseExpiresAt, sql`now()`)),
        // OFFSET 0 keeps this a per-row probe of outbox_record_idx. Pulled up into an anti join
        // (as drizzle's notExists() was), it was planned as a nested loop over every pending row
        // whenever the table's statistics were stale (a queue that grew since the last ANALYZE):
        // about 10 s per claim at 5,000 pending rows.
        sql`not exists (select 1 from ${outbox} ${older} where ${older.connectionId} = ${outbox.connectionId} and ${older.object} = ${outbox.object} and ${older.crmId} = ${outbox.crmId} and ${older.state} = 'pending' and ${older.id} < ${outbox.id} offset 0)`,
      ),
    )
    .orderBy(outbox.connectionId, outbox.id)
    .limit(claimLimit(params.limit))
    .for('update', { skipLocked: true });

  const claimed = db.$with('claimed').as(
    db
      .update(outbox)
      .set({
        leaseOwner: params.owner,
        leaseExpiresAt: sql`now() + ${millis(params.leaseMs)}`,
        attempts: sql`${outbox.attempts} + 1`,
      })
      // The ids as an array, so each is found through the primary key. As \`id in (…)\` the update
      // was planned as a hash join over a sequential scan of the whole outbox whenever the
      // table was small enough for that to look cheaper: 4.5 ms a claim at 20,000 rows.
      .where(sql`${outbox.id} = any(array(${due}))`)
      .returning({
        id: outbox.id,
        eventId: outbox.eventId,
        connectionId: outbox.connectionId,
        object: outbox.object,
        crmId: outbox.crmId,
        attempts: outbox.attempts,
        queuedAt: outbox.queuedAt,
      }),
  );
  // Each claimed row's ledger row and body through their unique index, one lookup a row (lateral,
  // LIMIT 1), whatever the planner guesses: as plain joins they became a hash join over a
  // sequential scan of the whole ledger on a ledger of tens of thousands of rows.
  const content = db
    .select({ change: ledger.change, version: ledger.version, origin: ledger.origin, source: ledger.source, observedAt: ledger.observedAt })
    .from(ledger)
    .where(eq(ledger.eventId, claimed.eventId))
    .limit(1)
    .as('content');
  const body = db
    .select({ rawJson: sql<string | null>`${ledgerBodies.raw}::text`.as('raw_json'), fieldsJson: sql<string | null>`${ledgerBodies.fields}::text`.as('fields_json') })
    .from(ledgerBodies)
    .where(eq(ledgerBodies.eventId, claimed.eventId))
    .limit(1)
    .as('body');
  return db
    .with(claimed)
    .select({
      id: claimed.id,
      eventId: claimed.eventId,
      connectionId: claimed.connectionId,
      object: claimed.object,
      crmId: claimed.crmId,
      attempts: claimed.attempts,
      queuedAt: claimed.queuedAt,
      change: content.change,
      version: content.version,
      origin: content.origin,
      source: content.source,
      observedAt: content.observedAt,
      rawJson: body.rawJson,
      fieldsJson: body.fieldsJson,
    })
    .from(claimed)
    .leftJoinLateral(content, sql`true`)
    .leftJoinLateral(body, sql`true`)
    .orderBy(claimed.id);
}

/** Marks many rows delivered in one statement per answer status (one commit for a whole batch). */
export async function markDeliveredMany(db: Db, delivered: ReadonlyArray<{ id: number; status: number }>): Promise<void> {
  const byStatus = new Map<number, number[]>();
  for (const d of delivered) byStatus.set(d.status, [...(byStatus.get(d.status) ?? []), d.id]);
  for (const [status, ids] of byStatus) {
    await db
      .update(outbox)
      .set({ state: 'delivered', deliveredAt: sql`now()`, lastStatus: status, lastError: null, leaseOwner: null, leaseExpiresAt: null })
      .where(and(idIn(ids), eq(outbox.state, 'pending')));
  }
}

/** Fenced by the lease: a worker whose lease was taken over no longer decides the row's fate. */
function heldBy(id: number, owner: string) {
  return and(eq(outbox.id, id), eq(outbox.state, 'pending'), eq(outbox.leaseOwner, owner));
}

export async function scheduleRetry(
  db: Db,
  params: { id: number; owner: string; delayMs: number; status: number | null; error: string },
): Promise<boolean> {
  const rows = await db
    .update(outbox)
    .set({
      nextAttemptAt: sql`now() + ${millis(params.delayMs)}`,
      lastStatus: params.status,
      lastError: params.error,
      leaseOwner: null,
      leaseExpiresAt: null,
    })
    .where(heldBy(params.id, params.owner))
    .returning({ id: outbox.id });
  return rows.length === 1;
}

export async function markDead(db: Db, params: { id: number; owner: string; status: number | null; error: string }): Promise<boolean> {
  const rows = await db
    .update(outbox)
    .set({ state: 'dead', lastStatus: params.status, lastError: params.error, leaseOwner: null, leaseExpiresAt: null })
    .where(heldBy(params.id, params.owner))
    .returning({ id: outbox.id });
  return rows.length === 1;
}

/**
 * Gives claimed rows back untried (the worker is stopping, or a row's lease would not outlast its
 * request): no attempt is charged and another replica may take them at once instead of waiting
 * for the lease to run out.
 */
export async function releaseClaims(db: Db, params: { ids: readonly number[]; owner: string }): Promise<void> {
  await db
    .update(outbox)
    .set({ attempts: sql`greatest(${outbox.attempts} - 1, 0)`, leaseOwner: null, leaseExpiresAt: null })
    .where(and(idIn(params.ids), eq(outbox.state, 'pending'), eq(outbox.leaseOwner, params.owner)));
}

export interface DeadLetter {
  id: number;
  eventId: string;
  connectionId: string;
  object: string;
  crmId: string;
  change: ChangeKind;
  version: string | null;
  attempts: number;
  lastStatus: number | null;
  lastError: string | null;
  queuedAt: Date;
}

/** Newest first; `before` is the `id` of the last row of the previous page (keyset paging). */
export async function listDeadLetters(
  db: Db,
  params: { connectionId?: string | undefined; limit: number; before?: number | undefined },
): Promise<{ items: DeadLetter[]; nextBefore: number | null }> {
  const rows = await db
    .select({
      id: outbox.id,
      eventId: outbox.eventId,
      connectionId: outbox.connectionId,
      object: outbox.object,
      crmId: outbox.crmId,
      change: ledger.change,
      version: ledger.version,
      attempts: outbox.attempts,
      lastStatus: outbox.lastStatus,
      lastError: outbox.lastError,
      queuedAt: outbox.queuedAt,
    })
    .from(outbox)
    .innerJoin(ledger, eq(ledger.eventId, outbox.eventId))
    .where(
      and(
        eq(outbox.state, 'dead'),
        params.connectionId !== undefined ? eq(outbox.connectionId, params.connectionId) : undefined,
        params.before !== undefined ? lt(outbox.id, params.before) : undefined,
      ),
    )
    .orderBy(desc(outbox.id))
    .limit(params.limit + 1);
  const items = rows.slice(0, params.limit);
  return { items, nextBefore: rows.length > params.limit ? (items.at(-1)?.id ?? null) : null };
}

/** A later change of the same record that a replay would be delivered after. */
export interface LaterChange {
  eventId: string;
  version: string | null;
  /**
   * `in_flight`: a worker holds a live lease on it and may deliver it before the replay;
   * `unanswered`: it was sent and no answer came (a timeout), so the pipeline may have it.
   */
  state: 'delivered' | 'in_flight' | 'unanswered';
}

export type ReplayOutcome =
  | { status: 'replayed'; connectionId: string; object: string; crmId: string; overtook: LaterChange | null }
  | { status: 'newer_change'; connectionId: string; object: string; crmId: string; newer: LaterChange }
  | { status: 'not_found' }
  | { status: 'not_dead'; state: 'pending' | 'delivered' };

/**
 * Puts a dead letter back in the queue with a fresh attempt and age budget, under the same event
 * id (so the same Idempotency-Key). It takes its old place in its record's order: later pending
 * changes of the record wait for it, so the record still ends at its newest version downstream.
 *
 * A later change already delivered, in flight (a live lease: it may arrive first), or sent
 * without a definite answer (a timeout: the pipeline may have applied it) would have the replay
 * move the record back in time downstream (DESIGN gate rule 3), so the replay is refused and
 * names it, unless `force` (the operator knows the pipeline orders by `version`). The record's
 * head is locked first, as the gate locks it before writing a newer change's outbox row (leased,
 * on the hook path) and until that commits: the decision sees that row, or the gate after it
 * sees this one pending. Then one statement locks the record's later rows while it decides, so
 * a claim (SKIP LOCKED) cannot take one in between, and one being claimed is read as its claim
 * left it.
 */
export async function replayDeadLetter(db: Db, eventId: string, options: { force?: boolean } = {}): Promise<ReplayOutcome> {
  return db.transaction(async (tx) => {
    // The record's head first, in a statement of its own: the gate holds it from before it writes
    // a newer change's outbox row (perhaps leased) until that commits, so the statement below sees
    // that row, and a gate that comes after sees this row pending.
    await tx.execute(sql`select 1 from record_heads h join outbox o on o.connection_id = h.connection_id and o.object = h.object and o.crm_id = h.crm_id where o.event_id = ${eventId} and o.state = 'dead' for update of h`);
    const [row] = await rowsOf<{ connection_id: string; object: string; crm_id: string; replayed: boolean; newer_event_id: string | null; newer_version: string | null; newer_state: LaterChange['state'] | null }>(
      tx.execute(sql`
        with target as (
          select id, connection_id, object, crm_id from outbox where event_id = ${eventId} and state = 'dead' for update
        ), later as (
          select o.id, o.event_id, o.state, o.attempts, o.last_status, o.lease_expires_at > now() as in_flight
          from outbox o join target t on o.connection_id = t.connection_id and o.object = t.object and o.crm_id = t.crm_id and o.id > t.id
          where o.state <> 'dead'
          for update of o
        ), ahead as (
          select l.event_id, case when l.state = 'delivered' then 'delivered' when l.in_flight then 'in_flight' else 'unanswered' end as state, e.version
          from later l join ledger e on e.event_id = l.event_id
          where l.state = 'delivered' or l.in_flight or (l.attempts > 0 and l.last_status is null)
          order by l.id desc
          limit 1
        ), replayed as (
          update outbox
          set state = 'pending', attempts = 0, next_attempt_at = now(), queued_at = now(), lease_owner = null, lease_expires_at = null
          from target
          where outbox.id = target.id and (${options.force === true}::boolean or not exists (select 1 from ahead))
          returning outbox.id
        )
        select t.connection_id, t.object, t.crm_id, exists (select 1 from replayed) as replayed,
          a.event_id as newer_event_id, a.version as newer_version, a.state as newer_state
        from target t left join ahead a on true`),
    );
    if (row) {
      const key = { connectionId: row.connection_id, object: row.object, crmId: row.crm_id };
      const newer = row.newer_event_id === null ? null : { eventId: row.newer_event_id, version: row.newer_version, state: row.newer_state! };
      if (row.replayed) return { status: 'replayed', ...key, overtook: newer };
      return { status: 'newer_change', ...key, newer: newer! };
    }
    const [found] = await tx.select({ state: outbox.state }).from(outbox).where(eq(outbox.eventId, eventId));
    if (found === undefined) return { status: 'not_found' as const };
    return { status: 'not_dead' as const, state: found.state === 'dead' ? ('pending' as const) : found.state };
  });
}
