import { setTimeout as sleep } from 'node:timers/promises';
import { AppError } from '../errors.js';
import { safeUrl } from '../logger.js';
import type { TokenProvider } from './token-provider.js';
import { parseStorableJson } from '../json-text.js';

/**
 * The one HTTP client for talking to CRMs: the connectors' list/get/write calls and the token
 * manager's token-endpoint calls (with `auth: false` and a form body). Timeouts on every call,
 * retries with backoff, 429 and rate-limit pacing, one refresh-and-replay on 401, answers
 * that are not JSON turned into an error that names the URL instead of a parse crash, and a
 * bound on how much of an answer is read.
 */

export type CrmHttpErrorCode =
  /** The CRM answered with a status the caller did not accept (after retries, for 5xx). */
  | 'CRM_HTTP_STATUS'
  /** Still 429 after every retry. */
  | 'CRM_RATE_LIMITED'
  /** 401 again after one refresh and replay. */
  | 'CRM_UNAUTHORIZED'
  /** An HTML page (or anything not JSON) where JSON was expected: usually the wrong host. */
  | 'CRM_NOT_JSON'
  /** No answer within the timeout, on every attempt. */
  | 'CRM_TIMEOUT'
  /** The connection failed (refused, reset, DNS) on every attempt. */
  | 'CRM_UNREACHABLE'
  /** A link the CRM gave (a next page) points away from the connection's host: the token is not sent there. */
  | 'CRM_OTHER_ORIGIN'
  /** The caller's signal aborted the call. */
  | 'CRM_ABORTED'
  /** The request could not be built (a token or header value with a character HTTP forbids): it was never sent. */
  | 'CRM_INVALID_REQUEST'
  /** The answer was larger than `maxResponseBytes`: declared so, or read up to it and dropped. Never retried. */
  | 'CRM_RESPONSE_TOO_LARGE';

export class CrmHttpError extends AppError {
  declare readonly code: CrmHttpErrorCode;
  constructor(
    code: CrmHttpErrorCode,
    detail: string,
    /** The URL with query secrets replaced; safe to log. */
    readonly url: string,
    /** The CRM's status, or 0 when it never answered. */
    readonly status: number,
    /** The parsed JSON body when there was one, else the first bytes of the text. */
    readonly body?: unknown,
    options?: { cause?: unknown; retryAfterMs?: number | undefined },
  ) {
    super(502, code, detail, options);
    this.name = 'CrmHttpError';
    this.retryAfterMs = options?.retryAfterMs;
  }

  /** A 429's or 5xx's Retry-After, when it gave one: how long the CRM asked to be left alone. */
  readonly retryAfterMs: number | undefined;
}

