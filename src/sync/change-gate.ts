import { randomUUID } from 'node:crypto';
import { and, desc, eq, isNull, or } from 'drizzle-orm';
import type { Db } from '../db/client.js';
import {
  ledger,
  ledgerBodies,
  outbox,
  outboundWrites,
  pendingFetches,
  recordHeads,
  type ChangeKind,
  type ChangeSource,
  type Disposition,
} from '../db/schema/index.js';
import { versionRank } from './record.js';

/** One observed change of one CRM record, from any path (hook, poll, sweep, fetched notification). */
export interface ObservedChange {
  connectionId: string;
  object: string;
  crmId: string;
  source: ChangeSource;
  change: ChangeKind;
  /** The CRM's version (an etag, a revision, or updated_at); null when the payload has none. */
  version: string | null;
  /**
   * Where the change sits in the record's history: the CRM's updated_at (or a numeric version)
   * as a number. Versions may be opaque (Clio's etag), so order comes from here; null when
   * unknown. Defaults to a reading of `version`.
   */
  rank?: number | null;
  raw: unknown;
  /** Mapped canonical fields; null for a delete. */
  fields: Record<string, unknown> | null;
  /** SHA-256 of the canonical fields; null for a delete. */
  contentHash: string | null;
  /** The record carries the bridge's own origin marker (written by the pipeline through us). */
  originMarker?: boolean;
  observedAt: Date;
  /** DESIGN rule 4 is configurable: deliver newer versions whose content did not change. */
  deliverUnchanged?: boolean;
}

export type GateDisposition = Disposition | 'duplicate';

export interface GateOutcome {
  disposition: GateDisposition;
  /** The new ledger row, or for a duplicate the event it duplicates. */
  eventId: string;
  /** An outbox row was written: the change goes downstream. */
  delivered: boolean;
}

type Head = typeof recordHeads.$inferSelect;

/**
 * The change gate (DESIGN "The change gate", rules 1-7). Runs inside the caller's transaction;
 * the caller commits, and only then may a hook be acknowledged. Changes are taken in key order
 * so that concurrent batches lock record heads in one order and cannot deadlock; two changes of
 * one record keep their arrival order. Outcomes come back in the order given.
 */
export async function passChanges(tx: Db, changes: readonly ObservedChange[]): Promise<GateOutcome[]> {
  const order = changes.map((_, i) => i).sort((a, b) => compareKeys(changes[a]!, changes[b]!));
  const outcomes = new Array<GateOutcome>(changes.length);
  for (const i of order) outcomes[i] = await passChange(tx, changes[i]!);
  return outcomes;
}

function compareKeys(a: ObservedChange, b: ObservedChange): number {
  return a.connectionId.localeCompare(b.connectionId) || a.object.localeCompare(b.object) || a.crmId.localeCompare(b.crmId);
}

async function passChange(tx: Db, change: ObservedChange): Promise<GateOutcome> {
  const eventId = randomUUID();
  const rank = change.rank !== undefined ? change.rank : versionRank(change.version);
  const key = { connectionId: change.connectionId, object: change.object, crmId: change.crmId };

  // Rule 6: the head row is claimed through a constraint, never check-then-insert. A losing
  // concurrent insert waits for the winner's commit, then reads its row under lock below.
  const inserted = await tx
    .insert(recordHeads)
    .values({
      ...key,
      version: change.version,
      versionRank: rank,
      contentHash: change.contentHash,
      deleted: change.change === 'delete',
      lastEventId: eventId,
      deliveredHash: change.contentHash,
    })
    .onConflictDoNothing()
    .returning({ crmId: recordHeads.crmId });

  let disposition: Disposition;
  if (inserted.length === 1) {
    disposition = (await isEcho(tx, change)) ? 'echo' : 'accepted';
    if (disposition === 'echo') {
      await tx.update(recordHeads).set({ origin: 'pipeline', deliveredHash: null }).where(headKey(change));
    }
  } else {
    const [head] = await tx.select().from(recordHeads).where(headKey(change)).for('update');
    if (head === undefined) throw new Error(`record head vanished for ${change.object}/${change.crmId}`);
    const decided = await decide(tx, head, change, rank);
    if (decided === 'duplicate') return { disposition: 'duplicate', eventId: head.lastEventId, delivered: false };
    disposition = decided;
    if (disposition !== 'stale') {
      const delivered = disposition === 'accepted';
      await tx
        .update(recordHeads)
        .set({
          version: change.version ?? (change.change === 'delete' ? head.version : null),
          versionRank: change.version !== null ? rank : change.change === 'delete' ? head.versionRank : null,
          contentHash: change.change === 'delete' ? head.contentHash : change.contentHash,
          deleted: change.change === 'delete',
          lastEventId: eventId,
          origin: disposition === 'echo' ? 'pipeline' : disposition === 'accepted' ? 'crm' : head.origin,
          ...(delivered ? { deliveredHash: change.contentHash } : {}),
          updatedAt: new Date(),
        })
        .where(headKey(change));
    }
  }

  const delivered = disposition === 'accepted';
  await tx.insert(ledger).values({
    eventId,
    ...key,
    source: change.source,
    disposition,
    change: change.change,
    version: change.version,
    contentHash: change.contentHash,
    origin: disposition === 'echo' ? 'pipeline' : 'crm',
    observedAt: change.observedAt,
  });
  await tx.insert(ledgerBodies).values({ eventId, raw: change.raw ?? null, fields: change.fields });
  if (delivered) await tx.insert(outbox).values({ eventId, ...key });
  return { disposition, eventId, delivered };
}

