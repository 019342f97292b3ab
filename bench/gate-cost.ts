// What the change gate costs Postgres per transaction and per change: passChanges in sequential
// transactions of 1 to 100 new ~1 KB records (as the hook path commits them, its write with the
// COMMIT), the backend's CPU read from /proc, the client's from process.cpuUsage().
// Run: npx tsx bench/gate-cost.ts [--batches 1,12,25,50] [--changes 3000] [--prefill 3000000] [--lz4]
// Postgres at DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres), on this
// machine (the backend's CPU is read from /proc); a throwaway database is created and dropped.
// --prefill N first writes N changes' rows (ledger, small bodies, delivered outbox rows), as a
// ledger in service for a while holds: the event-id indexes then outgrow shared_buffers.
// --lz4 compresses the body columns with lz4 instead of pglz (the server must have it).
import { sql } from 'drizzle-orm';
import { openDatabase, rowsOf } from '../src/db/client.js';
import type { ObjectDefinition } from '../src/config/schema.js';
import { passChanges } from '../src/sync/change-gate.js';
import { observeRecord } from '../src/sync/record.js';
import { createBenchDatabase } from './child.js';
import { matterBody } from './ingest.js';
import { BENCH_MATTERS } from './ingest-protocol.js';
import { processCpuSeconds } from './machine.js';

const arg = (name: string): string | undefined => {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
};
const BATCHES = (arg('batches') ?? '1,4,12,25,50,100').split(',').map(Number);
const CHANGES = Number(arg('changes') ?? 3000);
const WARMUP_TRANSACTIONS = 10;
const PREFILL = Number(arg('prefill') ?? 0);

const definition: ObjectDefinition = { ...BENCH_MATTERS, volatile: [] };

const throwaway = await createBenchDatabase(process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres');
const database = openDatabase({ url: throwaway.url, max: 1 });
try {
  await database.migrate();
  const { db } = database;
  if (PREFILL > 0) {
    const started = performance.now();
    // Random ids, as the gate made them before its ids were time-ordered (a ledger upgraded in place).
    await db.execute(sql`create temp table prefill as select gen_random_uuid() as id, g from generate_series(1, ${PREFILL}::int) g`);
    await db.execute(sql`insert into ledger (event_id, connection_id, object, crm_id, source, disposition, change, observed_at)
      select id, 'bench', 'matters', 'old-' || g, 'poll', 'accepted', 'upsert', now() from prefill`);
    await db.execute(sql`insert into ledger_bodies (event_id, raw, fields) select id, '{}', '{}' from prefill`);
    await db.execute(sql`insert into outbox (event_id, connection_id, object, crm_id, state) select id, 'bench', 'matters', 'old-' || g, 'delivered' from prefill`);
    await db.execute(sql`checkpoint`);
    console.log(`prefilled ${PREFILL} changes in ${((performance.now() - started) / 1000).toFixed(0)} s`);
  }
  if (process.argv.includes('--lz4')) await db.execute(sql`alter table ledger_bodies alter column raw set compression lz4, alter column fields set compression lz4`);
  const [backend] = await rowsOf<{ pid: number }>(db.execute(sql`select pg_backend_pid() as pid`));
  if (processCpuSeconds(backend!.pid, 'postgres') === undefined) throw new Error('The Postgres backend is not a process on this machine: its CPU cannot be read.');

  let n = 0;
  const transaction = (batch: number) => {
    const changes = Array.from({ length: batch }, () =>
      observeRecord({ connectionId: 'bench', object: 'matters', definition, raw: JSON.parse(matterBody(`gate-${n++}`)), source: 'hook', observedAt: new Date() })!,
    );
    return db.transaction((tx) => passChanges(tx, changes, { last: true }));
  };

  console.log('changes/tx  Postgres µs/tx  Postgres µs/change  client µs/change  wall ms/tx');
  for (const batch of BATCHES) {
    for (let i = 0; i < WARMUP_TRANSACTIONS; i++) await transaction(batch);
    const transactions = Math.max(40, Math.round(CHANGES / batch));
    const before = processCpuSeconds(backend!.pid, 'postgres')!;
    const client = process.cpuUsage();
    const started = performance.now();
    for (let i = 0; i < transactions; i++) await transaction(batch);
    const wall = performance.now() - started;
    const own = process.cpuUsage(client);
    const pgPerTx = ((processCpuSeconds(backend!.pid, 'postgres')! - before) * 1e6) / transactions;
    const clientPerChange = (own.user + own.system) / transactions / batch;
    console.log(
      [batch, pgPerTx.toFixed(0), (pgPerTx / batch).toFixed(0), clientPerChange.toFixed(0), (wall / transactions).toFixed(2)]
        .map((v, i) => v.toString().padStart([10, 15, 19, 17, 11][i]!))
        .join(' '),
    );
  }
  const [size] = await rowsOf<{ bytes: string; rows: string }>(
    db.execute(sql`select pg_total_relation_size('ledger_bodies') as bytes, (select count(*) from ledger_bodies) as rows`),
  );
  console.log(`ledger_bodies: ${Math.round(Number(size!.bytes) / Number(size!.rows))} bytes a row on disk (${size!.rows} rows, indexes included)`);
} finally {
  await database.close();
  await throwaway.drop();
}
