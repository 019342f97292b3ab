import { randomUUID } from 'node:crypto';
import type { FastifyBaseLogger } from 'fastify';
import type { ConnectionConfig } from '../config/schema.js';
import type { Connector } from '../crm/connector.js';
import { CrmHttpError } from '../crm/http-client.js';
import { NeedsReauthError } from '../crm/token-provider.js';
import type { Db } from '../db/client.js';
import { acquireLease, holdUntilTransactionEnds, releaseLease, renewLease } from '../db/queries/leases.js';
import {
  advanceStreamCursor,
  databaseNow,
  deletePendingFetch,
  finishStreamRun,
  getStreamCursor,
  getStreamHeads,
  listPendingFetches,
  listStreamHeads,
  markStreamAttempt,
  notePendingFetchError,
  saveListingResume,
  sweepDue,
} from '../db/queries/streams.js';
import type { SweepHold } from '../db/schema/index.js';
import { deleteChange, passChanges, type GateOutcome, type ObservedChange } from './change-gate.js';
import { logsDebug } from '../logger.js';
import { errorClass, redactFields } from '../privacy.js';
import { Daemon } from './daemon.js';
import { identifyRecord, observeRecord, sameVersion, type RecordIdentity } from './record.js';

/** One (connection, object) stream of changes, and what polling it needs. */
export interface StreamContext {
  db: Db;
  connection: Pick<ConnectionConfig, 'id' | 'connector' | 'poll' | 'deliverUnchanged'>;
  object: string;
  connector: Connector;
  /** This replica's name in lease rows. */
  owner: string;
  log: FastifyBaseLogger;
  /** Told about every finished poll or sweep run of the daemon (metrics). */
  onRun?: ((report: RunReport, seconds: number) => void) | undefined;
  /** Told when notified records were fetched between runs (`fetchNotified`). */
  onFetched?: (() => void) | undefined;
}

export interface RunReport {
  connectionId: string;
  object: string;
  kind: 'poll' | 'sweep';
  /** `busy`: another replica holds the stream's lease. */
  status: 'ok' | 'busy' | 'failed';
  pages: number;
  records: number;
  counts: Record<string, number>;
  /** Changes this run delivered that no hook had announced (the automation's misses). */
  caught: number;
  deleted: number;
  /** Records the CRM says match this run's query, when it says (for progress and ETA). */
  total?: number;
  error?: string;
  needsReauth?: boolean;
  /** Sweep only: deletes it found and did not make (see `vouchForDeletes`). */
  held?: SweepHold;
}

export interface RunOptions {
  signal?: AbortSignal;
  /** Called after each committed page (CLI progress, tests that stop a run part-way). */
  onPage?: (report: RunReport) => void | Promise<void>;
  /**
   * Poll only: keep the cursor and lease under this key instead of the object's own (a backfill
   * re-reads everything beside the scheduled poll, and resumes from its own cursor).
   */
  cursorKey?: string;
  /** Poll only: where a run with no cursor under its key starts (default: poll.initialSince, else everything). */
  since?: Date;
  /** Poll only: count delivered changes as caught by poll (not for a backfill: those were never missed hooks). */
  countCaught?: boolean;
  /** Sweep only: make the deletes even when they are more than `poll.sweepDeleteLimit` allows (an operator vouched for them). */
  allowDeletes?: boolean;
}

/** The poller lost its lease to another replica: it must write nothing more. */
export class LeaseLostError extends Error {
  readonly code = 'LEASE_LOST';
  constructor(lease: string) {
    super(`lease ${lease} was taken over by another replica`);
    this.name = 'LeaseLostError';
  }
}

export const DEFAULT_POLL = { interval: 300_000, lookback: 120_000, sweepInterval: 86_400_000, sweepDeleteLimit: 0.1, jitter: 0.2 } as const;

function pollSettings(ctx: StreamContext) {
  const poll = ctx.connection.poll;
  const interval = poll?.interval ?? DEFAULT_POLL.interval;
  return {
    interval,
    lookback: poll?.lookback ?? DEFAULT_POLL.lookback,
    sweepInterval: poll?.sweepInterval ?? DEFAULT_POLL.sweepInterval,
    sweepDeleteLimit: poll?.sweepDeleteLimit ?? DEFAULT_POLL.sweepDeleteLimit,
    staleAfter: poll?.staleAfter ?? interval * 3,
    lease: poll?.lease ?? Math.max(2 * interval, 60_000),
    pageSize: poll?.pageSize,
    initialSince: poll?.initialSince,
  };
}

export const leaseName = (connectionId: string, object: string) => `poll:${connectionId}:${object}`;

