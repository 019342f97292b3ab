import { Command, CommanderError, InvalidArgumentError } from 'commander';
import { ConfigError } from './config/load.js';
import { AppError } from './errors.js';
import { isUuid } from './ids.js';
import { EXIT_BUSY } from './sync/exit-status.js';

/** The `crm-bridge` command. Operator mistakes end in one line and the usage, exit status 2. */
const program = new Command()
  .name('crm-bridge')
  .description('Keeps an intake pipeline in reliable two-way sync with a legacy CRM.')
  .showHelpAfterError()
  .exitOverride();

program
  .command('serve')
  .description('run the bridge: hooks, health and (as configured) the poller and delivery')
  .action(async () => {
    const { serve } = await import('./server.js');
    await serve();
  });

/** A whole number from `min` (0 unless given) to `max` for an option, or a clear error (exit 2). */
function wholeNumber(name: string, max = Number.MAX_SAFE_INTEGER, min = 0) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < min || n > max) {
      throw new InvalidArgumentError(max === Number.MAX_SAFE_INTEGER ? `${name} must be a whole number of at least ${min}.` : `${name} must be a whole number from ${min} to ${max}.`);
    }
    return n;
  };
}

program
  .command('sandbox')
  .description('run the sandbox CRM (Clio Manage v4 dialect with switchable lies) for tests, demos and benchmarks')
  .option('--port <port>', 'port to listen on', wholeNumber('--port', 65535), 4010)
  .option('--host <host>', 'address to bind', '127.0.0.1')
  .option('--seed <seed>', 'seed for the deterministic records', wholeNumber('--seed'), 42)
  .option('--records <n>', 'how many records to seed (split between matters and contacts)', wholeNumber('--records', 5_000_000), 500)
  .option('--control', 'serve the /_sandbox control API (switches, clock, request log, automation rules); off unless asked for')
  .action(async (opts: { port: number; host: string; seed: number; records: number; control?: boolean }) => {
    const { runSandboxCommand } = await import('./sandbox/index.js');
    await runSandboxCommand({ ...opts, control: opts.control === true });
  });

program
  .command('auth <connection>')
  .description("authorise a connection with the CRM (OAuth2 authorization code): prints the consent URL, receives the redirect, stores the tokens encrypted")
  .option('--port <port>', 'local port for the redirect listener (default: the redirect URI\'s port, else any free port)', (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError('--port must be a whole number from 0 to 65535.');
    return n;
  })
  .option('--redirect-uri <uri>', 'the redirect URI registered with the CRM (default: auth.redirectUri, else http://127.0.0.1:<port>/oauth/<connection>/callback)')
  .option('--no-listen', 'do not listen: paste the URL the CRM redirected to (or just the code) on stdin')
  .option('--timeout <seconds>', 'give up after this long', (v: string) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0) throw new InvalidArgumentError('--timeout must be a positive whole number of seconds.');
    return n;
  }, 600)
  .action(async (connection: string, opts: { port?: number; redirectUri?: string; listen: boolean; timeout: number }) => {
    const { runAuthCommand } = await import('./crm/auth-command.js');
    await runAuthCommand({ connection, port: opts.port, redirectUri: opts.redirectUri, listen: opts.listen, timeoutSeconds: opts.timeout });
  });

/** Opens the database named by the environment (no connections file needed) for an admin command. */
async function withDatabase<T>(run: (db: import('./db/client.js').Db, database: import('./db/client.js').Database) => Promise<T>): Promise<T> {
  const { loadEnv } = await import('./config/load.js');
  const { openDatabase } = await import('./db/client.js');
  const { join } = await import('node:path');
  const env = loadEnv();
  const database = openDatabase({ url: env.DATABASE_URL, dataDir: join(env.DATA_DIR, 'pgdata'), max: 1 });
  try {
    await database.migrate();
    return await run(database.db, database);
  } finally {
    await database.close();
  }
}

program
  .command('migrate')
  .description('apply database migrations and exit (the server also applies them at start)')
  .action(async () => {
    const driver = await withDatabase(async (_db, database) => database.driver);
    process.stdout.write(`migrations applied (${driver})\n`);
  });

program
  .command('dead-letters')
  .description('list changes the intake pipeline refused or that ran out of retries, newest first')
  .option('-c, --connection <id>', 'only this connection')
  .option('-n, --limit <n>', 'how many to show', wholeNumber('--limit', Number.MAX_SAFE_INTEGER, 1), 50)
  .action(async (options: { connection?: string; limit: number }) => {
    const { printDeadLetters } = await import('./sync/dead-letters.js');
    await withDatabase((db) => printDeadLetters(db, { connectionId: options.connection, limit: options.limit }, (t) => process.stdout.write(t)));
  });

