import { eq, sql } from 'drizzle-orm';
import type { Db } from '../client.js';
import { tokens } from '../schema/index.js';

export type TokenRow = typeof tokens.$inferSelect;

/** Encrypted token values as the token manager stores them; the queries never see plaintext. */
export interface SealedTokens {
  accessTokenEnc: string;
  /** undefined keeps the stored refresh token: Clio answers a refresh without a new one. */
  refreshTokenEnc?: string | null | undefined;
  expiresAt: Date | null;
  claimedLifetimeSeconds: number | null;
}

export async function getTokenRow(db: Db, connectionId: string): Promise<TokenRow | undefined> {
  const [row] = await db.select().from(tokens).where(eq(tokens.connectionId, connectionId));
  return row;
}

function sealedValues(values: SealedTokens) {
  return {
    accessTokenEnc: values.accessTokenEnc,
    ...(values.refreshTokenEnc === undefined ? {} : { refreshTokenEnc: values.refreshTokenEnc }),
    expiresAt: values.expiresAt,
    claimedLifetimeSeconds: values.claimedLifetimeSeconds,
    state: 'ok' as const,
    lastError: null,
    updatedAt: sql`now()`,
  };
}

/**
 * Stores tokens an operator just granted (authorization-code exchange, a static token): they
 * replace whatever was there, and the connection is usable again.
 */
export async function saveGrantedTokens(db: Db, connectionId: string, values: SealedTokens): Promise<number> {
  const set = sealedValues({ refreshTokenEnc: null, ...values });
  const [row] = await db
    .insert(tokens)
    .values({ connectionId, ...set, generation: 1 })
    .onConflictDoUpdate({ target: tokens.connectionId, set: { ...set, generation: sql`${tokens.generation} + 1` } })
    .returning({ generation: tokens.generation });
  return row!.generation;
}

/**
 * Stores the answer of a refresh, but only over the generation it was refreshed from: if the
 * row moved on meanwhile (an operator re-authorised), the newer grant wins and this returns
 * null. The commit happens before the new access token is handed out, so a rotated refresh
 * token is never lost to a crash between the two.
 */
export async function saveRefreshedTokens(db: Db, connectionId: string, fromGeneration: number, values: SealedTokens): Promise<number | null> {
  const set = sealedValues(values);
  const rows = await db
    .insert(tokens)
    .values({ connectionId, ...set, generation: fromGeneration + 1 })
    .onConflictDoUpdate({
      target: tokens.connectionId,
      set: { ...set, generation: sql`${tokens.generation} + 1` },
      setWhere: sql`${tokens.generation} = ${fromGeneration}`,
    })
    .returning({ generation: tokens.generation });
  return rows[0]?.generation ?? null;
}

/**
 * The grant is gone: polling pauses and /health turns 503 until an operator re-authorises.
 * With `atGeneration`, only if nobody stored a newer grant since the failing one was read.
 */
export async function markNeedsReauth(db: Db, connectionId: string, reason: string, atGeneration?: number): Promise<boolean> {
  const set = { state: 'needs_reauth' as const, lastError: reason, updatedAt: sql`now()` };
  const rows = await db
    .insert(tokens)
    .values({ connectionId, ...set })
    .onConflictDoUpdate({
      target: tokens.connectionId,
      set,
      ...(atGeneration === undefined ? {} : { setWhere: sql`${tokens.generation} = ${atGeneration}` }),
    })
    .returning({ state: tokens.state });
  return rows.length === 1;
}

/** A transient token-endpoint failure: kept for operators, the state stays as it is. */
export async function recordTokenError(db: Db, connectionId: string, message: string): Promise<void> {
  await db.update(tokens).set({ lastError: message, updatedAt: sql`now()` }).where(eq(tokens.connectionId, connectionId));
}