/**
 * One poll run of a stream: list what changed since `cursor - lookback`, page by page (the next
 * page fetched while the current one commits), and pass every record through the change gate
 * (source `poll`). Each page commits its changes, the lease renewal and (for time-ordered pages)
 * the advanced cursor in one transaction, so a crash at any point loses nothing and a replica
 * that lost the lease writes nothing. Two pages' transactions run at once on Postgres (one
 * page's gate work beside the other's), and they commit in page order: a page commits only
 * after the one before it did, and fails with it. Records the committed heads already hold are
 * answered as duplicates before that transaction; a page of nothing else writes nothing.
 */
export async function pollStream(ctx: StreamContext, options: RunOptions = {}): Promise<RunReport> {
  const settings = pollSettings(ctx);
  const stream = { connectionId: ctx.connection.id, object: options.cursorKey ?? ctx.object };
  const lease = leaseName(stream.connectionId, stream.object);
  const report = emptyReport(ctx, 'poll');
  if (!(await acquireLease(ctx.db, lease, ctx.owner, settings.lease))) return { ...report, status: 'busy' };

  const started = performance.now();
  const runId = randomUUID();
  // The database's clock, as every replica reads it (what lastSweepAt and a resume's start are in).
  const startedAt = await markStreamAttempt(ctx.db, stream);
  const cursor = await getStreamCursor(ctx.db, stream);
  // A stream that never completed a run is a backfill: its changes are not "missed hooks".
  const hadCursor = cursor?.cursorRank !== null && cursor?.cursorRank !== undefined;
  const since = hadCursor
    ? new Date(cursor!.cursorRank! - settings.lookback)
    : (options.since ?? new Date(settings.initialSince ?? 0));
  const definition = ctx.connection.connector.objects[ctx.object]!;
  let newest: { updatedAt: string; id: string; rank: number } | undefined;
  // A first run from the beginning lists every record: it did a sweep's work of finding unseen
  // records, so the first sweep waits a sweep interval (a full listing can cost a Clio firm
  // minutes of its 50 requests/min).
  const fromTheStart = !hadCursor && options.since === undefined && settings.initialSince === undefined;
  let listsEverything = fromTheStart;
  // An id-ordered listing an earlier run stopped part-way goes on from its next page, with what
  // that run had read (a Clio backfill of 100,000 records is 500 pages at 50 requests/min).
  let resume = cursor?.resume ?? null;
  let resumeStartedAt: Date | undefined;
  if (resume) {
    newest = resume.newest ?? undefined;
    listsEverything = resume.listsEverything;
    resumeStartedAt = new Date(resume.startedAt);
    ctx.log.info({ stream }, `${stream.connectionId}/${stream.object}: going on with the listing stopped part-way`);
  }

  const listPages = async () => {
    // A page whose transaction failed stops the listing at once, the fetch in flight included.
    const failed = new AbortController();
    const pages = prefetched(
      (signal) =>
        ctx.connector.listChanges({ object: ctx.object, since, signal, ...(settings.pageSize ? { pageSize: settings.pageSize } : {}), ...(resume ? { from: resume.next } : {}) }),
      options.signal ? AbortSignal.any([options.signal, failed.signal]) : failed.signal,
    );
    let renewedAt = performance.now();
    // The page transaction in flight, and the records it writes: the next page's transaction
    // runs beside it and commits after it (see below), so at most two are open.
    let previous: Promise<void> | undefined;
    let previousKeys = new Set<string>();
    // Page order is kept by advisory locks as well as in the client. A page holds the lock
    // named for its number from its start, and after its gate work waits for the one before
    // it: in Postgres, where the deadlock detector sees it. Waiting only in the client, a page
    // holding record heads could wait for the page before it while that one waited for a third
    // transaction (a hook batch or another replica) that waited for those heads: a cycle
    // Postgres cannot see, which held every transaction in it until a process died (the soak's).
    // Three names in turn, so a page never asks for a name the page two before it still holds.
    const orderKey = (page: number) => `poll-order:${runId}:${page % 3}`;
    let pageNumber = 0;
    let previousStarted: Promise<void> = Promise.resolve();
    try {
      for await (const page of pages) {
        const seen: SeenRecord[] = [];
        for (const raw of page.records) {
          const identity = identifyRecord(raw, definition);
          if (identity === undefined) {
            report.counts.skipped = (report.counts.skipped ?? 0) + 1;
            continue;
          }
          seen.push({ raw, identity });
          const { crmId: id, rank } = identity;
          if (rank !== null && (newest === undefined || rank > newest.rank || (rank === newest.rank && id > newest.id))) {
            newest = { updatedAt: String(identity.updatedAt ?? identity.version), id, rank };
          }
        }
        const { held, changes } = await setAsideHeld(ctx, seen, new Date());
        // Time-ordered pages can checkpoint as they go; id-ordered ones (Clio) only at the end, and
        // note where they got to instead, so a stopped listing goes on from there.
        const checkpoint = page.order === 'updatedAt' ? newest : undefined;
        const place = page.order !== 'updatedAt' && page.cursor.next !== undefined && page.cursor.query === 1 ? { next: page.cursor.next, newest: newest ?? null } : undefined;
        if (logsDebug(ctx.log)) {
          for (const c of changes) ctx.log.debug({ stream, crmId: c.crmId, version: c.version, fields: redactFields(c.fields, definition) }, 'polled record');
        }
        const counted = (outcomes: GateOutcome[]) => {
          if (report.total === undefined && page.total !== undefined) report.total = page.total;
          tally(report, outcomes, hadCursor && options.countCaught !== false);
          report.pages++;
          report.records += page.records.length;
          return options.onPage?.(report);
        };
        // A page with nothing to write costs no transaction; the lease is still renewed (and a
        // lost one noticed, and the place in an id-ordered listing noted) at least every third of
        // its time.
        if (!(changes.length > 0 || checkpoint !== undefined || performance.now() - renewedAt >= settings.lease / 3)) {
          await previous;
          await counted(held);
          continue;
        }
        const before = previous;
        // A record on both pages (a time-ordered listing met an edit) waits for the first page:
        // the second must not lock its head while the first still needs it.
        if (before !== undefined && changes.some((c) => previousKeys.has(c.crmId))) await before;
        renewedAt = performance.now();
        const number = pageNumber++;
        // The page before must hold its lock before this one asks for it (below). Waiting for
        // that holds nothing: this page's transaction has not begun.
        await previousStarted;
        let markStarted!: () => void;
        previousStarted = new Promise<void>((resolve) => (markStarted = resolve));
        const committed = ctx.db
          .transaction(async (tx) => {
            await holdUntilTransactionEnds(tx, orderKey(number));
            markStarted();
            const result = await passChanges(tx, changes);
            // Pages commit in order: this one only after the one before it, and not at all if
            // that one failed. The wait is in Postgres first (see orderKey), then here for the
            // outcome, once the page before has ended. The lease and the stream's cursor are
            // written after it, because both pages write those rows; written first, they would
            // hold this page back behind the other's whole transaction.
            if (number > 0) await holdUntilTransactionEnds(tx, orderKey(number - 1));
            await before;
            // A run stopped meanwhile writes nothing more.
            options.signal?.throwIfAborted();
            if (!(await renewLease(tx, lease, ctx.owner, settings.lease))) throw new LeaseLostError(lease);
            if (checkpoint) await advanceStreamCursor(tx, stream, checkpoint);
            if (place) {
              resumeStartedAt ??= startedAt;
              await saveListingResume(tx, stream, { ...place, startedAt: resumeStartedAt.toISOString(), listsEverything });
            }
            return result;
          })
          .then((passed) => counted([...held, ...passed]));
        // A transaction that failed before it held its lock holds nothing the next page waits for.
        committed.catch((err: unknown) => failed.abort(err)).finally(() => markStarted());
        previous = committed;
        previousKeys = new Set(changes.map((c) => c.crmId));
        // At most two pages in flight: the next is read while this one's transaction runs.
        await before;
      }
      await previous;
    } catch (err) {
      // The listing stopped because a page failed: that failure is the run's.
      throw failed.signal.aborted ? failed.signal.reason : err;
    } finally {
      // A failed page fails the run; the one beside it is not left running unobserved.
      await previous?.catch(() => {});
    }
  };

  try {
    // A notified record the CRM cannot give now (a 500 on that one record, a timeout) fails the
    // run after the listing, not before it: the listing catches every other change meanwhile.
    let notificationsFailed: { error: unknown } | undefined;
    await fetchPendingNotifications(ctx, options.signal).catch((err: unknown) => {
      if (err instanceof NeedsReauthError || options.signal?.aborted) throw err;
      notificationsFailed = { error: err };
    });
    try {
      await listPages();
    } catch (err) {
      // A saved page link the CRM no longer takes (an expired page token): list from the start.
      if (!resume || report.pages > 0 || !refusesLink(err)) throw err;
      ctx.log.warn({ stream, error: errorSummary(err) }, `${stream.connectionId}/${stream.object}: the CRM refused the saved page link; listing from the start`);
      await saveListingResume(ctx.db, stream, null);
      resume = null;
      newest = undefined;
      resumeStartedAt = undefined;
      listsEverything = fromTheStart;
      await listPages();
    }

    if (newest) {
      // Pages in id order: a record edited during the listing, at an id already passed, carries
      // an updated_at no earlier than the CRM's clock when the listing began. The newest time
      // seen minus the listing's duration (measured here, and on the database's clock when it
      // spans runs, so skew cannot bend it) is never later than that, so the next run's window
      // still covers the edit.
      // A second more: a CRM that stamps whole seconds writes an edit made at X.9 s as X.000, up
      // to a second before the moment it was made.
      let elapsed = Math.ceil(performance.now() - started);
      if (resumeStartedAt) elapsed = Math.max(elapsed, (await databaseNow(ctx.db)).getTime() - resumeStartedAt.getTime());
      const back = elapsed + 1_000;
      const finalCursor = { ...newest, rank: newest.rank - back, updatedAt: new Date(newest.rank - back).toISOString() };
      await ctx.db.transaction(async (tx) => {
        if (!(await renewLease(tx, lease, ctx.owner, settings.lease))) throw new LeaseLostError(lease);
        await advanceStreamCursor(tx, stream, finalCursor);
      });
    }
    if (notificationsFailed) throw notificationsFailed.error;
    // A listing of everything counts as a sweep from when it began (in an earlier run, when it went on from there).
    const sweptAt = listsEverything ? (resumeStartedAt ?? startedAt) : undefined;
    await finishStreamRun(ctx.db, stream, { error: null, counts: report.counts, caught: report.caught, ...(sweptAt ? { sweptAt } : {}) });
    return report;
  } catch (err) {
    return failRun(ctx, stream, report, err, options.signal);
  }
}

