import { and, eq, sql } from 'drizzle-orm';
import { lastStatement, rowsOf, type Db } from '../db/client.js';
import { headsByKey } from '../db/queries/heads.js';
import type { ClaimedDelivery } from '../db/queries/outbox.js';
import {
  ledger,
  ledgerBodies,
  pendingFetches,
  recordHeads,
  type ChangeKind,
  type ChangeSource,
  type Disposition,
} from '../db/schema/index.js';
import { timeOrderedId } from '../ids.js';
import { canonicalJson, sameVersion, versionRank } from './record.js';

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

/**
 * A delete of one record, as the sweep, a fetch that found the record gone, or the CRM's deleted
 * event observes it: no version, fields or hash; `raw` is what came with it (a hook's last
 * version of the record), kept for the ledger. `rank` is where that last version sits in the
 * record's history (its updated_at), when the event carried it: no version up to it brings the
 * record back (see `decide`).
 */
export function deleteChange(
  stream: { connectionId: string; object: string },
  crmId: string,
  source: ChangeSource,
  observedAt: Date,
  raw: unknown = null,
  rank: number | null = null,
): ObservedChange {
  return { ...stream, crmId, source, change: 'delete', version: null, rank, raw, fields: null, contentHash: null, observedAt };
}

export type GateDisposition = Disposition | 'duplicate';

export interface GateOutcome {
  disposition: GateDisposition;
  /** The new ledger row, or for a duplicate the event it duplicates. */
  eventId: string;
  /** An outbox row was written: the change goes downstream. */
  delivered: boolean;
  /** That outbox row, written already leased to the worker named in `options.leases` (see there). */
  leased?: ClaimedDelivery;
}

/**
 * Outbox rows a batch may write already leased to a delivery worker of this process, so that the
 * worker sends them as soon as the transaction commits instead of claiming them first. A claim is
 * a statement and a commit of its own, and on the hook path it came between every committed hook
 * and its delivery.
 */
export interface LeaseOffer {
  /** The worker's lease owner (outbox.lease_owner). */
  owner: string;
  /** The lease, from the transaction's start on the database's clock. */
  ms: number;
  /** Most rows of this connection the batch may lease. */
  max: number;
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
  /** Given up on after an attempt that may have made the record: matched through its marker only. */
  failed: boolean;
};
/** The columns of a record head read through raw SQL, as `HeadRow`. */
const HEAD_COLUMNS = sql.raw('h.connection_id, h.object, h.crm_id, h.version, h.version_rank, h.content_hash, h.deleted, h.origin, h.last_event_id, h.delivered_hash');

/** A record head as the database returns it through raw SQL. */
type HeadRow = {
  connection_id: string;
  object: string;
  crm_id: string;
  version: string | null;
  version_rank: number | string | null;
  content_hash: string | null;
  deleted: boolean;
  origin: 'crm' | 'pipeline';
  last_event_id: string;
  delivered_hash: string | null;
};

function headOf(row: HeadRow, now: Date): Head {
  return {
    connectionId: row.connection_id,
    object: row.object,
    crmId: row.crm_id,
    version: row.version,
    versionRank: row.version_rank === null ? null : Number(row.version_rank),
    contentHash: row.content_hash,
    deleted: row.deleted,
    origin: row.origin,
    lastEventId: row.last_event_id,
    deliveredHash: row.delivered_hash,
    updatedAt: now,
  };
}

function keyRow(k: Pick<ObservedChange, 'connectionId' | 'object' | 'crmId'>) {
  return { connection_id: k.connectionId, object: k.object, crm_id: k.crmId };
}

/** A `json` column: parsed by both drivers, but read defensively as text too. */
type Json<T> = T | string;

function jsonOf<T>(value: Json<T>): T {
  return typeof value === 'string' ? (JSON.parse(value) as T) : value;
}

