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

export const redactPaths = [
  'req.headers',
  ...REDACTED_KEYS,
  ...REDACTED_KEYS.map((k) => `*.${k}`),
  ...REDACTED_KEYS.map((k) => `*.*.${k}`),
];

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
    redact: { paths: redactPaths, censor: '[Redacted]' },
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
