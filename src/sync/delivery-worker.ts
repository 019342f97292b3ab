import type { FastifyBaseLogger } from 'fastify';
import { request, type Dispatcher } from 'undici';
import type { DownstreamConfig } from '../config/schema.js';
import type { Db } from '../db/client.js';
import {
  claimDeliveries,
  markDead,
  markDeliveredMany,
  releaseClaims,
  scheduleRetry,
  type ClaimedDelivery,
  type DeliveryContent,
} from '../db/queries/outbox.js';
import type { LeaseOffer } from './change-gate.js';
import { Daemon } from './daemon.js';

/** A claimed row must outlive its request by this much, or a slow answer could be claimed twice. */
const LEASE_MARGIN_MS = 10_000;
/**
 * Rows claimed per delivery slot at a time. The next batch is claimed while the last one is
 * still queued, so a claim (a commit) is hidden behind a batch's worth of requests; and each
 * claim and mark is database work on the cores the sending needs, so fewer, larger ones deliver
 * faster (32 per slot and marks every 100 ms: about 6% more deliveries per second than 16 per
 * slot and a mark per 64 rows, BENCHMARKS.md).
 */
const CLAIMS_PER_SLOT = 32;
/** Longest a delivered row waits to be marked while sending goes on (the end of a tick marks at once). */
const MARK_DELAY_MS = 100;
/** Most delivered rows marked in one statement; below it, rows are marked every MARK_DELAY_MS. */
const MARKS_PER_STATEMENT = 500;
/** How much of a failed answer's body is kept with the row (enough to read the pipeline's reason). */
const EXCERPT_CHARS = 300;

export interface DeliveryWorkerOptions {
  db: Db;
  connectionId: string;
  downstream: DownstreamConfig;
  /** Unique per worker across replicas (host, pid, random): the lease names it. */
  owner: string;
  log: FastifyBaseLogger;
  /** Told about every attempt's outcome (metrics). */
  onOutcome?: ((outcome: 'delivered' | 'retry' | 'dead') => void) | undefined;
}

/** A lease offered to a hook transaction (see `offerLeases`). */
export interface WorkerLeaseOffer extends LeaseOffer {
  /** When a row leased under this offer is too late to send (its lease could end mid-request). */
  sendBy: number;
}

type Queued = ClaimedDelivery & { sendBy: number };

/** What one POST came to. `retry` covers 5xx, 408, 429, a 409 to a later attempt, timeouts and network errors. */
type Attempt =
  | { kind: 'delivered'; status: number }
  | { kind: 'retry'; status: number | null; error: string; retryAfterMs: number | null }
  | { kind: 'rejected'; status: number; error: string }
  | { kind: 'stopped' };

/**
 * Delivers one connection's outbox to the intake pipeline, at least once with a stable
 * Idempotency-Key (the event id), so the pipeline applies each change once in effect. Every
 * replica runs one per connection; they share the work through claims with leases, never a lock
 * held across an HTTP call.
 */
export class DeliveryWorker extends Daemon {
  private readonly leaseMs: number;
  private readonly secrets: string[];

  constructor(private readonly deps: DeliveryWorkerOptions) {
    super({ name: `delivery:${deps.connectionId}`, intervalMs: deps.downstream.pollInterval, jitter: 0.2, log: deps.log });
    this.leaseMs = deps.downstream.lease ?? deps.downstream.timeout + LEASE_MARGIN_MS;
    // The whole value and its credential without a scheme ("Bearer <key>" → "<key>"), longest first.
    const values = Object.values(deps.downstream.headers);
    this.secrets = [...new Set([...values, ...values.map((v) => v.replace(/^[A-Za-z][\w-]*\s+/, ''))])].filter((v) => v.length >= 4).sort((a, b) => b.length - a.length);
  }

  get owner(): string {
    return this.deps.owner;
  }

