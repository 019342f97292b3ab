import { execFile } from 'node:child_process';
import fs from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative } from 'node:path';
import { promisify } from 'node:util';
import { sql } from 'drizzle-orm';
import { afterAll, describe, expect, it } from 'vitest';
import { openDatabase, rowsOf, type Database } from '../src/db/client.js';
import { createEmbeddedDatabase } from '../src/db/embedded.js';
import { compiled } from './helpers/cli.js';

// The embedded database on disk (`npm start`'s). Only PGlite: the suite's own database is not used.
const skip = process.env.DATABASE_URL !== undefined && process.env.DATABASE_URL !== '';
// A directory that does not exist yet, as on a first `npm start`.
const dataDir = join(fs.mkdtempSync(join(tmpdir(), 'crm-bridge-durable-')), 'pgdata');
afterAll(() => fs.rmSync(dirname(dataDir), { recursive: true, force: true }));

/** Every file fsync()ed by this process from now on, relative to the data directory, in order. */
function watchSyncs(dir: string, onSync?: (path: string) => void) {
  const synced: string[] = [];
  const fsyncSync = fs.fsyncSync;
  // A new database is made in `<dir>.creating` and moved to `dir`: its files are counted as dir's.
  const staging = `${dir}.creating`;
  fs.fsyncSync = (fd: number) => {
    const path = fs.readlinkSync(`/proc/self/fd/${fd}`);
    synced.push(relative(path === staging || path.startsWith(`${staging}/`) ? staging : dir, path) || '.');
    onSync?.(synced.at(-1)!);
    return fsyncSync(fd);
  };
  return { synced, stop: () => void (fs.fsyncSync = fsyncSync) };
}

/** Every file and directory under `root`, relative to it. */
function tree(root: string, path = root): string[] {
  return fs.readdirSync(path, { withFileTypes: true }).flatMap((entry) => {
    const full = join(path, entry.name);
    return [relative(root, full), ...(entry.isDirectory() ? tree(root, full) : [])];
  });
}

const show = async (database: Database, setting: string) =>
  (await rowsOf<Record<string, string>>(database.db.execute(sql.raw(`show ${setting}`))))[0]![setting];

describe.skipIf(skip)('the embedded database on disk survives a power cut', () => {
  it('creates a new database synced whole (initdb writes it without a sync), and only then puts it in the data directory', async () => {
    const fresh = fs.mkdtempSync(join(tmpdir(), 'crm-bridge-initdb-'));
    // While files are still being synced, the data directory holds no database (PG_VERSION): a
    // power cut then leaves nothing a next start would take for a whole database.
    let seenBeforeSynced = 0;
    const watch = watchSyncs(fresh, (path) => {
      if (path !== '..' && fs.existsSync(join(fresh, 'PG_VERSION'))) seenBeforeSynced++;
    });
    try {
      await createEmbeddedDatabase(fresh);
      expect(seenBeforeSynced).toBe(0);
      expect(fs.existsSync(join(fresh, 'PG_VERSION'))).toBe(true);
      expect(fs.existsSync(`${fresh}.creating`)).toBe(false);
      // The move itself is made durable: the data directory's parent is synced after it.
      expect(watch.synced.at(-1)).toBe('..');
      // Not counted: what Postgres itself wrote since it started (the WAL, its lock file, and the
      // relation cache's pg_internal.init, rebuilt whenever it is missing or stale).
      const created = tree(fresh).filter((path) => !path.startsWith('pg_wal') && path !== 'postmaster.pid' && !path.endsWith('pg_internal.init'));
      expect(created.length).toBeGreaterThan(500);
      expect(created.filter((path) => !watch.synced.includes(path))).toEqual([]);
      expect(watch.synced).toContain('.');
    } finally {
      watch.stop();
      fs.rmSync(fresh, { recursive: true, force: true });
    }
  });

  it('creates a new database in a process of its own, so the bridge keeps none of initdb\'s memory; then syncs commits before they are answered, and data files at a checkpoint', async () => {
    const watch = watchSyncs(dataDir);
    const external = process.memoryUsage().external;
    const database = openDatabase({ dataDir });
    try {
      await database.db.execute(sql`select 1`);
      // initdb in this process left about 430 MB of WebAssembly memory behind it (PGlite 0.5.16).
      expect(fs.existsSync(join(dataDir, 'PG_VERSION'))).toBe(true);
      expect(process.memoryUsage().external - external).toBeLessThan(300 * 2 ** 20);
      expect(watch.synced.length).toBeLessThan(50);
      await database.migrate();

      expect(await show(database, 'fsync')).toBe('on');
      expect(await show(database, 'wal_sync_method')).toBe('fsync');
      expect(await show(database, 'shared_buffers')).toBe('32MB');

      await database.db.execute(sql`create table kept (note text)`);
      watch.synced.length = 0;
      await database.db.execute(sql`insert into kept values ('answered')`);
      // By the time the commit is answered, its WAL segment was synced.
      expect(watch.synced.filter((path) => path.startsWith('pg_wal/'))).not.toEqual([]);

      const [{ file }] = (await rowsOf<{ file: string }>(database.db.execute(sql`select pg_relation_filepath('kept') as file`))) as [{ file: string }];
      expect(watch.synced).not.toContain(file);
      await database.db.execute(sql`checkpoint`);
      expect(watch.synced).toContain(file);
      expect(watch.synced).toContain('global/pg_control');
    } finally {
      watch.stop();
      await database.close();
    }
  });

  it('starts again on its data without syncing it whole', async () => {
    const watch = watchSyncs(dataDir);
    const database = openDatabase({ dataDir });
    try {
      await database.migrate();
      expect(await rowsOf(database.db.execute(sql`select note from kept`))).toEqual([{ note: 'answered' }]);
      expect(watch.synced.length).toBeLessThan(50);
    } finally {
      watch.stop();
      await database.close();
    }
  });

  it('stops the process before answering a commit whose sync failed, and recovers from its WAL on the next start', async () => {
    const failing = fs.mkdtempSync(join(tmpdir(), 'crm-bridge-eio-'));
    try {
      const run = await promisify(execFile)(process.execPath, [compiled('test/fixtures/embedded-fsync-fails.ts'), failing], { timeout: 50_000 }).then(
        () => ({ code: 0, stdout: '', stderr: '' }),
        (err: { code: number | string; stdout: string; stderr: string }) => err,
      );
      expect(run.code).toBe(1);
      expect(run.stdout).toContain('answered: before the disk failed');
      expect(run.stdout).not.toContain('answered: after the disk failed');
      expect(run.stderr).toContain('the embedded database could not fsync its files (EIO); stopping, to recover from its WAL on the next start');
      expect(run.stderr).not.toMatch(/\n\s+at /);

      const again = openDatabase({ dataDir: failing });
      try {
        const notes = await rowsOf<{ note: string }>(again.db.execute(sql`select note from kept`));
        expect(notes.map((row) => row.note)).toContain('before the disk failed');
      } finally {
        await again.close();
      }
    } finally {
      fs.rmSync(failing, { recursive: true, force: true });
    }
  });
});
