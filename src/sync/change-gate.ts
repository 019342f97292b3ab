import { randomUUID } from 'node:crypto';
import { and, asc, eq, isNull, or, sql } from 'drizzle-orm';
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
type Stamp = { id: string; connectionId: string; object: string; contentHash: string; crmId: string | null; createdAt: Date };
type LedgerRow = typeof ledger.$inferInsert;

/**
 * The change gate (DESIGN "The change gate", rules 1-7). Runs inside the caller's transaction;
 * the caller commits, and only then may a hook be acknowledged. Changes are taken in key order
 * so that concurrent batches lock record heads in one order and cannot deadlock; two changes of
 * one record keep their arrival order. Outcomes come back in the order given.
 *
 * A batch costs a fixed number of round trips, not a few per change: head rows are claimed with
 * one multi-row insert (in key order), the heads that already existed are locked with one
 * SELECT … FOR UPDATE (in key order), outbound-write stamps are read once, each change is
 * decided in memory against the head as the changes before it in the batch left it, and the
 * ledger, body and outbox rows go in as one insert each. The decisions are those of taking the
 * changes one at a time: a head locked up front stays locked until commit either way.
 */
export async function passChanges(tx: Db, changes: readonly ObservedChange[]): Promise<GateOutcome[]> {
  if (changes.length === 0) return [];
  const order = changes.map((_, i) => i).sort((a, b) => compareKeys(changes[a]!, changes[b]!));
  const eventIds = changes.map(() => randomUUID());

  // Rule 6: head rows are claimed through a constraint, never check-then-insert. A losing
  // concurrent insert waits for the winner's commit; its row is then read under lock below.
  const firstOfKey = new Map<string, number>();
  for (const i of order) if (!firstOfKey.has(recordKey(changes[i]!))) firstOfKey.set(recordKey(changes[i]!), i);
  const claimed: Head[] = [];
  for (const rows of chunks([...firstOfKey.values()], INSERT_CHUNK)) {
    const values = rows.map((i) => {
      const change = changes[i]!;
      return {
        ...keyOf(change),
        version: change.version,
        versionRank: rankOf(change),
        contentHash: change.contentHash,
        deleted: change.change === 'delete',
        lastEventId: eventIds[i]!,
        deliveredHash: change.contentHash,
      };
    });
    claimed.push(...(await tx.insert(recordHeads).values(values).onConflictDoNothing().returning()));
  }
  const heads = new Map<string, Head>(claimed.map((head) => [recordKey(head), head]));
  const newKeys = new Set(heads.keys());
  const existing = [...firstOfKey.keys()].filter((key) => !newKeys.has(key)).map((key) => changes[firstOfKey.get(key)!]!);
  if (existing.length > 0) {
    const locked = await tx
      .select()
      .from(recordHeads)
      .where(inKeys(existing))
      .orderBy(asc(recordHeads.connectionId), asc(recordHeads.object), asc(recordHeads.crmId))
      .for('update');
    for (const head of locked) heads.set(recordKey(head), head);
  }

  const echoes = new EchoStamps(await readStamps(tx, changes));
  const headUpdates = new Map<string, Partial<Head>>();
  const ledgerRows: LedgerRow[] = [];
  const bodyRows: (typeof ledgerBodies.$inferInsert)[] = [];
  const outboxRows: (typeof outbox.$inferInsert)[] = [];
  const outcomes = new Array<GateOutcome>(changes.length);

  for (const i of order) {
    const change = changes[i]!;
    const eventId = eventIds[i]!;
    const key = recordKey(change);
    const head = heads.get(key);
    if (head === undefined) throw new Error(`record head vanished for ${change.object}/${change.crmId}`);
    const rank = rankOf(change);

    let disposition: Disposition;
    let update: Partial<Head> | undefined;
    if (firstOfKey.get(key) === i && newKeys.has(key)) {
      // This change's own insert made the head.
      disposition = echoes.isEcho(change) ? 'echo' : 'accepted';
      if (disposition === 'echo') update = { origin: 'pipeline', deliveredHash: null };
    } else {
      const decided = decide(head, change, rank, echoes);
      if (decided === 'duplicate') {
        outcomes[i] = { disposition: 'duplicate', eventId: head.lastEventId, delivered: false };
        continue;
      }
      disposition = decided;
      if (disposition !== 'stale') {
        update = {
          version: change.version ?? (change.change === 'delete' ? head.version : null),
          versionRank: change.version !== null ? rank : change.change === 'delete' ? head.versionRank : null,
          contentHash: change.change === 'delete' ? head.contentHash : change.contentHash,
          deleted: change.change === 'delete',
          lastEventId: eventId,
          origin: disposition === 'echo' ? 'pipeline' : disposition === 'accepted' ? 'crm' : head.origin,
          ...(disposition === 'accepted' ? { deliveredHash: change.contentHash } : {}),
          updatedAt: new Date(),
        };
      }
    }
    if (update) {
      // The next change of this record in the batch is decided against the head as updated.
      Object.assign(head, update);
      headUpdates.set(key, { ...headUpdates.get(key), ...update });
    }

    const delivered = disposition === 'accepted';
    ledgerRows.push({
      eventId,
      ...keyOf(change),
      source: change.source,
      disposition,
      change: change.change,
      version: change.version,
      contentHash: change.contentHash,
      origin: disposition === 'echo' ? 'pipeline' : 'crm',
      observedAt: change.observedAt,
    });
    bodyRows.push({ eventId, raw: change.raw ?? null, fields: change.fields });
    if (delivered) outboxRows.push({ eventId, ...keyOf(change) });
    outcomes[i] = { disposition, eventId, delivered };
  }

  // A head that changed is written once, with its state after the batch; new records seen once
  // (the common case) need no update at all.
  for (const [key, set] of headUpdates) await tx.update(recordHeads).set(set).where(headKey(heads.get(key)!));
  for (const claim of echoes.claims()) {
    await tx.update(outboundWrites).set({ crmId: claim.crmId, updatedAt: new Date() }).where(eq(outboundWrites.id, claim.id));
  }
  for (const rows of chunks(ledgerRows, INSERT_CHUNK)) await tx.insert(ledger).values(rows);
  for (const rows of chunks(bodyRows, INSERT_CHUNK)) await tx.insert(ledgerBodies).values(rows);
  for (const rows of chunks(outboxRows, INSERT_CHUNK)) await tx.insert(outbox).values(rows);
  return outcomes;
}

