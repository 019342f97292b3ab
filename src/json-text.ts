/**
 * Postgres cannot store every string JSON can carry: no U+0000 in text or jsonb, and no lone
 * UTF-16 surrogate (`\ud800` without its pair) in jsonb. A CRM field or a pipeline's body may
 * carry either, so wherever JSON comes in (request bodies, CRM answers) both are read as U+FFFD,
 * the replacement character. A record carrying one is then stored, compared and delivered like
 * any other instead of failing its transaction: a 500 for a hook, a page the poller could never
 * get past.
 *
 * Both can only arrive as `\u` escapes (raw, they are not valid UTF-8), so text without one is
 * parsed as it is; text with one (or with an escaped backslash before a "u", which the check
 * cannot tell apart) is parsed with a reviver that mends strings and keys.
 */
const MAY_NEED_MENDING = /\\u(?:0000|[dD][89a-fA-F])/;

const UNSTORABLE = /\u0000|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;

export function needsMending(json: string | Buffer): boolean {
  if (!json.includes('\\u')) return false;
  return MAY_NEED_MENDING.test(typeof json === 'string' ? json : json.toString('latin1'));
}

function mend(text: string): string {
  return text.replace(UNSTORABLE, '\ufffd');
}

/** A JSON.parse reviver that mends every string value and object key (see above). */
export function mendStrings(_key: string, value: unknown): unknown {
  if (typeof value === 'string') return mend(value);
  if (value !== null && typeof value === 'object' && !Array.isArray(value)) {
    const keys = Object.keys(value);
    if (keys.some((k) => mend(k) !== k)) return Object.fromEntries(keys.map((k) => [mend(k), (value as Record<string, unknown>)[k]]));
  }
  return value;
}

/** JSON.parse, mending what Postgres cannot store. */
export function parseStorableJson(text: string): unknown {
  return needsMending(text) ? JSON.parse(text, mendStrings) : JSON.parse(text);
}

/**
 * How deep arrays and objects may nest in a request body. A CRM record nests a few levels; the
 * hashing of fields (canonicalJson) and Postgres's jsonb recurse per level, so a body nested
 * thousands deep, a few kilobytes long, would otherwise end in a stack overflow: a 500.
 */
export const MAX_JSON_DEPTH = 64;

/** JSON text nests arrays and objects deeper than `max` (brackets inside strings do not count). */
export function nestsDeeperThan(json: Buffer, max: number): boolean {
  // Fewer opening brackets than the limit cannot nest deeper: most bodies end here, in native code.
  let opens = 0;
  for (const bracket of [0x7b, 0x5b]) {
    for (let at = json.indexOf(bracket); at !== -1 && opens <= max; at = json.indexOf(bracket, at + 1)) opens++;
  }
  if (opens <= max) return false;
  let depth = 0;
  let inString = false;
  for (let i = 0; i < json.length; i++) {
    const c = json[i];
    if (inString) {
      if (c === 0x5c) i++;
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) inString = true;
    else if (c === 0x7b || c === 0x5b) {
      if (++depth > max) return true;
    } else if (c === 0x7d || c === 0x5d) depth--;
  }
  return false;
}
