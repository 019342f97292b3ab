import { randomUUID } from 'node:crypto';
import { and, asc, eq, inArray, isNull, or, sql } from 'drizzle-orm';
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
import { canonicalJson, versionRank } from './record.js';

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
  /**
   * The write id in the record's origin marker (the outbound write's id), when the CRM has a
   * marker and the record carries one. A value, not a flag: a record the bridge created keeps
   * its marker through later human edits, so the marker only names which write to compare with.
   */
  originMarker?: string;
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
type Stamp = {
  id: string;
  connectionId: string;
  object: string;
  contentHash: string;
  crmId: string | null;
  echoMatch: { fields: Record<string, unknown>; foldCase: string[] } | null;
  createdAt: Date;
};
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
  // The stamps read does not depend on the claim: both are sent at once (see `pipelined`).
  const [claimed, stamps] = await Promise.all([
    pipelined(
      chunks([...firstOfKey.values()], INSERT_CHUNK).map((rows) =>
        tx
          .insert(recordHeads)
          .values(
            rows.map((i) => {
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
            }),
          )
          .onConflictDoNothing()
          .returning(),
      ),
    ).then((parts) => parts.flat()),
    readStamps(tx, changes),
  ]);
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

  const echoes = new EchoStamps(stamps);
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
  await pipelined([
    ...[...headUpdates].map(([key, set]) => tx.update(recordHeads).set(set).where(headKey(heads.get(key)!))),
    ...echoes.claims().map((claim) => tx.update(outboundWrites).set({ crmId: claim.crmId, settledAt: new Date(), updatedAt: new Date() }).where(eq(outboundWrites.id, claim.id))),
    ...chunks(ledgerRows, INSERT_CHUNK).map((rows) => tx.insert(ledger).values(rows)),
    ...chunks(bodyRows, INSERT_CHUNK).map((rows) => tx.insert(ledgerBodies).values(rows)),
    ...chunks(outboxRows, INSERT_CHUNK).map((rows) => tx.insert(outbox).values(rows)),
  ]);
  return outcomes;
}

function compareKeys(a: ObservedChange, b: ObservedChange): number {
  return a.connectionId.localeCompare(b.connectionId) || a.object.localeCompare(b.object) || a.crmId.localeCompare(b.crmId);
}

/**
 * Runs statements of one transaction in the order given without waiting for each answer.
 * `execute()` sends at once (a drizzle query is otherwise lazy), so postgres.js queues them on
 * the transaction's connection in this order and the server runs them in this order: the
 * outbox insert still follows the ledger insert its foreign key needs. One round trip instead
 * of one per statement; PGlite takes them one at a time behind its own lock. If one fails, the
 * transaction is aborted and the rest fail with it.
 */
