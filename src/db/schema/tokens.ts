import { integer, pgTable, text } from 'drizzle-orm/pg-core';
import { timestamptz } from './columns.js';

export const authStates = ['ok', 'needs_reauth'] as const;
export type AuthState = (typeof authStates)[number];

/** OAuth tokens per connection, encrypted at rest (AES-256-GCM); never logged. */
export const tokens = pgTable('tokens', {
  connectionId: text('connection_id').primaryKey(),
  accessTokenEnc: text('access_token_enc'),
  refreshTokenEnc: text('refresh_token_enc'),
  expiresAt: timestamptz('expires_at'),
  claimedLifetimeSeconds: integer('claimed_lifetime_seconds'),
  state: text('state', { enum: authStates }).notNull().default('ok'),
  lastError: text('last_error'),
  generation: integer('generation').notNull().default(0),
  updatedAt: timestamptz('updated_at').notNull().defaultNow(),
});
