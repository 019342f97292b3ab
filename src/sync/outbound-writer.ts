import type { FastifyBaseLogger } from 'fastify';
import type { ObjectDefinition, OutboundConfig } from '../config/schema.js';
import { ConnectorError, stampsMarker, type Connector } from '../crm/connector.js';
import { CrmHttpError } from '../crm/http-client.js';
import { NeedsReauthError } from '../crm/token-provider.js';
import type { Db } from '../db/client.js';
import {
  claimOutboundWrites,
  markOutboundFailed,
  markOutboundSent,
  releaseOutboundClaim,
  renewOutboundClaim,
  scheduleOutboundRetry,
  settleOutboundWrite,
  type OutboundWrite,
} from '../db/queries/outbound.js';
import { passChanges, showsWritten } from './change-gate.js';
import { Daemon } from './daemon.js';
import { backoffDelay } from './delivery-worker.js';
import { canonicalJson, contentHash, holdsPath, identifyRecord, mapFields, observeRecord, readId, readOriginMarker, readVersion, sameVersion } from './record.js';

/**
 * How far before a write was queued the search for its lost create looks: the CRM stamps
 * `updated_at` with its own clock, which may run minutes behind ours.
 */
const EARLIER_CREATE_MARGIN_MS = 10 * 60_000;

const STOPPED_DURING_CALL = 'no answer: the writer stopped during its CRM call';

/**
 * The longest a CRM's `Retry-After` holds a write back. It covers a rate limit's window and a
 * maintenance of hours; a longer one (or a misread header) does not park the pipeline's lead
 * for longer: the write is tried again after a day, and its next answer says how long to wait.
 */
const LONGEST_RETRY_AFTER_MS = 24 * 3600_000;

export interface OutboundWriterOptions {
  db: Db;
  connectionId: string;
  outbound: OutboundConfig;
  objects: Record<string, ObjectDefinition>;
  /** The connection's authenticated connector (built on first use, so a writer that never works never authenticates). */
  connector: () => Connector;
  /** Unique per writer across replicas: the lease names it. */
  owner: string;
  log: FastifyBaseLogger;
}

type Attempt =
  | { kind: 'written'; raw: unknown }
  | { kind: 'made-earlier'; crmId: string }
  | { kind: 'found-earlier'; crmId: string }
  | { kind: 'unread'; crmId: string; error: string }
  | { kind: 'retry'; status: number | null; error: string; retryAfterMs?: number | undefined }
  | { kind: 'rejected'; status: number | null; error: string }
  | { kind: 'waiting'; error: string }
  | { kind: 'stopped' };

/**
 * Makes the pipeline's writes in the CRM, one connection's worth, on every replica; claims with
 * SKIP LOCKED and a lease share the work. Each write was stamped (committed) before it was
 * queued, so its echo is recognised whenever it comes; the call carries the origin marker with
 * the write's id; the CRM's answer then passes through the change gate (source `outbound`) so
 * the returned version joins the record's head.
 */
export class OutboundWriter extends Daemon {
  constructor(private readonly deps: OutboundWriterOptions) {
    super({ name: `outbound:${deps.connectionId}`, intervalMs: deps.outbound.pollInterval, jitter: 0.2, log: deps.log });
  }

  /** Claims a batch, writes it in parallel, and asks for another tick right away when it was full. */
  async tick(signal: AbortSignal): Promise<boolean> {
    const { db, connectionId, outbound, owner } = this.deps;
    const claimed = await claimOutboundWrites(db, { connectionId, owner, limit: outbound.concurrency, leaseMs: outbound.lease });
    if (claimed.length === 0) return false;
    const results = await Promise.allSettled(claimed.map((row) => this.write(row, signal)));
    // A row whose outcome could not be recorded keeps its lease and is retried when it expires.
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    // Writes given back to wait for re-authorisation are due again at once: claiming again
    // before the pause would spin on them.
    const waiting = results.some((r) => r.status === 'fulfilled' && r.value === 'waiting');
    return claimed.length === outbound.concurrency && !waiting && !signal.aborted;
  }