/** The CRM answered a call about one record with a refusal of that record: a 4xx other than auth, timeouts and rate limits. */
function refusesRecord(err: unknown): boolean {
  return err instanceof CrmHttpError && err.code === 'CRM_HTTP_STATUS' && err.status >= 400 && err.status < 500 && ![401, 408, 429].includes(err.status);
}

/**
 * The saved page link cannot be used: the CRM turned it down itself (4xx other than auth and rate
 * limits: an expired page token), or it is on a host the connection no longer points to.
 */
function refusesLink(err: unknown): boolean {
  if (!(err instanceof CrmHttpError)) return false;
  if (err.code === 'CRM_OTHER_ORIGIN') return true;
  return err.code === 'CRM_HTTP_STATUS' && err.status >= 400 && err.status < 500 && err.status !== 401 && err.status !== 403 && err.status !== 429;
}

/**
 * The pages of a listing, each next one fetched while the caller works on the current one: one
 * page ahead, so at most two pages are held. When the caller stops (the loop ends, throws, or
 * the signal aborts) the fetch in flight is aborted and awaited, so nothing of the run is still
 * running once it has returned.
 */
async function* prefetched<T>(list: (signal: AbortSignal) => AsyncIterable<T>, signal?: AbortSignal): AsyncGenerator<T> {
  const done = new AbortController();
  const pages = list(signal ? AbortSignal.any([signal, done.signal]) : done.signal)[Symbol.asyncIterator]();
  const ahead = () => {
    const next = pages.next();
    // Handled here, rethrown where it is awaited: a fetch may fail while a page is committing.
    next.catch(() => {});
    return next;
  };
  let next = ahead();
  try {
    for (;;) {
      const result = await next;
      if (result.done) return;
      // A page fetched ahead is not handed out once the run was told to stop.
      signal?.throwIfAborted();
      next = ahead();
      yield result.value;
    }
  } finally {
    done.abort();
    await next.catch(() => {});
    await pages.return?.();
  }
}

