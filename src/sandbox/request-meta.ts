// Per-request notes (who called, which fault was injected) kept beside the request rather than
// as a Fastify decoration, so the sandbox adds nothing to the bridge's FastifyRequest type.
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { RequestAuth, RequestLogEntry } from './request-log.js';
import type { SandboxState } from './state.js';

interface RequestMeta {
  auth: RequestAuth;
  fault?: NonNullable<RequestLogEntry['fault']>;
  /** Kept for record writes only; the token endpoint's form (secrets, refresh tokens) never is. */
  body?: unknown;
  logged?: boolean;
}

const metas = new WeakMap<object, RequestMeta>();

export function requestMeta(req: FastifyRequest): RequestMeta {
  let meta = metas.get(req.raw);
  if (!meta) {
    meta = { auth: { scheme: 'none' } };
    metas.set(req.raw, meta);
  }
  return meta;
}

export function isLoggedPath(url: string): boolean {
  return !url.startsWith('/_sandbox');
}

export function logRequest(state: SandboxState, req: FastifyRequest, status: number): void {
  const meta = requestMeta(req);
  if (meta.logged || !isLoggedPath(req.url)) return;
  meta.logged = true;
  const q = req.url.indexOf('?');
  const path = q < 0 ? req.url : req.url.slice(0, q);
  state.requestLog.add({
    at: new Date(state.clock.now()).toISOString(),
    method: req.method,
    path,
    query: { ...(req.query as Record<string, unknown>) },
    auth: meta.auth,
    status,
    ...(meta.fault ? { fault: meta.fault } : {}),
    ...(meta.body === undefined ? {} : { body: meta.body }),
  });
}

/** Reads `Authorization: Bearer ...` and records which token it was, never the token itself. */
export function authenticateBearer(state: SandboxState, req: FastifyRequest): ReturnType<SandboxState['oauth']['checkAccess']> {
  const header = req.headers.authorization;
  const m = header === undefined ? null : /^Bearer\s+(.+)$/i.exec(header);
  const check = state.oauth.checkAccess(m?.[1]?.trim());
  const stateName = check.ok ? 'valid' : check.reason;
  requestMeta(req).auth = {
    scheme: m ? 'bearer' : 'none',
    state: stateName,
    ...(check.tokenId ? { tokenId: check.tokenId } : {}),
    ...(check.grantId ? { grantId: check.grantId } : {}),
  };
  return check;
}

export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Latency, resets and 5xx, drawn from the seeded fault generator. Returns true when the request
 * has been answered (or its socket destroyed) and the handler must not run.
 */
export async function injectFaults(state: SandboxState, req: FastifyRequest, reply: FastifyReply, phase: 'before-auth' | 'after-auth'): Promise<boolean> {
  const sw = state.switches;
  if (phase === 'before-auth') {
    if (sw.latencyMs > 0) await sleep(sw.latencyMs);
    if (sw.resetRate > 0 && state.faultRng() < sw.resetRate) {
      requestMeta(req).fault = 'reset';
      logRequest(state, req, 0);
      reply.hijack();
      req.raw.socket.destroy();
      return true;
    }
    return false;
  }
  if (sw.errorRate > 0 && state.faultRng() < sw.errorRate) {
    requestMeta(req).fault = 'error';
    const status = state.faultRng() < 0.5 ? 500 : 503;
    await reply.code(status).send({ error: { type: 'InternalServerError', message: 'Something went wrong on our end.' } });
    return true;
  }
  return false;
}

export interface RateWindow {
  start: number;
  count: number;
}

/**
 * Fixed window per key. Sets X-RateLimit-* on the reply (Reset in unix seconds, as Clio does)
 * and, when over the limit, answers 429 with Retry-After in seconds (or ms for HubSpot).
 */
export async function applyRateLimit(
  state: SandboxState,
  windows: Map<string, RateWindow>,
  key: string,
  limit: { limit: number; windowSeconds: number } | null,
  req: FastifyRequest,
  reply: FastifyReply,
  opts: { retryAfterUnit: 'seconds' | 'milliseconds'; body: unknown; headers: boolean },
): Promise<boolean> {
  if (!limit) return false;
  const now = state.clock.now();
  const windowMs = limit.windowSeconds * 1000;
  let w = windows.get(key);
  if (!w || now >= w.start + windowMs) {
    w = { start: now, count: 0 };
    windows.set(key, w);
  }
  w.count++;
  const resetAt = w.start + windowMs;
  if (opts.headers) {
    reply.header('X-RateLimit-Limit', String(limit.limit));
    reply.header('X-RateLimit-Remaining', String(Math.max(0, limit.limit - w.count)));
    reply.header('X-RateLimit-Reset', String(Math.ceil(resetAt / 1000)));
  }
  if (w.count <= limit.limit) return false;
  requestMeta(req).fault = 'rate_limited';
  const waitMs = Math.max(0, resetAt - now);
  reply.header('Retry-After', opts.retryAfterUnit === 'seconds' ? String(Math.max(1, Math.ceil(waitMs / 1000))) : String(Math.max(1, waitMs)));
  await reply.code(429).send(opts.body);
  return true;
}