  /** Rows waiting for a slot: claimed, or leased to this worker by a hook transaction. */
  private readonly queue: Queued[] = [];
  /** Rows promised to hook transactions in flight (`offerLeases`), not yet handed over. */
  private promised = 0;
  /** A wake-up or the schedule asked for a claim: rows may be due that nobody handed over. */
  private claimWanted = true;
  private lastClaimedAll = 0;
  /** Set while a tick runs: a wake-up claims at once instead of after the tick. */
  private onWake: (() => void) | undefined;
  /** Set while a tick runs and takes more rows: sends rows handed over without a claim. */
  private onHanded: (() => boolean) | undefined;

  override wake(): void {
    this.claimWanted = true;
    super.wake();
    this.onWake?.();
  }

  /**
   * How many outbox rows a hook transaction may write already leased to this worker (up to
   * `want`), so that they are sent the moment it commits, without a claim: a statement and a
   * commit of its own between every hook and its delivery. None while the worker is not running,
   * and none beyond one claim's worth of rows waiting here. Every offer is settled by
   * `takeLeased`, with the rows leased under it (none if the transaction failed).
   */
  offerLeases(want: number): WorkerLeaseOffer | undefined {
    if (!this.running) return undefined;
    const max = Math.min(want, this.batchSize - this.queue.length - this.promised);
    if (max <= 0) return undefined;
    this.promised += max;
    return { owner: this.deps.owner, ms: this.leaseMs, max, sendBy: Date.now() + this.leaseMs - this.deps.downstream.timeout };
  }

  /** The rows a committed transaction leased under `offer`: sent now, or given back if the worker has stopped. */
  takeLeased(offer: WorkerLeaseOffer, rows: readonly ClaimedDelivery[]): void {
    this.promised -= offer.max;
    if (rows.length === 0) return;
    if (!this.running) {
      this.release(rows);
      return;
    }
    for (const row of rows) this.queue.push({ ...row, sendBy: offer.sendBy });
    // A tick that is still taking rows sends them; otherwise the next one, started now, does.
    if (!this.onHanded?.()) super.wake();
  }

  override async stop(): Promise<void> {
    await super.stop();
    // Rows handed over as the worker stopped: another replica may take them at once.
    this.release(this.queue.splice(0));
  }

  private release(rows: readonly ClaimedDelivery[]): void {
    if (rows.length === 0) return;
    releaseClaims(this.deps.db, { ids: rows.map((r) => r.id), owner: this.deps.owner }).catch((err: unknown) =>
      this.deps.log.warn({ err, connection: this.deps.connectionId }, `delivery:${this.deps.connectionId}: leased rows not given back; they are claimed again when their lease runs out`),
    );
  }

  private get batchSize(): number {
    return this.deps.downstream.concurrency * CLAIMS_PER_SLOT;
  }

