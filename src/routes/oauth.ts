import { randomBytes } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { TokenEndpointError, TokenRequestRejectedError, type TokenManager } from '../crm/token-manager.js';
import { NotFoundError } from '../errors.js';

/**
 * The authorization-code bootstrap in a browser: `/start` sends the operator to the CRM's
 * consent page, `/callback` receives the code. `state` is signed (connection, expiry, redirect
 * URI, nonce) so no table is needed, and its nonce must match a cookie set by `/start` in the
 * same browser, so a callback URL crafted elsewhere cannot attach someone else's CRM account
 * (RFC 6749 §10.12).
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
  summary: "Sends the operator's browser to the CRM's consent page (302) to authorise a connection",
  tags: ['oauth'],
  params: connectionParams,
} as const;

const callbackSchema = {
  summary: 'Where the CRM sends the browser back with an authorization code; answers a small HTML page',
  tags: ['oauth'],
  params: connectionParams,
  // Open: the handler decides on code, state and error itself and answers every case with a page.
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

  app.get<{ Params: { connection: string } }>('/oauth/:connection/start', { schema: startSchema }, async (request, reply) => {
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

    const verified = q.state === undefined ? null : app.tokens.cipher!.verify(q.state);
    const payload = verified === null ? null : (JSON.parse(verified) as StatePayload);
    if (payload === null || payload.c !== id) return page(reply, 400, 'Authorisation failed', 'The state parameter is missing or invalid. Start again from /oauth/' + id + '/start.');
    if (payload.e < Date.now()) return page(reply, 400, 'Authorisation expired', 'The authorisation took too long. Start again from /oauth/' + id + '/start.');
    if (readCookie(request, cookieName(id)) !== payload.n) {
      return page(reply, 400, 'Authorisation failed', 'This callback does not belong to an authorisation started in this browser. Start again from /oauth/' + id + '/start.');
    }
    if (q.error !== undefined) {
      return page(reply, 400, 'Authorisation refused', `The CRM answered ${q.error}${q.error_description ? `: ${q.error_description}` : ''}.`);
    }
    if (!q.code) return page(reply, 400, 'Authorisation failed', 'The CRM sent no authorization code.');

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