/** The slice of a pino logger the client uses; every line carries a safe URL, never a token. */
export interface CrmHttpLog {
  debug(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}

export interface CrmHttpClientOptions {
  /** Relative request URLs resolve against it (`https://app.clio.com`). */
  baseUrl: string;
  /** Without it, requests go unauthenticated. */
  tokens?: TokenProvider;
  /** Per attempt. Default 30 s. */
  timeoutMs?: number;
  /** Retries after the first attempt for 5xx, resets, timeouts and 429. Default 4. */
  maxRetries?: number;
  /** Backoff: a random wait in [0, min(max, base × 2^attempt)] (full jitter). Defaults 500 ms / 30 s. */
  retryBaseMs?: number;
  retryMaxMs?: number;
  /** The unit of Retry-After on a 429: seconds (RFC 9110, Clio) or milliseconds (HubSpot). */
  retryAfterUnit?: 'seconds' | 'milliseconds';
  /** The longest Retry-After (on a 429 or a 5xx) the client will sleep for; longer ones fail the call. Default 10 min. */
  maxRetryAfterMs?: number;
  /** A floor between request starts, for a limit the CRM does not announce (HubSpot search: 4/s). */
  minIntervalMs?: number;
  /** Pace by X-RateLimit-* headers (default true). */
  pacing?: boolean;
  /** The most bytes of an answer's body read; a larger answer is CRM_RESPONSE_TOO_LARGE. Default MAX_RESPONSE_BYTES. */
  maxResponseBytes?: number;
  log?: CrmHttpLog;
  userAgent?: string;
}

export interface CrmRequest {
  method?: string;
  /** Absolute, or relative to the base URL. */
  url: string;
  query?: Record<string, string | number | boolean | undefined>;
  /** A JSON body (sets content-type). */
  json?: unknown;
  /** A form-encoded body, as token endpoints want. */
  form?: Record<string, string>;
  headers?: Record<string, string>;
  signal?: AbortSignal;
  /** Send the bearer token (default true when the client has a TokenProvider). */
  auth?: boolean;
  /**
   * Safe to send twice: retried on 5xx, timeouts and resets. Defaults to true except for POST
   * and PATCH; a search that is a POST says so. 429, 401 and refused connections are always
   * retried, since the CRM did not act on those.
   */
  idempotent?: boolean;
  /** Statuses returned instead of thrown (2xx always are). Default none. */
  acceptStatus?: number[];
  /** `json` (default) parses and insists on JSON; `text` returns the text; `none` skips the body. */
  expect?: 'json' | 'text' | 'none';
}

export interface CrmResponse<T = unknown> {
  status: number;
  headers: Headers;
  body: T;
  /** The URL that answered, safe to log. */
  url: string;
}

export interface CrmHttpClient {
  readonly baseUrl: string;
  request<T = unknown>(req: CrmRequest): Promise<CrmResponse<T>>;
}

/** What the X-RateLimit-* headers last said, shared by every request through this client. */
interface PacingState {
  limit: number | null;
  remaining: number | null;
  resetAt: number | null;
  /** The earliest time the next request may start (reserved slots and Retry-After). */
  nextSlotAt: number;
}

const NETWORK_RETRYABLE = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'UND_ERR_SOCKET', 'UND_ERR_CONNECT_TIMEOUT', 'ECONNABORTED', 'EAI_AGAIN']);
/** Refused means the request never reached the CRM, so even a create may be sent again. */
const NEVER_SENT = new Set(['ECONNREFUSED', 'UND_ERR_CONNECT_TIMEOUT', 'EAI_AGAIN']);
const REDIRECTS = new Set([301, 302, 303, 307, 308]);
const MAX_REDIRECTS = 10;

/**
 * The most of one answer the client reads. Pages are far smaller: from the sandbox, 200 Clio
 * matters weigh 94 KB and 100 HubSpot contacts 38 KB, so the limit leaves over a hundredfold
 * room for longer records and wider field lists. An answer near it is not a page but a base URL
 * pointing at a file server, a proxy's dump or a runaway export. The limit also bounds what one
 * answer costs: read and parsed, 16 MiB of records took about 110 MB of memory (32 MiB took
 * 180 MB, most of the 200 MB a backfill may peak at), where an answer of hundreds of MB read
 * whole takes a small machine's process down.
 */
export const MAX_RESPONSE_BYTES = 16 * 1024 * 1024;