  /** Returns what the attempt came to. */
  private async write(row: OutboundWrite, signal: AbortSignal): Promise<Attempt['kind']> {
    // The call may outlast the lease (Retry-After waits, a token refresh elsewhere): renew it while
    // the call runs, and stop the call if another writer has taken the write.
    const { db, owner, outbound } = this.deps;
    const lost = new AbortController();
    const heartbeat = setInterval(() => {
      renewOutboundClaim(db, { id: row.id, owner, leaseMs: outbound.lease }).then((held) => held || lost.abort(), () => {});
    }, outbound.lease / 3);
    let attempt: Attempt;
    try {
      attempt = await this.call(row, AbortSignal.any([signal, lost.signal]));
    } finally {
      clearInterval(heartbeat);
    }
    await this.record(row, attempt);
    return attempt.kind;
  }

  private async record(row: OutboundWrite, attempt: Attempt): Promise<void> {
    const { db, owner, outbound, log, connectionId } = this.deps;
    const context = { connection: connectionId, object: row.object, outboundId: row.id, attempt: row.attempts };
    switch (attempt.kind) {
      case 'stopped':
        // The writer is stopping (a deploy, SIGTERM) with its CRM call in flight: the CRM may
        // have made the write, so the attempt counts as one that got no answer, and the next
        // writer (due at once) looks for what it made before creating again.
        await scheduleOutboundRetry(db, { id: row.id, owner, delayMs: 0, status: null, error: STOPPED_DURING_CALL });
        return;
      case 'waiting':
        // While a connection needs re-authorisation only polling pauses (DESIGN); the
        // pipeline's writes wait. Nothing was made (the token manager refuses before the call,
        // or the CRM answered 401), so the attempt is given back and a wait of any length uses
        // none of `maxAttempts`. No age limit applies either, deliberately: a clock would throw
        // away leads the pipeline was told were accepted because nobody re-authorised in time.
        // The operator bounds the wait: /health answers 503 and counts the write in
        // `outbound.pending`, and the write shows why in `lastError`. Each tick retries only
        // the oldest `concurrency` writes, to see whether the connection is back.
        await releaseOutboundClaim(db, { id: row.id, owner, reason: attempt.error });
        log.debug(context, `outbound write ${row.id} to ${connectionId} waits for re-authorisation`);
        return;
      case 'written':
        await this.join(row, attempt.raw);
        return;
      case 'made-earlier':
        // The echo that taught us the id already joined the head; whatever staff did to the
        // record since is a real change the hooks and the poll deliver. So the write is done,
        // and nothing more passes the gate on its behalf.
        if (await markOutboundSent(db, { id: row.id, owner, crmId: attempt.crmId, crmVersion: null, contentHash: row.contentHash })) {
          await settleOutboundWrite(db, row.id);
          log.info({ ...context, crmId: attempt.crmId }, `outbound ${row.operation} ${row.id} for ${connectionId} was made by an earlier attempt (${row.object}/${attempt.crmId})`);
        }
        return;
      case 'found-earlier':
        // No echo has come (the automation may have dropped it), so the stamp stays live with
        // the CRM id: the poll's or a hook's sighting of the record is then this write's echo,
        // matched by its marker or the written fields, and not delivered.
        if (await markOutboundSent(db, { id: row.id, owner, crmId: attempt.crmId, crmVersion: null, contentHash: row.contentHash })) {
          log.info({ ...context, crmId: attempt.crmId }, `outbound create ${row.id} for ${connectionId} was made by an earlier attempt whose answer was lost (${row.object}/${attempt.crmId})`);
        }
        return;
      case 'unread':
        // The CRM made the update (a 2xx) but its answer was too large to read: sending it
        // again would only make it again (and add another entry for a writeAs field). As for a
        // create found after a lost answer, the stamp stays live with the CRM id, so the poll's
        // or a hook's sighting of the record is this write's echo, matched by the written fields.
        if (await markOutboundSent(db, { id: row.id, owner, crmId: attempt.crmId, crmVersion: null, contentHash: row.contentHash })) {
          log.warn({ ...context, crmId: attempt.crmId }, `outbound update ${row.id} for ${connectionId} was made, but the CRM's answer could not be read: ${attempt.error}`);
        }
        return;
      case 'rejected':
        // A definite refusal: this attempt made nothing, and an earlier one that may have made
        // the record was looked for first (a failed look-up is retried, never rejected).
        if (await markOutboundFailed(db, { id: row.id, owner, status: attempt.status, error: attempt.error, settle: true })) {
          log.warn({ ...context, status: attempt.status }, `outbound write ${row.id} to ${connectionId} failed: ${attempt.error}`);
        }
        return;
      case 'retry': {
        if (row.attempts >= outbound.maxAttempts) {
          // An attempt may have made the record (a lost answer, a 5xx after the CRM acted): the
          // stamp stays unsettled, so the record turning up with this write's marker is its echo.
          const error = `gave up after ${row.attempts} attempts: ${attempt.error}`;
          if (await markOutboundFailed(db, { id: row.id, owner, status: attempt.status, error, settle: false })) {
            log.warn({ ...context, status: attempt.status }, `outbound write ${row.id} to ${connectionId} failed: ${error}`);
          }
          return;
        }
        // A CRM that asked to be left alone (a 429 or a 5xx with a Retry-After longer than the
        // HTTP client waits within a call: an hour's rate limit, a maintenance) is left alone that
        // long: retried on the backoff alone, every attempt would be refused again and the write
        // shown `failed` within minutes, though it would have gone through once the CRM was back.
        const delayMs = Math.max(backoffDelay(row.attempts, outbound.backoff), Math.min(attempt.retryAfterMs ?? 0, LONGEST_RETRY_AFTER_MS));
        await scheduleOutboundRetry(db, { id: row.id, owner, delayMs, status: attempt.status, error: attempt.error });
        log.debug({ ...context, status: attempt.status, delayMs }, `outbound write ${row.id} will be retried: ${attempt.error}`);
        return;
      }
    }
  }

