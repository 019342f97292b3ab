// What the change gate costs Postgres per transaction and per change: passChanges in sequential
// transactions of 1 to 100 new ~1 KB records (as the hook path commits them, its write with the
// COMMIT), the backend's CPU read from /proc, the client's from process.cpuUsage().
// Run: npx tsx bench/gate-cost.ts [--batches 1,12,25,50] [--changes 3000] [--prefill 3000000] [--lz4] [--given-up 20000]
// Postgres at DATABASE_URL (default postgres://postgres@127.0.0.1:5432/postgres), on this
// machine (the backend's CPU is read from /proc); a throwaway database is created and dropped.
// --prefill N first writes N changes' rows (ledger, small bodies, delivered outbox rows), as a
// ledger in service for a while holds: the event-id indexes then outgrow shared_buffers.
// --lz4 compresses the body columns with lz4 instead of pglz (the server must have it).
// --given-up N then adds N pipeline writes given up on after a call that may have reached the CRM
// (failed, unsettled: their echo is still recognised by origin marker) and measures again, with
// the ratio to the first pass: what a CRM outage's worth of such writes costs every later batch.
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
const GIVEN_UP = Number(arg('given-up') ?? 0);

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

  const measure = async (batch: number) => {
    for (let i = 0; i < WARMUP_TRANSACTIONS; i++) await transaction(batch);
    const transactions = Math.max(40, Math.round(CHANGES / batch));
    const before = processCpuSeconds(backend!.pid, 'postgres')!;
    const client = process.cpuUsage();
    const started = performance.now();
    for (let i = 0; i < transactions; i++) await transaction(batch);
    const wall = performance.now() - started;
    const own = process.cpuUsage(client);
    const pgPerTx = ((processCpuSeconds(backend!.pid, 'postgres')! - before) * 1e6) / transactions;
    return { pgPerTx, clientPerChange: (own.user + own.system) / transactions / batch, wallPerTx: wall / transactions };
  };
  const row = (cells: (string | number)[]) => console.log(cells.map((v, i) => v.toString().padStart([10, 15, 19, 17, 11, 22][i]!)).join(' '));

  console.log('changes/tx  Postgres µs/tx  Postgres µs/change  client µs/change  wall ms/tx');
  const first = new Map<number, number>();
  for (const batch of BATCHES) {
    const m = await measure(batch);
    first.set(batch, m.pgPerTx);
    row([batch, m.pgPerTx.toFixed(0), (m.pgPerTx / batch).toFixed(0), m.clientPerChange.toFixed(0), m.wallPerTx.toFixed(2)]);
  }
  if (GIVEN_UP > 0) {
    await db.execute(sql`insert into outbound_writes (id, connection_id, object, idempotency_key, request_hash, content_hash, operation, state, attempts, last_status, last_error)
      select gen_random_uuid(), 'bench', 'matters', 'given-up-' || g, 'h', 'h' || g, 'create', 'failed', 5, 503, 'CRM_HTTP_STATUS (HTTP 503)' from generate_series(1, ${GIVEN_UP}::int) g`);
    await db.execute(sql`analyze outbound_writes`);
    console.log(`\nwith ${GIVEN_UP} writes given up on (failed, unsettled):`);
    console.log('changes/tx  Postgres µs/tx  Postgres µs/change  client µs/change  wall ms/tx  Postgres ÷ without');
    for (const batch of BATCHES) {
      const m = await measure(batch);
      row([batch, m.pgPerTx.toFixed(0), (m.pgPerTx / batch).toFixed(0), m.clientPerChange.toFixed(0), m.wallPerTx.toFixed(2), (m.pgPerTx / first.get(batch)!).toFixed(2)]);
    }
  }
  const [size] = await rowsOf<{ bytes: string; rows: string }>(
    db.execute(sql`select pg_total_relation_size('ledger_bodies') as bytes, (select count(*) from ledger_bodies) as rows`),
  );
  console.log(`ledger_bodies: ${Math.round(Number(size!.bytes) / Number(size!.rows))} bytes a row on disk (${size!.rows} rows, indexes included)`);
} finally {
  await database.close();
  await throwaway.drop();
}
