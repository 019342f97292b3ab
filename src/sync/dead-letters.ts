import type { Db } from '../db/client.js';
import { listDeadLetters, replayDeadLetter, type DeadLetter, type LaterChange } from '../db/queries/outbox.js';
import { isUuid } from '../ids.js';
import { printable } from '../terminal-text.js';

/**
 * The operator's side of dead letters for the CLI (`crm-bridge dead-letters`, `crm-bridge
 * replay`); the HTTP API calls the same queries. Kept apart from src/cli.ts so tests can run them.
 */

export async function printDeadLetters(
  db: Db,
  options: { connectionId?: string | undefined; limit: number },
  write: (text: string) => void,
): Promise<number> {
  const { items, nextBefore } = await listDeadLetters(db, { connectionId: options.connectionId, limit: options.limit });
  if (items.length === 0) {
    write('no dead letters\n');
    return 0;
  }
  write(formatTable(items));
  if (nextBefore !== null) write(`(showing the newest ${items.length}; raise --limit to see more)\n`);
  return items.length;
}

/**
 * Exit status: 0 queued again; 1 no such event, not a dead letter, or refused because a later
 * change of the record was delivered (or is being delivered) and `force` was not given.
 */
export async function replayFromCli(db: Db, eventId: string, write: (text: string) => void, options: { force?: boolean } = {}): Promise<number> {
  if (!isUuid(eventId)) {
    write(`"${printable(eventId)}" is not an event id (a UUID, as listed by crm-bridge dead-letters)\n`);
    return 1;
  }
  const outcome = await replayDeadLetter(db, eventId.toLowerCase(), options);
  switch (outcome.status) {
    case 'replayed':
      if (outcome.overtook) write(`forced: ${describeLater(outcome.overtook)}; the pipeline will get the older change after it\n`);
      write(`queued ${outcome.object}/${printable(outcome.crmId)} (${eventId}) for delivery to ${outcome.connectionId} again\n`);
      return 0;
    case 'newer_change':
      write(`not replayed: ${describeLater(outcome.newer)}, so ${outcome.object}/${printable(outcome.crmId)} would go back in time downstream; run again with --force to send it anyway\n`);
      return 1;
    case 'not_found':
      write(`no change with event id ${eventId} in the outbox\n`);
      return 1;
    case 'not_dead':
      write(`${eventId} is ${outcome.state}, not a dead letter: nothing to replay\n`);
      return 1;
  }
}

/** The later change a replay would follow, for the operator (the API's 409 and the CLI). */
export function describeLater(later: LaterChange): string {
  const version = later.version === null ? '' : ` (version ${later.version})`;
  const state = { delivered: 'was already delivered', in_flight: 'is being delivered now', unanswered: 'was sent and got no answer, so the pipeline may have it' }[later.state];
  return `a later change of the record, ${later.eventId}${version}, ${state}`;
}

function formatTable(items: DeadLetter[]): string {
  const header = ['EVENT ID', 'CONNECTION', 'RECORD', 'VERSION', 'ATTEMPTS', 'STATUS', 'QUEUED AT', 'LAST ERROR'];
  const rows = items.map((d) => [
    d.eventId,
    d.connectionId,
    `${d.object}/${d.crmId}`,
    d.version ?? '-',
    String(d.attempts),
    d.lastStatus === null ? '-' : String(d.lastStatus),
    d.queuedAt.toISOString(),
    (d.lastError ?? '').slice(0, 80),
  ].map(printable));
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => `${cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')}\n`;
  return [header, ...rows].map(line).join('');
}