function compareKeys(a: ObservedChange, b: ObservedChange): number {
  return a.connectionId.localeCompare(b.connectionId) || a.object.localeCompare(b.object) || a.crmId.localeCompare(b.crmId);
}

/** Rows per multi-row insert: well under Postgres's 65,535 bind parameters at ~10 columns a row. */
const INSERT_CHUNK = 1_000;

function chunks<T>(items: readonly T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/**
 * `(connection_id, object, crm_id) IN (…)` as one statement, so one ORDER BY fixes the order in
 * which every batch locks heads. Three parameters a record: up to ~21,000 records per call (the
 * hook writer sends 64 at most, the poller a page).
 */
function inKeys(keys: readonly Pick<ObservedChange, 'connectionId' | 'object' | 'crmId'>[]) {
  const tuples = keys.map((k) => sql`(${k.connectionId}, ${k.object}, ${k.crmId})`);
  return sql`(${recordHeads.connectionId}, ${recordHeads.object}, ${recordHeads.crmId}) in (${sql.join(tuples, sql`, `)})`;
}

function rankOf(change: ObservedChange): number | null {
  return change.rank !== undefined ? change.rank : versionRank(change.version);
}

function keyOf(change: Pick<ObservedChange, 'connectionId' | 'object' | 'crmId'>) {
  return { connectionId: change.connectionId, object: change.object, crmId: change.crmId };
}

function recordKey(r: Pick<ObservedChange, 'connectionId' | 'object' | 'crmId'>): string {
  return JSON.stringify([r.connectionId, r.object, r.crmId]);
}

function decide(head: Head, change: ObservedChange, rank: number | null, echoes: EchoStamps): GateDisposition {
  if (change.change === 'delete') return head.deleted ? 'duplicate' : 'accepted';

  const sameVersion = change.version !== null && change.version === head.version;
  // Rule 1: the same version, or with no version the same content as the head, is seen already.
  if (sameVersion) return head.deleted ? 'stale' : 'duplicate';
  if (change.version === null && !head.deleted && change.contentHash === head.contentHash) return 'duplicate';
  // Rule 3: never back in time downstream.
  if (rank !== null && head.versionRank !== null && rank < head.versionRank) return 'stale';
  // Rule 5 before rule 4, so the ledger says why an echo was not delivered.
  if (echoes.isEcho(change)) return 'echo';
  if (!head.deleted && change.contentHash === head.contentHash && !change.deliverUnchanged) return 'unchanged';
  // Rule 2: anything else is a real change, A → B → A included (dedup is against the head).
  return 'accepted';
}

/** The outbound-write stamps any change of the batch could match: same record or no CRM id yet, same content. */
async function readStamps(tx: Db, changes: readonly ObservedChange[]): Promise<Stamp[]> {
  const candidates = changes.filter((c) => !c.originMarker && c.change !== 'delete' && c.contentHash !== null);
  const stamps: Stamp[] = [];
  for (const part of chunks(candidates, 500)) {
    stamps.push(...(await selectStamps(tx, part)));
  }
  return stamps;
}

function selectStamps(tx: Db, candidates: readonly ObservedChange[]): Promise<Stamp[]> {
  return tx
    .select({
      id: outboundWrites.id,
      connectionId: outboundWrites.connectionId,
      object: outboundWrites.object,
      contentHash: outboundWrites.contentHash,
      crmId: outboundWrites.crmId,
      createdAt: outboundWrites.createdAt,
    })
    .from(outboundWrites)
    .where(
      or(
        ...candidates.map((c) =>
          and(
            eq(outboundWrites.connectionId, c.connectionId),
            eq(outboundWrites.object, c.object),
            eq(outboundWrites.contentHash, c.contentHash!),
            or(eq(outboundWrites.crmId, c.crmId), isNull(outboundWrites.crmId)),
          ),
        ),
      ),
    );
}

/**
 * Rule 5: the content matches a write the bridge made to this record, or one whose CRM id it
 * has not learned yet (the echo can arrive before the CRM call returns). The newest matching
 * stamp wins; a stamp without a CRM id is claimed for this record, so later changes of the
 * batch see it as that record's.
 */
class EchoStamps {
  private readonly claimed = new Map<string, Stamp>();

  constructor(private readonly stamps: Stamp[]) {
    this.stamps.sort((a, b) => b.createdAt.getTime() - a.createdAt.getTime());
  }

  isEcho(change: ObservedChange): boolean {
    if (change.originMarker) return true;
    if (change.change === 'delete' || change.contentHash === null) return false;
    const stamp = this.stamps.find(
      (s) =>
        s.connectionId === change.connectionId &&
        s.object === change.object &&
        s.contentHash === change.contentHash &&
        (s.crmId === change.crmId || s.crmId === null),
    );
    if (stamp === undefined) return false;
    if (stamp.crmId === null) {
      stamp.crmId = change.crmId;
      this.claimed.set(stamp.id, stamp);
    }
    return true;
  }

  claims(): { id: string; crmId: string }[] {
    return [...this.claimed.values()].map((s) => ({ id: s.id, crmId: s.crmId! }));
  }
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
