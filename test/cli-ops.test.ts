import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase, type Database } from '../src/db/client.js';
import { streamCursors } from '../src/db/schema/index.js';
import { startSandbox, type Sandbox } from '../src/sandbox/index.js';
import { buildTestApp, SECRET } from './helpers/app.js';
import { clioConnection, TEST_TOKEN_KEY, timeOrderedConnector } from './helpers/bridge.js';
import { crmBridge } from './helpers/cli.js';
import { createTestDatabase } from './helpers/database.js';

let sandbox: Sandbox;
// The CLI runs on the embedded database, or on a fresh Postgres database when DATABASE_URL is set.
const database = process.env.DATABASE_URL ? await createTestDatabase() : undefined;
const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-cli-ops-'));
const config = join(dir, 'connections.json');

beforeAll(async () => {
  sandbox = await startSandbox({ records: 80 });
  writeFileSync(
    config,
    JSON.stringify({
      connections: [
        clioConnection(sandbox, { poll: { pageSize: 10 } }),
        clioConnection(sandbox, { id: 'ordered', connector: timeOrderedConnector, poll: { pageSize: 5, lookback: '0s' } }),
        // Clio's own listing, by id: an interrupted backfill goes on from the saved page link.
        clioConnection(sandbox, { id: 'paged', poll: { pageSize: 10 } }),
        // A vendor "API key" the CRM never issued: it answers 401.
        clioConnection(sandbox, { id: 'keyed', auth: { type: 'static', token: 'a-key-the-crm-never-issued' } }),
      ],
    }),
  );
});
afterAll(async () => {
  await sandbox.close();
  await database?.close();
});

/**
 * Runs `crm-bridge <args>` on the embedded database in DATA_DIR (or the test's Postgres database)
 * with the connections file `config` unless another is given; `stopWhen` sends SIGINT once the
 * output matches.
 */
function cli(args: string[], options: { stopWhen?: RegExp; config?: string } = {}): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, crmBridge(...args), {
      env: { ...process.env, CRM_BRIDGE_CONFIG: options.config ?? config, DATA_DIR: dir, TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY, DATABASE_URL: database?.url ?? '' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let stopped = false;
    const take = (d: Buffer) => {
      out += d;
      if (options.stopWhen && !stopped && options.stopWhen.test(out)) {
        stopped = true;
        child.kill('SIGINT');
      }
    };
    child.stdout.on('data', take);
    child.stderr.on('data', take);
    child.on('exit', (code) => resolve({ code, out }));
  });
}

/** The database the CLI runs on, opened here between commands (the embedded one takes one process at a time). */
async function withCliDatabase<T>(run: (db: Database) => Promise<T>): Promise<T> {
  if (database) return run(database);
  const embedded = openDatabase({ dataDir: join(dir, 'pgdata') });
  await embedded.migrate();
  try {
    return await run(embedded);
  } finally {
    await embedded.close();
  }
}