  /**
   * Delivers through up to `concurrency` slots until nothing more is due. Rows are claimed in
   * batches, the next while the last is still queued, so slots do not wait for claims, and a
   * wake-up claims again at once. Rows a hook's transaction leased to this worker (`takeLeased`)
   * join the queue without a claim; a tick started only for them claims nothing until the
   * schedule's interval has passed since the last claim that found everything due. Delivered rows
   * are marked in the background, many per statement, while sending goes on: a crash before a row
   * is marked re-sends it with the same key once its lease runs out, which the pipeline dedups
   * (at least once, never lost), and until then the row, still pending, holds back newer versions
   * of its record. A row whose lease could run out before its request would end is handed back
   * untried instead of being sent late, as is every row not yet sent after a stop or a failure.
   */
  async tick(signal: AbortSignal): Promise<boolean> {
    const { db, connectionId, downstream, owner } = this.deps;
    const batch = this.batchSize;
    const queue = this.queue;
    let failure: { error: unknown } | undefined;
    const fail = (error: unknown) => void (failure ??= { error });
    // A failed mark leaves its rows leased: they are sent again when the lease expires.
    const marks = new DeliveredMarks(db, MARKS_PER_STATEMENT, fail);

    let slots = 0;
    let claiming = false;
    let done = false;
    let finish!: () => void;
    const finished = new Promise<void>((resolve) => (finish = resolve));
    const finishIfIdle = () => {
      if (slots > 0 || claiming) return;
      done = true;
      finish();
    };

    const slot = async () => {
      slots++;
      for (let row = queue.shift(); row !== undefined; row = queue.shift()) {
        claim();
        try {
          if (failure || signal.aborted) await releaseClaims(db, { ids: [row, ...queue.splice(0)].map((r) => r.id), owner });
          else if (Date.now() > row.sendBy) await releaseClaims(db, { ids: [row.id], owner });
          else await this.deliver(row, signal, marks);
        } catch (err) {
          // A row whose outcome could not be recorded keeps its lease and is retried when it expires.
          fail(err);
        }
      }
      slots--;
      finishIfIdle();
    };

    // A short claim means nothing more is due, unless a wake-up came after the claim began. A
    // tick started only to send rows handed over by hooks claims nothing until the schedule's
    // interval has passed since the last claim that found everything due.
    let drained = !this.claimWanted && queue.length > 0;
    let woken = false;
    this.claimWanted = false;
    const startSlots = () => {
      while (slots < downstream.concurrency && queue.length > 0) void slot();
    };
    const claim = () => {
      if (done || claiming || failure || signal.aborted || queue.length >= batch) return;
      if (drained && !woken && Date.now() - this.lastClaimedAll < downstream.pollInterval) return;
      claiming = true;
      woken = false;
      const sendBy = Date.now() + this.leaseMs - downstream.timeout;
      claimDeliveries(db, { connectionId, owner, limit: batch, leaseMs: this.leaseMs })
        .then((claimed) => {
          drained = claimed.length < batch;
          if (drained) this.lastClaimedAll = Date.now();
          for (const row of claimed) queue.push({ ...row, sendBy });
        }, fail)
        .finally(() => {
          claiming = false;
          startSlots();
          claim();
          finishIfIdle();
        });
    };

    this.onWake = () => {
      woken = true;
      claim();
    };
    this.onHanded = () => {
      if (done) return false;
      startSlots();
      return true;
    };
    startSlots();
    claim();
    finishIfIdle();
    await finished;
    this.onWake = undefined;
    this.onHanded = undefined;
    await marks.flush();
    if (failure) throw failure.error;
    return false;
  }

  private async deliver(row: ClaimedDelivery, signal: AbortSignal, marks: DeliveredMarks): Promise<void> {
    const { db, owner, connectionId, downstream, log } = this.deps;
    const { content } = row;
    const context = { connection: connectionId, object: row.object, crmId: row.crmId, eventId: row.eventId, attempt: row.attempts };
    if (content === null) {
      // The outbox references the ledger, so this means a broken database, not a bad answer.
      await markDead(db, { id: row.id, owner, status: null, error: 'ledger row missing' });
      this.deps.onOutcome?.('dead');
      log.warn(context, `dead letter ${row.object}/${row.crmId} for ${connectionId}: ledger row missing`);
      return;
    }

    const attempt = await this.post(row, content, signal);
    switch (attempt.kind) {
      case 'stopped':
        await releaseClaims(db, { ids: [row.id], owner });
        return;
      case 'delivered':
        marks.add(row.id, attempt.status);
        this.deps.onOutcome?.('delivered');
        // One line per delivery is an access log: debug. Retries and dead letters stay loud.
        log.debug({ ...context, status: attempt.status }, `delivered ${row.object}/${row.crmId} to ${connectionId} (attempt ${row.attempts})`);
        return;
      case 'rejected':
        if (await markDead(db, { id: row.id, owner, status: attempt.status, error: attempt.error })) {
          this.deps.onOutcome?.('dead');
          log.warn({ ...context, status: attempt.status }, `dead letter ${row.object}/${row.crmId} for ${connectionId}: ${attempt.error}`);
        }
        return;
      case 'retry': {
        const delayMs = Math.max(backoffDelay(row.attempts, downstream.backoff), attempt.retryAfterMs ?? 0);
        const ageAtNextTry = Date.now() - row.queuedAt.getTime() + delayMs;
        if (row.attempts >= downstream.maxAttempts || ageAtNextTry > downstream.maxAge) {
          const error = `gave up after ${row.attempts} attempts: ${attempt.error}`;
          if (await markDead(db, { id: row.id, owner, status: attempt.status, error })) {
            this.deps.onOutcome?.('dead');
            log.warn({ ...context, status: attempt.status }, `dead letter ${row.object}/${row.crmId} for ${connectionId}: ${error}`);
          }
          return;
        }
        await scheduleRetry(db, { id: row.id, owner, delayMs, status: attempt.status, error: attempt.error });
        this.deps.onOutcome?.('retry');
        log.debug({ ...context, status: attempt.status, delayMs }, `delivery of ${row.object}/${row.crmId} to ${connectionId} will be retried: ${attempt.error}`);
        return;
      }
    }
  }

