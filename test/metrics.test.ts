import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase, type Database } from '../src/db/client.js';
import { backfillKey } from '../src/sync/backfill-command.js';
import { connectorForConnection } from '../src/crm/connector.js';
import { pollStream, runOnce } from '../src/sync/poller.js';
import { startBridge, timeOrderedConnector } from './helpers/bridge.js';
import { buildTestApp, SECRET } from './helpers/app.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';

const METRICS_TOKEN = 'metrics-token-0123456789';

/** The value of one sample line, e.g. `crm_bridge_changes_total{connection="acme",...}`. */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split('\n')) {
    if (!line.startsWith(`${name}{`) && !line.startsWith(`${name} `)) continue;
    if (Object.entries(labels).every(([k, v]) => line.includes(`${k}="${v}"`))) return Number(line.slice(line.lastIndexOf(' ') + 1));
  }
  return undefined;
}

describe('GET /metrics', () => {
  let database: Database;
  beforeAll(async () => {
    database = await createTestDatabase();
  });
  afterAll(() => database.close());

  it('counts hook changes by disposition and hook auth failures, labelled by configured connection only, with process metrics', async () => {
    await resetDatabase(database);
    const app = await buildTestApp({ database });
    try {
      const hook = (payload: object, authorization = `Bearer ${SECRET}`, connection = 'acme') =>
        app.inject({ method: 'POST', url: `/hooks/${connection}`, headers: { authorization }, payload });
      expect((await hook({ id: 7, updated_at: '2024-01-01T00:00:00Z', display_number: 'Jane Doe' })).statusCode).toBe(202);
      expect((await hook({ id: 7, updated_at: '2024-01-01T00:00:00Z', display_number: 'Jane Doe' })).statusCode).toBe(200);
      expect((await hook({ id: 8 }, 'Bearer wrong-secret-0123456789')).statusCode).toBe(401);
      expect((await hook({ id: 8 }, `Bearer ${SECRET}`, 'attacker-chosen-name')).statusCode).toBe(401);

      const res = await app.inject({ url: '/metrics' });
      expect(res.statusCode).toBe(200);
      expect(res.headers['content-type']).toMatch(/^text\/plain/);
      const text = res.body;
      expect(sample(text, 'crm_bridge_changes_total', { connection: 'acme', object: 'matters', source: 'hook', disposition: 'accepted' })).toBe(1);
      expect(sample(text, 'crm_bridge_changes_total', { connection: 'acme', source: 'hook', disposition: 'duplicate' })).toBe(1);
      expect(sample(text, 'crm_bridge_hook_auth_failures_total', { connection: 'acme' })).toBe(1);
      expect(sample(text, 'crm_bridge_hook_auth_failures_total', { connection: 'unknown' })).toBe(1);
      expect(sample(text, 'crm_bridge_outbox_depth', { connection: 'acme', state: 'pending' })).toBe(1);
      expect(sample(text, 'crm_bridge_outbox_depth', { connection: 'acme', state: 'dead' })).toBe(0);
      expect(text).toMatch(/^process_cpu_user_seconds_total /m);
      expect(text).toMatch(/^nodejs_eventloop_lag_seconds /m);
      // Labels carry configured names and enums only: never a record id, a name or a caller's text.
      expect(text).not.toContain('attacker-chosen-name');
      expect(text).not.toContain('Jane');
      expect(text).not.toMatch(/="7"/);
    } finally {
      await app.close();
    }
  });

  it('still answers when the database is down: counters and process metrics, crm_bridge_database_up 0, and no gauge read from the database', async () => {
    await resetDatabase(database);
    const up = await buildTestApp({ database });
    try {
      const text = (await up.inject({ url: '/metrics' })).body;
      expect(sample(text, 'crm_bridge_database_up', {})).toBe(1);
      expect(sample(text, 'crm_bridge_outbox_depth', { connection: 'acme', state: 'pending' })).toBe(0);
    } finally {
      await up.close();
    }

    const broken = openDatabase(process.env.DATABASE_URL ? { url: 'postgres://postgres@127.0.0.1:1/none', max: 1 } : { dataDir: 'memory://' });
    const app = await buildTestApp({ database: { ...database, db: broken.db, migrate: async () => {} } });
    await broken.close();
    try {
      expect((await app.inject({ method: 'POST', url: '/hooks/acme', headers: { authorization: 'Bearer wrong-secret-0123456789' }, payload: { id: 1 } })).statusCode).toBe(401);
      const res = await app.inject({ url: '/metrics' });
      expect(res.statusCode).toBe(200);
      expect(sample(res.body, 'crm_bridge_database_up', {})).toBe(0);
      // What the process counted itself is still there for Prometheus, and nothing claims a depth of 0.
      expect(sample(res.body, 'crm_bridge_hook_auth_failures_total', { connection: 'acme' })).toBe(1);
      expect(res.body).toMatch(/^process_cpu_user_seconds_total /m);
      expect(res.body).not.toMatch(/^crm_bridge_(outbox_depth|poll_lag_seconds|poll_last_success_age_seconds|caught_by_poll|sweep_held_deletes)\{/m);
    } finally {
      await app.close();
    }
  });

  it('keeps each app’s counts apart (one registry per app)', async () => {
    const first = await buildTestApp({ database });
    const second = await buildTestApp({ database });
    try {
      await first.inject({ method: 'POST', url: '/hooks/acme', headers: { authorization: 'Bearer nope-nope-nope-nope' }, payload: {} });
      expect(sample((await first.inject({ url: '/metrics' })).body, 'crm_bridge_hook_auth_failures_total', { connection: 'acme' })).toBe(1);
      expect(sample((await second.inject({ url: '/metrics' })).body, 'crm_bridge_hook_auth_failures_total', { connection: 'acme' })).toBeUndefined();
    } finally {
      await first.close();
      await second.close();
    }
  });

  it('requires the bearer when METRICS_TOKEN is set, with the usual 401 body', async () => {
    const app = await buildTestApp({ database, env: { METRICS_TOKEN } });
    try {
      const none = await app.inject({ url: '/metrics' });
      const wrong = await app.inject({ url: '/metrics', headers: { authorization: 'Bearer wrong-token-0123456789' } });
      expect(none.statusCode).toBe(401);
      expect(wrong.statusCode).toBe(401);
      expect(wrong.body).toBe(none.body);
      const ok = await app.inject({ url: '/metrics', headers: { authorization: `Bearer ${METRICS_TOKEN}` } });
      expect(ok.statusCode).toBe(200);
      expect(ok.body).toContain('crm_bridge_outbox_depth');
    } finally {
      await app.close();
    }
  });

  it('gives a stream that has never polled successfully an age from its first run, as /health counts it, so the stale-poll alert fires', async () => {
    await resetDatabase(database);
    const bridge = await startBridge({ database, connection: { poll: { objects: ['matters'] } } });
    try {
      const { app, sandbox } = bridge;
      // Set up against a CRM that has never answered: every run fails.
      sandbox.state.setSwitches({ errorRate: 1 });
      const stream = app.poller.stream('firm', 'matters');
      const failed = await pollStream({ ...stream, connector: connectorForConnection(stream.connection, { tokens: app.tokens.get('firm')!, http: { maxRetries: 0 } }) });
      expect(failed.status).toBe('failed');
      await new Promise((resolve) => setTimeout(resolve, 1_100));
      const age = sample((await app.inject({ url: '/metrics' })).body, 'crm_bridge_poll_last_success_age_seconds', { connection: 'firm', object: 'matters' });
      expect(age).toBeGreaterThanOrEqual(1);
    } finally {
      await bridge.close();
    }
  });

  it('shows only the streams the poller runs: a backfill stopped part-way (Ctrl-C) is not a poll stream years behind', async () => {
    await resetDatabase(database);
    const bridge = await startBridge({ database, sandbox: { records: 80 }, connection: { connector: timeOrderedConnector, poll: { objects: ['matters'], pageSize: 5, lookback: '0s' } } });
    try {
      const { app } = bridge;
      // The scheduled poll is healthy and current.
      await app.poller.daemons[0]!.tick(new AbortController().signal);
      // `crm-bridge backfill firm` stopped after its first page, run as runBackfillCommand runs it: its checkpoint stays.
      const stop = new AbortController();
      const report = await runOnce('poll', app.poller.stream('firm', 'matters'), { cursorKey: backfillKey('matters'), countCaught: false, signal: stop.signal, onPage: () => stop.abort() });
      expect(report.status).toBe('failed');

      const text = (await app.inject({ url: '/metrics' })).body;
      const streams = text.split('\n').filter((l) => /^crm_bridge_(poll_lag_seconds|poll_last_success_age_seconds|caught_by_poll|sweep_held_deletes)\{/.test(l));
      expect(streams.filter((l) => l.includes('#backfill'))).toEqual([]);
      expect(sample(text, 'crm_bridge_poll_lag_seconds', { connection: 'firm', object: 'matters' })).toBeGreaterThanOrEqual(0);
    } finally {
      await bridge.close();
    }
  }, 60_000);

  it('records poll runs (duration, changes by source, lag), token refreshes and delivery outcomes against the sandbox', async () => {
    await resetDatabase(database);
    // A pipeline that takes the first change and refuses the next with a 422 (a dead letter).
    let received = 0;
    const pipeline: Server = createServer((req, res) => {
      req.resume();
      req.on('end', () => {
        received++;
        res.writeHead(received === 1 ? 200 : 422).end();
      });
    });
    await new Promise<void>((resolve) => pipeline.listen(0, '127.0.0.1', resolve));
    const { port } = pipeline.address() as AddressInfo;
    const bridge = await startBridge({
      database,
      sandbox: { records: 6 },
      connection: { downstream: { url: `http://127.0.0.1:${port}/intake`, maxAttempts: 1 } },
    });
    try {
      const { app } = bridge;
      await app.poller.daemons[0]!.tick(new AbortController().signal);
      const worker = app.deliveryWorkers.get('firm')!;
      while (await worker.tick(new AbortController().signal)) {
        /* drain */
      }
      await worker.tick(new AbortController().signal);
      const text = (await app.inject({ url: '/metrics' })).body;
      const polled = sample(text, 'crm_bridge_changes_total', { connection: 'firm', object: 'matters', source: 'poll', disposition: 'accepted' });
      expect(polled).toBeGreaterThan(0);
      expect(sample(text, 'crm_bridge_poll_duration_seconds_count', { connection: 'firm', object: 'matters', kind: 'poll', status: 'ok' })).toBe(1);
      expect(sample(text, 'crm_bridge_poll_lag_seconds', { connection: 'firm', object: 'matters' })).toBeGreaterThanOrEqual(0);
      expect(sample(text, 'crm_bridge_poll_last_success_age_seconds', { connection: 'firm', object: 'matters' })).toBeLessThan(60);
      expect(sample(text, 'crm_bridge_token_refreshes_total', { connection: 'firm', outcome: 'refreshed' })).toBeGreaterThanOrEqual(1);
      expect(sample(text, 'crm_bridge_deliveries_total', { connection: 'firm', outcome: 'delivered' })).toBe(1);
      expect(sample(text, 'crm_bridge_deliveries_total', { connection: 'firm', outcome: 'dead' })).toBe(polled! - 1);
      expect(sample(text, 'crm_bridge_outbox_depth', { connection: 'firm', state: 'dead' })).toBe(polled! - 1);
    } finally {
      await bridge.close();
      await new Promise((resolve) => pipeline.close(resolve));
    }
  }, 30_000);
});
