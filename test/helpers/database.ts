import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import postgres from 'postgres';
import { inject } from 'vitest';
import { openDatabase, type Database } from '../../src/db/client.js';

/**
 * A fresh, migrated database for one test file: a new Postgres database when DATABASE_URL is
 * set (dropped on close), otherwise an in-memory PGlite started from the migrated dump the global
 * setup made (test/helpers/global-setup.ts). Same migrations as production: they run here too,
 * and find nothing left to apply.
 */
export async function createTestDatabase(options: { max?: number } = {}): Promise<Database & { url: string | undefined }> {
  const base = process.env.DATABASE_URL;
  if (!base) {
    const database = openDatabase({ dataDir: 'memory://', from: new Blob([readFileSync(inject('migratedDump'))]) });
    await database.migrate();
    return { ...database, url: undefined };
  }
  const name = `crm_bridge_test_${randomBytes(6).toString('hex')}`;
  const admin = postgres(base, { max: 1, onnotice: () => {} });
  await admin.unsafe(`create database ${name}`);
  await admin.end();
  const url = new URL(base);
  url.pathname = `/${name}`;
  const database = openDatabase({ url: url.toString(), max: options.max ?? 10 });
  await database.migrate();
  return {
    ...database,
    url: url.toString(),
    close: async () => {
      await database.close();
      const cleanup = postgres(base, { max: 1, onnotice: () => {} });
      await cleanup.unsafe(`drop database if exists ${name} with (force)`).catch(() => {});
      await cleanup.end();
    },
  };
}

/** Empties every table between tests that share one database (the ledger's trigger forbids DELETE, TRUNCATE is the reset). */
export async function resetDatabase(database: Database): Promise<void> {
  const { sql } = await import('drizzle-orm');
  await database.db.execute(
    sql.raw('truncate table ledger_bodies, outbox, ledger, record_heads, pending_fetches, stream_cursors, tokens, leases, outbound_writes restart identity cascade'),
  );
}