interface SeenRecord {
  raw: unknown;
  identity: RecordIdentity;
}

/**
 * Rule 1 before the transaction: a record whose committed head already holds this version (or,
 * without a version, this content) is a duplicate however often it is listed, so it is answered
 * from one unlocked read of the page's heads, as the gate would answer it, and never mapped or
 * hashed. Everything else becomes a change for the gate, which decides it under its locks. A
 * record listed twice in one page is left to the gate, where the order of the two matters.
 */
async function setAsideHeld(ctx: StreamContext, seen: SeenRecord[], observedAt: Date): Promise<{ held: GateOutcome[]; changes: ObservedChange[] }> {
  const definition = ctx.connection.connector.objects[ctx.object]!;
  const listed = new Map<string, number>();
  for (const { identity } of seen) listed.set(identity.crmId, (listed.get(identity.crmId) ?? 0) + 1);
  const heads = new Map((await getStreamHeads(ctx.db, { connectionId: ctx.connection.id, object: ctx.object }, [...listed.keys()])).map((h) => [h.crmId, h]));
  const held: GateOutcome[] = [];
  const changes: ObservedChange[] = [];
  for (const { raw, identity } of seen) {
    const head = listed.get(identity.crmId) === 1 ? heads.get(identity.crmId) : undefined;
    const live = head !== undefined && !head.deleted;
    if (live && identity.version !== null && sameVersion(identity.version, head.version)) {
      held.push({ disposition: 'duplicate', eventId: head.lastEventId, delivered: false });
      continue;
    }
    const change = observeRecord({ connectionId: ctx.connection.id, object: ctx.object, definition, raw, identity, source: 'poll', observedAt, deliverUnchanged: ctx.connection.deliverUnchanged });
    if (change === undefined) continue;
    if (live && identity.version === null && change.contentHash === head.contentHash) {
      held.push({ disposition: 'duplicate', eventId: head.lastEventId, delivered: false });
      continue;
    }
    changes.push(change);
  }
  return { held, changes };
}

