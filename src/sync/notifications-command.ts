import type { Db } from '../db/client.js';
import { dropPendingFetch, listPendingFetchesForOperator } from '../db/queries/streams.js';
import { errorClass } from '../privacy.js';
import { printable } from '../terminal-text.js';

/**
 * The operator's side of notification-mode hooks (`crm-bridge notifications`): the records
 * notified and not fetched yet, and a way to give up on one the CRM will never give (a 403 on a
 * matter the grant's user may not see): each run asks for it again, and /health counts it as
 * failing, until it is fetched or dropped. Kept apart from src/cli.ts so tests can run it.
 */
export async function printPendingFetches(db: Db, options: { connectionId?: string | undefined; limit: number }, write: (text: string) => void): Promise<number> {
  const rows = await listPendingFetchesForOperator(db, options);
  if (rows.length === 0) {
    write('no notified records waiting to be fetched\n');
    return 0;
  }
  const header = ['CONNECTION', 'RECORD', 'NOTIFIED AT', 'LAST ERROR'];
  const cells = rows.map((r) => [r.connectionId, `${r.object}/${r.crmId}`, r.receivedAt.toISOString(), r.lastError === null ? '-' : errorClass(r.lastError)].map(printable));
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  for (const line of [header, ...cells]) write(`${line.map((c, i) => (i === line.length - 1 ? c : c.padEnd(widths[i]!))).join('  ')}\n`);
  if (rows.length === options.limit) write(`(showing the oldest ${rows.length}; raise --limit to see more)\n`);
  return rows.length;
}

/**
 * Drops the pending fetches named `<object>/<id>` of one connection. The notification stays in
 * the ledger; the record is not fetched for it (a poll still reads the record if it changes).
 * Exit status 0 when every one was dropped, 1 when one was malformed or not pending.
 */
export async function dropPendingFromCli(db: Db, connectionId: string, records: readonly string[], write: (text: string) => void): Promise<number> {
  let code = 0;
  for (const record of records) {
    const slash = record.indexOf('/');
    if (slash <= 0 || slash === record.length - 1) {
      write(`"${record}" is not <object>/<id> (as listed by crm-bridge notifications)\n`);
      code = 1;
      continue;
    }
    const key = { connectionId, object: record.slice(0, slash), crmId: record.slice(slash + 1) };
    const dropped = await dropPendingFetch(db, key);
    if (dropped === undefined) {
      write(`${connectionId}: no notified record ${record} waiting to be fetched\n`);
      code = 1;
      continue;
    }
    write(`${connectionId}: dropped ${record} (notified ${dropped.receivedAt.toISOString()}${dropped.lastError ? `, last error ${errorClass(dropped.lastError)}` : ''}); it will not be fetched\n`);
  }
  return code;
}