describe('crm-bridge status', () => {
  it('prints a table of what /health says, before and after a poll', async () => {
    const before = await cli(['status']);
    expect(before.out).toMatch(/^crm-bridge: (ok|degraded) \(database ok\)$/m);
    expect(before.out).toMatch(/^connection\s+auth\s+last poll\s+last hook\s+pending\s+dead\s+caught by poll\s+state$/m);
    expect(before.out).toMatch(/^firm\s+none\s+never\s+never\s+0\s+0\s+0\s+ok$/m);

    expect((await cli(['poll', 'firm', '--once'])).code).toBe(0);
    const after = await cli(['status']);
    expect(after.code).toBe(0);
    expect(after.out).toMatch(/^firm\s+ok\s+\d+s ago\s+never\s+\d+\s+0\s+0\s+ok$/m);
  }, 60_000);

  it('asks a running bridge with --url, and says so in one line when none answers', async () => {
    const down = await cli(['status', '--url', 'http://127.0.0.1:9']);
    expect(down.code).toBe(1);
    expect(down.out.trim().split('\n')).toHaveLength(1);
    expect(down.out).toMatch(/cannot reach http:\/\/127\.0\.0\.1:9/);
  });

  it('says "poll stale" (exit 1), as /health answers 503, for a poll that has not succeeded since it was set up an hour ago, whenever the server was started', async () => {
    // A poll that has never once succeeded (a wrong baseUrl, a CRM answering 500), its first run an hour ago.
    const failing = { id: 'failing', connector: 'clio', baseUrl: 'http://127.0.0.1:9', inbound: { secrets: [SECRET] }, poll: { objects: ['matters'], interval: '1m', staleAfter: '10m' } };
    const failingConfig = join(dir, 'failing.json');
    writeFileSync(failingConfig, JSON.stringify({ connections: [failing] }));
    const hourAgo = new Date(Date.now() - 3_600_000);
    await withCliDatabase(async (cliDatabase) => {
      await cliDatabase.db.insert(streamCursors).values({ connectionId: 'failing', object: 'matters', createdAt: hourAgo, lastAttemptAt: hourAgo, lastError: 'CRM_HTTP_503' });
      // A server started just now (a restart) does not give the poll another staleAfter.
      const app = await buildTestApp({ database: cliDatabase, connections: [failing] });
      try {
        const health = await app.inject({ url: '/health' });
        expect(health.statusCode).toBe(503);
        expect(health.json().connections[0].poll.stale).toBe(true);
      } finally {
        await app.close();
      }
    });

    const status = await cli(['status'], { config: failingConfig });
    expect(status.out).toMatch(/^failing\s.*poll stale/m);
    expect(status.code).toBe(1);
  }, 60_000);

  it('tells an operator to replace a static token the CRM refused, not to run crm-bridge auth (which cannot authorise one)', async () => {
    const polled = await cli(['poll', 'keyed', '--once']);
    expect(polled.code).toBe(1);
    const replace = /replace the token \(`auth\.token`\) of connection keyed in the configuration, then restart crm-bridge/;
    expect(polled.out).toMatch(new RegExp(`keyed/matters: poll failed: NEEDS_REAUTH.*${replace.source}`));
    // The log line says so too.
    expect(polled.out).toMatch(new RegExp(`"msg":"connection keyed needs re-authorisation.*polling pauses until then: ${replace.source}`));
    expect(polled.out).not.toMatch(/crm-bridge auth/);

    const status = await cli(['status']);
    expect(status.code).toBe(1);
    expect(status.out).toMatch(new RegExp(`^keyed\\s+needs_reauth\\s.*${replace.source}`, 'm'));
    expect(status.out).not.toMatch(/crm-bridge auth/);
    // The CRM answered 401: no "(HTTP 503)", the bridge's own code for NEEDS_REAUTH, as if the CRM had said it.
    expect(polled.out).not.toMatch(/NEEDS_REAUTH \(HTTP/);
    expect(status.out).toMatch(/poll error: NEEDS_REAUTH(;|$)/m);
  }, 60_000);

  it('shows no HTTP status for a CRM that never answered, not the 502 the bridge maps it to', async () => {
    const unreachableConfig = join(dir, 'unreachable.json');
    writeFileSync(unreachableConfig, JSON.stringify({ connections: [{ id: 'unreachable', connector: 'clio', baseUrl: 'http://127.0.0.1:9', inbound: { secrets: [SECRET] }, poll: { objects: ['matters'] } }] }));
    const polled = await cli(['poll', 'unreachable', '--once'], { config: unreachableConfig });
    expect(polled.code).toBe(1);
    expect(polled.out).toMatch(/^unreachable\/matters: poll failed: CRM_UNREACHABLE$/m);
    const status = await cli(['status'], { config: unreachableConfig });
    expect(status.out).toMatch(/^unreachable\s.*poll error: CRM_UNREACHABLE$/m);
    expect(`${polled.out}${status.out}`).not.toMatch(/HTTP 502/);
  }, 60_000);
});

describe('crm-bridge backfill', () => {
  it('re-reads every record with progress and a summary; a second backfill starts over and finds only duplicates', async () => {
    const first = await cli(['backfill', 'firm']);
    expect(first.code).toBe(0);
    expect(first.out).toMatch(/backfill firm\/matters: page 1, 10\/40 records, \d+ new, \d+ records\/s ETA \d+s/);
    expect(first.out).toMatch(/firm\/matters: backfill done: 40 record\(s\) read in \d+s/);
    const again = await cli(['backfill', 'firm', '--object', 'matters']);
    expect(again.code).toBe(0);
    expect(again.out).not.toMatch(/resuming/);
    expect(again.out).toMatch(/backfill done: 40 record\(s\) read .*: nothing new|backfill done: 40 record\(s\) read [^:]*: (\d+ (unchanged|duplicate)(, )?)+$/m);
  }, 60_000);

  it('stops on Ctrl-C with what it committed, and the next run continues from its checkpoint instead of starting over', async () => {
    sandbox.state.setSwitches({ latencyMs: 150 });
    try {
      const stopped = await cli(['backfill', 'ordered'], { stopWhen: /page 2,/ });
      expect(stopped.code).toBe(1);
      expect(stopped.out).toMatch(/ordered\/matters: backfill stopped after (\d+) record\(s\): ABORTED.*run the same command again to continue/);
      const readBefore = Number(/stopped after (\d+) record/.exec(stopped.out)![1]);
      expect(readBefore).toBeGreaterThanOrEqual(10);

      const resumed = await cli(['backfill', 'ordered']);
      expect(resumed.code).toBe(0);
      expect(resumed.out).toMatch(/ordered\/matters: resuming the backfill from \S+/);
      const readAfter = Number(/backfill done: (\d+) record/.exec(resumed.out)![1]);
      // The rest of the 40 matters, plus at most the page it checkpointed at (the cursor is inclusive).
      expect(readAfter).toBeLessThan(40);
      expect(readBefore + readAfter).toBeGreaterThanOrEqual(40);
    } finally {
      sandbox.state.setSwitches({ latencyMs: 0 });
    }
  }, 60_000);

  it('resumes an interrupted Clio backfill from the page it saved, and says so instead of "starting again" at "page 1"', async () => {
    sandbox.state.setSwitches({ latencyMs: 150 });
    try {
      const stopped = await cli(['backfill', 'paged'], { stopWhen: /page 2,/ });
      expect(stopped.code).toBe(1);
      const readBefore = Number(/paged\/matters: backfill stopped after (\d+) record/.exec(stopped.out)![1]);
      expect(readBefore).toBeGreaterThanOrEqual(20);

      const since = sandbox.state.requestLog.lastSeq;
      const resumed = await cli(['backfill', 'paged']);
      expect(resumed.code).toBe(0);
      expect(resumed.out).toMatch(/^paged\/matters: resuming the backfill from the page an earlier run saved/m);
      expect(resumed.out).not.toMatch(/starting again/);
      expect(resumed.out).toMatch(/^backfill paged\/matters: page 1 since resuming, 10 records since resuming, 10 new/m);
      // The CRM's request log: the rerun's first listing asked for the saved page, not the first one.
      const [first] = sandbox.state.requestLog.list({ since, method: 'GET', pathPrefix: '/api/v4/matters.json' });
      expect(first?.query.page_token).toEqual(expect.any(String));
      const readAfter = Number(/paged\/matters: backfill done: (\d+) record\(s\) since resuming read/.exec(resumed.out)![1]);
      expect(readBefore + readAfter).toBe(40);
    } finally {
      sandbox.state.setSwitches({ latencyMs: 0 });
    }
  }, 60_000);

  it('answers bad arguments with one line, the usage and exit status 2', async () => {
    // Refused before any database is opened: run side by side.
    const [badDate, missing, unknown, object, url, drop, eventId] = await Promise.all([
      cli(['backfill', 'firm', '--since', 'last tuesday']),
      cli(['backfill']),
      cli(['backfill', 'nope']),
      cli(['backfill', 'firm', '--object', 'invoices']),
      cli(['status', '--url', 'ftp://x']),
      cli(['notifications', '--drop', 'matters/1']),
      cli(['replay', '0b6f-not-a-uuid']),
    ]);
    expect(badDate.code).toBe(2);
    expect(badDate.out).toMatch(/--since must be an ISO-8601 date/);
    expect(badDate.out).toMatch(/Usage: crm-bridge backfill/);

    expect(missing.code).toBe(2);
    expect(missing.out).toMatch(/missing required argument 'connection'/);

    expect(unknown.code).toBe(2);
    expect(unknown.out.trim().split('\n')).toHaveLength(1);
    expect(unknown.out).toMatch(/no connection "nope"/);

    expect(object.code).toBe(2);
    expect(object.out).toMatch(/cannot list "invoices"/);

    expect(url.code).toBe(2);
    expect(url.out).toMatch(/--url must be an http/);

    expect(drop.code).toBe(2);
    expect(drop.out).toMatch(/--drop needs --connection <id>/);

    expect(eventId.code).toBe(2);
    expect(eventId.out).toMatch(/the event id is a UUID, as listed by crm-bridge dead-letters/);
    expect(eventId.out).toMatch(/Usage: crm-bridge replay/);
  }, 60_000);

  it('answers a --limit of dead-letters or notifications that is not a whole number of at least 1 with a usage error (exit 2), not an empty list', async () => {
    // Refused before any database is opened: run side by side.
    const cases = ['dead-letters', 'notifications'].flatMap((command) => ['all', '0', '-5', '2.5'].map((limit) => ({ command, limit })));
    const answers = await Promise.all(cases.map(({ command, limit }) => cli([command, '--limit', limit])));
    cases.forEach(({ command, limit }, i) => {
      const res = answers[i]!;
      expect({ command, limit, code: res.code }).toEqual({ command, limit, code: 2 });
      expect(res.out).toMatch(/--limit must be a whole number of at least 1/);
      expect(res.out).toMatch(new RegExp(`Usage: crm-bridge ${command}`));
      expect(res.out).not.toMatch(/no dead letters|no notified records/);
    });
    expect((await cli(['dead-letters', '--limit', '1'])).code).toBe(0);
  }, 120_000);

  it('lists notified records waiting to be fetched: none on a connection fed by full hooks', async () => {
    const listed = await cli(['notifications']);
    expect(listed.code).toBe(0);
    expect(listed.out).toContain('no notified records waiting to be fetched');
    const dropped = await cli(['notifications', '--connection', 'firm', '--drop', 'matters/1']);
    expect(dropped.code).toBe(1);
    expect(dropped.out).toContain('firm: no notified record matters/1 waiting to be fetched');
  }, 30_000);

  it('has --help for backfill and status', async () => {
    const commands = ['backfill', 'status'];
    const helps = await Promise.all(commands.map((command) => cli([command, '--help'])));
    commands.forEach((command, i) => {
      expect(helps[i]!.code).toBe(0);
      expect(helps[i]!.out).toMatch(new RegExp(`Usage: crm-bridge ${command}`));
    });
  }, 30_000);
});
