/**
 * Postgres stores no U+0000 in text or jsonb ("unsupported Unicode escape sequence"), yet JSON
 * allows it as `\u0000`, and a CRM field or a pipeline's body may carry one. Wherever JSON comes
 * in (request bodies, CRM answers) that escape is read as U+FFFD, the replacement character, so
 * a record carrying one is stored, compared and delivered like any other instead of failing its
 * transaction: a 500 for a hook, a page the poller could never get past.
 *
 * The text is JSON: `\u0000` counts only where its backslash is not itself escaped (`\\u0000` is
 * a backslash followed by "u0000", and stays).
 */
const NUL_ESCAPE = /(?<!\\)((?:\\\\)*)\\u0000/g;

export function withoutNul(json: string): string {
  return json.includes('\\u0000') ? json.replace(NUL_ESCAPE, '$1\\ufffd') : json;
}