  private async call(row: OutboundWrite, signal: AbortSignal): Promise<Attempt> {
    const connector = this.deps.connector();
    const fields = row.fields ?? {};
    // An earlier attempt may have made the write unless its answer proves it did not: a 429
    // (the CRM turned it away) or a 401 (it was not let in). A 5xx (the CRM or its gateway
    // may fail after the write was made), an answer cut off, no answer, a writer stopped
    // mid-call, a failed look-up: no echo has come since, so look before writing again.
    const mayHaveMade = row.attempts > 1 && row.lastStatus !== 429 && row.lastStatus !== 401;
    let looking = false;
    try {
      // An earlier attempt that ended without an answer (timeout, reset, a killed writer) may
      // have been made after all. If its echo has since come, it was: done, whatever became of
      // the record since. Staff may have edited the record or deleted it, and making the write
      // again would undo their edit or bring back what they deleted. (A write matched during an
      // attempt then given back to wait for re-authorisation met a record already showing what
      // it writes: there is nothing to do.)
      if (row.settledAt !== null && row.crmId !== null) return { kind: 'made-earlier', crmId: row.crmId };
      if (row.operation === 'update') {
        if (row.crmId === null) return { kind: 'rejected', status: null, error: 'an update without a CRM id' };
        let send = fields;
        // Sent again, a writeAs field the earlier attempt did write would give the contact a
        // second, identical email or phone entry: the record is read first, and what it already
        // shows is left out. A failed read fails the attempt, to be retried: writing blind could
        // add the entry twice.
        const definition = this.deps.objects[row.object];
        if (mayHaveMade && definition?.get !== undefined && writesThroughTemplate(definition, fields)) {
          looking = true;
          const read = await connector.getRecord(row.object, row.crmId, { signal });
          looking = false;
          // A record gone is the CRM's to say (a 404 to the update, which rejects it).
          if (read !== null) {
            send = withoutShown(definition, fields, mapFields(read, definition));
            // The record shows all of it: the earlier attempt made the write, and the record read
            // is its echo (joined as the CRM's answer, not delivered).
            if (Object.keys(send).length === 0) return { kind: 'written', raw: read };
          }
        }
        const raw = await connector.updateRecord(row.object, row.crmId, connector.toRecord(row.object, send), { writeId: row.id, signal });
        return { kind: 'written', raw: await this.readBack(row.object, raw, signal) };
      }
      if (mayHaveMade) {
        looking = true;
        const crmId = await this.findEarlierCreate(row, signal);
        if (crmId !== undefined) return { kind: 'found-earlier', crmId };
        looking = false;
      }
      const raw = await connector.createRecord(row.object, connector.toRecord(row.object, fields), { writeId: row.id, signal });
      return { kind: 'written', raw: await this.readBack(row.object, raw, signal) };
    } catch (err) {
      if (signal.aborted) return { kind: 'stopped' };
      // The update's own answer, not the read before it: that read being too large says nothing was made.
      if (!looking && row.operation === 'update' && row.crmId !== null && err instanceof CrmHttpError && err.code === 'CRM_RESPONSE_TOO_LARGE' && err.status >= 200 && err.status < 300) {
        return { kind: 'unread', crmId: row.crmId, error: err.message };
      }
      const attempt = classify(err);
      // Whatever the look-up answered (a 429, a 4xx), the earlier attempt may still have made the
      // write: the attempt is retried, with no status, so that the next one looks again.
      if (looking && attempt.kind !== 'waiting') {
        const what = row.operation === 'update' ? 'looking at the record an earlier attempt may have updated' : 'looking for the record an earlier attempt may have made';
        return { kind: 'retry', status: null, error: `${what}: ${attempt.error}`, retryAfterMs: attempt.kind === 'retry' ? attempt.retryAfterMs : undefined };
      }
      return attempt;
    }
  }