program
  .command('replay')
  .description('queue a dead letter for delivery again, with the same Idempotency-Key')
  .argument('<eventId>', 'the event id shown by `crm-bridge dead-letters`', (v: string) => {
    // Checked before any database is opened: a mistyped id is a usage error.
    if (!isUuid(v)) throw new InvalidArgumentError('the event id is a UUID, as listed by crm-bridge dead-letters.');
    return v;
  })
  .option('--force', 'replay even though a later change of the record was delivered: the pipeline gets the older version after the newer one')
  .action(async (eventId: string, options: { force?: boolean }) => {
    const { replayFromCli } = await import('./sync/dead-letters.js');
    const code = await withDatabase((db) => replayFromCli(db, eventId, (t) => process.stdout.write(t), { force: options.force === true }));
    if (code !== 0) process.exitCode = code;
  });

program
  .command('notifications')
  .description('list notified records (notification-mode hooks) not fetched from the CRM yet, oldest first; --drop gives up on one the CRM will never give')
  .option('-c, --connection <id>', 'only this connection (required with --drop)')
  .option('-n, --limit <n>', 'how many to show', wholeNumber('--limit', Number.MAX_SAFE_INTEGER, 1), 50)
  .option('--drop <object/id...>', 'stop fetching these records (as listed); the notification stays in the ledger')
  .action(async (options: { connection?: string; limit: number; drop?: string[] }) => {
    const { dropPendingFromCli, printPendingFetches } = await import('./sync/notifications-command.js');
    if (options.drop !== undefined) {
      if (options.connection === undefined) program.error('error: --drop needs --connection <id>', { exitCode: 2 });
      const code = await withDatabase((db) => dropPendingFromCli(db, options.connection!, options.drop!, (t) => process.stdout.write(t)));
      if (code !== 0) process.exitCode = code;
      return;
    }
    await withDatabase((db) => printPendingFetches(db, { connectionId: options.connection, limit: options.limit }, (t) => process.stdout.write(t)));
  });

program
  .command('prune')
  .description('delete the stored bodies of changes, and the fields of finished pipeline writes, older than RETENTION_DAYS now (the server does it daily); keys, versions and hashes stay')
  .action(async () => {
    const { loadEnv } = await import('./config/load.js');
    const { pruneFromCli } = await import('./sync/retention.js');
    const { hostname } = await import('node:os');
    const env = loadEnv();
    const code = await withDatabase((db) => pruneFromCli(db, { retentionDays: env.RETENTION_DAYS, owner: `cli:${hostname()}:${process.pid}` }, (t) => process.stdout.write(t)));
    if (code !== 0) process.exitCode = code;
  });

program
  .command('forget')
  .description('erase the stored bodies of one record (an erasure request) and print what was removed; the gate keeps recognising it')
  .argument('<connection>', 'the connection id')
  .argument('<crmId>', "the record's id in the CRM")
  .option('-o, --object <name>', 'the object (needed when the id exists under several)')
  .option('--force', 'also erase changes not yet delivered and pipeline writes not yet finished: the changes become dead letters and the writes not yet made fail, marked ERASED, instead of being sent')
  .action(async (connectionId: string, crmId: string, options: { object?: string; force?: boolean }) => {
    const { forgetFromCli } = await import('./sync/forget.js');
    const code = await withDatabase((db) => forgetFromCli(db, { connectionId, crmId, object: options.object, force: options.force === true }, (t) => process.stdout.write(t)));
    if (code !== 0) process.exitCode = code;
  });

/**
 * Ctrl-C or SIGTERM (a deploy, a cron timeout) stops a stream command's run where it is, so the
 * run records how far it got and gives its lease back instead of keeping the stream from the
 * server until the lease runs out. A second one kills the process as usual.
 */
function stopSignal(): AbortSignal {
  const stop = new AbortController();
  process.once('SIGINT', () => stop.abort());
  process.once('SIGTERM', () => stop.abort());
  return stop.signal;
}

/** The exit statuses of the one-shot stream commands, for their help. */
const streamExitStatus = (failed: string) => `
Exit status:
  0   every stream is done
  1   ${failed}
  2   a usage error
  ${EXIT_BUSY}  another process (the server, another crm-bridge command) was running a stream, so
      nothing was read for it; try again when it ends
Each stream's lease is given back when its run ends, done, failed or stopped (Ctrl-C, SIGTERM).`;

program
  .command('poll')
  .description('poll a connection now: read what changed since its cursor and pass it through the change gate')
  .argument('<connection>', 'the connection id from the connections file')
  .option('--once', 'one pass over each stream, then exit (without it: keep polling on the interval until Ctrl-C)')
  .option('-o, --object <name>', 'only this object (default: every polled object)')
  .addHelpText('after', streamExitStatus('a stream failed'))
  .action(async (connectionId: string, options: { once?: boolean; object?: string }) => {
    const { runPollCommand } = await import('./sync/poll-command.js');
    const code = await runPollCommand({ connectionId, object: options.object, kind: 'poll', follow: !options.once, signal: stopSignal(), print: (t) => process.stdout.write(t) });
    if (code !== 0) process.exitCode = code;
  });