/**
 * The sweep: list every id (and version) of the stream and reconcile with the record heads.
 * Unseen or changed records are fetched and passed through the gate (source `sweep`); heads the
 * CRM no longer lists become deletes, but only after a listing that completed.
 */
export async function sweepStream(ctx: StreamContext, options: RunOptions = {}): Promise<RunReport> {
  const settings = pollSettings(ctx);
  const stream = { connectionId: ctx.connection.id, object: ctx.object };
  const lease = leaseName(stream.connectionId, stream.object);
  const report = emptyReport(ctx, 'sweep');
  if (!(await acquireLease(ctx.db, lease, ctx.owner, settings.lease))) return { ...report, status: 'busy' };
  // The sweep finds the deletes made before its listing began, not those made while it ran: that
  // is the time it vouches for (`lastSweepAt`), by the database's clock (`sweepDue`).
  const listingFrom = await markStreamAttempt(ctx.db, stream);

  try {
    // The heads as they were before the listing began: the listing vouches for those alone. A
    // record created while it ran (its hook came in after the listing had passed where the CRM
    // lists it) is not among them, so it cannot be taken for a delete.
    const heads = new Map((await listStreamHeads(ctx.db, stream)).map((h) => [h.crmId, h]));
    const listed = new Map<string, string | null>();
    for await (const page of ctx.connector.listAll({ object: ctx.object, ...(options.signal ? { signal: options.signal } : {}) })) {
      for (const { id, version } of page) listed.set(id, version);
      report.pages++;
      report.records += page.length;
      if (!(await renewLease(ctx.db, lease, ctx.owner, settings.lease))) throw new LeaseLostError(lease);
      await options.onPage?.(report);
    }

    const observedAt = new Date();
    const definition = ctx.connection.connector.objects[ctx.object]!;
    const toFetch = [...listed].filter(([id, version]) => version === null || !sameVersion(version, heads.get(id)?.version ?? null)).map(([id]) => id);
    // A head the listing missed that took a change while the listing ran was seen alive during
    // it (a hook, a poll): not a delete this time. The next sweep finds it if it is gone by then.
    const missing = [...heads.keys()].filter((id) => !listed.has(id));
    const vanished = (await getStreamHeads(ctx.db, stream, missing))
      .filter((now) => !now.deleted && now.lastEventId === heads.get(now.crmId)!.lastEventId)
      .map(({ crmId }) => crmId);

    for (let i = 0; i < toFetch.length; i += 50) {
      const changes: ObservedChange[] = [];
      for (const id of toFetch.slice(i, i + 50)) {
        const raw = await ctx.connector.getRecord(ctx.object, id, options.signal ? { signal: options.signal } : {});
        const change =
          raw === null
            ? deleteChange(stream, id, 'sweep', new Date())
            : observeRecord({ connectionId: stream.connectionId, object: ctx.object, definition, raw, source: 'sweep', observedAt, deliverUnchanged: ctx.connection.deliverUnchanged });
        if (change) changes.push(change);
      }
      await commitGuarded(ctx, lease, settings.lease, changes, report);
    }
    const { gone, found, held } = await vouchForDeletes(ctx, vanished, { records: heads.size, listingFrom, limit: settings.sweepDeleteLimit, allow: options.allowDeletes === true, signal: options.signal });
    await commitGuarded(ctx, lease, settings.lease, found, report);
    await commitGuarded(ctx, lease, settings.lease, gone.map((crmId) => deleteChange(stream, crmId, 'sweep', observedAt)), report);
    report.deleted = gone.length;
    if (held) report.held = held;
    await finishStreamRun(ctx.db, stream, { error: null, counts: report.counts, caught: 0, sweptAt: listingFrom, sweepHeld: held ?? null });
    return report;
  } catch (err) {
    return failRun(ctx, stream, report, err, options.signal);
  }
}

/** A sweep that found more vanished records than this confirms this many of them by fetching each by id, a sample. */
const SWEEP_CONFIRMATIONS = 10;
/** A sweep may make this many deletes whatever `poll.sweepDeleteLimit` says: a small stream loses a few records too. */
const SWEEP_DELETE_FLOOR = 10;