/**
 * The change gate (DESIGN "The change gate", rules 1-7). Runs inside the caller's transaction;
 * the caller commits, and only then may a hook be acknowledged. Changes are taken in key order
 * so that concurrent batches lock record heads in one order and cannot deadlock; two changes of
 * one record keep their arrival order. Outcomes come back in the order given.
 *
 * A batch costs two or three statements, not a few per change: one claims the head rows (in
 * the database's key order) and reads the committed heads and the live outbound-write stamps;
 * the heads that already existed and changed are locked with one SELECT … FOR UPDATE (in the same
 * order); each change is decided in memory against the head as the changes before it in the
 * batch left it; and one statement writes the heads, stamps, ledger, body and outbox rows. Each
 * statement carries its rows as JSON parameters. The decisions are those of taking the changes
 * one at a time: a head locked up front stays locked until commit either way.
 *
 * `last`: the caller runs nothing after this in its transaction, so the write may go out with
 * the COMMIT (`lastStatement`).
 *
 * `leases`: per connection, an offer of a delivery worker in this process. A delivered change's
 * outbox row is written leased to it (its first attempt counted, as a claim counts it) when the
 * offer has room left and the row is the only pending one of its record: per-record order holds,
 * since a worker may send a row only when no older one of its record is pending. The leased row
 * comes back as `leased`, with the content a claim would read (the record and fields rendered by
 * the database, so a retry's body is byte for byte the first attempt's). The caller hands it to
 * the worker once the transaction committed; if it never does, the lease runs out and any worker
 * claims the row as usual.
 */
