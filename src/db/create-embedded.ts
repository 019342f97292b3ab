/**
 * `node create-embedded.js <data dir>`: creates the embedded database there and exits. Run by
 * `openDatabase` when the bridge starts on a data directory with no database yet, so that the
 * memory PGlite's initdb takes is handed back when this process ends (`createEmbeddedDatabase`).
 * A failure is one line on stderr, which `openDatabase` passes on, and exit status 1.
 */
import { createEmbeddedDatabase } from './embedded.js';

/** The errors of a disk PGlite's file system reports, by their WASI numbers. */
const DISK_ERRORS: Record<number, string> = {
  2: 'permission denied (EACCES)',
  19: 'the disk quota is used up (EDQUOT)',
  29: 'the disk failed a read or write (EIO)',
  51: 'the disk is full (ENOSPC)',
  63: 'permission denied (EPERM)',
  69: 'the file system is read-only (EROFS)',
};

// A bridge killed while it waits here (SIGKILL, the OOM killer: a stop signal takes this process
// with it) leaves this one running on. It must not go on to move the database into place: the
// next start is by then making its own in the same staging directory. initdb runs without
// yielding for seconds at a time, so the timer alone may come too late.
const bridge = process.ppid;
const abandoned = () => process.ppid !== bridge;
setInterval(() => {
  if (abandoned()) process.exit(1);
}, 100).unref();

try {
  await createEmbeddedDatabase(process.argv[2]!, abandoned);
} catch (err) {
  // PGlite's file system fails with an errno and no message (WASI's numbering, not Linux's).
  const { message, errno } = err as { message?: string; errno?: number };
  const disk = errno === undefined ? undefined : DISK_ERRORS[errno];
  // A full or read-only disk is the disk's problem, not the directory's: saying the directory must
  // be empty sent an operator to clear a directory that was empty already.
  process.stderr.write(
    message ? `${message}; the directory must be empty or not exist yet\n`
    : disk ? `${disk}: the new database needs about 40 MB it can write there\n`
    : `PGlite's file system failed (errno ${errno ?? 'unknown'}); the directory must be empty or not exist yet\n`,
  );
  process.exitCode = 1;
}