/**
 * Which of the records a complete listing no longer showed are deleted. A complete listing can
 * still be wrong: a re-authorisation by a user who sees fewer matters, a CRM that answers a
 * short page as the last. A delete delivered downstream may close a client's file, so the sweep
 * checks before it makes one:
 *
 * - Up to SWEEP_CONFIRMATIONS of them (a random sample when there are more) are fetched by id.
 *   A record the CRM answers, or refuses to show (it exists), is not deleted: it is passed
 *   through the gate like any swept record. If any was there, the listing left out records the
 *   CRM still has, so only the records confirmed gone are deleted and the rest are held.
 * - Otherwise, more than `limit` of the stream's records (never fewer than SWEEP_DELETE_FLOOR)
 *   vanishing at once is held whole unless an operator allowed it (`--allow-deletes`).
 *
 * Held deletes are not made: the stream says so on /health (503) until a sweep makes them, or
 * finds the records back. Errors other than a refusal (the CRM down, auth) fail the sweep.
 */
async function vouchForDeletes(
  ctx: StreamContext,
  vanished: string[],
  opts: { records: number; listingFrom: Date; limit: number; allow: boolean; signal?: AbortSignal | undefined },
): Promise<{ gone: string[]; found: ObservedChange[]; held?: SweepHold }> {
  if (vanished.length === 0) return { gone: [], found: [] };
  const definition = ctx.connection.connector.objects[ctx.object]!;
  const stream = { connectionId: ctx.connection.id, object: ctx.object };
  const sample = definition.get === undefined ? [] : randomSample(vanished, SWEEP_CONFIRMATIONS);
  const confirmed = new Set<string>();
  const found: ObservedChange[] = [];
  let there = 0;
  for (const id of sample) {
    let raw: unknown;
    try {
      raw = await ctx.connector.getRecord(ctx.object, id, opts.signal ? { signal: opts.signal } : {});
    } catch (err) {
      if (!refusesRecord(err)) throw err;
      there++;
      continue;
    }
    if (raw === null) {
      confirmed.add(id);
      continue;
    }
    there++;
    const change = observeRecord({ ...stream, definition, raw, source: 'sweep', observedAt: new Date(), deliverUnchanged: ctx.connection.deliverUnchanged });
    if (change) found.push(change);
  }
  const hold = (reason: SweepHold['reason'], deletes: number): SweepHold => ({ reason, deletes, records: opts.records, at: opts.listingFrom.toISOString() });
  const where = `${stream.connectionId}/${stream.object}`;
  if (there > 0) {
    const held = vanished.length - confirmed.size - there;
    ctx.log.warn(
      { stream, vanished: vanished.length, stillThere: there, confirmedGone: confirmed.size, held },
      `sweep of ${where}: the listing left out ${there} record(s) the CRM still has, so what else it left out is not taken for deleted: ${confirmed.size} confirmed gone, ${held} held`,
    );
    return { gone: [...confirmed], found, ...(held > 0 ? { held: hold('listing_incomplete', held) } : {}) };
  }
  const limit = Math.max(SWEEP_DELETE_FLOOR, Math.floor(opts.limit * opts.records));
  if (vanished.length > limit && !opts.allow) {
    ctx.log.warn(
      { stream, vanished: vanished.length, records: opts.records, limit },
      `sweep of ${where}: ${vanished.length} of ${opts.records} records vanished from the listing at once, more than poll.sweepDeleteLimit lets a sweep delete by itself; held, not deleted (crm-bridge sweep ${stream.connectionId} --object ${stream.object} --allow-deletes makes them)`,
    );
    return { gone: [], found: [], held: hold('over_limit', vanished.length) };
  }
  return { gone: vanished, found: [] };
}

/** What a sweep held and why, with what to do about it: for the CLI, `crm-bridge status` and the status page. */
export function heldText(held: SweepHold, connectionId: string, object: string): string {
  if (held.reason === 'listing_incomplete') {
    return `${held.deletes} vanished record(s) held, not deleted: the CRM's listing left out records it still has, so it is not trusted with deletes; the next sweep tries again (compare the listing with the CRM, for instance a token that sees fewer records)`;
  }
  return `${held.deletes} of ${held.records} records vanished at once, more than poll.sweepDeleteLimit lets a sweep delete by itself: held, not deleted; if the CRM really lost them, crm-bridge sweep ${connectionId} --object ${object} --allow-deletes`;
}

function randomSample<T>(items: readonly T[], n: number): T[] {
  const copy = [...items];
  for (let i = 0; i < Math.min(n, copy.length); i++) {
    const j = i + Math.floor(Math.random() * (copy.length - i));
    [copy[i], copy[j]] = [copy[j]!, copy[i]!];
  }
  return copy.slice(0, n);
}

/**
 * A run from the CLI (`poll --once`, `sweep`, `backfill`): gives the stream's lease back when it
 * ends, done or failed, as the daemon does when it stops. Kept, the lease would turn the next run
 * away as busy, from another CLI process or the server started after, for max(2 × interval, 60 s)
 * (10 minutes by default) on an install with no other replica. A busy run holds nothing to give
 * back: the release only deletes a row this owner holds.
 */
