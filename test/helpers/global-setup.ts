import { mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { PGlite } from '@electric-sql/pglite';
import { build } from 'esbuild';
import type { TestProject } from 'vitest/node';
import { openDatabase } from '../../src/db/client.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** A dump of a migrated embedded database, which every test file's database starts from (embedded runs only). */
    migratedDump: string;
    /** Where src/ and test/fixtures/ are compiled to JavaScript, to run by plain node. */
    compiledRoot: string;
  }
}

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

/**
 * Runs once before the test files:
 * - compiles src/ and test/fixtures/ to JavaScript (esbuild, well under a second), so the tests
 *   that start `crm-bridge` or a fixture as a process run it with plain node, as the image runs
 *   dist/: a process under tsx spends one to two seconds more loading the same modules, and the
 *   CLI tests start about fifty processes. The `npm start` tests (server-process.test.ts) keep
 *   tsx, as npm start runs.
 * - on the embedded database, migrates one PGlite and dumps it, so each file's database loads that
 *   dump (about half a second) instead of running initdb and the migrations (two to three
 *   seconds). Under DATABASE_URL each file makes its own Postgres database.
 */
export default async function setup(project: TestProject): Promise<() => void> {
  // Inside node_modules, so the compiled files find the packages; one directory a run, so runs
  // from checkouts sharing node_modules do not write over each other.
  const cache = join(ROOT, 'node_modules/.cache');
  mkdirSync(cache, { recursive: true });
  const dir = mkdtempSync(join(cache, 'crm-bridge-test-'));
  const sources = ['src', 'test/fixtures'].flatMap((folder) =>
    readdirSync(join(ROOT, folder), { recursive: true, encoding: 'utf8' })
      .filter((file) => file.endsWith('.ts'))
      .map((file) => join(ROOT, folder, file)),
  );
  await build({ entryPoints: sources, outbase: ROOT, outdir: dir, format: 'esm', platform: 'node', target: 'node20', sourcemap: 'inline', logLevel: 'error' });
  // Node reads a .js file under node_modules as CommonJS unless its own package.json says otherwise.
  writeFileSync(join(dir, 'package.json'), '{ "type": "module" }\n');
  // The compiled src/db/client.js applies migrations from ../../drizzle, as dist/db/client.js does.
  symlinkSync(join(ROOT, 'drizzle'), join(dir, 'drizzle'));
  project.provide('compiledRoot', dir);

  // The dump (about 40 MB) goes to the system's temporary directory, not node_modules.
  const dumpDir = process.env.DATABASE_URL ? undefined : mkdtempSync(join(tmpdir(), 'crm-bridge-test-dump-'));
  if (dumpDir !== undefined) {
    const database = openDatabase({ dataDir: 'memory://' });
    await database.migrate();
    const client = (database.db as unknown as { $client: PGlite }).$client;
    const dump = await client.dumpDataDir('none');
    await database.close();
    const path = join(dumpDir, 'migrated.tar');
    writeFileSync(path, Buffer.from(await dump.arrayBuffer()));
    project.provide('migratedDump', path);
  }
  return () => {
    rmSync(dir, { recursive: true, force: true });
    if (dumpDir !== undefined) rmSync(dumpDir, { recursive: true, force: true });
  };
}
