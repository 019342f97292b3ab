ALTER TABLE "outbound_writes" ADD COLUMN "operation" text DEFAULT 'create' NOT NULL;--> statement-breakpoint
ALTER TABLE "outbound_writes" ADD COLUMN "echo_match" jsonb;--> statement-breakpoint
ALTER TABLE "outbound_writes" ADD COLUMN "settled_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "outbound_writes" ADD COLUMN "lease_owner" text;--> statement-breakpoint
ALTER TABLE "outbound_writes" ADD COLUMN "lease_expires_at" timestamp with time zone;--> statement-breakpoint
ALTER TABLE "outbound_writes" ADD COLUMN "last_status" integer;--> statement-breakpoint
CREATE INDEX "outbound_writes_due_idx" ON "outbound_writes" USING btree ("state","next_attempt_at");--> statement-breakpoint
CREATE INDEX "outbound_writes_live_idx" ON "outbound_writes" USING btree ("connection_id","object","crm_id") WHERE settled_at is null;