export async function passChanges(
  tx: Db,
  changes: readonly ObservedChange[],
  options: { last?: boolean; leases?: ReadonlyMap<string, LeaseOffer> } = {},
): Promise<GateOutcome[]> {
  if (changes.length === 0) return [];
  const order = changes.map((_, i) => i).sort((a, b) => compareKeys(changes[a]!, changes[b]!));
  const eventIds = changes.map(() => timeOrderedId());

  // Rule 6: head rows are claimed through a constraint, never check-then-insert. A losing
  // concurrent insert waits for the winner's commit; its row is then read under lock below.
  const firstOfKey = new Map<string, number>();
  for (const i of order) if (!firstOfKey.has(recordKey(changes[i]!))) firstOfKey.set(recordKey(changes[i]!), i);
  const claimRows = [...firstOfKey.values()].map((i) => {
    const change = changes[i]!;
    return {
      connection_id: change.connectionId,
      object: change.object,
      crm_id: change.crmId,
      version: change.version,
      version_rank: rankOf(change),
      content_hash: change.contentHash,
      deleted: change.change === 'delete',
      last_event_id: eventIds[i]!,
    };
  });
  const allKeys = [...firstOfKey.values()].map((i) => keyRow(changes[i]!));
  // One statement, one round trip: an unlocked read of the heads as committed (the statement's
  // snapshot, taken before the claim), the claim, and the live stamps. The read lets a batch of
  // changes already seen (a re-poll) finish without locking or writing anything.
  const [first] = await rowsOf<{ seen: Json<HeadRow[]>; claimed: Json<{ connection_id: string; object: string; crm_id: string }[]>; stamps: Json<StampRow[]> }>(
    tx.execute(sql`
      with claimed as (
        insert into record_heads (connection_id, object, crm_id, version, version_rank, content_hash, deleted, last_event_id, delivered_hash)
        select connection_id, object, crm_id, version, version_rank, content_hash, deleted, last_event_id, content_hash
        from jsonb_to_recordset(${JSON.stringify(claimRows)}::jsonb)
          as r(connection_id text, object text, crm_id text, version text, version_rank float8, content_hash text, deleted boolean, last_event_id uuid)
        order by connection_id, object, crm_id
        on conflict do nothing
        returning connection_id, object, crm_id
      )
      select
        (select coalesce(json_agg(h), '[]') from (${headsByKey(HEAD_COLUMNS, allKeys)}) h) as seen,
        (select coalesce(json_agg(c), '[]') from claimed c) as claimed,
        (select coalesce(json_agg(w), '[]') from (${stampsQuery(changes)}) w) as stamps`),
  );
  const seen = jsonOf(first!.seen);
  const claimed = jsonOf(first!.claimed);
  const stamps = jsonOf(first!.stamps).map(stampOf);
  const now = new Date();
  const heads = new Map<string, Head>();
  for (const row of claimed) {
    const i = firstOfKey.get(recordKey({ connectionId: row.connection_id, object: row.object, crmId: row.crm_id }))!;
    const change = changes[i]!;
    heads.set(recordKey(change), {
      ...keyOf(change),
      version: change.version,
      versionRank: rankOf(change),
      contentHash: change.contentHash,
      deleted: change.change === 'delete',
      origin: 'crm',
      lastEventId: eventIds[i]!,
      deliveredHash: change.contentHash,
      updatedAt: now,
    });
  }
  const newKeys = new Set(heads.keys());
  const outcomes = new Array<GateOutcome>(changes.length);
  // Rule 1 without a lock: a record that appears once in the batch, whose committed head already
  // holds this change, writes nothing whatever happens concurrently (a head only moves on).
  const keyCount = new Map<string, number>();
  for (const change of changes) keyCount.set(recordKey(change), (keyCount.get(recordKey(change)) ?? 0) + 1);
  const settled = new Set<string>();
  for (const row of seen) {
    const head = headOf(row, now);
    const key = recordKey(head);
    const i = firstOfKey.get(key)!;
    if (keyCount.get(key) === 1 && !newKeys.has(key) && isDuplicate(head, changes[i]!)) {
      outcomes[i] = { disposition: 'duplicate', eventId: head.lastEventId, delivered: false };
      settled.add(key);
    }
  }
  const existing = [...firstOfKey.keys()].filter((key) => !newKeys.has(key) && !settled.has(key)).map((key) => changes[firstOfKey.get(key)!]!);
  if (existing.length > 0) {
    const locked = await rowsOf<HeadRow>(tx.execute(headsByKey(HEAD_COLUMNS, existing.map(keyRow), 'lock')));
    for (const row of locked) {
      const head = headOf(row, now);
      heads.set(recordKey(head), head);
    }
  }

  const echoes = new EchoStamps(stamps);
  // Heads the batch changed; each is written once, with its state after the batch.
  const changedHeads = new Set<string>();
  const ledgerRows: Record<string, unknown>[] = [];
  const bodyRows: Record<string, unknown>[] = [];
  const outboxRows: Record<string, unknown>[] = [];
  // Leases offered and still unused, per connection; records with an outbox row in this batch.
  const leaseRoom = new Map([...(options.leases ?? [])].map(([id, offer]) => [id, offer.max]));
  const queued = new Set<string>();
  const leasedAt = new Map<string, number>();

  for (const i of order) {
    if (outcomes[i] !== undefined) continue;
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
      disposition = isOwnWrite(change, echoes) ? 'echo' : 'accepted';
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
          // A delete keeps the newest rank known of the record: its own (the deleted event's last
          // version) or the head's, so a version read before the delete stays behind it.
          versionRank: change.change === 'delete' ? newestRank(rank, head.versionRank) : (rank ?? (change.version !== null ? null : head.versionRank)),
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
      changedHeads.add(key);
    }

    const delivered = disposition === 'accepted';
    ledgerRows.push({
      event_id: eventId,
      ...keyRow(change),
      source: change.source,
      disposition,
      change: change.change,
      version: change.version,
      content_hash: change.contentHash,
      origin: disposition === 'echo' ? 'pipeline' : 'crm',
      observed_at: change.observedAt.toISOString(),
    });
    bodyRows.push({ event_id: eventId, raw: change.raw ?? null, fields: change.fields });
    if (delivered) {
      // A second row of one record in the batch waits for the first, so only the first may be leased.
      const room = leaseRoom.get(change.connectionId) ?? 0;
      const offer = room > 0 && !queued.has(key) ? options.leases!.get(change.connectionId)! : undefined;
      if (offer) {
        leaseRoom.set(change.connectionId, room - 1);
        leasedAt.set(eventId, i);
      }
      queued.add(key);
      outboxRows.push({ event_id: eventId, ...keyRow(change), lease_owner: offer?.owner ?? null, lease_ms: offer?.ms ?? null });
    }
    outcomes[i] = { disposition, eventId, delivered };
  }

  // A head that changed is written once, with its state after the batch; new records seen once
  // (the common case) need no update at all. Each statement carries its rows as one JSON
  // parameter: building SQL per row and column costs more client CPU than the database work.
  const updatedHeads = [...changedHeads].map((key) => {
    const h = heads.get(key)!;
    return {
      ...keyRow(h),
      version: h.version,
      version_rank: h.versionRank,
      content_hash: h.contentHash,
      deleted: h.deleted,
      origin: h.origin,
      last_event_id: h.lastEventId,
      delivered_hash: h.deliveredHash,
    };
  });
  // Every head changed with a ledger row, and every matched stamp with an echo's ledger row, so
  // a batch of duplicates writes nothing. Otherwise one statement writes it all: its parts see
  // one snapshot, and the foreign keys (bodies and outbox → ledger) are checked at its end.
  if (ledgerRows.length > 0) {
    const writes = JSON.stringify({ heads: updatedHeads, claims: echoes.claims().map((c) => ({ id: c.id, crm_id: c.crmId })), ledger: ledgerRows, bodies: bodyRows, outbox: outboxRows });
    const write = sql`
      with w as (select ${writes}::jsonb as j),
      heads as (
        -- Every one of these heads exists and is locked by this transaction: the insert always
        -- meets its conflict and updates. Unlike UPDATE … FROM, it finds each head through the
        -- primary key whatever the planner guesses about the row count.
        insert into record_heads (connection_id, object, crm_id, version, version_rank, content_hash, deleted, origin, last_event_id, delivered_hash)
        select connection_id, object, crm_id, version, version_rank, content_hash, deleted, origin, last_event_id, delivered_hash
        from w, jsonb_to_recordset(w.j->'heads')
          as u(connection_id text, object text, crm_id text, version text, version_rank float8, content_hash text, deleted boolean, origin text, last_event_id uuid, delivered_hash text)
        on conflict (connection_id, object, crm_id) do update set version = excluded.version, version_rank = excluded.version_rank,
          content_hash = excluded.content_hash, deleted = excluded.deleted, origin = excluded.origin, last_event_id = excluded.last_event_id,
          delivered_hash = excluded.delivered_hash, updated_at = now()
      ),
      claims as (
        -- A write given up on whose record turned up was made after all: it is sent.
        update outbound_writes o set crm_id = c.crm_id, settled_at = now(), updated_at = now(),
          state = case when o.state = 'failed' then 'sent' else o.state end,
          last_status = case when o.state = 'failed' then null else o.last_status end,
          last_error = case when o.state = 'failed' then null else o.last_error end
        from w, jsonb_to_recordset(w.j->'claims') as c(id uuid, crm_id text)
        -- The id list again as an array, so the writes are found through their primary key and
        -- not by a hash join over every write ever made (see headsByKey). A stamp another
        -- transaction is settling right now (a hook and a poll page matched it at once) is left
        -- to that one: both changes are echoes either way, and waiting for it could wait on a
        -- transaction that is itself waiting for this one (the poller commits pages in order).
        where o.id = c.id and o.id = any(array(
          select s.id from outbound_writes s
          where s.id = any(array(select (x->>'id')::uuid from w as ids, jsonb_array_elements(ids.j->'claims') x))
          for update skip locked))
      ),
      ledger_rows as (
        insert into ledger (event_id, connection_id, object, crm_id, source, disposition, change, version, content_hash, origin, observed_at)
        select event_id, connection_id, object, crm_id, source, disposition, change, version, content_hash, origin, observed_at
        from w, jsonb_to_recordset(w.j->'ledger')
          as l(event_id uuid, connection_id text, object text, crm_id text, source text, disposition text, change text, version text, content_hash text, origin text, observed_at timestamptz)
      ),
      bodies as (
        insert into ledger_bodies (event_id, raw, fields)
        select event_id, raw, fields from w, jsonb_to_recordset(w.j->'bodies') as b(event_id uuid, raw jsonb, fields jsonb)
        ${leasedAt.size === 0 ? sql`` : sql`returning event_id, raw, fields`}
      )
      ${leasedAt.size === 0 ? PLAIN_OUTBOX : LEASED_OUTBOX}`;
    const query = options.last ? lastStatement(write) : write;
    if (leasedAt.size === 0) {
      await tx.execute(query);
      return outcomes;
    }
    const leased = await rowsOf<LeasedRow>(tx.execute(query));
    for (const row of leased) {
      const i = leasedAt.get(row.event_id)!;
      const change = changes[i]!;
      outcomes[i]!.leased = {
        id: Number(row.id),
        eventId: row.event_id,
        ...keyOf(change),
        attempts: row.attempts,
        queuedAt: new Date(row.queued_at),
        content: {
          change: change.change,
          version: change.version,
          origin: 'crm',
          source: change.source,
          observedAt: change.observedAt,
          rawJson: row.raw_json,
          fieldsJson: row.fields_json,
        },
      };
    }
  }
  return outcomes;
}

