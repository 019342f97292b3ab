import { setTimeout as sleep } from 'node:timers/promises';
import { pino } from 'pino';
import { buildApp } from '../app.js';
import { loadConfig } from '../config/load.js';
import { AppError } from '../errors.js';
import { loggerOptions } from '../logger.js';
import { pollObjects } from '../config/schema.js';
import { reauthHint } from '../crm/token-provider.js';
import { EXIT_BUSY } from './exit-status.js';
import { heldText, runOnce, type RunReport } from './poller.js';

export interface PollCommandOptions {
  connectionId: string;
  object?: string | undefined;
  kind: 'poll' | 'sweep';
  /** Sweep: make deletes over `poll.sweepDeleteLimit` (`--allow-deletes`). */
  allowDeletes?: boolean;
  /** Keep polling on the connection's interval until interrupted (poll without --once). */
  follow?: boolean;
  print: (text: string) => void;
  signal?: AbortSignal;
}

/**
 * `crm-bridge poll <connection> --once` and `crm-bridge sweep <connection>`: one pass over each
 * stream with a progress line, through the same app, auth and gate as the server, giving each
 * stream's lease back when its run ends. Exit status 1 when a stream failed, else EXIT_BUSY when
 * another process was running one, else 0.
 */
export async function runPollCommand(options: PollCommandOptions): Promise<number> {
  const config = loadConfig();
  const connection = config.connections.find((c) => c.id === options.connectionId);
  if (connection === undefined) {
    throw new AppError(404, 'UNKNOWN_CONNECTION', `no connection "${options.connectionId}" in ${config.source ?? 'the configuration'} (known: ${config.connections.map((c) => c.id).join(', ')})`);
  }
  const objects = options.object ? [options.object] : pollObjects(connection).length ? pollObjects(connection) : Object.keys(connection.connector.objects).filter((o) => connection.connector.objects[o]?.list);
  const unknown = objects.find((o) => connection.connector.objects[o]?.list === undefined);
  if (unknown !== undefined) throw new AppError(422, 'UNKNOWN_OBJECT', `connection ${connection.id} cannot list "${unknown}"`);

  const app = await buildApp({ config, loggerInstance: pino(loggerOptions(config.env.LOG_LEVEL === 'info' ? 'warn' : config.env.LOG_LEVEL)) });
  let failed = false;
  let busy = false;
  try {
    do {
      for (const object of objects) {
        // Stopped (Ctrl-C, SIGTERM): the streams not begun are left for the next run.
        if (options.signal?.aborted) break;
        const stream = app.poller.stream(connection.id, object);
        const started = performance.now();
        const progress = (r: RunReport) => {
          const rate = r.records / Math.max(0.001, (performance.now() - started) / 1000);
          options.print(`\r${options.kind} ${connection.id}/${object}: ${r.pages} page(s), ${r.records} record(s), ${r.counts.accepted ?? 0} new, ${rate.toFixed(0)} records/s   `);
        };
        const report = await runOnce(options.kind, stream, { onPage: progress, allowDeletes: options.allowDeletes === true, ...(options.signal ? { signal: options.signal } : {}) });
        progress(report);
        options.print('\n');
        options.print(`${summarise(report, reauthHint(connection.id, connection.auth.type))}\n`);
        if (report.status === 'failed') failed = true;
        if (report.status === 'busy') busy = true;
      }
      // Ctrl-C ends the pause at once, not after the interval.
      if (options.follow) await sleep(connection.poll?.interval ?? 300_000, undefined, options.signal ? { signal: options.signal } : {}).catch(() => {});
    } while (options.follow && !options.signal?.aborted);
  } finally {
    await app.close();
  }
  return failed ? 1 : busy ? EXIT_BUSY : 0;
}

/** `reauth`: what to do when the CRM refused the connection's credentials (reauthHint). */
function summarise(r: RunReport, reauth: string): string {
  const where = `${r.connectionId}/${r.object}`;
  if (r.status === 'busy') {
    return `${where}: ${r.kind} not run: another process (the server or another crm-bridge command) is running this stream and holds its lease; nothing was read (exit status ${EXIT_BUSY}); try again when it ends`;
  }
  if (r.status === 'failed') return `${where}: ${r.kind} failed: ${r.error}${r.needsReauth ? ` (${reauth})` : ''}`;
  const counts = Object.entries(r.counts).map(([k, v]) => `${v} ${k}`).join(', ') || 'no changes';
  const extra = r.kind === 'poll' ? `, ${r.caught} caught that no hook announced` : `, ${r.deleted} deleted`;
  return `${where}: ${r.kind} done: ${counts}${extra}${r.held ? `\n${where}: ${heldText(r.held, r.connectionId, r.object)}` : ''}`;
}

