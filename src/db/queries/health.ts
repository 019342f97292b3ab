import { and, eq, max, sql } from 'drizzle-orm';
import type { Db } from '../client.js';
import { ledger, outbox, tokens } from '../schema/index.js';

export interface DeliveryStats {
  pending: number;
  oldestPendingAt: Date | null;
  deadLetters: number;
}

export async function getDeliveryStats(db: Db): Promise<Map<string, DeliveryStats>> {
  const rows = await db
    .select({
      connectionId: outbox.connectionId,
      pending: sql<number>`count(*) filter (where ${outbox.state} = 'pending')`.mapWith(Number),
      oldestPendingAt: sql<string | null>`min(${outbox.queuedAt}) filter (where ${outbox.state} = 'pending')`,
      deadLetters: sql<number>`count(*) filter (where ${outbox.state} = 'dead')`.mapWith(Number),
    })
    .from(outbox)
    .where(sql`${outbox.state} in ('pending', 'dead')`)
    .groupBy(outbox.connectionId);
  return new Map(
    rows.map((r) => [
      r.connectionId,
      { pending: r.pending, deadLetters: r.deadLetters, oldestPendingAt: r.oldestPendingAt === null ? null : new Date(r.oldestPendingAt) },
    ]),
  );
}

/** The last hook the ledger recorded for a connection (any replica); an index lookup. */
export async function getLastHookAt(db: Db, connectionId: string): Promise<Date | null> {
  const [row] = await db
    .select({ at: max(ledger.receivedAt) })
    .from(ledger)
    .where(and(eq(ledger.connectionId, connectionId), eq(ledger.source, 'hook')));
  return row?.at ?? null;
}

export interface StoredAuth {
  state: 'ok' | 'needs_reauth';
  expiresAt: Date | null;
}

/** The stored token state per connection; a connection with no row has stored no token yet. */
export async function getAuthStates(db: Db): Promise<Map<string, StoredAuth>> {
  const rows = await db.select({ connectionId: tokens.connectionId, state: tokens.state, expiresAt: tokens.expiresAt }).from(tokens);
  return new Map(rows.map((r) => [r.connectionId, { state: r.state, expiresAt: r.expiresAt }]));
}
