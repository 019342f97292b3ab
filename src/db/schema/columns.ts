import { text, timestamp } from 'drizzle-orm/pg-core';

/** Every key in crm-bridge starts with the connection, so one deployment serves many firms. */
export const connectionId = () => text('connection_id').notNull();

export const timestamptz = (name: string) => timestamp(name, { withTimezone: true, mode: 'date' });

export const createdAt = () => timestamptz('created_at').notNull().defaultNow();
