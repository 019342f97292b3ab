import { randomFillSync } from 'node:crypto';
import { v7 } from 'uuid';

/**
 * A time-ordered UUID (version 7) for an event or an outbound write: the ledger, its bodies, the
 * outbox and the outbound writes are each unique on such an id, and random ids would put every
 * insert on a random leaf of those indexes.
 *
 * `uuid`'s own v7 draws 16 random bytes from `crypto.getRandomValues` for every id: a call into
 * OpenSSL with a system call each time (`getpid`, its check for a fork), 5 µs an id here and 3-5%
 * of the bridge's CPU at backfill and hook ingest. Here the bytes come from a pool refilled 256
 * ids at a time, as Node's `crypto.randomUUID()` pools its own; the millisecond and the counter
 * within it are kept as `uuid` keeps them (RFC 9562, method 1), so ids made later in this process
 * sort after earlier ones.
 */
export function timeOrderedId(): string {
  if (offset === pool.length) {
    randomFillSync(pool);
    offset = 0;
  }
  const random = pool.subarray(offset, offset + 16);
  offset += 16;
  const now = Date.now();
  if (now > msecs) {
    // A new millisecond: the counter starts at a random 31-bit value, leaving room to count up.
    msecs = now;
    seq = ((random[6]! & 0x7f) << 24) | (random[7]! << 16) | (random[8]! << 8) | random[9]!;
  } else {
    // The same millisecond (or the clock stepped back): count up; past the counter's end, borrow
    // the next millisecond, as `uuid` does.
    seq = (seq + 1) | 0;
    if (seq === 0) msecs++;
  }
  return v7({ msecs, seq, random });
}

const pool = new Uint8Array(16 * 256);
let offset = pool.length;
let msecs = -Infinity;
let seq = 0;

/** A UUID as the ledger and the outbound writes name their rows (any version, either case): for route schemas. */
export const UUID_PATTERN = '^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$';

const UUID = new RegExp(UUID_PATTERN);

/** Whether `value` could name an event or a write (a UUID), checked before anything is looked up. */
export function isUuid(value: string): boolean {
  return UUID.test(value);
}
