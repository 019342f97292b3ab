import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { PGlite } from '@electric-sql/pglite';
import type { TestProject } from 'vitest/node';
import { openDatabase } from '../../src/db/client.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** A dump of a migrated embedded database, which every test file's database starts from. */
    migratedDump: string;
  }
}

/**
 * Runs once before the test files: on the embedded database, migrates one PGlite and dumps it, so
 * each file's database loads that dump (about half a second) instead of running initdb and the
 * migrations (two to three seconds). Under DATABASE_URL each file makes its own Postgres database.
 */
export default async function setup(project: TestProject): Promise<(() => void) | undefined> {
  if (process.env.DATABASE_URL) return undefined;
  const database = openDatabase({ dataDir: 'memory://' });
  await database.migrate();
  const client = (database.db as unknown as { $client: PGlite }).$client;
  const dump = await client.dumpDataDir('none');
  await database.close();
  const dir = mkdtempSync(join(tmpdir(), 'crm-bridge-test-dump-'));
  const path = join(dir, 'migrated.tar');
  writeFileSync(path, Buffer.from(await dump.arrayBuffer()));
  project.provide('migratedDump', path);
  return () => rmSync(dir, { recursive: true, force: true });
}
