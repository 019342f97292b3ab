import { pino } from 'pino';
import { buildApp } from '../app.js';
import { loadConfig } from '../config/load.js';
import { deleteStreamCursor } from '../db/queries/activity.js';
import { getStreamCursor } from '../db/queries/streams.js';
import { releaseLease } from '../db/queries/leases.js';
import { AppError } from '../errors.js';
import { loggerOptions } from '../logger.js';
import { leaseName, pollStream, type RunReport } from './poller.js';

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
 * restart continues where the last run stopped. Time-ordered listings checkpoint every page;
 * id-ordered ones (Clio) only at the end, so an interrupted Clio backfill re-reads from its start,
 * and the gate turns the re-read into duplicates that write nothing. A finished backfill forgets
 * its cursor, so the next one starts over. Exit status 1 when a stream failed or was stopped.
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
  try {
    for (const object of objects) {
      if (options.signal?.aborted) break;
      const stream = app.poller.stream(connection.id, object);
      const key = backfillKey(object);
      const previous = await getStreamCursor(app.db, { connectionId: connection.id, object: key });
      if (previous?.cursorUpdatedAt) options.print(`${connection.id}/${object}: resuming the backfill from ${previous.cursorUpdatedAt}\n`);
      else if (previous) options.print(`${connection.id}/${object}: an earlier backfill stopped before its first checkpoint; starting again\n`);

      const started = performance.now();
      const progress = (r: RunReport) => options.print(progressLine(connection.id, object, r, (performance.now() - started) / 1000, options.columns ?? 0, r.total));
      let report: RunReport;
      try {
        report = await pollStream(stream, {
          cursorKey: key,
          countCaught: false,
          onPage: progress,
          ...(options.since ? { since: options.since } : {}),
          ...(options.signal ? { signal: options.signal } : {}),
        });
      } finally {
        // Hand the backfill's lease back now, so a restart can continue at once.
        await releaseLease(app.db, leaseName(connection.id, key), stream.owner).catch(() => {});
      }
      if (options.columns) options.print('\n');
      options.print(`${summarise(report, (performance.now() - started) / 1000)}\n`);
      if (report.status === 'ok') await deleteStreamCursor(app.db, { connectionId: connection.id, object: key });
      else failed = true;
    }
  } finally {
    await app.close();
  }
  return failed || options.signal?.aborted ? 1 : 0;
}

/**
 * `[########------] 1200/5000 records, 340 records/s ETA 12s` when the total is known, a moving
 * marker otherwise, or a plain line per page when not on a terminal. Pages carry a total where
 * the connector's list call names `totalPath` (Clio's `meta.records`).
 */
export function progressLine(connectionId: string, object: string, r: RunReport, seconds: number, columns: number, total?: number): string {
  const rate = r.records / Math.max(0.001, seconds);
  const known = total !== undefined && total > 0;
  const eta = known ? ` ETA ${formatSeconds(Math.max(0, total - r.records) / Math.max(rate, 0.001))}` : '';
  const counts = `${r.records}${known ? `/${total}` : ''} records, ${r.counts.accepted ?? 0} new, ${rate.toFixed(0)} records/s${eta}`;
  if (!columns) return `backfill ${connectionId}/${object}: page ${r.pages}, ${counts}\n`;
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

function summarise(r: RunReport, seconds: number): string {
  const where = `${r.connectionId}/${r.object}`;
  if (r.status === 'busy') return `${where}: another backfill of this stream is running (its lease is held); try again when it ends`;
  if (r.status === 'failed') {
    const hint = r.needsReauth ? ` (run \`crm-bridge auth ${r.connectionId}\`)` : r.error?.startsWith('ABORTED') ? '; run the same command again to continue' : '';
    return `${where}: backfill stopped after ${r.records} record(s): ${r.error}${hint}`;
  }
  const counts = Object.entries(r.counts).map(([k, v]) => `${v} ${k}`).join(', ') || 'nothing new';
  return `${where}: backfill done: ${r.records} record(s) read in ${formatSeconds(seconds)}: ${counts}`;
}