function pipelined<T>(statements: { execute(): Promise<T> }[]): Promise<T[]> {
  return Promise.all(statements.map((statement) => statement.execute()));
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

/**
 * The live outbound-write stamps any change of the batch could match: not settled (see
 * EchoStamps), not failed or skipped, for the same record or with no CRM id yet. Only writes in
 * flight or not yet echoed are live, so this reads a handful of rows through a partial index.
 */
async function readStamps(tx: Db, changes: readonly ObservedChange[]): Promise<Stamp[]> {
  const candidates = changes.filter((c) => c.change !== 'delete' && c.contentHash !== null);
  const parts = await pipelined(chunks(candidates, 500).map((part) => selectStamps(tx, part)));
  const byId = new Map<string, Stamp>();
  for (const stamp of parts.flat()) byId.set(stamp.id, stamp);
  return [...byId.values()];
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function selectStamps(tx: Db, candidates: readonly ObservedChange[]) {
  return tx
    .select({
      id: outboundWrites.id,
      connectionId: outboundWrites.connectionId,
      object: outboundWrites.object,
      contentHash: outboundWrites.contentHash,
      crmId: outboundWrites.crmId,
      echoMatch: outboundWrites.echoMatch,
      createdAt: outboundWrites.createdAt,
    })
    .from(outboundWrites)
    .where(
      and(
        isNull(outboundWrites.settledAt),
        inArray(outboundWrites.state, ['pending', 'sent']),
        or(
          ...candidates.map((c) =>
            and(
              eq(outboundWrites.connectionId, c.connectionId),
              eq(outboundWrites.object, c.object),
              // A marker that is not a write id (someone typed into the field) names no stamp.
              c.originMarker !== undefined && UUID.test(c.originMarker)
                ? eq(outboundWrites.id, c.originMarker)
                : or(eq(outboundWrites.crmId, c.crmId), isNull(outboundWrites.crmId)),
            ),
          ),
        ),
      ),
    );
}

/**
 * Rule 5, the echo of an outbound write. A stamp (an outbound_writes row, committed before the
 * CRM call) matches a change of the same record, or of any record while the stamp's CRM id is
 * still unknown, in one of these ways:
 *
 * - After the CRM call returned, the writer passes the returned record through this gate with
 *   the stamp's CRM id and that record's exact content hash: the head then holds the write's
 *   version, so every later arrival of that version, by hook or poll, is a rule-1 duplicate,
 *   and a versionless arrival with that content matches the exact hash.
 * - Before it returned (the hook beat the response), the CRM id and the read-back content are
 *   unknown (the CRM fills in computed fields), so:
 *   - with an origin marker, the change names its write: it is an echo of that stamp only, and
 *     only if the record still shows what was written (the stamp's `echoMatch` subset);
 *   - without one, a record showing the written subset (fold-case fields compared
 *     case-insensitively) is taken as the echo.
 *
 * A matched stamp is settled: it never matches again. That is what keeps a later human edit of
 * a bridge-written record a real change although the record still carries the marker (the
 * marker's write was already echoed) and still shows the written fields (they were not edited).
 * The newest matching stamp wins; a stamp without a CRM id learns this record's.
 */
class EchoStamps {
  private readonly settled = new Map<string, Stamp>();

  constructor(private readonly stamps: Stamp[]) {
    this.stamps.sort((a, b) => b.createdAt.getTime() - a.createdAt.getTime());
  }

  isEcho(change: ObservedChange): boolean {
    if (change.change === 'delete' || change.contentHash === null || change.fields === null) return false;
    const fields = change.fields;
    const stamp = this.stamps.find((s) => {
      if (this.settled.has(s.id) || s.connectionId !== change.connectionId || s.object !== change.object) return false;
      if (s.crmId !== null && s.crmId !== change.crmId) return false;
      // A marked record is compared with the write its marker names, and with no other.
      if (change.originMarker !== undefined) return s.id === change.originMarker.toLowerCase() && (s.contentHash === change.contentHash || showsWritten(fields, s));
      return s.contentHash === change.contentHash || showsWritten(fields, s);
    });
    if (stamp === undefined) return false;
    if (stamp.crmId === null) stamp.crmId = change.crmId;
    this.settled.set(stamp.id, stamp);
    return true;
  }

  /** Stamps matched in this batch: each learns its CRM id and is settled. */
  claims(): { id: string; crmId: string }[] {
    return [...this.settled.values()].map((s) => ({ id: s.id, crmId: s.crmId! }));
  }
}

/** The record shows every field the write set, as the CRM reads it back. */
function showsWritten(fields: Record<string, unknown>, stamp: Stamp): boolean {
  if (stamp.echoMatch === null) return false;
  const { fields: written, foldCase } = stamp.echoMatch;
  const names = Object.keys(written);
  // An empty subset would match any record: such a write is recognised by exact hash only.
  if (names.length === 0) return false;
  return names.every((name) => {
    const want = written[name];
    const got = fields[name];
    if (foldCase.includes(name) && typeof want === 'string' && typeof got === 'string') return want.toLowerCase() === got.toLowerCase();
    return canonicalJson(want ?? null) === canonicalJson(got ?? null);
  });
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
