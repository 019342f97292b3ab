import { sql, type SQL } from 'drizzle-orm';

/** A record head's key, as the JSON lists of keys below carry it. */
export interface HeadKey {
  connection_id: string;
  object: string;
  crm_id: string;
}

/**
 * `select <columns> from` the record heads of a list of keys, in key order, each found through
 * the primary key, and locked in that order for `'lock'` (so concurrent batches cannot deadlock).
 * The keys travel as one JSON parameter: one statement text whatever their number.
 *
 * The lateral LIMIT 1 leaves the planner no join to choose. It guesses a JSON list at 100 rows
 * whatever its length; joined to the heads that way, it scanned every head once the table held a
 * few thousand, and a generic plan made while the table was empty did so for good.
 */
export function headsByKey(columns: SQL, keys: readonly HeadKey[], mode: 'read' | 'lock' = 'read'): SQL {
  return sql`
    select ${columns}
    from (
      select * from jsonb_to_recordset(${JSON.stringify(keys)}::jsonb) as k(connection_id text, object text, crm_id text)
      order by connection_id, object, crm_id
    ) k
    cross join lateral (
      select * from record_heads h
      where (h.connection_id, h.object, h.crm_id) = (k.connection_id, k.object, k.crm_id)
      limit 1 ${mode === 'lock' ? sql`for update` : sql``}
    ) h`;
}