/** The outbox rows of a batch that leases none: the write statement's last part. */
const PLAIN_OUTBOX = sql`
      insert into outbox (event_id, connection_id, object, crm_id)
      select event_id, connection_id, object, crm_id from w, jsonb_to_recordset(w.j->'outbox') as o(event_id uuid, connection_id text, object text, crm_id text)`;

type LeasedRow = { id: number | string; event_id: string; attempts: number; queued_at: string | Date; raw_json: string | null; fields_json: string | null };

/**
 * The outbox rows of a batch that leases some: a row offered a lease takes it only if no other
 * row of its record is pending (committed, so ordered before it: every outbox row of a record is
 * written under its head's lock). The leased rows come back with their body as a claim renders it.
 */
const LEASED_OUTBOX = sql`
      , outbox_rows as (
        insert into outbox (event_id, connection_id, object, crm_id, attempts, lease_owner, lease_expires_at)
        select event_id, connection_id, object, crm_id, case when owner is null then 0 else 1 end, owner,
          case when owner is null then null else now() + lease_ms * interval '1 millisecond' end
        from (
          select o.event_id, o.connection_id, o.object, o.crm_id, o.lease_ms,
            case when o.lease_owner is not null and not exists (
              select 1 from outbox p
              where p.connection_id = o.connection_id and p.object = o.object and p.crm_id = o.crm_id and p.state = 'pending' offset 0)
            then o.lease_owner end as owner
          from w, jsonb_to_recordset(w.j->'outbox') as o(event_id uuid, connection_id text, object text, crm_id text, lease_owner text, lease_ms float8)
        ) o
        returning id, event_id, attempts, queued_at, lease_owner
      )
      select r.id, r.event_id, r.attempts, r.queued_at, b.raw::text as raw_json, b.fields::text as fields_json
      from outbox_rows r join bodies b on b.event_id = r.event_id
      where r.lease_owner is not null`;