  /**
   * The CRM's answer to a write, or, when the answer leaves out mapped fields, the record read
   * back at the same version. HubSpot answers a create or update with the properties it set and
   * a few defaults: hashed as it stands, the answer would put nulls in the head where every later
   * read shows values, and the next touch that changes nothing would be delivered as a change.
   * Only the same version is the write's own state (a later one may be a staff edit, which must
   * not pass as the echo). Best effort: the write is made, so a failed read keeps the answer.
   */
  private async readBack(object: string, raw: unknown, signal: AbortSignal): Promise<unknown> {
    const definition = this.deps.objects[object];
    if (definition?.fields === undefined || definition.get === undefined) return raw;
    if (Object.values(definition.fields).every((path) => holdsPath(raw, path))) return raw;
    const id = readId(raw, definition);
    const version = readVersion(raw, definition);
    if (id === undefined || version === null) return raw;
    try {
      const read = await this.deps.connector().getRecord(object, id, { signal });
      return read !== null && sameVersion(readVersion(read, definition), version) ? read : raw;
    } catch {
      return raw;
    }
  }

  /**
   * The record an earlier attempt of this create may have made, if the CRM shows one: among
   * the records changed since shortly before the write was queued (the margin covers the CRM's
   * clock running behind ours), the one carrying this write's origin marker, or, for an object
   * without a marker, the newest one showing every written field. A failed listing fails the
   * attempt, to be retried: creating blind could make the record twice. An object with no list
   * call is the exception: there, creating again is the only way the write can go through.
   */
  private async findEarlierCreate(row: OutboundWrite, signal: AbortSignal): Promise<string | undefined> {
    const definition = this.deps.objects[row.object];
    if (definition === undefined) return undefined;
    if (definition.list === undefined) {
      // A hooks-only object: there is no listing to look in, so the create is made again. The
      // bridge is at-least-once: a second record is a duplicate the firm sees and merges (it
      // carries this write's id in the origin marker, where the object has one); failing the
      // write would lose the pipeline's lead unseen. An echo that did come by hook has already
      // answered (see call), so this happens only when the hook was dropped too.
      this.deps.log.warn(
        { connection: this.deps.connectionId, object: row.object, outboundId: row.id },
        `outbound create ${row.id}: an earlier attempt may have made the record and "${row.object}" has no list call to look for it; creating again, which may make the record twice`,
      );
      return undefined;
    }
    const connector = this.deps.connector();
    const since = new Date(row.createdAt.getTime() - EARLIER_CREATE_MARGIN_MS);
    let found: { crmId: string; rank: number } | undefined;
    for await (const page of connector.listChanges({ object: row.object, since, signal })) {
      for (const raw of page.records) {
        const identity = identifyRecord(raw, definition);
        if (identity === undefined) continue;
        if (definition.originMarker) {
          if (readOriginMarker(raw, definition)?.toLowerCase() === row.id) return identity.crmId;
          continue;
        }
        const rank = identity.rank ?? -Infinity;
        if (showsWritten(mapFields(raw, definition), row.echoMatch) && (found === undefined || rank > found.rank)) found = { crmId: identity.crmId, rank };
      }
    }
    return found?.crmId;
  }

