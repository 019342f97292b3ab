import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { eq, sql } from 'drizzle-orm';
import type { FastifyInstance } from 'fastify';
import postgres from 'postgres';
import { afterAll, afterEach, beforeEach, describe, expect, it } from 'vitest';
import { outbox } from '../src/db/schema/index.js';
import type { DeliveryWorker } from '../src/sync/delivery-worker.js';
import { buildTestApp, connection, SECRET } from './helpers/app.js';
import { compiled, crmBridge } from './helpers/cli.js';
import { createTestDatabase, resetDatabase } from './helpers/database.js';
import { startSink, type Sink } from './fixtures/delivery-sink.js';

/**
 * Workers in separate processes on one database. PGlite is an in-process database that another
 * process cannot open, so these run only against Postgres (DATABASE_URL set); the in-process
 * two-worker test in delivery.test.ts covers lease exclusion on both databases.
 */
const onPostgres = Boolean(process.env.DATABASE_URL);
const database = onPostgres ? await createTestDatabase() : undefined;

let sink: Sink;
let app: FastifyInstance | undefined;
const children: ChildProcess[] = [];

beforeEach(async () => {
  if (database) await resetDatabase(database);
  sink = await startSink();
});
afterEach(async () => {
  for (const child of children.splice(0)) await killGroup(child);
  await app?.close();
  app = undefined;
  await sink.close();
});
afterAll(() => database?.close());

/** A worker process in a process group of its own, which SIGKILL is sent to. */
function spawnWorker(env: Record<string, string>): ChildProcess {
  const child = spawn(process.execPath, [compiled('test/fixtures/delivery-worker.ts')], {
    env: { ...process.env, DATABASE_URL: database!.url!, SINK_URL: sink.url, ...env },
    detached: true,
    stdio: ['ignore', 'ignore', 'inherit'],
  });
  children.push(child);
  return child;
}

async function killGroup(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((resolve) => child.once('exit', resolve));
  try {
    process.kill(-child.pid!, 'SIGKILL');
  } catch {
    return;
  }
  await exited;
}

async function startApp() {
  app = await buildTestApp({
    database: database!,
    connections: [connection({ downstream: { url: sink.url, timeout: '1500ms', lease: '2500ms', backoff: { base: '1ms', max: '5ms' } } })],
  });
  return { app, worker: app.deliveryWorkers.get('acme')! };
}

async function hook(id: number): Promise<string> {
  const res = await app!.inject({
    method: 'POST',
    url: '/hooks/acme',
    headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
    payload: JSON.stringify({ id, display_number: `000${id}-Doe`, status: 'Open', updated_at: '2026-11-20T10:00:00Z' }),
  });
  expect(res.statusCode).toBe(202);
  return res.json().eventId;
}

async function undelivered(): Promise<number> {
  const rows = await database!.db.select({ state: outbox.state }).from(outbox);
  return rows.filter((r) => r.state !== 'delivered').length;
}

/**
 * The row of a killed worker: still pending under its lease, not sent by anyone while the lease
 * holds, then sent again by `worker` with the same key and marked delivered.
 */
async function expectSentAgainOnceTheLeaseRunsOut(worker: DeliveryWorker, eventId: string, owner = 'doomed'): Promise<void> {
  const [leased] = await database!.db.select().from(outbox).where(eq(outbox.eventId, eventId));
  expect(leased).toMatchObject({ state: 'pending', leaseOwner: owner, attempts: 1 });

  // While the dead worker's lease holds, nobody else may send the row.
  sink.behave(() => ({ status: 200 }));
  const signal = new AbortController().signal;
  expect(await worker.tick(signal)).toBe(false);
  expect(sink.requests).toHaveLength(1);

  for (let i = 0; i < 200 && sink.requests.length < 2; i++) {
    await worker.tick(signal);
    await sleep(50);
  }
  expect(sink.requests.map((r) => r.key)).toEqual([eventId, eventId]);
  expect(sink.requests[1]!.text).toBe(sink.requests[0]!.text);
  expect(sink.applied.map((b) => b.id)).toEqual([eventId]);
  const [delivered] = await database!.db.select().from(outbox).where(eq(outbox.eventId, eventId));
  expect(delivered).toMatchObject({ state: 'delivered', leaseOwner: null, attempts: 2 });
}

/** The outbox row of `eventId`: its lease owner, and whether it is still the tuple its change's transaction wrote. */
async function rowsOfHandover(eventId: string) {
  return (await database!.db.execute(
    sql`select o.lease_owner as owner, o.xmin::text = l.xmin::text as untouched from outbox o join ledger l using (event_id) where o.event_id = ${eventId}`,
  )) as unknown as Array<{ owner: string; untouched: boolean }>;
}