  private async post(row: ClaimedDelivery, content: DeliveryContent, stop: AbortSignal): Promise<Attempt> {
    const { connectionId, downstream } = this.deps;
    // The envelope is serialised here; the record and fields are spliced in as the database's JSON
    // text, not parsed and serialised again (a kilobyte of each per delivery).
    const envelope = JSON.stringify({
      id: row.eventId,
      connection: connectionId,
      object: row.object,
      crmId: row.crmId,
      change: content.change,
      version: content.version,
      origin: content.origin,
      source: content.source,
      observedAt: content.observedAt.toISOString(),
    });
    const body = `${envelope.slice(0, -1)},"record":${content.rawJson ?? 'null'},"fields":${content.fieldsJson ?? 'null'}}`;
    // One controller per request, aborted by a stop or the timeout: several times cheaper than
    // AbortSignal.any() over AbortSignal.timeout(), which showed in every delivery's profile.
    const controller = new AbortController();
    const abort = () => controller.abort();
    const timer = setTimeout(abort, downstream.timeout);
    stop.addEventListener('abort', abort);
    try {
      let response: Dispatcher.ResponseData;
      try {
        // undici's request, not fetch: a quarter of fetch's CPU per POST (BENCHMARKS.md), and on
        // the delivery path that is the bridge's largest cost. It follows no redirect: following
        // one would resend the configured headers (the pipeline's API key) to wherever it points,
        // and a moved endpoint is a configuration problem, so it dead-letters.
        response = await request(downstream.url, {
          method: 'POST',
          headers: { ...downstream.headers, 'content-type': 'application/json', 'idempotency-key': row.eventId },
          body,
          signal: controller.signal,
        });
      } catch (err) {
        if (stop.aborted) return { kind: 'stopped' };
        if (controller.signal.aborted) return { kind: 'retry', status: null, error: `no answer within ${downstream.timeout}ms`, retryAfterMs: null };
        return { kind: 'retry', status: null, error: `network error: ${networkReason(err)}`, retryAfterMs: null };
      }

      const status = response.statusCode;
      if (status >= 200 && status < 300) {
        // Not awaited: the answer is in, and a body cut off while discarded changes nothing.
        response.body.dump().catch(() => {});
        return { kind: 'delivered', status };
      }
      const excerpt = await this.readExcerpt(response.body);
      const error = `HTTP ${status}${excerpt ? `: ${excerpt}` : ''}`;
      // A 409 to a later attempt is retried: the Idempotency-Key convention (the bridge's own write
      // API answers so) is 409 while a request with the key is still in process, and after a
      // timeout that is this change's earlier attempt, still running in the pipeline. Dead-lettered,
      // a change the pipeline took would wait for a replay. To a first attempt it is a refusal.
      if (status === 408 || status === 429 || status >= 500 || (status === 409 && row.attempts > 1)) {
        return { kind: 'retry', status, error, retryAfterMs: parseRetryAfter(response.headers['retry-after']) };
      }
      return { kind: 'rejected', status, error };
    } finally {
      clearTimeout(timer);
      stop.removeEventListener('abort', abort);
    }
  }