program
  .command('sweep')
  .description('list every record id of a connection and reconcile with the ledger: unseen records are processed, vanished ones become deletes')
  .argument('<connection>', 'the connection id from the connections file')
  .option('-o, --object <name>', 'only this object (default: every polled object)')
  .option('--allow-deletes', 'make the deletes even when more records vanished at once than poll.sweepDeleteLimit lets a sweep delete by itself (after checking the CRM really lost them)')
  .addHelpText('after', streamExitStatus('a stream failed'))
  .action(async (connectionId: string, options: { object?: string; allowDeletes?: boolean }) => {
    const { runPollCommand } = await import('./sync/poll-command.js');
    const code = await runPollCommand({ connectionId, object: options.object, kind: 'sweep', allowDeletes: options.allowDeletes === true, signal: stopSignal(), print: (t) => process.stdout.write(t) });
    if (code !== 0) process.exitCode = code;
  });

program
  .command('backfill')
  .description('re-read every record (or those changed since --since) through the poller and the change gate, with a progress bar; an interrupted backfill continues where it stopped')
  .argument('<connection>', 'the connection id from the connections file')
  .option('-o, --object <name>', 'only this object (default: every polled object)')
  .option('--since <date>', 'only records changed at or after this ISO-8601 date or time (default: everything)', (v: string) => {
    const at = new Date(v);
    if (!/^\d{4}-\d{2}-\d{2}/.test(v) || Number.isNaN(at.getTime())) throw new InvalidArgumentError('--since must be an ISO-8601 date or time, e.g. 2024-01-31 or 2024-01-31T12:00:00Z.');
    return at;
  })
  .addHelpText('after', streamExitStatus('a stream failed, or was stopped (Ctrl-C: run it again to continue)'))
  .action(async (connectionId: string, options: { object?: string; since?: Date }) => {
    const { runBackfillCommand } = await import('./sync/backfill-command.js');
    const code = await runBackfillCommand({
      connectionId,
      object: options.object,
      since: options.since,
      signal: stopSignal(),
      columns: process.stdout.isTTY ? process.stdout.columns : 0,
      print: (t) => process.stdout.write(t),
    });
    if (code !== 0) process.exitCode = code;
  });

program
  .command('status')
  .description('what /health says, as a table: auth, last poll and hook, deliveries, dead letters, caught by poll (exit 1 when unhealthy)')
  .option('--url <url>', 'ask a running bridge (e.g. http://127.0.0.1:3000) instead of reading the configured database', (v: string) => {
    if (!/^https?:\/\/[^/]/.test(v)) throw new InvalidArgumentError('--url must be an http:// or https:// URL.');
    return v;
  })
  .action(async (options: { url?: string }) => {
    const { runStatusCommand } = await import('./status-command.js');
    const code = await runStatusCommand({ url: options.url, print: (t) => process.stdout.write(t) });
    if (code !== 0) process.exitCode = code;
  });

program
  .command('probe')
  .description("fetch one live record through the connection's auth and check it against the connector definition (exit 1 on a mismatch)")
  .argument('<connection>', 'the connection id from the connections file')
  .option('-o, --object <name>', 'the object to probe (default: the connector\'s first object, e.g. matters)')
  .action(async (connectionId: string, options: { object?: string }) => {
    const { runProbeCommand } = await import('./crm/probe.js');
    const code = await runProbeCommand({ connectionId, ...(options.object ? { object: options.object } : {}), print: (t) => process.stdout.write(t) });
    if (code !== 0) process.exitCode = code;
  });

try {
  await program.parseAsync(process.argv);
} catch (err) {
  if (err instanceof CommanderError) {
    process.exit(err.exitCode === 0 ? 0 : 2);
  }
  if (err instanceof ConfigError) {
    process.stderr.write(`${err.message}\n`);
    process.exit(2);
  }
  if (err instanceof AppError && err.statusCode < 500) {
    // An operator's mistake (unknown connection or object): one line, no stack.
    process.stderr.write(`crm-bridge: ${err.message}\n`);
    process.exit(2);
  }
  // A wrapped failure (drizzle's "Failed query") says why in its causes.
  const reasons = [(err as Error).message];
  for (let cause = (err as Error).cause; cause instanceof Error && reasons.length < 4; cause = cause.cause) reasons.push(cause.message);
  process.stderr.write(`crm-bridge: ${reasons.join('\n  because: ')}\n`);
  process.exit(1);
}
