import type { ObjectDefinition } from './config/schema.js';

/**
 * Keeping client data out of what operators and log collectors see. Intake records are
 * confidential; error messages are where they leak by accident: a CRM's 422 body echoes the
 * record it refused, a failed insert's message carries the query parameters (the record), a
 * URL carries an access token. So an error is stored and shown as its class and status only.
 */

const CLASS = /^[A-Za-z][A-Za-z0-9_.-]{0,63}$/;
/** What `errorClass` produces, so a stored value can be recognised and trimmed back to it. */
const STORED = /^([A-Za-z][A-Za-z0-9_.-]{0,63})(?: \(HTTP (\d{3})\))?/;

/**
 * An error reduced to its class and status, e.g. `CRM_HTTP_STATUS (HTTP 422)`, `DB_22P05`,
 * `LEASE_LOST`: what failed, never what it was failing on. Use it wherever an error is stored
 * (`last_error` columns) or shown (/health). Given a string (a value stored before this rule,
 * or by older code), it keeps only the leading class and status.
 */
export function errorClass(err: unknown): string {
  if (typeof err === 'string') {
    const match = STORED.exec(err.trim());
    if (!match) return 'Error';
    return match[2] ? `${match[1]} (HTTP ${match[2]})` : match[1]!;
  }
  if (err === null || typeof err !== 'object') return 'Error';
  const e = err as { code?: unknown; name?: unknown; status?: unknown; query?: unknown; params?: unknown; cause?: unknown };
  // Drizzle wraps a driver error in one whose message is the query and its parameters: the
  // record being written. The driver's SQLSTATE is the class.
  if (typeof e.query === 'string' && 'params' in e) {
    const sqlstate = (e.cause as { code?: unknown } | undefined)?.code;
    return typeof sqlstate === 'string' && /^[0-9A-Z]{5}$/.test(sqlstate) ? `DB_${sqlstate}` : 'DB_ERROR';
  }
  let name = typeof e.code === 'string' && CLASS.test(e.code) ? e.code : typeof e.name === 'string' && CLASS.test(e.name) ? e.name : 'Error';
  // A bare SQLSTATE from postgres.js or PGlite.
  if (/^[0-9A-Z]{5}$/.test(name) && /\d/.test(name)) name = `DB_${name}`;
  // Only the status a server answered with (CrmHttpError.status; 0 when none answered). An
  // AppError's statusCode is what the bridge would answer its own caller (502 for any CRM
  // failure, 503 for NEEDS_REAUTH): shown as "(HTTP 502)" on a CRM that never answered, it sent
  // operators looking for a gateway error at the CRM instead of at the address or the network.
  const status = typeof e.status === 'number' && e.status >= 100 && e.status <= 599 ? e.status : undefined;
  return status === undefined ? name : `${name} (HTTP ${status})`;
}

export const REDACTED = '[Redacted]';

/**
 * A record's mapped fields for a debug log, with the connector's `sensitive` fields replaced.
 * Only mapped fields are ever logged, never the raw record: its unmapped parts (nested
 * addresses, custom fields) cannot be classified, so they do not reach a log at any level.
 */
export function redactFields(fields: Record<string, unknown> | null, definition: Pick<ObjectDefinition, 'sensitive'>): Record<string, unknown> | null {
  if (fields === null) return null;
  const sensitive = new Set(definition.sensitive ?? []);
  return Object.fromEntries(Object.entries(fields).map(([k, v]) => [k, sensitive.has(k) && v !== null ? REDACTED : v]));
}

/**
 * An error for a log line: class, status and stack frames, with the message reduced where it
 * would carry client data (a failed query's parameters, a CRM's error body). Other messages,
 * written by the bridge itself, are kept; they name paths and ids, not content.
 */
export function safeLoggedError(err: unknown): { [key: string]: unknown; type: string; message: string; stack: string } {
  if (err === null || typeof err !== 'object') return { type: typeof err, message: String(err), stack: '' };
  const e = err as Error & { code?: unknown; status?: unknown; statusCode?: unknown; query?: unknown; body?: unknown; url?: unknown; cause?: unknown };
  // A database error's own message can quote a value too (`invalid input syntax …: "Jane Doe"`).
  const sqlstate = typeof e.code === 'string' && /^[0-9A-Z]{5}$/.test(e.code) && /\d/.test(e.code);
  const carriesData = (typeof e.query === 'string' && 'params' in e) || 'body' in e || sqlstate;
  const message = carriesData ? errorClass(err) : typeof e.message === 'string' ? e.message : '';
  const frames = typeof e.stack === 'string' ? e.stack.split('\n').filter((line) => /^\s+at /.test(line)).join('\n') : undefined;
  return {
    type: e.constructor?.name ?? 'Error',
    class: errorClass(err),
    message,
    ...(typeof e.url === 'string' ? { url: e.url } : {}),
    stack: frames ? `${e.name ?? 'Error'}: ${message}\n${frames}` : '',
    ...(e.cause !== undefined && e.cause !== err ? { cause: safeLoggedError(e.cause) } : {}),
  };
}
