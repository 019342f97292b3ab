// Replicas on one Postgres where a slow CRM call, a graceful stop or a dropped connection meets
// work another replica takes over: a pipeline lead must be made once, and a rotated refresh
// token must never be lost (a CRM that detects its reuse revokes the whole grant); and where one
// replica's clock is wrong, which the schedules and /health must not follow.
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import postgres from 'postgres';
import { pino } from 'pino';
import { pollStream, sweepStream } from '../src/sync/poller.js';
import { afterAll, beforeEach, describe, expect, it, vi } from 'vitest';
import { buildApp } from '../src/app.js';
import { loadConfig } from '../src/config/load.js';
import { createTokenManager } from '../src/crm/token-manager.js';
import { openDatabase } from '../src/db/client.js';
import { outboundWrites, streamCursors, tokens } from '../src/db/schema/index.js';
import { startSandbox, type Sandbox } from '../src/sandbox/index.js';
import { authorise, callApi, oauthAuth, TEST_KEY, testCipher } from './fixtures/token-helpers.js';
import { buildTestApp, SECRET } from './helpers/app.js';
import { clioConnection, startBridge, TEST_TOKEN_KEY } from './helpers/bridge.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';
import { startFaultProxy } from './helpers/fault-proxy.js';

// Two replicas need two pools on one server: Postgres only (PGlite has one connection).
const onPostgres = Boolean(process.env.DATABASE_URL);
const database = await createTestDatabase();
afterAll(() => database.close());
beforeEach(() => resetDatabase(database));

const revokedGrants = (sandbox: Sandbox) => sandbox.state.oauth.listGrants().filter((g) => g.revokedAt !== null).map((g) => g.revokedReason);

