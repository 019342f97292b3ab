import type { FastifyServerOptions } from 'fastify';
import type { LoggerOptions } from 'pino';
import { safeLoggedError } from './privacy.js';

/**
 * Keys whose values never reach a log line, at any depth pino can address. Hook secrets, OAuth
 * tokens and client secrets are the bridge's keys to a firm's client data.
 */
const REDACTED_KEYS = [
  'authorization',
  'cookie',
  'secret',
  'secrets',
  'password',
  'token',
  'accessToken',
  'refreshToken',
  'access_token',
  'refresh_token',
  'clientSecret',
  'client_secret',
  'apiKey',
  'apiKeys',
];

const SENSITIVE_KEYS = new Set([...REDACTED_KEYS, 'headers'].map((k) => k.toLowerCase()));
/** Keys are censored this deep: the logged object's own keys, and two levels below them. */
const CENSOR_DEPTH = 3;

/**
 * A log line's object with every sensitive key's value replaced, at any case, in plain objects
 * and arrays up to CENSOR_DEPTH; whole `headers` objects go. The object itself is returned when
 * nothing needed censoring (the common case: a walk over a few keys, no copy). This replaces
 * pino's path-based `redact`, which cloned and walked 43 paths for every line and was the
 * largest single cost of a hook's info line under load. Errors are left to the `err`
 * serializer (safeLoggedError), which keeps only a class, a message and frames.
 */
export function censor<T>(value: T, depth = 0): T {
  if (depth >= CENSOR_DEPTH || !isPlain(value)) return value;
  const source = value as Record<string, unknown>;
  let copy: Record<string, unknown> | undefined;
  for (const key of Object.keys(source)) {
    const original = source[key];
    const next = SENSITIVE_KEYS.has(key.toLowerCase()) && original !== undefined ? '[Redacted]' : censor(original, depth + 1);
    if (next !== original) {
      copy ??= Array.isArray(source) ? ([...source] as unknown as Record<string, unknown>) : { ...source };
      copy[key] = next;
    }
  }
  return (copy ?? value) as T;
}

function isPlain(value: unknown): boolean {
  if (value === null || typeof value !== 'object') return false;
  if (Array.isArray(value)) return true;
  const proto = Object.getPrototypeOf(value) as unknown;
  return proto === Object.prototype || proto === null;
}

const SENSITIVE_QUERY = /token|secret|code|key|password|state/i;

/** A URL for the log: sensitive query values (OAuth codes, tokens) replaced, the rest kept. */
export function safeUrl(url: string): string {
  const q = url.indexOf('?');
  if (q === -1) return url;
  const params = new URLSearchParams(url.slice(q + 1));
  for (const key of [...params.keys()]) if (SENSITIVE_QUERY.test(key)) params.set(key, '[Redacted]');
  return `${url.slice(0, q)}?${params.toString()}`;
}

export function loggerOptions(level: string): LoggerOptions & NonNullable<Exclude<FastifyServerOptions['logger'], boolean>> {
  return {
    level,
    // Log objects through `censor`; a child logger's bindings bypass formatters, so pino's
    // redact keeps the top-level keys there (top-level paths cost nothing on lines without them).
    formatters: { log: (object: Record<string, unknown>) => censor(object) },
    redact: { paths: REDACTED_KEYS, censor: '[Redacted]' },
    serializers: {
      req: (req: { method: string; url: string; ip: string }) => ({ method: req.method, url: safeUrl(req.url), remoteAddress: req.ip }),
      // A failed insert's message is its query and parameters (the record); a CRM's error body
      // can echo the record it refused. Errors are logged without either, at every level.
      err: safeLoggedError,
    },
  };
}

/**
 * The process logger: JSON for machines, or pino-pretty (in a worker thread, so the event loop
 * is not slowed) when a person watches a terminal. Pretty lines drop the keys their message
 * already says in words; JSON keeps every key for queries.
 */
export function processLoggerOptions(level: string, format: 'json' | 'pretty' | undefined, isTty: boolean) {
  const pretty = format === 'pretty' || (format === undefined && isTty);
  return {
    ...loggerOptions(level),
    ...(pretty ? { transport: { target: 'pino-pretty', options: { translateTime: 'HH:MM:ss', ignore: 'pid,hostname,reqId,component,connection,object,crmId,eventId,disposition,report,attempt,status,grant', singleLine: true } } } : {}),
  };
}

/** Whether a logger writes debug lines: what is built only for them (a redacted field map) is built only then. */
export function logsDebug(log: { level: string }): boolean {
  return log.level === 'debug' || log.level === 'trace';
}
