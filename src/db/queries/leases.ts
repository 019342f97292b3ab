import { and, eq, sql } from 'drizzle-orm';
import type { Db } from '../client.js';
import { leases } from '../schema/index.js';

/**
 * Named leases with an expiry, for work one replica should do at a time (`token:<conn>`,
 * `poll:<conn>:<object>`). Expiry is judged by the database clock, so replicas with skewed
 * clocks agree on it. Each call is one statement: nothing is held across the caller's HTTP work.
 */

const expiresIn = (ttlMs: number) => sql`now() + ${Math.max(1, Math.round(ttlMs))} * interval '1 millisecond'`;

/**
 * Takes the lease if it is free, expired, or already ours (then it is extended). The
 * conditional upsert decides atomically: two replicas racing cannot both get a row back.
 */
export async function acquireLease(db: Db, name: string, owner: string, ttlMs: number): Promise<boolean> {
  const rows = await db
    .insert(leases)
    .values({ name, owner, expiresAt: expiresIn(ttlMs) })
    .onConflictDoUpdate({
      target: leases.name,
      set: { owner, expiresAt: expiresIn(ttlMs) },
      setWhere: sql`${leases.expiresAt} <= now() or ${leases.owner} = ${owner}`,
    })
    .returning({ owner: leases.owner });
  return rows.length === 1;
}

/**
 * Extends a lease its owner still holds. False when another owner has taken it: the caller
 * has lost it and must stop the work it guards. (A lease that expired but was not taken is
 * still the owner's row, so renewing it is safe.)
 */
export async function renewLease(db: Db, name: string, owner: string, ttlMs: number): Promise<boolean> {
  const rows = await db
    .update(leases)
    .set({ expiresAt: expiresIn(ttlMs) })
    .where(and(eq(leases.name, name), eq(leases.owner, owner)))
    .returning({ owner: leases.owner });
  return rows.length === 1;
}

/** Gives the lease up early so a waiting replica need not sit out the expiry. Only the owner can. */
export async function releaseLease(db: Db, name: string, owner: string): Promise<boolean> {
  const rows = await db
    .delete(leases)
    .where(and(eq(leases.name, name), eq(leases.owner, owner)))
    .returning({ owner: leases.owner });
  return rows.length === 1;
}

/**
 * Deletes the expired leases named `<prefix>…`: for one-off names (an OAuth state is a lease
 * of its own), which no one takes again once they expired, so the table keeps only live ones.
 */
export async function pruneExpiredLeases(db: Db, prefix: string): Promise<void> {
  await db.delete(leases).where(and(sql`starts_with(${leases.name}, ${prefix})`, sql`${leases.expiresAt} < now()`));
}

/**
 * A transaction-scoped advisory lock on `key` (text, hashed into Postgres's lock space), held
 * until the transaction ends. Waiting for it is waiting inside Postgres, where the deadlock
 * detector sees the wait; a wait in the client for another transaction to end is invisible to it.
 */
export async function holdUntilTransactionEnds(db: Db, key: string): Promise<void> {
  await db.execute(sql`select pg_advisory_xact_lock(hashtextextended(${key}, 0))`);
}
