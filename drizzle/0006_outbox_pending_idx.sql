DROP INDEX "outbox_due_idx";--> statement-breakpoint
CREATE INDEX "outbox_pending_idx" ON "outbox" USING btree ("connection_id","id") WHERE "outbox"."state" = 'pending';