async function decide(tx: Db, head: Head, change: ObservedChange, rank: number | null): Promise<GateDisposition> {
  if (change.change === 'delete') return head.deleted ? 'duplicate' : 'accepted';

  const sameVersion = change.version !== null && change.version === head.version;
  // Rule 1: the same version, or with no version the same content as the head, is seen already.
  if (sameVersion) return head.deleted ? 'stale' : 'duplicate';
  if (change.version === null && !head.deleted && change.contentHash === head.contentHash) return 'duplicate';
  // Rule 3: never back in time downstream.
  if (rank !== null && head.versionRank !== null && rank < head.versionRank) return 'stale';
  // Rule 5 before rule 4, so the ledger says why an echo was not delivered.
  if (await isEcho(tx, change)) return 'echo';
  if (!head.deleted && change.contentHash === head.contentHash && !change.deliverUnchanged) return 'unchanged';
  // Rule 2: anything else is a real change, A → B → A included (dedup is against the head).
  return 'accepted';
}

/**
 * Rule 5: the content matches a write the bridge made to this record, or one whose CRM id it
 * has not learned yet (the echo can arrive before the CRM call returns).
 */
async function isEcho(tx: Db, change: ObservedChange): Promise<boolean> {
  if (change.originMarker) return true;
  if (change.change === 'delete' || change.contentHash === null) return false;
  const [stamp] = await tx
    .select({ id: outboundWrites.id, crmId: outboundWrites.crmId })
    .from(outboundWrites)
    .where(
      and(
        eq(outboundWrites.connectionId, change.connectionId),
        eq(outboundWrites.object, change.object),
        eq(outboundWrites.contentHash, change.contentHash),
        or(eq(outboundWrites.crmId, change.crmId), isNull(outboundWrites.crmId)),
      ),
    )
    .orderBy(desc(outboundWrites.createdAt))
    .limit(1);
  if (stamp === undefined) return false;
  if (stamp.crmId === null) {
    await tx.update(outboundWrites).set({ crmId: change.crmId, updatedAt: new Date() }).where(eq(outboundWrites.id, stamp.id));
  }
  return true;
}

function headKey(change: Pick<ObservedChange, 'connectionId' | 'object' | 'crmId'>) {
  return and(
    eq(recordHeads.connectionId, change.connectionId),
    eq(recordHeads.object, change.object),
    eq(recordHeads.crmId, change.crmId),
  );
}

/**
 * A notification-mode hook (an id and little else): stored durably as a pending fetch, one per
 * record, so the record is fetched later even if auth is down now.
 */
export async function recordNotification(
  tx: Db,
  note: { connectionId: string; object: string; crmId: string; observedAt: Date; raw: unknown },
): Promise<GateOutcome> {
  const eventId = randomUUID();
  const key = { connectionId: note.connectionId, object: note.object, crmId: note.crmId };
  const inserted = await tx.insert(pendingFetches).values({ ...key, eventId }).onConflictDoNothing().returning();
  if (inserted.length === 0) {
    const [pending] = await tx
      .select({ eventId: pendingFetches.eventId })
      .from(pendingFetches)
      .where(and(eq(pendingFetches.connectionId, key.connectionId), eq(pendingFetches.object, key.object), eq(pendingFetches.crmId, key.crmId)));
    return { disposition: 'duplicate', eventId: pending?.eventId ?? eventId, delivered: false };
  }
  await tx.insert(ledger).values({
    eventId,
    ...key,
    source: 'hook',
    disposition: 'notified',
    change: 'upsert',
    version: null,
    contentHash: null,
    observedAt: note.observedAt,
  });
  await tx.insert(ledgerBodies).values({ eventId, raw: note.raw ?? null, fields: null });
  return { disposition: 'notified', eventId, delivered: false };
}
