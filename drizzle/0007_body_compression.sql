-- A body row (the CRM's record and its mapped fields, as jsonb) passes Postgres's 2 KB TOAST
-- threshold, so every insert compresses it. pglz took about a quarter of the gate's Postgres CPU
-- per change (bench/gate-cost.ts); lz4 does the same job several times faster. Rows already
-- stored keep pglz, and both are read alike. A server built without lz4 (PGlite among them)
-- keeps pglz.
DO $$
BEGIN
  ALTER TABLE ledger_bodies ALTER COLUMN raw SET COMPRESSION lz4, ALTER COLUMN fields SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
  RAISE NOTICE 'lz4 is not available on this server: ledger bodies stay compressed with pglz';
END $$;
