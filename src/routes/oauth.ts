import { randomBytes, randomUUID } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { TokenEndpointError, TokenRequestRejectedError, type TokenManager } from '../crm/token-manager.js';
import { acquireLease, pruneExpiredLeases } from '../db/queries/leases.js';
import { BadRequestError, NotFoundError } from '../errors.js';

/**
 * The authorization-code bootstrap in a browser: `/start` sends the operator to the CRM's
 * consent page, `/callback` receives the code. Both replace the stored grant, so `/start` is an
 * operator action behind the admin credential: otherwise anyone who can reach the bridge could
 * consent with their own CRM account and have the bridge poll it and write leads into it. The
 * callback cannot carry that credential (the CRM redirects the browser there), so it completes
 * only a flow an authenticated `/start` began: `state` is signed (connection, expiry, redirect
 * URI, nonce) so no table is needed, its nonce must match a cookie set by `/start` in the same
 * browser (RFC 6749 §10.12), and it is taken once.
 */

const STATE_LIFETIME_MS = 10 * 60_000;

interface StatePayload {
  c: string;
  n: string;
  e: number;
  r: string;
}

const escapeHtml = (s: string): string =>
  s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c] ?? c);

function page(reply: FastifyReply, status: number, title: string, message: string): FastifyReply {
  return reply
    .code(status)
    .type('text/html; charset=utf-8')
    .header('cache-control', 'no-store')
    .send(`<!doctype html><html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head><body><h1>${escapeHtml(title)}</h1><p>${escapeHtml(message)}</p></body></html>`);
}

const connectionParams = { type: 'object', properties: { connection: { type: 'string', maxLength: 63 } }, required: ['connection'] } as const;

const startSchema = {
  summary: "Sends the operator's browser to the CRM's consent page (302) to authorise a connection (admin bearer or basic login with ADMIN_TOKEN as the password)",
  tags: ['oauth'],
  security: [{ admin: [] }, { adminBasic: [] }],
  params: connectionParams,
} as const;

const callbackSchema = {
  summary: 'Where the CRM sends the browser back with an authorization code; a small HTML page, or 400 problem+json when its state is not one an authenticated /start gave this browser, or was used',
  tags: ['oauth'],
  params: connectionParams,
  // Open: the handler decides on code, state and error itself. A state or cookie that does not
  // hold is refused with problem+json; what the CRM answered to a genuine flow is a page.
  querystring: {
    type: 'object',
    properties: { code: { type: 'string' }, state: { type: 'string' }, error: { type: 'string' }, error_description: { type: 'string' } },
    additionalProperties: true,
  },
} as const;

const cookieName = (connectionId: string) => `crm_bridge_oauth_${connectionId.replace(/[^a-z0-9_]/g, '_')}`;

function readCookie(request: FastifyRequest, name: string): string | undefined {
  for (const part of (request.headers.cookie ?? '').split(';')) {
    const eq = part.indexOf('=');
    if (eq > 0 && part.slice(0, eq).trim() === name) return decodeURIComponent(part.slice(eq + 1).trim());
  }
  return undefined;
}

export default async function oauthRoutes(app: FastifyInstance) {
  const oauthManager = (connectionId: string): TokenManager => {
    const manager = app.tokens.manager(connectionId);
    if (!manager || manager.auth.type !== 'oauth2') throw new NotFoundError(`No connection ${connectionId} with OAuth2 authorization-code auth.`);
    return manager;
  };

  app.get<{ Params: { connection: string } }>('/oauth/:connection/start', { onRequest: app.requireAdmin, schema: startSchema }, async (request, reply) => {
    const id = request.params.connection;
    const manager = oauthManager(id);
    const cipher = app.tokens.cipher!;
    const configured = manager.auth.type === 'oauth2' ? manager.auth.redirectUri : undefined;
    const redirectUri = configured ?? `${request.protocol}://${request.host}/oauth/${encodeURIComponent(id)}/callback`;
    const nonce = randomBytes(16).toString('base64url');
    const state = cipher.sign(JSON.stringify({ c: id, n: nonce, e: Date.now() + STATE_LIFETIME_MS, r: redirectUri } satisfies StatePayload));
    const secure = new URL(redirectUri).protocol === 'https:' ? '; Secure' : '';
    return reply
      .header('set-cookie', `${cookieName(id)}=${nonce}; Path=/oauth/${encodeURIComponent(id)}; Max-Age=${STATE_LIFETIME_MS / 1000}; HttpOnly; SameSite=Lax${secure}`)
      .header('cache-control', 'no-store')
      .redirect(manager.authorizationUrl({ state, redirectUri }));
  });

  app.get<{ Params: { connection: string }; Querystring: Record<string, string | undefined> }>('/oauth/:connection/callback', { schema: callbackSchema }, async (request, reply) => {
    const id = request.params.connection;
    const manager = oauthManager(id);
    const q = request.query;
    const clearCookie = `${cookieName(id)}=; Path=/oauth/${encodeURIComponent(id)}; Max-Age=0; HttpOnly; SameSite=Lax`;
    reply.header('set-cookie', clearCookie);

    const refuse = (code: string, detail: string) => {
      request.log.warn({ connection: id, code }, 'OAuth callback refused');
      return new BadRequestError(`${detail} Start again from /oauth/${id}/start.`, code);
    };

    const verified = q.state === undefined ? null : app.tokens.cipher!.verify(q.state);
    const payload = verified === null ? null : (JSON.parse(verified) as StatePayload);
    if (payload === null || payload.c !== id) throw refuse('OAUTH_STATE_INVALID', 'The state parameter is missing or was not issued by this bridge for this connection.');
    if (payload.e < Date.now()) throw refuse('OAUTH_STATE_EXPIRED', 'The authorisation took too long.');
    if (readCookie(request, cookieName(id)) !== payload.n) {
      throw refuse('OAUTH_STATE_NOT_THIS_BROWSER', 'This callback does not belong to an authorisation started in this browser.');
    }
    if (q.error !== undefined) {
      return page(reply, 400, 'Authorisation refused', `The CRM answered ${q.error}${q.error_description ? `: ${q.error_description}` : ''}.`);
    }
    if (!q.code) return page(reply, 400, 'Authorisation failed', 'The CRM sent no authorization code.');
    // A state is taken once, as a lease held for its whole lifetime by this callback alone: a
    // replay (with the cookie copied) finds it held, on any replica, and reaches neither the CRM
    // nor the stored grant. Taken before the exchange, so a failed one means starting again.
    if (!(await acquireLease(app.db, `oauth-state:${payload.n}`, randomUUID(), STATE_LIFETIME_MS))) {
      throw refuse('OAUTH_STATE_USED', 'This authorisation has already been used.');
    }
    // States taken by earlier callbacks and expired since: nothing can use them any more.
    await pruneExpiredLeases(app.db, 'oauth-state:');

    try {
      await manager.exchangeCode(q.code, payload.r);
    } catch (err) {
      if (err instanceof TokenEndpointError) return page(reply, 503, 'CRM unavailable', `${err.message}. Start again in a moment.`);
      if (err instanceof TokenRequestRejectedError) return page(reply, 400, 'Authorisation failed', err.message);
      throw err;
    }
    request.log.info({ connection: id }, 'connection authorised through the browser');
    // What waited for the authorisation runs now, not at its next interval.
    app.poller.wake(id);
    app.outboundWriters.get(id)?.wake();
    return page(reply, 200, 'Connected', `crm-bridge is connected to the CRM for "${id}". You can close this window.`);
  });
}
