import { sql } from 'drizzle-orm';

/** A duration in milliseconds as an interval, for `now() + …` on the database's clock. */
export const millis = (ms: number) => sql`(${Math.max(0, Math.round(ms))}::double precision * interval '1 millisecond')`;

/**
 * A claim's row limit as part of the statement's text, not a parameter. A cached generic plan
 * does not know a parameter's value and guessed a tenth of the table: the claim's UPDATE and its
 * joins then scanned the whole outbox and ledger (22 ms at 50,000 rows). A worker's limit is
 * fixed, so each worker still runs one statement text.
 */
export const claimLimit = (limit: number) => sql.raw(String(Math.max(1, Math.trunc(limit)))) as unknown as number;