export function createCrmHttpClient(options: CrmHttpClientOptions): CrmHttpClient {
  const timeoutMs = options.timeoutMs ?? 30_000;
  const maxRetries = options.maxRetries ?? 4;
  const retryBaseMs = options.retryBaseMs ?? 500;
  const retryMaxMs = options.retryMaxMs ?? 30_000;
  const retryAfterUnit = options.retryAfterUnit ?? 'seconds';
  const maxRetryAfterMs = options.maxRetryAfterMs ?? 600_000;
  const minIntervalMs = options.minIntervalMs ?? 0;
  const pacingOn = options.pacing ?? true;
  const maxResponseBytes = options.maxResponseBytes ?? MAX_RESPONSE_BYTES;
  const log = options.log;
  const base = options.baseUrl.endsWith('/') ? options.baseUrl : `${options.baseUrl}/`;
  const baseOrigin = new URL(base).origin;
  const pacing: PacingState = { limit: null, remaining: null, resetAt: null, nextSlotAt: 0 };

  function resolveUrl(req: CrmRequest): URL {
    const url = new URL(/^https?:\/\//i.test(req.url) ? req.url : req.url.replace(/^\//, ''), base);
    for (const [k, v] of Object.entries(req.query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    return url;
  }

  /** Reserves the next start time; concurrent callers get successive slots, not the same one. */
  function reserveSlot(): number {
    const now = Date.now();
    let slot = Math.max(now, pacing.nextSlotAt);
    let spacing = minIntervalMs;
    if (pacingOn && pacing.remaining !== null && pacing.resetAt !== null) {
      if (pacing.resetAt <= slot) {
        // The window has rolled over; the next answer will tell us the new budget.
        pacing.remaining = null;
      } else if (pacing.remaining <= 0) {
        slot = pacing.resetAt;
        pacing.remaining = null;
      } else {
        // Burst while more than half the budget is left; below that, spread what remains evenly
        // over the rest of the window, so a long run never reaches zero and never sees a 429.
        const half = Math.ceil((pacing.limit ?? pacing.remaining * 2) / 2);
        if (pacing.remaining <= half) spacing = Math.max(spacing, (pacing.resetAt - slot) / pacing.remaining);
        pacing.remaining -= 1;
      }
    }
    pacing.nextSlotAt = slot + spacing;
    return slot - now;
  }

  function observeRateHeaders(headers: Headers): void {
    const limit = Number(headers.get('x-ratelimit-limit'));
    const remaining = headers.get('x-ratelimit-remaining');
    const reset = Number(headers.get('x-ratelimit-reset'));
    if (remaining === null || !Number.isFinite(Number(remaining))) return;
    if (Number.isFinite(limit) && limit > 0) pacing.limit = limit;
    // Clio sends the reset as unix seconds; others send seconds until the reset. A value past
    // 10^9 can only be an epoch, on the CRM's clock: read against its Date header when the two
    // clocks are seconds apart, or a host minutes behind waits minutes for each window (and one
    // minutes ahead stops pacing and meets 429s). Date has whole seconds, so closer is left be.
    const serverNow = Date.parse(headers.get('date') ?? '');
    const skew = Number.isFinite(serverNow) && Math.abs(serverNow - Date.now()) > 2_000 ? serverNow - Date.now() : 0;
    const resetAt = Number.isFinite(reset) && reset > 0 ? (reset > 1e9 ? reset * 1000 - skew : Date.now() + reset * 1000) : null;
    // Answers arrive out of order under concurrency: keep the lowest remaining for a window.
    if (pacing.resetAt !== null && resetAt !== null && Math.abs(resetAt - pacing.resetAt) < 1000 && pacing.remaining !== null) {
      pacing.remaining = Math.min(pacing.remaining, Number(remaining));
    } else {
      pacing.remaining = Number(remaining);
    }
    pacing.resetAt = resetAt;
  }

  function retryAfterMs(headers: Headers): number | null {
    const raw = headers.get('retry-after');
    if (raw === null) return null;
    const n = Number(raw);
    if (Number.isFinite(n)) return Math.max(0, retryAfterUnit === 'seconds' ? n * 1000 : n);
    const at = Date.parse(raw);
    return Number.isFinite(at) ? Math.max(0, at - Date.now()) : null;
  }

  function backoffMs(attempt: number): number {
    return Math.random() * Math.min(retryMaxMs, retryBaseMs * 2 ** attempt);
  }

  async function wait(ms: number, signal: AbortSignal | undefined, url: string): Promise<void> {
    if (ms <= 0) return;
    try {
      await sleep(ms, undefined, signal ? { signal } : undefined);
    } catch (err) {
      throw new CrmHttpError('CRM_ABORTED', `Call to ${url} aborted`, url, 0, undefined, { cause: err });
    }
  }

  async function request<T>(req: CrmRequest): Promise<CrmResponse<T>> {
    let method = (req.method ?? 'GET').toUpperCase();
    let url = resolveUrl(req);
    let shownUrl = safeUrl(url.toString());
    const useAuth = (req.auth ?? true) && options.tokens !== undefined;
    // The access token goes to the connection's own host only, whatever a CRM's answer links to.
    if (useAuth && url.origin !== baseOrigin) {
      throw new CrmHttpError('CRM_OTHER_ORIGIN', `${method} ${shownUrl}: not on ${baseOrigin}, the connection's host; the access token is not sent elsewhere`, shownUrl, 0);
    }
    const idempotent = req.idempotent ?? !(method === 'POST' || method === 'PATCH');
    const expect = req.expect ?? 'json';

    const headers: Record<string, string> = { accept: 'application/json', ...(options.userAgent ? { 'user-agent': options.userAgent } : {}), ...req.headers };
    let body: string | undefined;
    // A content type the caller set wins (JSON:API wants application/vnd.api+json).
    const typed = Object.keys(headers).some((h) => h.toLowerCase() === 'content-type');
    if (req.json !== undefined) {
      body = JSON.stringify(req.json);
      if (!typed) headers['content-type'] = 'application/json';
    } else if (req.form !== undefined) {
      body = new URLSearchParams(req.form).toString();
      if (!typed) headers['content-type'] = 'application/x-www-form-urlencoded';
    }

    let token = useAuth ? await options.tokens!.getAccessToken(req.signal) : undefined;
    let replayedAfter401 = false;
    let attempt = 0;
    let redirects = 0;
    for (;;) {
      await wait(reserveSlot(), req.signal, shownUrl);
      if (req.signal?.aborted) throw new CrmHttpError('CRM_ABORTED', `Call to ${shownUrl} aborted`, shownUrl, 0);
      const timeout = AbortSignal.timeout(timeoutMs);
      const signal = req.signal ? AbortSignal.any([req.signal, timeout]) : timeout;
      const sentHeaders = token === undefined ? headers : { ...headers, authorization: `Bearer ${token}` };

      let res: Response;
      try {
        res = await fetch(url, { method, headers: sentHeaders, ...(body === undefined ? {} : { body }), signal, redirect: 'manual' });
      } catch (err) {
        if (req.signal?.aborted) throw new CrmHttpError('CRM_ABORTED', `Call to ${shownUrl} aborted`, shownUrl, 0, undefined, { cause: err });
        const timedOut = timeout.aborted;
        const code = networkCode(err);
        if (!timedOut && code === undefined && err instanceof TypeError) {
          // fetch refused to build the request: no retry can send it. Its message quotes the
          // offending header value, which may be the token, so only the rest of it is kept.
          const reason = err.message.replace(/"[^]*"/g, '"…"');
          throw new CrmHttpError('CRM_INVALID_REQUEST', `${method} ${shownUrl}: the request could not be sent (${reason}); is a token or header value pasted with quotes, a line break or an invisible character?`, shownUrl, 0);
        }
        const retryable = timedOut ? idempotent : NETWORK_RETRYABLE.has(code ?? '') && (idempotent || NEVER_SENT.has(code ?? ''));
        if (retryable && attempt < maxRetries) {
          const delay = backoffMs(attempt++);
          log?.warn({ url: shownUrl, method, attempt, delayMs: Math.round(delay), reason: timedOut ? 'timeout' : code }, 'CRM call failed; retrying');
          await wait(delay, req.signal, shownUrl);
          continue;
        }
        if (timedOut) throw new CrmHttpError('CRM_TIMEOUT', `${method} ${shownUrl}: no answer within ${timeoutMs} ms (${attempt + 1} attempts)`, shownUrl, 0, undefined, { cause: err });
        throw new CrmHttpError('CRM_UNREACHABLE', `${method} ${shownUrl}: ${code ?? (err as Error).message} (${attempt + 1} attempts)`, shownUrl, 0, undefined, { cause: err });
      }

      observeRateHeaders(res.headers);

      // Redirects are followed here, not by fetch: fetch follows one to another host without the
      // token (and with a create's body), and that host's 401 read as our token refused, which
      // spent a refresh or declared a static token dead when the base URL was what was wrong.
      const location = REDIRECTS.has(res.status) ? res.headers.get('location') : null;
      if (location !== null) {
        await res.body?.cancel();
        const to = new URL(location, url);
        if (token !== undefined && to.origin !== baseOrigin) {
          throw new CrmHttpError('CRM_OTHER_ORIGIN', `${method} ${shownUrl} redirects to ${safeUrl(to.toString())}, not on ${baseOrigin}, the connection's host; the access token is not sent elsewhere (should the base URL be ${to.origin}?)`, shownUrl, res.status);
        }
        // Nor a body: a token request's carries the refresh token and the client secret.
        if (body !== undefined && to.origin !== url.origin) {
          throw new CrmHttpError('CRM_OTHER_ORIGIN', `${method} ${shownUrl} redirects to ${safeUrl(to.toString())}, on another host; what it sends is not sent elsewhere (should the URL be on ${to.origin}?)`, shownUrl, res.status);
        }
        if (++redirects > MAX_REDIRECTS) throw new CrmHttpError('CRM_HTTP_STATUS', `${method} ${shownUrl}: more than ${MAX_REDIRECTS} redirects`, shownUrl, res.status);
        // As fetch does: a 303, or a 301/302 answering a POST, is followed by a GET without the body.
        if (res.status === 303 || ((res.status === 301 || res.status === 302) && method === 'POST')) {
          method = 'GET';
          body = undefined;
          for (const h of Object.keys(headers)) if (h.toLowerCase() === 'content-type') delete headers[h];
        }
        url = to;
        shownUrl = safeUrl(url.toString());
        continue;
      }

      if (res.status === 401 && token !== undefined) {
        await res.body?.cancel();
        if (replayedAfter401) throw new CrmHttpError('CRM_UNAUTHORIZED', `${method} ${shownUrl}: 401 again after refreshing the token`, shownUrl, 401);
        replayedAfter401 = true;
        log?.debug({ url: shownUrl, method }, 'CRM answered 401; refreshing the token once and replaying');
        token = await options.tokens!.handleUnauthorized(token, req.signal);
        continue;
      }

      if (res.status === 429) {
        const after = retryAfterMs(res.headers);
        await res.body?.cancel();
        if (after !== null && after > maxRetryAfterMs) {
          throw new CrmHttpError('CRM_RATE_LIMITED', `${method} ${shownUrl}: 429 with Retry-After ${after} ms, longer than allowed`, shownUrl, 429, undefined, { retryAfterMs: after });
        }
        if (attempt < maxRetries) {
          const delay = after ?? backoffMs(attempt);
          attempt++;
          // Every request through this client waits, not only this one: the budget is per token.
          pacing.nextSlotAt = Math.max(pacing.nextSlotAt, Date.now() + delay);
          log?.warn({ url: shownUrl, method, attempt, delayMs: Math.round(delay) }, 'CRM rate limit hit (429); waiting');
          continue;
        }
        throw new CrmHttpError('CRM_RATE_LIMITED', `${method} ${shownUrl}: still 429 after ${attempt + 1} attempts`, shownUrl, 429, undefined, { retryAfterMs: after ?? undefined });
      }

      // A CRM down for maintenance may ask for hours: that fails the call (as on a 429) rather
      // than hold the run, its lease and a shutdown for as long.
      const serverAsked = res.status >= 500 ? retryAfterMs(res.headers) : null;
      if (res.status >= 500 && idempotent && attempt < maxRetries && (serverAsked === null || serverAsked <= maxRetryAfterMs)) {
        await res.body?.cancel();
        const delay = Math.max(backoffMs(attempt), serverAsked ?? 0);
        attempt++;
        log?.warn({ url: shownUrl, method, status: res.status, attempt, delayMs: Math.round(delay) }, 'CRM answered 5xx; retrying');
        await wait(delay, req.signal, shownUrl);
        continue;
      }

      let parsed: unknown;
      let text = '';
      if (expect === 'none') {
        // Nothing to read: the body is dropped, not left holding the connection until collected.
        await res.body?.cancel().catch(() => {});
      } else {
        // Too large is never retried: the same call would get the same answer.
        const limit = describeBytes(maxResponseBytes);
        const tooLarge = (what: string) => new CrmHttpError('CRM_RESPONSE_TOO_LARGE', `${method} ${shownUrl} answered ${res.status} ${what}`, shownUrl, res.status);
        // Refused unread. A compressed answer declares its compressed length, and JSON inflates to more.
        const declared = Number(res.headers.get('content-length'));
        if (declared > maxResponseBytes) {
          await res.body?.cancel().catch(() => {});
          throw tooLarge(`declaring a body of ${describeBytes(declared)}, more than the ${limit} the bridge reads of an answer`);
        }
        let read: string | null;
        try {
          read = await readText(res, maxResponseBytes);
        } catch (err) {
          if (req.signal?.aborted) throw new CrmHttpError('CRM_ABORTED', `Call to ${shownUrl} aborted`, shownUrl, res.status, undefined, { cause: err });
          // The body was cut off mid-way: a reset, retried like one when that is safe.
          if (idempotent && attempt < maxRetries && !req.signal?.aborted) {
            await wait(backoffMs(attempt++), req.signal, shownUrl);
            continue;
          }
          throw new CrmHttpError('CRM_UNREACHABLE', `${method} ${shownUrl}: the answer was cut off`, shownUrl, res.status, undefined, { cause: err });
        }
        if (read === null) throw tooLarge(`with a body going on past ${limit}, the most the bridge reads of an answer`);
        text = read;
      }
      const ok = (res.status >= 200 && res.status < 300) || (req.acceptStatus ?? []).includes(res.status);
      const contentType = res.headers.get('content-type') ?? '';
      if (expect === 'json' && text !== '') {
        try {
          // A NUL or a lone surrogate in a record is read as U+FFFD: the database cannot store it.
          parsed = parseStorableJson(text);
        } catch {
          const kind = /html/i.test(contentType) || /^\s*</.test(text) ? 'an HTML page' : `a non-JSON answer (${contentType || 'no content type'})`;
          throw new CrmHttpError(
            'CRM_NOT_JSON',
            `${method} ${shownUrl} answered ${res.status} with ${kind} where JSON was expected; is the base URL right?`,
            shownUrl,
            res.status,
            text.slice(0, 200),
            { retryAfterMs: serverAsked ?? undefined },
          );
        }
      } else if (expect === 'text') {
        parsed = text;
      }
      if (!ok) {
        throw new CrmHttpError('CRM_HTTP_STATUS', `${method} ${shownUrl} answered ${res.status}${describeBody(parsed)}`, shownUrl, res.status, parsed, { retryAfterMs: serverAsked ?? undefined });
      }
      return { status: res.status, headers: res.headers, body: parsed as T, url: shownUrl };
    }
  }

  return { baseUrl: options.baseUrl, request };
}

/**
 * The body as text, read as it arrives and counted after any content decoding (a small
 * compressed answer that inflates is stopped too); null as soon as it passes `limit`, its rest
 * unread and the connection dropped. A body cut off mid-way rejects, as `res.text()` does.
 */
async function readText(res: Response, limit: number): Promise<string | null> {
  if (res.body === null) return '';
  const reader = res.body.getReader();
  const chunks: Uint8Array[] = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    received += value.byteLength;
    if (received > limit) {
      await reader.cancel().catch(() => {});
      return null;
    }
    chunks.push(value);
  }
  // As `res.text()` decodes: UTF-8, a leading BOM dropped, malformed bytes read as U+FFFD.
  return new TextDecoder().decode(Buffer.concat(chunks, received));
}

/** `16 MiB`, `64 KiB`, or exact (`16,777,217 bytes`), so a size just over a limit never reads as equal to it. */
function describeBytes(n: number): string {
  if (n > 0 && n % (1024 * 1024) === 0) return `${n / (1024 * 1024)} MiB`;
  if (n > 0 && n % 1024 === 0) return `${n / 1024} KiB`;
  return `${n.toLocaleString('en-US')} bytes`;
}

function networkCode(err: unknown): string | undefined {
  // fetch wraps the socket error: TypeError('fetch failed', {cause: {code: 'ECONNRESET'}}).
  let current: unknown = err;
  for (let i = 0; i < 4 && current !== null && typeof current === 'object'; i++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === 'string') return code;
    current = (current as { cause?: unknown }).cause;
  }
  if (err instanceof TypeError && err.message === 'fetch failed') return 'ECONNRESET';
  return undefined;
}

/** A short, token-free reading of an error body for the message. */
function describeBody(body: unknown): string {
  if (body === undefined || body === null || body === '') return '';
  const text = typeof body === 'string' ? body : JSON.stringify(body);
  const cleaned = text.replace(/("(?:access_token|refresh_token|token|client_secret)"\s*:\s*)"[^"]*"/gi, '$1"[Redacted]"');
  return `: ${cleaned.slice(0, 300)}`;
}
