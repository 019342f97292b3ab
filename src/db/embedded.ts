import { execFile } from 'node:child_process';
import fs, { mkdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { hostname } from 'node:os';
import { dirname, extname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { promisify } from 'node:util';
import { PGlite } from '@electric-sql/pglite';
import { NodeFS } from '@electric-sql/pglite/nodefs';

/**
 * The embedded database: PGlite in this process, in memory (`memory://`, for tests) or in a data
 * directory on disk, where it is as durable as Postgres (`SyncedNodeFS`).
 */
export function openEmbedded(dataDir: string, from?: Blob): { client: PGlite; unlock: () => void } {
  if (dataDir.startsWith('memory://')) {
    return { client: new PGlite(dataDir, { startParams: [...PGlite.defaultStartParams, ...sharedBuffers], ...(from ? { loadDataDir: from } : {}) }), unlock: () => {} };
  }
  if (from) throw new Error('Only a memory:// database starts from a dump.');
  mkdirSync(dataDir, { recursive: true });
  const unlock = lockDataDir(dataDir);
  try {
    return { client: embeddedOnDisk(dataDir), unlock };
  } catch (err) {
    unlock();
    throw err;
  }
}

/**
 * One process at a time on a data directory. PGlite takes no lock of its own (Postgres's
 * postmaster.pid is not checked): a second process on the same files, a CLI command beside the
 * running server, would write over what the first has cached, and what it changed (a replayed
 * dead letter, a new grant) would not be seen by the first. The lock is a file beside the
 * directory (initdb needs the directory empty) naming the holder's pid and host; a holder that is
 * gone (killed, the machine restarted, a container started again with its pid) leaves a lock
 * that is taken over. Returns its release.
 */
function lockDataDir(dataDir: string): () => void {
  const path = `${dataDir}.lock`;
  const mine = JSON.stringify({ pid: process.pid, host: hostname() });
  for (let attempt = 0; ; attempt++) {
    try {
      fs.writeFileSync(path, mine, { flag: 'wx', mode: 0o600 });
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      const holder = lockHolder(path);
      if (attempt > 0 || (holder !== undefined && holder.host === hostname() && holder.pid !== process.pid && isRunning(holder.pid))) {
        throw new Error(
          `The embedded database in ${dataDir} is in use by another crm-bridge process${holder ? ` (pid ${holder.pid})` : ''}: the server and the CLI cannot share it. ` +
            `Stop the server first or use its HTTP API; with DATABASE_URL (Postgres) they can run side by side. If no crm-bridge is running, delete ${path}.`,
        );
      }
      fs.rmSync(path, { force: true });
    }
  }
  const unlock = () => {
    process.off('exit', unlock);
    try {
      if (fs.readFileSync(path, 'utf8') === mine) fs.rmSync(path);
    } catch {
      // Gone already.
    }
  };
  process.on('exit', unlock);
  return unlock;
}

/** Who holds a lock file; undefined when it cannot be read (a holder that died writing it). */
function lockHolder(path: string): { pid: number; host: string } | undefined {
  try {
    const holder = JSON.parse(fs.readFileSync(path, 'utf8')) as { pid?: unknown; host?: unknown };
    return typeof holder.pid === 'number' && typeof holder.host === 'string' ? { pid: holder.pid, host: holder.host } : undefined;
  } catch {
    return undefined;
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    // EPERM: it runs, as another user.
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * 32 MB of shared buffers instead of Postgres's 128 MB: about 130 MB less resident memory
 * (PGlite's are in this process's heap). A miss reads the data directory's file through the
 * operating system's page cache. On the command line, so postgresql.conf is left as it is.
 */
const sharedBuffers = ['-c', 'shared_buffers=32MB'];

/** The embedded database in `dataDir`, durable (below); `initdbHere` is for `createEmbeddedDatabase` only. */
function embeddedOnDisk(dataDir: string, initdbHere = false): PGlite {
  return new PGlite({ fs: new SyncedNodeFS(dataDir, initdbHere), startParams: [...durableStartParams, ...sharedBuffers] });
}

/**
 * Creates the embedded database in `dataDir` and closes it: what `create-embedded.ts` runs, in a
 * process of its own, when the bridge starts on a data directory that has no database yet.
 * PGlite creates one through a second, temporary Postgres and initdb in the same process; their
 * WebAssembly memory (about 450 MB) is freed only by a full garbage collection, which a bridge
 * with little to do may put off indefinitely (`crm-bridge serve` still held it 20 s after ready).
 */
export async function createEmbeddedDatabase(dataDir: string, abandoned: () => boolean = () => false): Promise<void> {
  // Made beside the data directory and moved into it only once whole and synced: a first start
  // stopped part-way (killed, or a power cut before initdb's files reached the disk) leaves no
  // half database where the next start would take it for a whole one. A leftover is made again.
  const staging = `${dataDir}.creating`;
  fs.rmSync(staging, { recursive: true, force: true });
  try {
    const client = embeddedOnDisk(staging, true);
    await client.waitReady;
    await client.close();
  } catch (err) {
    // What initdb wrote before it failed (on a full disk, the tens of MB that filled it) goes
    // with it, unless the path may be the next start's own staging directory by now.
    if (!abandoned()) fs.rmSync(staging, { recursive: true, force: true });
    throw err;
  }
  // Left as it is: the path may be the next start's own staging directory by now.
  if (abandoned()) throw new Error('the bridge that asked for it has stopped');
  try {
    // Replaces the empty directory the bridge made (or none); the rename is on disk once its parent is synced.
    fs.renameSync(staging, dataDir);
  } catch (err) {
    fs.rmSync(staging, { recursive: true, force: true });
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOTEMPTY' || code === 'EEXIST' || code === 'ENOTDIR') throw new Error('it holds files but no database');
    throw err;
  }
  syncFile(dirname(dataDir));
}

/** Runs `createEmbeddedDatabase` in a child process (a script beside this module, run as this one is). */
async function createInProcessOfItsOwn(dataDir: string): Promise<void> {
  const self = fileURLToPath(import.meta.url);
  const script = join(dirname(self), `create-embedded${extname(self)}`);
  // Run from source, the script needs tsx, found from here whatever the working directory.
  const loader = script.endsWith('.ts') ? ['--import', pathToFileURL(createRequire(import.meta.url).resolve('tsx')).href] : [];
  const creating = promisify(execFile)(process.execPath, [...loader, script, dataDir], { timeout: 180_000 });
  // A stop signal sent to the bridge alone (`kill <pid>`, a supervisor) would leave the creation
  // running on, writing into the staging directory the next start makes its own database in:
  // it is stopped with the bridge, which then dies of the signal as it would have.
  const stop = (signal: NodeJS.Signals) => {
    creating.child.kill('SIGKILL');
    process.kill(process.pid, signal);
  };
  process.once('SIGTERM', stop).once('SIGINT', stop);
  try {
    await creating;
  } catch (err) {
    const { stderr, message } = err as { stderr?: string; message: string };
    throw new Error(`Could not create the embedded database in ${dataDir}: ${stderr?.trim() || message}`);
  } finally {
    process.off('SIGTERM', stop).off('SIGINT', stop);
  }
}

/**
 * PGlite's start parameters for a data directory on disk. PGlite starts Postgres with `-F` (fsync
 * off), and in its WebAssembly runtime fdatasync() does nothing and fsync() does nothing on files
 * of the host's disk. With these and `SyncedNodeFS`, a commit is on the disk before it is
 * answered (so before the hook it holds is), and a checkpoint's data files before the checkpoint
 * that relies on them: what Postgres itself promises after a power cut.
 */
const durableStartParams = [
  ...PGlite.defaultStartParams.filter((param) => param !== '-F'),
  '-c', 'fsync=on',
  // fdatasync() does nothing in PGlite's WebAssembly runtime; fsync() reaches SyncedNodeFS.
  '-c', 'wal_sync_method=fsync',
];

/**
 * PGlite's file system for a data directory on the host's disk, whose fsync() reaches the disk.
 * PGlite mounts the directory through Emscripten's NODEFS, whose files have no fsync operation:
 * Postgres's fsync() of a WAL segment or a data file returned at once with nothing synced.
 */
class SyncedNodeFS extends NodeFS {
  /** PGlite runs initdb here (in `createEmbeddedDatabase`'s staging directory): it writes the new database unsynced, before Postgres starts on it. */
  #created = false;

  constructor(
    dataDir: string,
    /** Create a missing database in this process, not in a process of its own. */
    private readonly initdbHere: boolean,
  ) {
    super(dataDir);
  }

  override async init(pg: PGlite, opts: Parameters<NodeFS['init']>[1]) {
    const missing = () => !fs.existsSync(join(this.rootDir, 'PG_VERSION'));
    if (!this.initdbHere && missing()) await createInProcessOfItsOwn(this.rootDir);
    this.#created = missing();
    const { emscriptenOpts } = await super.init(pg, opts);
    const preRun = [
      ...(emscriptenOpts.preRun ?? []),
      (mod: { NODEFS: unknown }) => {
        const nodefs = mod.NODEFS as NodeFsInternals | undefined;
        if (!nodefs?.stream_ops) throw new Error('This PGlite has no NODEFS file system to give an fsync(): the embedded database cannot promise durable commits.');
        nodefs.stream_ops.fsync = (stream) => {
          try {
            syncOpen(stream.nfd);
          } catch (err) {
            stopAfterFailedSync((err as NodeJS.ErrnoException).code);
          }
        };
      },
    ];
    return { emscriptenOpts: { ...emscriptenOpts, preRun } };
  }

  /** PGlite calls this after initdb has written the new database, and after every query. */
  override async syncToFs() {
    if (!this.#created) return;
    this.#created = false;
    syncTree(this.rootDir);
  }
}

/**
 * A failed fsync() may have dropped written pages that the kernel will not write again. Postgres
 * answers it with a PANIC and a restart from its WAL; PGlite cannot go on after a PANIC (its next
 * statement never returns), so the process stops here, before the statement that needed the sync
 * is answered, and recovers from the WAL when it starts again.
 */
function stopAfterFailedSync(code = 'unknown error'): never {
  fs.writeSync(2, `crm-bridge: the embedded database could not fsync its files (${code}); stopping, to recover from its WAL on the next start\n`);
  process.exit(1);
}

/** fsync()s every file and directory under `path`, each directory after what it holds (as initdb does). */
function syncTree(path: string) {
  for (const entry of fs.readdirSync(path, { withFileTypes: true })) {
    if (entry.isDirectory()) syncTree(join(path, entry.name));
    else if (entry.isFile()) syncFile(join(path, entry.name));
  }
  syncFile(path);
}

function syncFile(path: string) {
  const fd = fs.openSync(path, 'r');
  try {
    syncOpen(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** fsync() of an open file. A directory its file system cannot sync is let be, as Postgres does. */
function syncOpen(fd: number) {
  try {
    fs.fsyncSync(fd);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if ((code === 'EINVAL' || code === 'EBADF') && fs.fstatSync(fd).isDirectory()) return;
    throw err;
  }
}

/** What `SyncedNodeFS` uses of Emscripten's NODEFS (its JavaScript, not typed by PGlite). */
interface NodeFsInternals {
  stream_ops: { fsync?: (stream: { nfd: number }) => void };
}
