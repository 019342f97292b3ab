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
 * The keys travel as one JSON parameter, the ids grouped under their (connection, object): one
 * statement text whatever their number, and a page of 200 ids is about 2 KB instead of 12.
 *
 * The lateral LIMIT 1 leaves the planner no join to choose. It guesses a JSON list at 100 rows
 * whatever its length; joined to the heads that way, it scanned every head once the table held a
 * few thousand, and a generic plan made while the table was empty did so for good.
 */
export function headsByKey(columns: SQL, keys: readonly HeadKey[], mode: 'read' | 'lock' = 'read'): SQL {
  const groups = new Map<string, { connection_id: string; object: string; crm_ids: string[] }>();
  for (const k of keys) {
    const group = `${k.connection_id}\u0000${k.object}`;
    let g = groups.get(group);
    if (g === undefined) groups.set(group, (g = { connection_id: k.connection_id, object: k.object, crm_ids: [] }));
    g.crm_ids.push(k.crm_id);
  }
  return sql`
    select ${columns}
    from (
      select g.connection_id, g.object, i.crm_id
      from jsonb_to_recordset(${JSON.stringify([...groups.values()])}::jsonb) as g(connection_id text, object text, crm_ids jsonb),
        jsonb_array_elements_text(g.crm_ids) as i(crm_id)
      order by 1, 2, 3
    ) k
    cross join lateral (
      select * from record_heads h
      where (h.connection_id, h.object, h.crm_id) = (k.connection_id, k.object, k.crm_id)
      limit 1 ${mode === 'lock' ? sql`for update` : sql``}
    ) h`;
}
