/**
 * Exit status of a one-shot stream command (`poll --once`, `sweep`, `backfill`) that did nothing
 * because another process (the server, another command) was running the stream: sysexits'
 * EX_TEMPFAIL, "try again later". Not 0, so a script can tell that nothing was read; not 1,
 * which says a run failed; 2 is a usage error. Kept apart so the CLI's help can name it without
 * loading the app.
 */
export const EXIT_BUSY = 75;
