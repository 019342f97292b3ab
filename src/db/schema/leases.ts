import { pgTable, text } from 'drizzle-orm/pg-core';
import { timestamptz } from './columns.js';

/**
 * Named leases with an expiry (`poll:<conn>:<object>`, `token:<conn>`): the holder renews its
 * own; anyone may take an expired one. Never a lock held across an HTTP call.
 */
export const leases = pgTable('leases', {
  name: text('name').primaryKey(),
  owner: text('owner').notNull(),
  expiresAt: timestamptz('expires_at').notNull(),
});