  /**
   * The CRM's answer joins the record's head: the stamp learns the CRM id, version and the
   * exact hash of the returned content, then the returned record passes through
   * the gate as a change of source `outbound`. If the echo already came (by hook or poll, with
   * the same version), the gate calls it a duplicate; otherwise the stamp's exact hash makes it
   * an echo and the head takes its version, so the echo arriving later is a duplicate. Either
   * way nothing is delivered, and the stamp is settled.
   */
  private async join(row: OutboundWrite, raw: unknown): Promise<void> {
    const { db, owner, connectionId, log } = this.deps;
    const definition = this.deps.objects[row.object];
    const change =
      definition === undefined
        ? undefined
        : observeRecord({ connectionId, object: row.object, definition, raw, source: 'outbound', observedAt: new Date() });
    if (change === undefined) {
      // The CRM said yes but its answer names no record: retrying could create a second one. The
      // record exists, so the stamp stays unsettled for its echo to name it.
      await markOutboundFailed(db, { id: row.id, owner, status: null, error: 'the CRM accepted the write but its answer has no record id', settle: false });
      log.warn({ connection: connectionId, outboundId: row.id }, `outbound write ${row.id}: the CRM's answer has no record id`);
      return;
    }
    // Two transactions, in the gate's lock order. The stamp learns the answer first, on its own:
    // a gate transaction (a hook racing this) locks the record head and then the stamp, so
    // taking the stamp and then the head in one transaction here could deadlock with it.
    // Between the two, the stamp is live with the exact hash and CRM id, so an echo arriving
    // then is still recognised; a crash between them leaves the echo to be matched the same way.
    const sent = await markOutboundSent(db, { id: row.id, owner, crmId: change.crmId, crmVersion: change.version, contentHash: change.contentHash ?? contentHash(change.fields) });
    if (!sent) {
      log.warn({ connection: connectionId, outboundId: row.id }, `outbound write ${row.id}: lease lost before the answer was recorded`);
      return;
    }
    const outcome = await db.transaction(async (tx) => {
      const [result] = await passChanges(tx, [change]);
      await settleOutboundWrite(tx, row.id);
      return result!;
    });
    log.info(
      { connection: connectionId, object: row.object, crmId: change.crmId, outboundId: row.id, disposition: outcome.disposition },
      `outbound ${row.operation} of ${row.object}/${change.crmId} for ${connectionId} (attempt ${row.attempts})`,
    );
  }
}

/**
 * 5xx, 408, 429, timeouts, network errors and token-endpoint trouble are worth another try; other
 * 4xx are not. A connection that needs re-authorisation is neither: the write waits for it.
 */
function classify(err: unknown): Extract<Attempt, { error: string }> {
  if (err instanceof NeedsReauthError) return { kind: 'waiting', error: err.message };
  if (err instanceof CrmHttpError) {
    const status = err.status === 0 ? null : err.status;
    if (err.code === 'CRM_HTTP_STATUS' && err.status >= 400 && err.status < 500 && err.status !== 408 && err.status !== 429) {
      return { kind: 'rejected', status, error: err.message };
    }
    return { kind: 'retry', status, error: err.message, retryAfterMs: err.retryAfterMs };
  }
  if (err instanceof ConnectorError) {
    // A definition without a create call, or a template missing a value: no retry can fix it.
    return { kind: 'rejected', status: null, error: err.message };
  }
  return { kind: 'retry', status: null, error: (err as Error).message ?? String(err) };
}

/**
 * The fields a pipeline's write sends to the CRM, decided when the write is accepted, and the
 * fields it asks to clear that cannot be. A field written through a template (`writeAs`) is not
 * set in place: Clio adds an `email_addresses` entry for every one sent without an id, and
 * removes one only by that id. So:
 * - on an update, such a field holding what the record showed when the bridge last saw it
 *   (`seen`) is left out: a pipeline handing back the email it was delivered must not add the
 *   same address again. With `seen` unknown it is sent: a duplicate entry is a nuisance, a lost
 *   change is not recoverable;
 * - a null has nothing to clear on a create (left out), but on an update of a record that may
 *   hold a value it cannot be written: it is named in `uncleared`, for the route to refuse.
 * Other fields pass as they are: writing a value again changes nothing.
 */
