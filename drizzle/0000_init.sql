CREATE TABLE "ledger" (
	"seq" bigserial PRIMARY KEY NOT NULL,
	"event_id" uuid NOT NULL,
	"connection_id" text NOT NULL,
	"object" text NOT NULL,
	"crm_id" text NOT NULL,
	"source" text NOT NULL,
	"disposition" text NOT NULL,
	"change" text NOT NULL,
	"version" text,
	"content_hash" text,
	"origin" text DEFAULT 'crm' NOT NULL,
	"observed_at" timestamp with time zone NOT NULL,
	"received_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "ledger_event_id_key" UNIQUE("event_id")
);
--> statement-breakpoint
CREATE TABLE "ledger_bodies" (
	"event_id" uuid PRIMARY KEY NOT NULL,
	"raw" jsonb,
	"fields" jsonb
);
--> statement-breakpoint
CREATE TABLE "record_heads" (
	"connection_id" text NOT NULL,
	"object" text NOT NULL,
	"crm_id" text NOT NULL,
	"version" text,
	"version_rank" double precision,
	"content_hash" text,
	"deleted" boolean DEFAULT false NOT NULL,
	"origin" text DEFAULT 'crm' NOT NULL,
	"last_event_id" uuid NOT NULL,
	"delivered_hash" text,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "record_heads_pkey" PRIMARY KEY("connection_id","object","crm_id")
);
--> statement-breakpoint
CREATE TABLE "outbox" (
	"id" bigserial PRIMARY KEY NOT NULL,
	"event_id" uuid NOT NULL,
	"connection_id" text NOT NULL,
	"object" text NOT NULL,
	"crm_id" text NOT NULL,
	"state" text DEFAULT 'pending' NOT NULL,
	"attempts" integer DEFAULT 0 NOT NULL,
	"next_attempt_at" timestamp with time zone DEFAULT now() NOT NULL,
	"lease_owner" text,
	"lease_expires_at" timestamp with time zone,
	"last_status" integer,
	"last_error" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"delivered_at" timestamp with time zone,
	CONSTRAINT "outbox_event_id_key" UNIQUE("event_id")
);
--> statement-breakpoint
CREATE TABLE "pending_fetches" (
	"connection_id" text NOT NULL,
	"object" text NOT NULL,
	"crm_id" text NOT NULL,
	"event_id" uuid NOT NULL,
	"received_at" timestamp with time zone DEFAULT now() NOT NULL,
	"last_error" text,
	CONSTRAINT "pending_fetches_pkey" PRIMARY KEY("connection_id","object","crm_id")
);
--> statement-breakpoint
CREATE TABLE "stream_cursors" (
	"connection_id" text NOT NULL,
	"object" text NOT NULL,
	"cursor_updated_at" text,
	"cursor_id" text,
	"last_attempt_at" timestamp with time zone,
	"last_success_at" timestamp with time zone,
	"last_error" text,
	"last_sweep_at" timestamp with time zone,
	"caught_by_poll" integer DEFAULT 0 NOT NULL,
	"counts" jsonb,
	CONSTRAINT "stream_cursors_pkey" PRIMARY KEY("connection_id","object")
);
--> statement-breakpoint
CREATE TABLE "tokens" (
	"connection_id" text PRIMARY KEY NOT NULL,
	"access_token_enc" text,
	"refresh_token_enc" text,
	"expires_at" timestamp with time zone,
	"claimed_lifetime_seconds" integer,
	"state" text DEFAULT 'ok' NOT NULL,
	"last_error" text,
	"generation" integer DEFAULT 0 NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL
);
--> statement-breakpoint
CREATE TABLE "leases" (
	"name" text PRIMARY KEY NOT NULL,
	"owner" text NOT NULL,
	"expires_at" timestamp with time zone NOT NULL
);
--> statement-breakpoint
CREATE TABLE "outbound_writes" (
	"id" uuid PRIMARY KEY NOT NULL,
	"connection_id" text NOT NULL,
	"object" text NOT NULL,
	"idempotency_key" text NOT NULL,
	"request_hash" text NOT NULL,
	"external_id" text,
	"crm_id" text,
	"content_hash" text NOT NULL,
	"fields" jsonb,
	"state" text DEFAULT 'pending' NOT NULL,
	"attempts" integer DEFAULT 0 NOT NULL,
	"next_attempt_at" timestamp with time zone DEFAULT now() NOT NULL,
	"last_error" text,
	"crm_version" text,
	"created_at" timestamp with time zone DEFAULT now() NOT NULL,
	"updated_at" timestamp with time zone DEFAULT now() NOT NULL,
	CONSTRAINT "outbound_writes_idempotency_key" UNIQUE("connection_id","idempotency_key")
);
--> statement-breakpoint
ALTER TABLE "ledger_bodies" ADD CONSTRAINT "ledger_bodies_event_id_ledger_event_id_fk" FOREIGN KEY ("event_id") REFERENCES "public"."ledger"("event_id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
ALTER TABLE "outbox" ADD CONSTRAINT "outbox_event_id_ledger_event_id_fk" FOREIGN KEY ("event_id") REFERENCES "public"."ledger"("event_id") ON DELETE no action ON UPDATE no action;--> statement-breakpoint
CREATE INDEX "ledger_record_idx" ON "ledger" USING btree ("connection_id","object","crm_id","seq");--> statement-breakpoint
CREATE INDEX "ledger_connection_source_received_idx" ON "ledger" USING btree ("connection_id","source","received_at");--> statement-breakpoint
CREATE INDEX "outbox_due_idx" ON "outbox" USING btree ("state","next_attempt_at");--> statement-breakpoint
CREATE INDEX "outbox_connection_state_idx" ON "outbox" USING btree ("connection_id","state","created_at");--> statement-breakpoint
CREATE INDEX "outbox_record_idx" ON "outbox" USING btree ("connection_id","object","crm_id","id");--> statement-breakpoint
CREATE INDEX "outbound_writes_record_idx" ON "outbound_writes" USING btree ("connection_id","object","crm_id");--> statement-breakpoint
CREATE INDEX "outbound_writes_hash_idx" ON "outbound_writes" USING btree ("connection_id","object","content_hash");