describe('delivery workers in separate processes on one Postgres', () => {
  it.skipIf(!onPostgres)('delivers each row once when two worker processes share the outbox', async () => {
    await startApp();
    const eventIds: string[] = [];
    for (let id = 1; id <= 30; id++) eventIds.push(await hook(id));

    spawnWorker({ OWNER: 'process-a' });
    spawnWorker({ OWNER: 'process-b' });
    // Done means recorded as delivered, not just answered: a kill between the two is a redelivery.
    for (let i = 0; i < 600 && (await undelivered()) > 0; i++) await sleep(100);
    for (const child of children.splice(0)) await killGroup(child);

    expect(await undelivered()).toBe(0);
    expect(sink.requests.map((r) => r.key).sort()).toEqual([...eventIds].sort());
  });

  it.skipIf(!onPostgres)('loses nothing when a worker is killed with SIGKILL mid-delivery: the row is delivered again with the same key after its lease expires', async () => {
    const { worker } = await startApp();
    const eventId = await hook(1);
    sink.behave(() => 'hold');

    const child = spawnWorker({ OWNER: 'doomed', TIMEOUT: '1500ms', LEASE: '2500ms' });
    await sink.until(() => sink.heldCount === 1, 'the child to start delivering', 60_000);
    await killGroup(child);

    await expectSentAgainOnceTheLeaseRunsOut(worker, eventId);
  });

  it.skipIf(!onPostgres)('loses nothing when a bridge is killed with SIGKILL while sending a hook it leased in the hook\'s own transaction: the row is sent again, same key and body, once the lease runs out', async () => {
    const { worker } = await startApp();
    const config = join(mkdtempSync(join(tmpdir(), 'crm-bridge-handover-')), 'connections.json');
    writeFileSync(config, JSON.stringify({ connections: [connection({ downstream: { url: sink.url, timeout: '1500ms', lease: '2500ms', pollInterval: '1h' } })] }));
    sink.behave(() => 'hold');
    // crm-bridge serve, as a replica runs it: hooks, daemons and this test's Postgres.
    const child = spawn(process.execPath, crmBridge('serve'), {
      env: { ...process.env, PORT: '0', LOG_LEVEL: 'info', DATABASE_URL: database!.url!, CRM_BRIDGE_CONFIG: config },
      detached: true,
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    children.push(child);
    let output = '';
    const base = await new Promise<string>((resolve, reject) => {
      child.stdout!.on('data', (d: Buffer) => {
        output += d.toString();
        const match = /listening on (http:\/\/[\d.:]+)/.exec(output);
        if (match) resolve(match[1]!);
      });
      child.once('exit', (code) => reject(new Error(`crm-bridge serve exited ${code}: ${output}`)));
    });
    const answer = await fetch(`${base}/hooks/acme`, {
      method: 'POST',
      headers: { authorization: `Bearer ${SECRET}`, 'content-type': 'application/json' },
      body: JSON.stringify({ id: 1, display_number: '0001-Doe', status: 'Open', updated_at: '2026-11-20T10:00:00Z' }),
    });
    expect(answer.status).toBe(202);
    const { eventId } = (await answer.json()) as { eventId: string };
    await sink.until(() => sink.heldCount === 1, 'the serving bridge to send the hook', 60_000);

    // Leased in the hook's transaction (the row is the tuple it wrote), to the serving process.
    const [row] = await rowsOfHandover(eventId);
    expect(row).toMatchObject({ untouched: true });
    await killGroup(child);

    await expectSentAgainOnceTheLeaseRunsOut(worker, eventId, row!.owner);
  });

  it.skipIf(!onPostgres)('delivers a row again with the same key when its worker is killed after the answer but before the row is marked delivered', async () => {
    const { worker } = await startApp();
    const eventId = await hook(1);
    sink.behave(() => 'hold');
    const child = spawnWorker({ OWNER: 'doomed', TIMEOUT: '1500ms', LEASE: '2500ms' });
    await sink.until(() => sink.heldCount === 1, 'the child to start delivering', 60_000);

    // A row lock held here stops the child's mark after the pipeline has answered; then the child
    // dies, and its mark with it, as in a crash between the answer and the mark.
    const locker = postgres(database!.url!, { max: 1, onnotice: () => {} });
    try {
      await locker.begin(async (tx) => {
        await tx`select id from outbox where event_id = ${eventId} for update`;
        sink.release({ status: 200 });
        const markWaiting = sql`select pid from pg_stat_activity where wait_event_type = 'Lock' and query like 'update "outbox" set "state"%'`;
        let waiting: Array<{ pid: number }> = [];
        for (let i = 0; i < 200 && waiting.length === 0; i++) {
          waiting = (await database!.db.execute(markWaiting)) as unknown as Array<{ pid: number }>;
          if (waiting.length === 0) await sleep(25);
        }
        expect(waiting).toHaveLength(1);
        await killGroup(child);
        await database!.db.execute(sql`select pg_terminate_backend(${waiting[0]!.pid})`);
      });
    } finally {
      await locker.end();
    }

    expect(sink.applied.map((b) => b.id)).toEqual([eventId]);
    await expectSentAgainOnceTheLeaseRunsOut(worker, eventId);
  });
});
