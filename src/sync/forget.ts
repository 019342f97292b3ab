import type { Db } from '../db/client.js';
import {
  deadLetterErased,
  eraseRecordBodies,
  findRecordObjects,
  lockUndeliveredRows,
  lockUnfinishedWrites,
  settleErasedWrites,
  type ErasedBodies,
} from '../db/queries/retention.js';

/**
 * `crm-bridge forget <connection> <crmId>`: an erasure request for one record. Every stored
 * body of the record goes; its ledger rows and head stay, so the gate still recognises a
 * replayed old version as a duplicate and the audit trail still says what happened when.
 *
 * A delivery of the record that has not reached the pipeline (pending) is the one hard case:
 * sending it without its body would hand the pipeline an "upsert" with no content, which it
 * cannot tell from a record emptied in the CRM; sending it with the body would move the data
 * the request asked to erase. So `forget` refuses and names the rows, and with `--force` turns
 * them into dead letters marked ERASED: visible in /health and the dead-letter list, never sent
 * on their own. A row a worker is sending right now is refused even with `--force` (its POST
 * already carries the body; run again in a moment). Dead letters are bodies at rest like any
 * other and are erased without `--force`; replaying one later sends `record: null`.
 *
 * A pipeline write to the record that is not finished is the same case from the other side: a
 * pending one still has the fields to write into the CRM, and one not settled still needs its
 * `echo_match` (the values it wrote) to recognise its echo, which would otherwise reach the
 * pipeline as a new change. So `forget` refuses for those too, and with `--force` a pending one
 * is never made (failed, marked ERASED) and each is settled, so its fields and echo_match go
 * with the rest; a write whose CRM call is under way is refused even with `--force`.
 *
 * Erase the record in the CRM first: while it exists there, the next poll or hook stores it again.
 */

export interface ForgetRequest {
  connectionId: string;
  crmId: string;
  /** Required when the CRM id exists under more than one object of the connection. */
  object?: string | undefined;
  force?: boolean;
}

export type ForgetOutcome =
  | ({ status: 'erased'; object: string; deadLettered: string[]; erasedWrites: string[] } & ErasedBodies)
  | { status: 'not_found' }
  | { status: 'ambiguous'; objects: string[] }
  | { status: 'pending'; object: string; pending: string[]; inFlight: string[]; writes: string[]; writesInFlight: string[] };

export async function forgetRecord(db: Db, request: ForgetRequest): Promise<ForgetOutcome> {
  const objects = await findRecordObjects(db, request.connectionId, request.crmId);
  const object = request.object ?? (objects.length === 1 ? objects[0] : undefined);
  if (request.object === undefined && objects.length > 1) return { status: 'ambiguous', objects };
  if (object === undefined || !objects.includes(object)) return { status: 'not_found' };
  const key = { connectionId: request.connectionId, object, crmId: request.crmId };

  return db.transaction(async (tx) => {
    const undelivered = await lockUndeliveredRows(tx, key);
    const pending = undelivered.filter((r) => r.state === 'pending');
    const inFlight = pending.filter((r) => r.leased);
    const writes = await lockUnfinishedWrites(tx, key);
    const writesInFlight = writes.filter((w) => w.leased);
    if ((pending.length > 0 || writes.length > 0) && (!request.force || inFlight.length > 0 || writesInFlight.length > 0)) {
      return {
        status: 'pending' as const,
        object,
        pending: pending.map((r) => r.eventId),
        inFlight: inFlight.map((r) => r.eventId),
        writes: writes.map((w) => w.id),
        writesInFlight: writesInFlight.map((w) => w.id),
      };
    }
    await deadLetterErased(tx, pending.map((r) => r.id));
    await settleErasedWrites(tx, writes.map((w) => w.id));
    const erased = await eraseRecordBodies(tx, key);
    return { status: 'erased' as const, object, deadLettered: pending.map((r) => r.eventId), erasedWrites: writes.map((w) => w.id), ...erased };
  });
}

/** The CLI's side: prints what was removed. Exit status 0 erased, 1 nothing to erase or refused. */
export async function forgetFromCli(db: Db, request: ForgetRequest, write: (text: string) => void): Promise<number> {
  const outcome = await forgetRecord(db, request);
  const where = `${request.connectionId}/${request.object ?? '*'}/${request.crmId}`;
  switch (outcome.status) {
    case 'not_found':
      write(`no record ${where} in the ledger: nothing to erase\n`);
      return 1;
    case 'ambiguous':
      write(`${request.crmId} is a record of several objects of ${request.connectionId} (${outcome.objects.join(', ')}): name one with --object\n`);
      return 1;
    case 'pending': {
      const record = `${request.connectionId}/${outcome.object}/${request.crmId}`;
      if (outcome.inFlight.length > 0) {
        write(`refused: ${outcome.inFlight.length} delivery(ies) of ${record} are being sent right now (${outcome.inFlight.join(', ')}); run forget again in a moment\n`);
      } else if (outcome.writesInFlight.length > 0) {
        write(`refused: ${outcome.writesInFlight.length} pipeline write(s) to ${record} are being made in the CRM right now (${outcome.writesInFlight.join(', ')}); run forget again in a moment\n`);
      } else {
        if (outcome.pending.length) write(`refused: ${outcome.pending.length} change(s) of ${record} are not yet delivered (${outcome.pending.join(', ')}).\n`);
        if (outcome.writes.length) write(`refused: ${outcome.writes.length} pipeline write(s) to ${record} are not finished: not yet made, or their echo not yet seen (${outcome.writes.join(', ')}).\n`);
        write(
          'Wait for them, or run again with --force to erase them too: changes become dead letters marked ERASED and are not sent; ' +
            'writes not yet made fail as ERASED and are not made, and a write whose echo comes after is not recognised (the pipeline receives it as a change).\n',
        );
      }
      return 1;
    }
    case 'erased': {
      const record = `${request.connectionId}/${outcome.object}/${request.crmId}`;
      write(`erased ${outcome.eventIds.length} stored body(ies) of ${record}${outcome.eventIds.length ? `: ${outcome.eventIds.join(', ')}` : ''}\n`);
      if (outcome.pendingFetchEventId) write(`  including the pending notification fetch's hook body (${outcome.pendingFetchEventId})\n`);
      if (outcome.deadLettered.length) write(`  ${outcome.deadLettered.length} undelivered change(s) dead-lettered as ERASED: ${outcome.deadLettered.join(', ')}\n`);
      if (outcome.erasedWrites.length) write(`  ${outcome.erasedWrites.length} unfinished pipeline write(s) settled (those not yet made failed as ERASED): ${outcome.erasedWrites.join(', ')}\n`);
      if (outcome.clearedErrors) write(`  ${outcome.clearedErrors} delivery error excerpt(s) cleared\n`);
      if (outcome.clearedOutboundWrites) write(`  ${outcome.clearedOutboundWrites} outbound write(s) cleared of their fields and of the values their echo was matched by\n`);
      write('  the ledger rows and the record head stay: the gate still recognises this record\'s changes\n');
      return 0;
    }
  }
}
