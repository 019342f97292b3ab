import { pino } from 'pino';
import { buildApp } from '../app.js';
import { loadConfig } from '../config/load.js';
import { deleteStreamCursor } from '../db/queries/activity.js';
import { getStreamCursor } from '../db/queries/streams.js';
import { reauthHint } from '../crm/token-provider.js';
import { AppError } from '../errors.js';
import { loggerOptions } from '../logger.js';
import { EXIT_BUSY } from './exit-status.js';
import { runOnce, type RunReport } from './poller.js';

export interface BackfillOptions {
  connectionId: string;
  object?: string | undefined;
  /** Re-read changes from this time on (default: everything the CRM lists). */
  since?: Date | undefined;
  print: (text: string) => void;
  signal?: AbortSignal;
  /** Terminal width for the bar; 0 prints one line per page (not a TTY). */
  columns?: number;
}

/** The cursor key of an object's backfill: beside the scheduled poll's own, never the same row. */
export const backfillKey = (object: string) => `${object}#backfill`;

/**
 * `crm-bridge backfill <connection>`: a full re-read through the poller (same auth, pages, gate,
 * per-page commits) under its own cursor and lease, so it runs beside the scheduled poll and a
 * restart continues where the last run stopped. Time-ordered listings checkpoint every page and
 * resume from the checkpoint; id-ordered ones (Clio) note the CRM's link to their next page as
 * they commit and resume from that link. A finished backfill forgets its cursor, so the next
 * one starts over. The lease is given back when each stream's run ends. Exit status 1 when a
 * stream failed or was stopped, else EXIT_BUSY when another backfill of a stream was running,
 * else 0.
 */
export async function runBackfillCommand(options: BackfillOptions): Promise<number> {
  const config = loadConfig();
  const connection = config.connections.find((c) => c.id === options.connectionId);
  if (connection === undefined) {
    throw new AppError(404, 'UNKNOWN_CONNECTION', `no connection "${options.connectionId}" in ${config.source ?? 'the configuration'} (known: ${config.connections.map((c) => c.id).join(', ')})`);
  }
  const listable = Object.keys(connection.connector.objects).filter((o) => connection.connector.objects[o]?.list !== undefined);
  const objects = options.object ? [options.object] : (connection.poll?.objects ?? listable);
  const unknown = objects.find((o) => !listable.includes(o));
  if (unknown !== undefined) throw new AppError(422, 'UNKNOWN_OBJECT', `connection ${connection.id} cannot list "${unknown}" (objects with a list call: ${listable.join(', ') || 'none'})`);

  const app = await buildApp({ config, loggerInstance: pino(loggerOptions(config.env.LOG_LEVEL === 'info' ? 'warn' : config.env.LOG_LEVEL)) });
  let failed = false;
  let busy = false;
  try {
    for (const object of objects) {
      if (options.signal?.aborted) break;
      const stream = app.poller.stream(connection.id, object);
      const key = backfillKey(object);
      const previous = await getStreamCursor(app.db, { connectionId: connection.id, object: key });
      // An id-ordered listing (Clio) stopped part-way goes on from the CRM's link to its next page
      // (pollStream): its pages and records are counted from there, as the earlier run's are not kept.
      const resumed = previous?.resume != null;
      if (resumed) options.print(`${connection.id}/${object}: resuming the backfill from the page an earlier run saved (the CRM's link to it); pages and records count from there\n`);
      else if (previous?.cursorUpdatedAt) options.print(`${connection.id}/${object}: resuming the backfill from ${previous.cursorUpdatedAt}\n`);
      else if (previous) options.print(`${connection.id}/${object}: an earlier backfill stopped before its first checkpoint; starting again\n`);

      const started = performance.now();
      const progress = (r: RunReport) => options.print(progressLine(connection.id, object, r, (performance.now() - started) / 1000, options.columns ?? 0, { total: r.total, resumed }));
      const report = await runOnce('poll', stream, {
        cursorKey: key,
        countCaught: false,
        onPage: progress,
        ...(options.since ? { since: options.since } : {}),
        ...(options.signal ? { signal: options.signal } : {}),
      });
      if (options.columns) options.print('\n');
      options.print(`${summarise(report, (performance.now() - started) / 1000, resumed, reauthHint(connection.id, connection.auth.type))}\n`);
      if (report.status === 'ok') await deleteStreamCursor(app.db, { connectionId: connection.id, object: key });
      else if (report.status === 'busy') busy = true;
      else failed = true;
    }
  } finally {
    await app.close();
  }
  return failed || options.signal?.aborted ? 1 : busy ? EXIT_BUSY : 0;
}

/**
 * `[########------] 1200/5000 records, 340 records/s ETA 12s` when the total is known, a moving
 * marker otherwise, or a plain line per page when not on a terminal. Pages carry a total where
 * the connector's list call names `totalPath` (Clio's `meta.records`). A run `resumed` from a
 * saved page link counts from there and shows no total: the CRM's total includes the pages the
 * earlier run read, so bar and ETA would be wrong.
 */
export function progressLine(connectionId: string, object: string, r: RunReport, seconds: number, columns: number, options: { total?: number | undefined; resumed?: boolean } = {}): string {
  const total = options.resumed ? undefined : options.total;
  const rate = r.records / Math.max(0.001, seconds);
  const known = total !== undefined && total > 0;
  const eta = known ? ` ETA ${formatSeconds(Math.max(0, total - r.records) / Math.max(rate, 0.001))}` : '';
  const counts = `${r.records}${known ? `/${total}` : ''} records${options.resumed ? ' since resuming' : ''}, ${r.counts.accepted ?? 0} new, ${rate.toFixed(0)} records/s${eta}`;
  if (!columns) return `backfill ${connectionId}/${object}: page ${r.pages}${options.resumed ? ' since resuming' : ''}, ${counts}\n`;
  const width = 24;
  const filled = known ? Math.min(width, Math.round((r.records / total) * width)) : (r.pages % width) + 1;
  const bar = known ? `[${'#'.repeat(filled)}${'-'.repeat(width - filled)}]` : `[${' '.repeat(filled - 1)}#${' '.repeat(width - filled)}]`;
  return `\r${`backfill ${connectionId}/${object} ${bar} ${counts}`.slice(0, Math.max(20, columns - 1)).padEnd(Math.max(20, columns - 1))}`;
}

function formatSeconds(s: number): string {
  if (s < 60) return `${Math.ceil(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${Math.ceil(s % 60)}s`;
  return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
}

/** `reauth`: what to do when the CRM refused the connection's credentials (reauthHint). */
function summarise(r: RunReport, seconds: number, resumed: boolean, reauth: string): string {
  const where = `${r.connectionId}/${r.object}`;
  const read = `${r.records} record(s)${resumed ? ' since resuming' : ''}`;
  if (r.status === 'busy') return `${where}: backfill not run: another backfill of this stream is running (its lease is held); nothing was read (exit status ${EXIT_BUSY}); try again when it ends`;
  if (r.status === 'failed') {
    const hint = r.needsReauth ? ` (${reauth})` : r.error?.startsWith('ABORTED') ? '; run the same command again to continue' : '';
    return `${where}: backfill stopped after ${read}: ${r.error}${hint}`;
  }
  const counts = Object.entries(r.counts).map(([k, v]) => `${v} ${k}`).join(', ') || 'nothing new';
  return `${where}: backfill done: ${read} read in ${formatSeconds(seconds)}: ${counts}`;
}