  /** The start of an error body, one line, with any configured header value (an API key the pipeline echoed back) blanked. */
  private async readExcerpt(body: Dispatcher.ResponseData['body']): Promise<string> {
    let text = '';
    try {
      const decoder = new TextDecoder();
      for await (const chunk of body) {
        text += decoder.decode(chunk as Buffer, { stream: true });
        // Past the limit by the longest secret, so one cut at the limit is still redacted whole.
        if (text.length >= EXCERPT_CHARS + (this.secrets[0]?.length ?? 0)) break;
      }
    } catch {
      // A body cut off mid-read still leaves the status, which is what decides the outcome.
    } finally {
      // Leaving the loop early destroys the body; the rest of a long answer is never read.
      body.destroy();
    }
    for (const secret of this.secrets) text = text.split(secret).join('[Redacted]');
    return text.replace(/\s+/g, ' ').trim().slice(0, EXCERPT_CHARS);
  }
}

/**
 * Gathers delivered rows and marks them in the background, a batch per statement, at most
 * MARK_DELAY_MS after the first was gathered (well inside the lease, so nobody re-claims them).
 */
class DeliveredMarks {
  private rows: Array<{ id: number; status: number }> = [];
  private timer: NodeJS.Timeout | undefined;
  private chain = Promise.resolve();

  constructor(
    private readonly db: Db,
    private readonly batch: number,
    private readonly onError: (error: unknown) => void,
  ) {}

  add(id: number, status: number): void {
    this.rows.push({ id, status });
    if (this.rows.length >= this.batch) void this.flush();
    else this.timer ??= setTimeout(() => void this.flush(), MARK_DELAY_MS);
  }

  /** Marks every row gathered so far; resolves once all marks are done or have failed. */
  flush(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.rows.length > 0) {
      const rows = this.rows;
      this.rows = [];
      this.chain = this.chain.then(() => markDeliveredMany(this.db, rows)).catch(this.onError);
    }
    return this.chain;
  }
}

/**
 * base × 2^(attempt-1), capped, then "equal jitter" (half fixed, half random): replicas that
 * failed together spread out, and no retry comes sooner than half the schedule.
 */
export function backoffDelay(attempt: number, backoff: { base: number; max: number }): number {
  const exponential = Math.min(backoff.max, backoff.base * 2 ** Math.min(Math.max(attempt - 1, 0), 30));
  return exponential / 2 + Math.random() * (exponential / 2);
}

/** `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3); null when absent or unreadable. */
export function parseRetryAfter(header: string | string[] | undefined, now = Date.now()): number | null {
  const value = Array.isArray(header) ? header[0] : header;
  if (value === undefined) return null;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
  // An HTTP date names a weekday and month; Date.parse reads bare numbers such as "-3600" as years.
  if (!/^[A-Za-z]{3}/.test(trimmed)) return null;
  const at = Date.parse(trimmed);
  return Number.isNaN(at) ? null : Math.max(0, at - now);
}

function networkReason(err: unknown): string {
  // undici's errors carry the code themselves (ECONNREFUSED, UND_ERR_SOCKET); fetch's wrapped it.
  const { code, cause, message } = err as { code?: unknown; cause?: { code?: unknown }; message?: unknown };
  if (typeof code === 'string') return code;
  if (typeof cause?.code === 'string') return cause.code;
  return typeof message === 'string' ? message : String(err);
}