export async function runOnce(kind: RunReport['kind'], ctx: StreamContext, options: RunOptions = {}): Promise<RunReport> {
  const lease = leaseName(ctx.connection.id, kind === 'poll' ? (options.cursorKey ?? ctx.object) : ctx.object);
  try {
    return kind === 'poll' ? await pollStream(ctx, options) : await sweepStream(ctx, options);
  } finally {
    await releaseLease(ctx.db, lease, ctx.owner).catch((err: unknown) => {
      ctx.log.warn({ lease, error: errorSummary(err) }, `could not give the lease ${lease} back; it lapses at its expiry`);
    });
  }
}

/**
 * Notification-mode hooks stored an id; the record is fetched here and passed through the gate
 * (source `notification`). While the connection needs re-authorisation they stay pending. A
 * record the CRM refuses to give (a 403 on one matter, a 400 on a malformed id) keeps its error
 * and is tried again next run, without holding up the others or the listing after them: one bad
 * notification must not stop a stream's polling. Anything else (the CRM down, rate limits, the
 * network) fails the run, as it would fail the listing.
 */
export async function fetchPendingNotifications(ctx: StreamContext, signal?: AbortSignal): Promise<number> {
  const stream = { connectionId: ctx.connection.id, object: ctx.object };
  const definition = ctx.connection.connector.objects[ctx.object]!;
  if (definition.get === undefined) return 0;
  let done = 0;
  let after: string | undefined;
  for (;;) {
    const pending = await listPendingFetches(ctx.db, stream, 50, after);
    if (pending.length === 0) return done;
    after = pending.at(-1)!.crmId;
    for (const note of pending) {
      let raw: unknown;
      try {
        raw = await ctx.connector.getRecord(ctx.object, note.crmId, signal ? { signal } : {});
      } catch (err) {
        if (err instanceof NeedsReauthError || signal?.aborted) throw err;
        await notePendingFetchError(ctx.db, stream, note.crmId, errorSummary(err));
        if (!refusesRecord(err)) throw err;
        ctx.log.warn({ stream, crmId: note.crmId, error: errorSummary(err) }, `${stream.connectionId}/${stream.object}: the CRM refused the notified record ${note.crmId}; its fetch is tried again next run`);
        continue;
      }
      const observedAt = new Date();
      const change =
        raw === null
          ? deleteChange(stream, note.crmId, 'notification', observedAt)
          : observeRecord({ connectionId: stream.connectionId, object: ctx.object, definition, raw, source: 'notification', observedAt, deliverUnchanged: ctx.connection.deliverUnchanged });
      await ctx.db.transaction(async (tx) => {
        if (change) await passChanges(tx, [change]);
        await deletePendingFetch(tx, stream, note.crmId, note.eventId, note.receivedAt);
      });
      done++;
    }
  }
}

/**
 * Fetches the records of a stream's pending notifications now, without a listing, under the
 * stream's lease (busy: the replica holding it fetches them in its next run). What a
 * notification hook wakes; a poll run fetches them too.
 */
export async function fetchNotified(ctx: StreamContext, signal?: AbortSignal): Promise<void> {
  const settings = pollSettings(ctx);
  if (!(await acquireLease(ctx.db, leaseName(ctx.connection.id, ctx.object), ctx.owner, settings.lease))) return;
  try {
    if ((await fetchPendingNotifications(ctx, signal)) > 0) ctx.onFetched?.();
  } catch (err) {
    // Left waiting for the next run, which tries again (and reports a failure as the run's).
    if (!signal?.aborted) ctx.log.debug({ stream: { connectionId: ctx.connection.id, object: ctx.object }, error: errorSummary(err) }, 'notified records not fetched yet');
  }
}

async function commitGuarded(ctx: StreamContext, lease: string, ttl: number, changes: ObservedChange[], report: RunReport) {
  if (changes.length === 0) return;
  const outcomes = await ctx.db.transaction(async (tx) => {
    if (!(await renewLease(tx, lease, ctx.owner, ttl))) throw new LeaseLostError(lease);
    return passChanges(tx, changes);
  });
  tally(report, outcomes, false);
}

function tally(report: RunReport, outcomes: GateOutcome[], countCaught: boolean) {
  for (const o of outcomes) {
    report.counts[o.disposition] = (report.counts[o.disposition] ?? 0) + 1;
    if (o.delivered && countCaught) report.caught++;
  }
}

function emptyReport(ctx: StreamContext, kind: RunReport['kind']): RunReport {
  return { connectionId: ctx.connection.id, object: ctx.object, kind, status: 'ok', pages: 0, records: 0, counts: {}, caught: 0, deleted: 0 };
}