export function fieldsToWrite(
  definition: ObjectDefinition,
  operation: 'create' | 'update',
  fields: Record<string, unknown>,
  seen: Record<string, unknown> | null,
): { fields: Record<string, unknown>; uncleared: string[] } {
  const writeAs = definition.writeAs ?? {};
  const out: Record<string, unknown> = {};
  const uncleared: string[] = [];
  const kept = operation === 'update' && seen !== null ? withoutShown(definition, fields, seen) : fields;
  for (const [name, value] of Object.entries(kept)) {
    if (!Object.hasOwn(writeAs, name)) {
      out[name] = value;
      continue;
    }
    if (value === null && operation === 'create') continue;
    if (value === null) uncleared.push(name);
    else out[name] = value;
  }
  return { fields: out, uncleared };
}

/**
 * The pipeline's fields as the CRM keeps them: a number or boolean written to a field it holds as
 * text (`fieldTypes: string`; every HubSpot property) becomes that text. That is what the CRM
 * reads back, so the write's echo (a hook before the answer), the record a create whose answer
 * was lost made, and the loop guard's comparison with what was delivered all see one value:
 * compared as 5550100 with "5550100", the echo was delivered and the lost create made twice.
 * A field written as the object's `nullAs` (HubSpot's "") clears it, as a null does, and reads
 * back null: it is null here.
 */
export function asTheCrmKeepsThem(definition: ObjectDefinition, fields: Record<string, unknown>): Record<string, unknown> {
  const types = definition.fieldTypes ?? {};
  const out: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(fields)) {
    const text = Object.hasOwn(types, name) && types[name] === 'string' && (typeof value === 'number' || typeof value === 'boolean');
    out[name] = text ? String(value) : definition.nullAs !== undefined && value === definition.nullAs ? null : value;
  }
  return out;
}

/** Whether a write sends any field through a template (`writeAs`), which adds rather than sets. */
function writesThroughTemplate(definition: ObjectDefinition, fields: Record<string, unknown>): boolean {
  const writeAs = definition.writeAs ?? {};
  return Object.keys(fields).some((name) => Object.hasOwn(writeAs, name));
}

/**
 * `fields` less each `writeAs` field whose value the record already shows (`shown`, its mapped
 * fields, as last seen or just read): sent again, it would add a second entry for the same
 * address. Other fields stay: writing a value again changes nothing.
 */
function withoutShown(definition: ObjectDefinition, fields: Record<string, unknown>, shown: Record<string, unknown>): Record<string, unknown> {
  const writeAs = definition.writeAs ?? {};
  const holds = (name: string, value: unknown) => Object.hasOwn(shown, name) && canonicalJson(shown[name] ?? null) === canonicalJson(value ?? null);
  return Object.fromEntries(Object.entries(fields).filter(([name, value]) => !(Object.hasOwn(writeAs, name) && holds(name, value))));
}

/**
 * What the echo of a write must show, by canonical field, for the gate to recognise it before
 * the CRM call has returned: the fields the connector will actually write (mapped, not
 * read-only; a `writeAs` field shows the value written at its read path), the origin marker's
 * value in place of whatever the request put in its field when this write stamps it (see
 * `originMarker.stampOn`), and the `lowercaseOnWrite` fields listed for a case-insensitive
 * comparison (Clio takes `open` and shows `Open`).
 */
export function expectedEcho(definition: ObjectDefinition, operation: 'create' | 'update', fields: Record<string, unknown>, writeId: string): { fields: Record<string, unknown>; foldCase: string[] } {
  const readOnly = new Set(definition.readOnly ?? []);
  const paths: Record<string, string> = definition.fields ?? Object.fromEntries(Object.keys(fields).map((k) => [k, k]));
  const out: Record<string, unknown> = {};
  for (const [name, value] of Object.entries(fields)) {
    if (paths[name] === undefined || readOnly.has(name)) continue;
    out[name] = value ?? null;
  }
  if (definition.originMarker && stampsMarker(definition, operation)) {
    const markerName = Object.entries(paths).find(([, path]) => path === definition.originMarker!.path)?.[0];
    if (markerName !== undefined) out[markerName] = definition.originMarker.value.replace(/\{\{\s*writeId\s*\}\}/g, writeId);
  }
  const lowercase = new Set(definition.lowercaseOnWrite ?? []);
  const foldCase = Object.entries(paths)
    .filter(([name, path]) => lowercase.has(path) && name in out)
    .map(([name]) => name);
  return { fields: out, foldCase };
}