describe.skipIf(!onPostgres)('replicas on one Postgres', () => {
  it('makes a pipeline lead once when the CRM holds its create back for longer than the write lease', async () => {
    const sandbox = await startSandbox({ records: 20 });
    // The first two creates are answered 429 with Retry-After 2 s: the first writer's call lasts over 4 s; its lease is 3 s.
    let refused = 0;
    const proxy = await startFaultProxy({
      target: sandbox.url,
      fail: (req) => (req.method === 'POST' && req.url!.startsWith('/api/v4/matters.json') && refused++ < 2 ? { status: 429, headers: { 'retry-after': '2' } } : undefined),
    });
    const replicaB = openDatabase({ url: database.url!, max: 4 });
    const apps: FastifyInstance[] = [];
    try {
      const apiKey = 'pipeline-api-key-0123456789';
      const conn = clioConnection(sandbox, { baseUrl: proxy.url, outbound: { apiKeys: [apiKey], lease: '3s', maxAttempts: 5, backoff: { base: '1ms', max: '5ms' } } });
      const env = { TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY };
      const a = await buildTestApp({ database, connections: [conn], env });
      apps.push(a);
      const b = await buildTestApp({ database: replicaB, connections: [conn], env });
      apps.push(b);
      const res = await a.inject({
        method: 'POST',
        url: '/v1/connections/firm/records',
        headers: { authorization: `Bearer ${apiKey}`, 'content-type': 'application/json', 'idempotency-key': 'lead-1' },
        payload: JSON.stringify({ object: 'matters', externalId: 'lead-1', fields: { description: 'Intake lead', status: 'Open', clientId: 100000001 } }),
      });
      expect(res.statusCode).toBe(202);
      const { outboundId } = res.json() as { outboundId: string };

      const signal = new AbortController().signal;
      // Replica A claims the write and waits as the CRM asked (Retry-After); B's writer ticks
      // once A's first lease would have run out.
      const first = a.outboundWriters.get('firm')!.tick(signal);
      await sleep(3_300);
      const second = b.outboundWriters.get('firm')!.tick(signal);
      await Promise.allSettled([first, second]);

      const made = sandbox.state.store.matters.items.filter((m) => m.clientReference === `crm-bridge:${outboundId}`);
      const [row] = await database.db.select().from(outboundWrites).where(eq(outboundWrites.id, outboundId));
      expect({ made: made.length, state: row!.state }).toEqual({ made: 1, state: 'sent' });
    } finally {
      for (const app of apps) await app.close();
      await replicaB.close();
      await proxy.close();
      await sandbox.close();
    }
  }, 30_000);

  it('keeps the rotated refresh token when a replica is stopped (SIGTERM) while its refresh is in flight', async () => {
    const sandbox = await startSandbox({ records: 5 });
    sandbox.state.setSwitches({ autoApprove: true, rotateRefreshTokens: true });
    // The CRM acts on the refresh at once (rotating the refresh token); its answer is held on the
    // way back until the replica has been told to stop.
    let holdNext = false;
    let held: (() => void) | undefined;
    const proxy = await startFaultProxy({
      target: sandbox.url,
      answer: async (req) => {
        if (holdNext && req.method === 'POST' && req.url!.startsWith('/oauth/token')) {
          holdNext = false;
          await new Promise<void>((resolve) => (held = resolve));
        }
        return false;
      },
    });
    try {
      const auth = oauthAuth({ tokenUrl: `${proxy.url}/oauth/token`, authorizeUrl: `${sandbox.url}/oauth/authorize` });
      const connection = { id: 'acme', connector: 'clio', baseUrl: sandbox.url, auth, inbound: { secrets: [SECRET], recordPath: 'data', object: 'matters' } };
      // Replica A as `crm-bridge serve` builds it: the app opens, and on close closes, its own pool.
      const config = loadConfig(
        { LOG_LEVEL: 'silent', DATA_DIR: mkdtempSync(join(tmpdir(), 'crm-bridge-replica-')), DATABASE_URL: database.url!, TOKEN_ENCRYPTION_KEY: TEST_KEY },
        { connections: [connection] },
      );
      const a = await buildApp({ config, loggerInstance: pino({ level: 'silent' }) });
      await authorise(a.tokens.manager('acme')!);
      const current = await a.tokens.get('acme')!.getAccessToken();
      sandbox.state.expireAccessTokens();
      holdNext = true;
      const pollersCall = a.tokens.get('acme')!.handleUnauthorized(current).catch((err: Error) => err);
      for (let i = 0; i < 200 && held === undefined; i++) await sleep(10);
      expect(held).toBeDefined();

      // SIGTERM: what server.ts does (closeWithGrace → app.close()); the answer arrives meanwhile.
      const closing = a.close();
      await sleep(500);
      held!();
      await closing;
      await pollersCall;

      // Replica B, on the same database, needs a token later.
      await database.db.update(tokens).set({ expiresAt: new Date(Date.now() - 1_000) }).where(eq(tokens.connectionId, 'acme'));
      const b = createTokenManager(database.db, { id: 'acme', auth, baseUrl: sandbox.url }, { cipher: testCipher(), instanceId: 'b', backoffBaseMs: 5, backoffMaxMs: 50 });
      const call = await callApi(sandbox, b).then(
        (c) => c.status,
        (err: Error) => err.message.slice(0, 80),
      );
      expect({ call, revoked: revokedGrants(sandbox) }).toEqual({ call: 200, revoked: [] });
    } finally {
      await proxy.close();
      await sandbox.close();
    }
  }, 30_000);

  it('keeps the rotated refresh token when the connection drops while it is being stored', async () => {
    const sandbox = await startSandbox({ records: 5 });
    sandbox.state.setSwitches({ autoApprove: true, rotateRefreshTokens: true });
    const locker = postgres(database.url!, { max: 1, onnotice: () => {} });
    try {
      const manager = (instanceId: string) =>
        createTokenManager(database.db, { id: 'acme', auth: oauthAuth(), baseUrl: sandbox.url }, { cipher: testCipher(), instanceId, backoffBaseMs: 5, backoffMaxMs: 50 });
      const a = manager('a');
      await authorise(a);
      const current = await a.getAccessToken();
      sandbox.state.expireAccessTokens();

      // The CRM rotates the refresh token; the replica's connection is cut while it stores the
      // answer (a failover, a PgBouncer restart). The row lock only holds the save still long
      // enough to find its backend.
      let refresh: Promise<unknown> | undefined;
      await locker.begin(async (tx) => {
        await tx`select 1 from tokens where connection_id = 'acme' for update`;
        refresh = a.handleUnauthorized(current).catch((err: Error) => err);
        let pid: number | undefined;
        for (let i = 0; i < 400 && pid === undefined; i++) {
          const rows = (await database.db.execute(sql`select pid from pg_stat_activity where wait_event_type = 'Lock' and query like 'insert into "tokens"%'`)) as unknown as Array<{ pid: number }>;
          pid = rows[0]?.pid;
          if (pid === undefined) await sleep(10);
        }
        expect(pid).toBeDefined();
        await database.db.execute(sql`select pg_terminate_backend(${pid!})`);
      });
      await refresh;

      const next = await callApi(sandbox, manager('b')).then(
        (c) => c.status,
        (err: Error) => err.message.slice(0, 80),
      );
      expect({ next, revoked: revokedGrants(sandbox) }).toEqual({ next: 200, revoked: [] });
    } finally {
      await locker.end();
      await sandbox.close();
    }
  }, 30_000);

  it("answers /health by the database's clock: a stream another replica polled a moment ago is not stale though that replica's clock is 16 minutes behind", async () => {
    const sandbox = await startSandbox({ records: 10 });
    const apps: FastifyInstance[] = [];
    try {
      // Default poll timing: every 5 minutes, stale after 15.
      const conn = clioConnection(sandbox, { poll: { objects: ['matters'], interval: '5m', pageSize: 50 } });
      const env = { TOKEN_ENCRYPTION_KEY: TEST_TOKEN_KEY };
      const poller = await buildTestApp({ database, connections: [conn], env });
      apps.push(poller);
      const other = await buildTestApp({ database, connections: [conn], env });
      apps.push(other);
      // The replica holding the poll lease runs 16 minutes behind (its NTP broke); the lease goes
      // by the database's clock, so it polls as usual.
      vi.useFakeTimers({ toFake: ['Date'], now: Date.now() - 16 * 60_000, shouldAdvanceTime: true });
      try {
        expect((await pollStream(poller.poller.stream('firm', 'matters'))).status).toBe('ok');
      } finally {
        vi.useRealTimers();
      }
      // A moment later the load balancer asks the other replica, whose clock is right.
      const res = await other.inject({ method: 'GET', url: '/health' });
      expect({ status: res.statusCode, stale: res.json().connections[0].poll.stale }).toEqual({ status: 200, stale: false });
    } finally {
      for (const app of apps) await app.close();
      await sandbox.close();
    }
  }, 30_000);

  it("keeps the sweep's schedule by the database's clock: a replica a day ahead neither stamps its sweep a day ahead nor sweeps on every poll", async () => {
    const bridge = await startBridge({ database, connection: { poll: { pageSize: 50, sweepInterval: '1h' } } });
    const firstPages = () => bridge.sandbox.state.requestLog.list({ pathPrefix: '/api/v4/matters.json' }).filter((e) => e.query.page_token === undefined).length;
    const lastSweepAt = async () => (await database.db.select().from(streamCursors))[0]!.lastSweepAt!.getTime();
    try {
      const daemon = bridge.app.poller.daemons[0]!;
      await daemon.tick(new AbortController().signal); // the first run, from the beginning: the stream's first sweep
      expect(firstPages()).toBe(1);
      // This replica's clock runs a day ahead (its NTP broke).
      vi.useFakeTimers({ toFake: ['Date'], now: Date.now() + 24 * 3600_000, shouldAdvanceTime: true });
      try {
        daemon.wake();
        await daemon.tick(new AbortController().signal);
        expect(firstPages()).toBe(2); // the poll's listing, and no sweep: the last began moments ago
        expect((await sweepStream(bridge.app.poller.stream('firm', 'matters'))).status).toBe('ok');
      } finally {
        vi.useRealTimers();
      }
      expect(Math.abs((await lastSweepAt()) - Date.now())).toBeLessThan(60_000);
    } finally {
      await bridge.close();
    }
  });

  it("judges a stream never run from this process's uptime on the database's clock: a replica whose clock is a day behind is not stale the moment it starts", async () => {
    vi.useFakeTimers({ toFake: ['Date'], now: Date.now() - 24 * 3600_000, shouldAdvanceTime: true });
    try {
      const bridge = await startBridge({ database, connection: { poll: { staleAfter: '10m' } } });
      try {
        const res = await bridge.app.inject('/health');
        expect({ status: res.statusCode, stale: res.json().connections[0].poll.streams[0].stale }).toEqual({ status: 200, stale: false });
      } finally {
        await bridge.close();
      }
    } finally {
      vi.useRealTimers();
    }
  });
});