function compareKeys(a: ObservedChange, b: ObservedChange): number {
  return a.connectionId.localeCompare(b.connectionId) || a.object.localeCompare(b.object) || a.crmId.localeCompare(b.crmId);
}

function newestRank(a: number | null, b: number | null): number | null {
  return a === null ? b : b === null ? a : Math.max(a, b);
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

/** Rule 1: the same version, or with no version the same content as the head, is seen already. */
function isDuplicate(head: Head, change: ObservedChange): boolean {
  if (change.change === 'delete') return head.deleted;
  if (head.deleted) return false;
  if (change.version !== null) return sameVersion(change.version, head.version);
  return change.contentHash === head.contentHash;
}

/**
 * Rule 5: the echo of a stamp, or the CRM's answer to a write (source `outbound`), which is the
 * bridge's own version however its stamp fared: an earlier attempt's echo may have settled it
 * already. The stamps are asked first, so an answer still settles its own.
 */
function isOwnWrite(change: ObservedChange, echoes: EchoStamps): boolean {
  return echoes.isEcho(change) || change.source === 'outbound';
}

function decide(head: Head, change: ObservedChange, rank: number | null, echoes: EchoStamps): GateDisposition {
  if (isDuplicate(head, change)) return 'duplicate';
  if (change.change === 'delete') return 'accepted';
  // A version seen before the record was deleted does not bring it back.
  if (change.version !== null && sameVersion(change.version, head.version)) return 'stale';
  // Nor one from no later than the last version the delete knew of: a poll page or a fetch read
  // before the matter was deleted and committed after its deleted hook (the version was never
  // seen, its hook dropped) would otherwise put a deleted matter back in the pipeline until the
  // next sweep. A CRM that hard-deletes (Clio) never edits a record after it is gone; one that
  // restores a record (HubSpot) stamps the restore later than the delete.
  if (head.deleted && rank !== null && head.versionRank !== null && rank <= head.versionRank) return 'stale';
  // Rule 3: never back in time downstream.
  if (rank !== null && head.versionRank !== null && rank < head.versionRank) return 'stale';
  // Rule 5 before rule 4, so the ledger says why an echo was not delivered.
  if (isOwnWrite(change, echoes)) return 'echo';
  if (!head.deleted && change.contentHash === head.contentHash && !change.deliverUnchanged) return 'unchanged';
  // Rule 2: anything else is a real change, A → B → A included (dedup is against the head).
  return 'accepted';
}

/**
 * The live outbound-write stamps any change of the batch could match: not settled (see
 * EchoStamps), of the batch's (connection, object) pairs, and with a CRM call that may have
 * started (`attempts > 0`: the claim commits the attempt before the call, and a wait for
 * re-authorisation gives it back). A write still queued has written nothing, so a change showing
 * its fields is someone else's. Pending or sent writes are live: only writes in flight or not
 * yet echoed, a handful of rows read through a partial index. A failed one is read only by its
 * id, when a change of the batch carries it in the origin marker (see EchoStamps): writes given
 * up on stay unsettled for good unless their echo comes, and a CRM outage's worth of them read
 * on every batch made each hook's transaction ten times dearer (bench/gate-cost.ts --given-up).
 * EchoStamps picks the stamp a change matches.
 */
function stampsQuery(changes: readonly ObservedChange[]) {
  const pairs = new Map<string, { connection_id: string; object: string }>();
  const markers = new Set<string>();
  for (const c of changes) {
    if (c.change !== 'delete' && c.contentHash !== null) pairs.set(`${c.connectionId}\u0000${c.object}`, { connection_id: c.connectionId, object: c.object });
    // A marker that is no write id (someone's text in the field) names no write.
    if (c.originMarker !== undefined && WRITE_ID.test(c.originMarker)) markers.add(c.originMarker.toLowerCase());
  }
  const columns = sql`w.id, w.connection_id, w.object, w.content_hash, w.crm_id, w.echo_match, w.created_at, w.state = 'failed' as failed`;
  const ofBatch = sql`(w.connection_id, w.object) in (
    select connection_id, object from jsonb_to_recordset(${JSON.stringify([...pairs.values()])}::jsonb) as p(connection_id text, object text))`;
  // The first through the partial index outbound_writes_live_idx, whose predicate it repeats;
  // the second by primary key (none without markers: one statement text either way).
  return sql`
    select ${columns} from outbound_writes w
    where w.settled_at is null and w.state in ('pending', 'sent') and w.attempts > 0 and ${ofBatch}
    union all
    select ${columns} from outbound_writes w
    where w.id in (select (jsonb_array_elements_text(${JSON.stringify([...markers])}::jsonb))::uuid)
      and w.state = 'failed' and w.settled_at is null and w.attempts > 0 and ${ofBatch}`;
}

const WRITE_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

type StampRow = {
  id: string;
  connection_id: string;
  object: string;
  content_hash: string;
  crm_id: string | null;
  echo_match: Stamp['echoMatch'] | string;
  created_at: string | Date;
  failed: boolean;
};

function stampOf(r: StampRow): Stamp {
  return {
    id: r.id,
    connectionId: r.connection_id,
    object: r.object,
    contentHash: r.content_hash,
    crmId: r.crm_id,
    echoMatch: typeof r.echo_match === 'string' ? (JSON.parse(r.echo_match) as Stamp['echoMatch']) : r.echo_match,
    createdAt: new Date(r.created_at),
    failed: r.failed,
  };
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
 *   - with an origin marker naming a live write, the change names its write: it is an echo of
 *     that stamp only, and only if the record still shows what was written (the stamp's
 *     `echoMatch` subset); a marker naming a write already echoed (a bridge-created record
 *     updated without a new stamp) is compared like no marker, with writes to this record only;
 *   - without one, a record showing the written subset (fold-case fields compared
 *     case-insensitively) is taken as the echo.
 * - A create given up on after an attempt that may have made the record is matched only by a
 *   record whose marker names it (and that shows what it wrote); the write then turns `sent`.
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
    const marker = change.originMarker?.toLowerCase();
    const live = (s: Stamp) => !this.settled.has(s.id) && s.connectionId === change.connectionId && s.object === change.object;
    // A marker naming a live write: the record is compared with that write and no other. A marker
    // naming a write already echoed is the create's (updates that do not stamp leave it): the
    // record is compared like an unmarked one, but only with writes to this very record.
    const named = marker !== undefined && this.stamps.some((s) => s.id === marker && live(s));
    const stamp = this.stamps.find((s) => {
      if (!live(s)) return false;
      // A write given up on may have made its record, which then names it; showing the same
      // fields alone proves nothing (a human's record of the same lead).
      if (s.failed && s.id !== marker) return false;
      if (s.crmId !== null && s.crmId !== change.crmId) return false;
      if (named) return s.id === marker && (s.contentHash === change.contentHash || showsWritten(fields, s.echoMatch));
      if (marker !== undefined && s.crmId === null) return false;
      return s.contentHash === change.contentHash || showsWritten(fields, s.echoMatch);
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
export function showsWritten(fields: Record<string, unknown>, echoMatch: Stamp['echoMatch']): boolean {
  if (echoMatch === null) return false;
  const { fields: written, foldCase } = echoMatch;
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

/**
 * A notification-mode hook (an id and little else): stored durably as a pending fetch, one per
 * record, so the record is fetched later even if auth is down now.
 */
export async function recordNotification(
  tx: Db,
  note: { connectionId: string; object: string; crmId: string; observedAt: Date; raw: unknown },
): Promise<GateOutcome> {
  const eventId = timeOrderedId();
  const key = { connectionId: note.connectionId, object: note.object, crmId: note.crmId };
  const inserted = await tx.insert(pendingFetches).values({ ...key, eventId }).onConflictDoNothing().returning();
  if (inserted.length === 0) {
    // Re-armed: a fetch already under way may have read the record before this change.
    const [pending] = await tx
      .update(pendingFetches)
      .set({ receivedAt: sql`date_trunc('milliseconds', clock_timestamp())` })
      .where(and(eq(pendingFetches.connectionId, key.connectionId), eq(pendingFetches.object, key.object), eq(pendingFetches.crmId, key.crmId)))
      .returning({ eventId: pendingFetches.eventId });
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
