import type { FastifyBaseLogger } from 'fastify';
import type { DownstreamConfig } from '../config/schema.js';
import type { Db } from '../db/client.js';
import {
  claimDeliveries,
  loadDeliveryContent,
  markDead,
  markDeliveredMany,
  releaseClaim,
  scheduleRetry,
  type ClaimedDelivery,
  type DeliveryContent,
} from '../db/queries/outbox.js';
import { Daemon } from './daemon.js';

/** A claimed row must outlive its request by this much, or a slow answer could be claimed twice. */
const LEASE_MARGIN_MS = 10_000;
/** Rows claimed per delivery slot per tick: fewer claims and commits than one row at a time. */
const CLAIMS_PER_SLOT = 8;
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

/** What one POST came to. `retry` covers 5xx, 408, 429, timeouts and network errors. */
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
    this.secrets = Object.values(deps.downstream.headers).filter((v) => v.length >= 4);
  }

  get owner(): string {
    return this.deps.owner;
  }

  /**
   * Claims a batch (several rows per slot), delivers it through `concurrency` slots, and asks for
   * another tick right away when it was full. Deliveries are marked together in one statement at
   * the end of the batch: a crash before that re-sends them with the same key, which the
   * pipeline dedups (at least once, never lost). A row whose lease could run out before its
   * request would end is handed back untried instead of being sent late.
   */
  async tick(signal: AbortSignal): Promise<boolean> {
    const { db, connectionId, downstream, owner } = this.deps;
    const batch = downstream.concurrency * CLAIMS_PER_SLOT;
    const claimedAt = Date.now();
    const claimed = await claimDeliveries(db, { connectionId, owner, limit: batch, leaseMs: this.leaseMs });
    if (claimed.length === 0) return false;
    const contents = await loadDeliveryContent(db, claimed.map((c) => c.eventId));
    const delivered: Array<{ id: number; status: number }> = [];
    let next = 0;
    const slot = async () => {
      while (next < claimed.length) {
        const row = claimed[next++]!;
        if (signal.aborted || Date.now() > claimedAt + this.leaseMs - downstream.timeout) {
          await releaseClaim(db, { id: row.id, owner });
          continue;
        }
        await this.deliver(row, contents.get(row.eventId), signal, delivered);
      }
    };
    const results = await Promise.allSettled(Array.from({ length: Math.min(downstream.concurrency, claimed.length) }, slot));
    if (delivered.length > 0) await markDeliveredMany(db, delivered);
    // A row whose outcome could not be recorded keeps its lease and is retried when it expires.
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    return claimed.length === batch && !signal.aborted;
  }

  private async deliver(row: ClaimedDelivery, content: DeliveryContent | undefined, signal: AbortSignal, delivered: Array<{ id: number; status: number }>): Promise<void> {
    const { db, owner, connectionId, downstream, log } = this.deps;
    const context = { connection: connectionId, object: row.object, crmId: row.crmId, eventId: row.eventId, attempt: row.attempts };
    if (content === undefined) {
      // The outbox references the ledger, so this means a broken database, not a bad answer.
      await markDead(db, { id: row.id, owner, status: null, error: 'ledger row missing' });
      this.deps.onOutcome?.('dead');
      log.warn(context, `dead letter ${row.object}/${row.crmId} for ${connectionId}: ledger row missing`);
      return;
    }

    const attempt = await this.post(row, content, signal);
    switch (attempt.kind) {
      case 'stopped':
        await releaseClaim(db, { id: row.id, owner });
        return;
      case 'delivered':
        delivered.push({ id: row.id, status: attempt.status });
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
    const body = JSON.stringify({
      id: row.eventId,
      connection: connectionId,
      object: row.object,
      crmId: row.crmId,
      change: content.change,
      version: content.version,
      origin: content.origin,
      source: content.source,
      observedAt: content.observedAt.toISOString(),
      record: content.raw,
      fields: content.fields,
    });
    const timeout = AbortSignal.timeout(downstream.timeout);
    let response: Response;
    try {
      response = await fetch(downstream.url, {
        method: 'POST',
        headers: { ...downstream.headers, 'content-type': 'application/json', 'idempotency-key': row.eventId },
        body,
        signal: AbortSignal.any([stop, timeout]),
        // Following a redirect would resend the configured headers (the pipeline's API key) to
        // wherever it points; a moved endpoint is a configuration problem, so it dead-letters.
        redirect: 'manual',
      });
    } catch (err) {
      if (stop.aborted) return { kind: 'stopped' };
      if (timeout.aborted) return { kind: 'retry', status: null, error: `no answer within ${downstream.timeout}ms`, retryAfterMs: null };
      return { kind: 'retry', status: null, error: `network error: ${networkReason(err)}`, retryAfterMs: null };
    }

    const { status } = response;
    if (status >= 200 && status < 300) {
      await response.body?.cancel().catch(() => {});
      return { kind: 'delivered', status };
    }
    const excerpt = await this.readExcerpt(response);
    const error = `HTTP ${status}${excerpt ? `: ${excerpt}` : ''}`;
    if (status === 408 || status === 429 || status >= 500) {
      return { kind: 'retry', status, error, retryAfterMs: parseRetryAfter(response.headers.get('retry-after')) };
    }
    return { kind: 'rejected', status, error };
  }

  /** The start of an error body, one line, with any configured header value (an API key the pipeline echoed back) blanked. */
  private async readExcerpt(response: Response): Promise<string> {
    let text = '';
    try {
      const reader = response.body?.getReader();
      if (reader) {
        const decoder = new TextDecoder();
        while (text.length < EXCERPT_CHARS) {
          const { done, value } = await reader.read();
          if (done) break;
          text += decoder.decode(value, { stream: true });
        }
        await reader.cancel().catch(() => {});
      }
    } catch {
      // A body cut off mid-read still leaves the status, which is what decides the outcome.
    }
    for (const secret of this.secrets) text = text.split(secret).join('[Redacted]');
    return text.replace(/\s+/g, ' ').trim().slice(0, EXCERPT_CHARS);
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
export function parseRetryAfter(value: string | null, now = Date.now()): number | null {
  if (value === null) return null;
  const trimmed = value.trim();
  if (/^\d+$/.test(trimmed)) return Number(trimmed) * 1000;
  const at = Date.parse(trimmed);
  return Number.isNaN(at) ? null : Math.max(0, at - now);
}

function networkReason(err: unknown): string {
  const cause = (err as { cause?: { code?: unknown; message?: unknown } }).cause;
  if (typeof cause?.code === 'string') return cause.code;
  if (typeof cause?.message === 'string') return cause.message;
  return (err as Error).message;
}