async function failRun(ctx: StreamContext, stream: { connectionId: string; object: string }, report: RunReport, err: unknown, signal?: AbortSignal): Promise<RunReport> {
  const error = signal?.aborted ? 'ABORTED' : errorSummary(err);
  // Changes of committed pages count, even though the run did not finish.
  await finishStreamRun(ctx.db, stream, { error, counts: report.counts, caught: report.caught }).catch(() => {});
  if (err instanceof LeaseLostError) ctx.log.warn({ stream }, `${report.kind} of ${stream.connectionId}/${stream.object} stopped: another replica took the stream over`);
  return { ...report, status: 'failed', error, ...(err instanceof NeedsReauthError ? { needsReauth: true } : {}) };
}

/**
 * A class and status for /health and logs (`CRM_HTTP_STATUS (HTTP 422)`), never a message: a
 * CRM's error body or a failed insert's parameters would quote the record (src/privacy.ts).
 */
export const errorSummary = errorClass;

/**
 * Polls one stream on its interval (with jitter), fetches pending notifications, and sweeps
 * when the sweep is due. Many replicas may run it: the lease decides who works.
 */
export class PollDaemon extends Daemon {
  /** When the next poll run is due (performance.now()); the first is due at start. */
  private nextPollAt = 0;
  /** Woken for a run now (`wake`): the connection was authorised, say. */
  private runWanted = false;
  /** Woken by notification hooks on this replica: their records are fetched without waiting for the next run. */
  private notesWaiting = false;

  constructor(private readonly ctx: StreamContext) {
    const settings = pollSettings(ctx);
    super({ name: `poll:${ctx.connection.id}:${ctx.object}`, intervalMs: settings.interval, jitter: ctx.connection.poll?.jitter ?? DEFAULT_POLL.jitter, log: ctx.log });
  }

  override wake(): void {
    this.runWanted = true;
    super.wake();
  }

  /**
   * A notification hook stored a record to fetch: fetch it now (under the stream's lease, no
   * listing), not in the next poll run minutes away. The poll runs keep their schedule.
   */
  notified(): void {
    this.notesWaiting = true;
    super.wake();
  }

  /** Until the next poll run is due: a fetch of notified records in between does not push it back. */
  protected override nextPause(): number {
    return Math.max(0, this.nextPollAt - performance.now());
  }

  async tick(signal: AbortSignal): Promise<void> {
    const due = this.runWanted || performance.now() >= this.nextPollAt;
    this.runWanted = false;
    const notes = this.notesWaiting;
    this.notesWaiting = false;
    if (!due) {
      if (notes) await fetchNotified(this.ctx, signal);
      return;
    }
    // Not due again while it runs: a notification meanwhile is fetched after it, not by another run.
    this.nextPollAt = Infinity;
    try {
      await this.pollAndSweep(signal);
    } finally {
      this.nextPollAt = performance.now() + super.nextPause();
    }
  }

  private async pollAndSweep(signal: AbortSignal): Promise<void> {
    const report = await this.timed(() => pollStream(this.ctx, { signal }));
    if (report.status === 'busy' || signal.aborted) return;
    this.logRun(report);
    const settings = pollSettings(this.ctx);
    if (report.status === 'ok' && settings.sweepInterval > 0) {
      const stream = { connectionId: this.ctx.connection.id, object: this.ctx.object };
      if (await sweepDue(this.ctx.db, stream, settings.sweepInterval)) this.logRun(await this.timed(() => sweepStream(this.ctx, { signal })));
    }
  }

  private async timed(run: () => Promise<RunReport>): Promise<RunReport> {
    const started = performance.now();
    const report = await run();
    this.ctx.onRun?.(report, (performance.now() - started) / 1000);
    return report;
  }

  override async stop(): Promise<void> {
    await super.stop();
    // Hand the stream over now rather than after the lease expires.
    await releaseLease(this.ctx.db, leaseName(this.ctx.connection.id, this.ctx.object), this.ctx.owner).catch(() => {});
  }

  private logRun(report: RunReport) {
    const where = `${report.connectionId}/${report.object}`;
    if (report.status === 'failed') {
      if (report.needsReauth) this.ctx.log.debug({ report }, `${report.kind} of ${where} waits for re-authorisation`);
      else this.ctx.log.warn({ report }, `${report.kind} of ${where} failed: ${report.error}`);
      return;
    }
    if (report.caught > 0) this.ctx.log.info({ report }, `poll caught ${report.caught} change(s) on ${where} that the automation missed`);
    else if (report.kind === 'sweep' && report.deleted > 0) this.ctx.log.info({ report }, `sweep found ${report.deleted} deleted record(s) on ${where}`);
    else this.ctx.log.debug({ report }, `${report.kind} of ${where}: ${report.records} record(s), nothing new`);
  }
}

